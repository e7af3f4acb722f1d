"""Where things go: data to stdout, everything else (progress, warnings, errors) to stderr,
so they never pollute what a pipeline parses."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..errors import EXIT_OK, EXIT_PARTIAL, InputNotFound, UsageError


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


_batch_size: int | None = None


def set_batch_size(size: int) -> None:
    """The batch size a command runs with, for the out-of-memory hint."""
    global _batch_size
    _batch_size = size


def batch_size() -> int | None:
    return _batch_size


# A message is text, never markup: a path like `photos/[b]/a.jpg` or an install hint like
# `deit-cli[onnx]` prints as it is (and `[/x]` in a path would otherwise raise in rich).
def error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True) if _fancy() else _plain("error: " + message)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", markup=True) if _fancy() else _plain("warning: " + message)


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


def choose_format(
    fmt: Any,
    json_: bool = False,
    *,
    per_item: bool,
    allowed: tuple[str, ...] = ("table", "json", "jsonl", "csv", "tsv"),
) -> str:
    """The output format of a command: what --format (or --json) says; otherwise a table on
    a terminal and, when stdout is piped, JSON lines for per-item records (`per_item`) or
    one JSON document for a summary."""
    name = getattr(fmt, "value", fmt)
    if json_:
        if name not in (None, "json"):
            raise UsageError(f"--json and --format {name} disagree; give one of them")
        name = "json"
    if name is None:
        name = "table" if stdout_is_terminal() else ("jsonl" if per_item else "json")
    if name not in allowed:
        raise UsageError(f"--format {name} is not available here; use {', '.join(allowed)}")
    return name


def write_records(records: Iterable[dict], fmt: str, *, fieldnames: list[str] | None = None) -> None:
    """Records on stdout as `fmt` (json, jsonl, csv or tsv), each flushed as it comes."""
    if fmt == "jsonl":
        for rec in records:
            write_jsonl(rec)
    elif fmt == "json":
        write_json_array(records)
    elif fmt in ("csv", "tsv"):
        write_rows(records, delimiter="," if fmt == "csv" else "\t", fieldnames=fieldnames)
    else:
        raise ValueError(f"not a record format: {fmt!r}")


def write_document(obj: Any, fmt: str) -> None:
    """One summary on stdout: indented JSON (`json`) or one line (`jsonl`)."""
    if fmt == "jsonl":
        write_jsonl(obj)
    elif fmt == "json":
        write_json(obj)
    else:
        raise ValueError(f"not a document format: {fmt!r}")


def write_json_array(records: Iterable[dict]) -> None:
    """A JSON array streamed one record per line, so memory stays flat however many."""
    out = sys.stdout
    first = True
    for rec in records:
        out.write(("[\n  " if first else ",\n  ") + json.dumps(rec, ensure_ascii=False))
        out.flush()
        first = False
    out.write("[]\n" if first else "\n]\n")
    out.flush()


def write_rows(rows: Iterable[dict], *, delimiter: str = ",", fieldnames: list[str] | None = None) -> None:
    """CSV/TSV with a header, streamed."""
    writer = None
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(
                sys.stdout,
                fieldnames=fieldnames or list(row),
                delimiter=delimiter,
                lineterminator="\n",
                extrasaction="ignore",
            )
            writer.writeheader()
        writer.writerow({k: _cell(v) for k, v in row.items()})
        sys.stdout.flush()


def _cell(v: Any) -> Any:
    # Lists and dicts in a CSV cell as JSON, not as Python's repr.
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v


class ProgressBar:
    """Images done, images/s and ETA on stderr (rich, on the stderr console); a no-op when
    not `enabled`. `stop()` ends it early, before a table is printed on the terminal."""

    def __init__(self, enabled: bool, description: str, total: int | None = None) -> None:
        self._progress = None
        self._task = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task) -> Text:
                # Over the whole run: a batch's results arrive in a burst, which fools
                # rich's windowed estimate (thousands of img/s).
                rate = task.completed / task.elapsed if task.elapsed and task.completed else None
                return Text(f"{rate:.1f} img/s" if rate else "", style="progress.data.speed")

        # redirect_stdout would send stdout's data through the stderr console: never.
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            Rate(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            redirect_stdout=False,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def wrap(self, results: Iterable) -> Iterator:
        """`results`, advancing the bar by one for each."""
        if self._progress is None:
            yield from results
            return
        for r in results:
            yield r
            self._progress.advance(self._task)


class Tally:
    """Counts good and failed inputs, prints each failure on stderr, gives the exit code."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0

    def add(self, result) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
            error(result.message)

    def counting(self, results: Iterable) -> Iterator:
        """`results`, each added as it passes."""
        for r in results:
            self.add(r)
            yield r

    def exit_code(self) -> int:
        """0 if all succeeded, 1 if some failed; raises InputNotFound (66) if none succeeded."""
        if self.ok == 0:
            if self.failed == 0:
                raise InputNotFound("no inputs: nothing to process")
            what = "the input" if self.failed == 1 else f"none of the {self.failed} inputs"
            raise InputNotFound(f"{what} could not be read" if self.failed == 1 else f"{what} could be read")
        if self.failed:
            error(f"{self.failed} of {self.ok + self.failed} inputs failed; the others were processed")
            return EXIT_PARTIAL
        return EXIT_OK
