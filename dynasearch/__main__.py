"""`python -m dynasearch` (also what `torchrun -m dynasearch` runs)."""

from .cli import run

if __name__ == "__main__":
    run()
