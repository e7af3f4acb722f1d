"""Where things go: data to stdout, everything else (progress, warnings, errors) to stderr,
so they never pollute what a pipeline parses."""

from __future__ import annotations

import csv
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from rich.console import Console


def _color_system() -> str | None:
    return None if os.environ.get("NO_COLOR") else "auto"


# rich already drops colour when the stream is not a terminal; NO_COLOR is honoured too.
stderr = Console(stderr=True, color_system=_color_system(), highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    # Off a terminal a table must not be cut to 80 columns.
    return Console(color_system=_color_system(), highlight=False, width=None if sys.stdout.isatty() else 200)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def show_progress() -> bool:
    """Progress bars only for a person watching stderr."""
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {message}", markup=True) if _fancy() else _plain("error: " + message)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {message}", markup=True) if _fancy() else _plain("warning: " + message)


def info(message: str) -> None:
    _plain(message)


def _fancy() -> bool:
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR")


def _plain(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """`deit ... | head -1`: when the reader of stdout goes away, stop quietly, exit code 0.

    Needed inside a command because click turns EPIPE into exit code 1 itself, before
    main() sees a BrokenPipeError.
    """
    import typer

    try:
        yield
    except BrokenPipeError:
        # Point stdout at /dev/null so that flushing what is buffered, at exit, is silent.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        raise typer.Exit(0) from None


def write_line(text: str) -> None:
    """One line of data on stdout, flushed so pipelines see it at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def write_json(obj: Any, *, indent: int | None = 2) -> None:
    write_line(json.dumps(obj, indent=indent, ensure_ascii=False))


def write_jsonl(obj: Any) -> None:
    write_line(json.dumps(obj, ensure_ascii=False))


def write_rows(rows: Iterable[dict], *, delimiter: str = ",", fieldnames: list[str] | None = None) -> None:
    """CSV/TSV with a header, streamed."""
    writer = None
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(sys.stdout, fieldnames=fieldnames or list(row), delimiter=delimiter,
                                    lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
        writer.writerow(row)
        sys.stdout.flush()
