"""Wiring: registers one module per command, and `main()`, which turns known errors into
one line on stderr and an exit code (DESIGN.md). DEIT_DEBUG=1 shows tracebacks."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated, Sequence

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    DeiTError,
    OutOfMemory,
    first_line,
    is_out_of_memory,
)
from . import output

# One module per command (cli/X.py); importing one must not import torch.
COMMANDS = (
    "classify",
    "features",
    "evaluate",
    "explain",
    "train",
    "convert",
    "export",
    "push",
    "models",
    "bench",
    "serve",
)


class _Group(TyperGroup):
    def invoke(self, ctx):
        # `deit ... | head -1`: Typer turns EPIPE into exit 1 before main() could see it.
        with output.reader_may_leave():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="deit",
    help="Data-efficient Image Transformers (DeiT): classify, extract features, evaluate, train, explain, convert, export, push to the Hub, serve, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        output.write_line(f"deit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Data-efficient Image Transformers (DeiT) from the command line."""


def _register() -> None:
    import importlib

    for name in COMMANDS:  # a command that fails to import is a broken install: let it show
        importlib.import_module(f"{__package__}.{name}").register(app)


_register()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    output.warn(str(message))


def main(argv: Sequence[str] | None = None) -> int:
    """The `deit` console script."""
    from .._openmp import tune_openmp_env

    tune_openmp_env()  # before any command imports torch: libgomp reads it once, when loaded
    debug = bool(os.environ.get("DEIT_DEBUG"))
    if not debug:
        warnings.showwarning = _show_warning
    command = typer.main.get_command(app)
    reported = False
    try:
        rc = command.main(args=list(argv) if argv is not None else None, prog_name="deit", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        rc = EXIT_INTERRUPTED
    except DeiTError as e:
        if debug:
            raise
        output.error(_with_batch_hint(e).one_line() if isinstance(e, OutOfMemory) else e.one_line())
        rc, reported = e.exit_code, True
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still one line
        if _is_usage_error(e):  # Typer's (vendored click) usage errors: bad flags or arguments
            e.show()
            return e.exit_code
        if debug:
            raise
        if is_out_of_memory(e):
            oom = _with_batch_hint(OutOfMemory("out of memory", batch_size=output.batch_size()))
            output.error(oom.one_line())
            return oom.exit_code
        output.error(
            f"internal error: {type(e).__name__}: {first_line(e, '(no message)')} (this is a bug in deit; "
            "set DEIT_DEBUG=1 to see the traceback and report it)"
        )
        rc = EXIT_INTERNAL
    if rc == EXIT_INTERRUPTED and not debug and not reported:  # Typer turns Ctrl-C into Exit(130) silently
        output.error("interrupted")
    if rc is None:
        rc = 0
    if not isinstance(rc, int):
        rc = EXIT_USAGE
    return rc


def _with_batch_hint(e: OutOfMemory) -> OutOfMemory:
    size = e.batch_size if e.batch_size is not None else output.batch_size()
    if e.hint is None:
        e.hint = f"the batch size was {size}; lower it with --batch-size" if size else "lower --batch-size"
    return e


def _is_usage_error(e: Exception) -> bool:
    # Typer exposes no public class for these; they are the ClickExceptions it raises.
    return callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int)


def run() -> None:
    sys.exit(main())
