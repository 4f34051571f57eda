"""The `dynasearch` command line: a thin typer + rich layer; each command builds a typed config and calls the library."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console

from ..errors import DynasearchError

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

_EXITS = tuple({typer.Exit, getattr(click_exc, "Exit", typer.Exit)})
_ABORTS = tuple({typer.Abort, getattr(click_exc, "Abort", typer.Abort)})


def print_frame(df: object, title: str) -> None:
    """Print a pandas DataFrame as a rich table (numbers to 4 significant digits)."""
    from rich.table import Table

    table = Table(title=title)
    for col in df.columns:  # type: ignore[attr-defined]
        table.add_column(str(col), justify="right")
    for row in df.itertuples(index=False):  # type: ignore[attr-defined]
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def _debug() -> bool:
    """Whether --debug (or DYNASEARCH_DEBUG) asks for tracebacks."""
    return os.environ.get("DYNASEARCH_DEBUG", "") not in ("", "0")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    """Weight-sharing architecture search for Diffusion Transformers."""
    if debug:
        os.environ["DYNASEARCH_DEBUG"] = "1"


_announced = False
"""Whether the running command already printed why it stopped (see :func:`stop`)."""


def stop(message: str | None, code: int) -> typer.Exit:
    """Print `message` (None: nothing, e.g. on DDP ranks other than 0) as the command's one line on stderr and
    return the Exit to raise (e.g. 130 after Ctrl-C)."""
    global _announced
    _announced = True
    if message is not None:
        print(message, file=sys.stderr)
    return typer.Exit(code)


from . import _bench, _demo, _inspect, _report, _sample, _search, _train


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line and exit code 2 (internal errors: 1)."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    debug = "--debug" in args or _debug()
    global _announced
    _announced = False
    try:
        rv = command.main(args=args, prog_name="dynasearch", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer turns Ctrl-C into a returned 130
            if rv == 130 and not _announced:
                print("interrupted", file=sys.stderr)
            return rv
    except _EXITS as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _ABORTS:
        err_console.print("aborted", highlight=False)
        return 130
    except click_exc.ClickException as exc:
        if debug:
            traceback.print_exc()
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = exc.format_message().replace("Value error, ", "")
        value = _offending_value(exc, args)
        if value is not None and repr(value) not in message and f"'{value}'" not in message:
            message = f"{message} (got {value!r})"
        print(f"error: {message}{where}", file=sys.stderr)
        return 2
    except DynasearchError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a TrainingInterrupted says where it stopped and how to resume
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place internal errors become a message
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def _offending_value(exc: Exception, args: list[str]) -> str | None:
    """The command-line text given for the option a BadParameter error is about (typer's message omits it)."""
    param = getattr(exc, "param", None)
    opts = list(getattr(param, "opts", []) or []) + list(getattr(param, "secondary_opts", []) or [])
    for i, arg in enumerate(args):
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1 :]
    return None


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
