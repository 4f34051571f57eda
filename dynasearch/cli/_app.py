"""The typer app every command registers on, its consoles, and the helpers commands share (tables, stop)."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "click_exc", "console", "debug_enabled", "err_console", "print_frame", "state", "stop"]

try:  # recent typer vendors click privately; older releases use click itself
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exc  # type: ignore[no-redef]

app = typer.Typer(
    name="dynasearch",
    help="Weight-sharing architecture search for Diffusion Transformers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)



def print_frame(df: object, title: str) -> None:
    """Print a pandas DataFrame as a rich table (numbers to 4 significant digits)."""
    table = Table(title=title)
    for col in df.columns:  # type: ignore[attr-defined]
        table.add_column(str(col), justify="right")
    for row in df.itertuples(index=False):  # type: ignore[attr-defined]
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def debug_enabled() -> bool:
    """Whether --debug (or DYNASEARCH_DEBUG) asks for tracebacks."""
    return os.environ.get("DYNASEARCH_DEBUG", "") not in ("", "0")


def _print_version(value: bool) -> None:
    """--version: print the package, torch and Python versions, then exit."""
    if value:
        import platform

        import torch

        from ..version import __version__

        console.print(f"dynasearch {__version__} (torch {torch.__version__}, Python {platform.python_version()})",
                      highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Weight-sharing architecture search for Diffusion Transformers."""
    if debug:
        os.environ["DYNASEARCH_DEBUG"] = "1"


class _State:
    """What the running command already said: whether it printed why it stopped (see :func:`stop`)."""

    announced = False


state = _State()


def stop(message: str | None, code: int) -> typer.Exit:
    """Print `message` (None: nothing, e.g. on DDP ranks other than 0) as the command's one line on stderr and
    return the Exit to raise (e.g. 130 after Ctrl-C)."""
    state.announced = True
    if message is not None:
        print(message, file=sys.stderr)
    return typer.Exit(code)
