"""The `dynasearch` command line: a thin typer + rich layer; each command builds a typed config and calls the
library."""

from __future__ import annotations

import sys
import traceback
import warnings

import typer

from .. import restore_sigint
from ..checks import disk_full, is_disk_full
from ..errors import DynasearchError
from ._app import app, click_exc, debug_enabled, err_console, state

_EXITS = tuple({typer.Exit, getattr(click_exc, "Exit", typer.Exit)})
_ABORTS = tuple({typer.Abort, getattr(click_exc, "Abort", typer.Abort)})

from . import _bench, _demo, _export, _finetune, _inspect, _latents, _report, _sample, _search, _train  # noqa: F401, E402  (register commands)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line and exit code 2 (internal errors: 1)."""
    restore_sigint()  # every import is done: Ctrl-C is the command's to handle from here
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    debug = "--debug" in args or debug_enabled()
    state.announced = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code = _run(command, args, debug)
    if code == 0:  # a failed command's one line stands alone; a finished one still tells the user's warnings
        for w in caught:
            if not issubclass(w.category, _LIBRARY_NOISE) and w.category.__name__ != "ExperimentalWarning":
                print(f"warning: {w.message}", file=sys.stderr)
    return code


_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning, ResourceWarning)
"""Warnings meant for the developers of a library (deprecations and the like), not for a user of the command."""


def _run(command: typer.core.TyperGroup, args: list[str], debug: bool) -> int:
    """Run the click command on `args`; the exit code, with every error turned into its one line."""
    try:
        rv = command.main(args=args, prog_name="dynasearch", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer turns Ctrl-C into a returned 130
            if rv == 130 and not state.announced:
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
    except Exception as exc:  # the one place internal errors become a message
        if is_disk_full(exc):  # a writer without its own guard: still the user's full disk, one line
            if debug:
                traceback.print_exc()
            print(f"error: {disk_full(None, exc)}", file=sys.stderr)
            return 2
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def _offending_value(exc: Exception, args: list[str]) -> str | None:
    """The command-line text given for the option a BadParameter error is about (typer's message omits it)."""
    param = getattr(exc, "param", None)
    opts = list(getattr(param, "opts", []) or []) + list(getattr(param, "secondary_opts", []) or [])
    for i, arg in reversed(list(enumerate(args))):  # click keeps the last value of an option given twice
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1 :]
    return None


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
