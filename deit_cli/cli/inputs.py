"""What `classify` and `extract-features` share: the image-input options, reading the
inputs (sharded under torchrun), the progress bar, and the exit status of a run.

Importing this module must not import torch (`--help` stays fast): the engine, the images
layer and torch are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import EXIT_OK, EXIT_PARTIAL, InputNotFound, UsageError
from . import output

if TYPE_CHECKING:
    from ..engine import ImageOptions

InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Image files, directories (recursive), glob patterns, http(s) URLs, or - to read paths from stdin.",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per model call.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-j", min=0, help="Decoding threads (default: min(8, CPUs); 0: none).")
]
CropPctOpt = Annotated[
    float | None, typer.Option("--crop-pct", help="Center-crop ratio (default: the model's, 0.875).")
]


class Resize(str, Enum):
    shorter = "shorter"
    squash = "squash"


ResizeOpt = Annotated[
    Resize | None,
    typer.Option(
        "--resize",
        help="shorter: shorter side to size/crop-pct, aspect kept (the original DeiT eval); "
        "squash: both sides, as transformers' DeiTImageProcessor.",
    ),
]
NoExifOpt = Annotated[bool, typer.Option("--no-exif", help="Ignore EXIF orientation.")]
AllowTruncatedOpt = Annotated[bool, typer.Option("--allow-truncated", help="Decode what is there of truncated files.")]
NullOpt = Annotated[bool, typer.Option("-0", "--null", help="Paths on stdin are NUL-separated (find -print0).")]


def image_options(
    batch_size: int, workers: int | None, crop_pct: float | None, resize: Resize | str | None, no_exif: bool,
    allow_truncated: bool,
) -> ImageOptions:  # fmt: skip
    from ..engine import ImageOptions

    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise UsageError(f"--crop-pct must be in (0, 1], not {crop_pct:g}")
    resize = resize.value if isinstance(resize, Resize) else resize
    if resize is not None and resize not in ("shorter", "squash"):
        raise UsageError(f"unknown --resize {resize!r}; use shorter or squash")
    return ImageOptions(batch_size=batch_size, workers=workers, crop_pct=crop_pct, resize_mode=resize,
                        exif_transpose=not no_exif, allow_truncated=allow_truncated)  # fmt: skip


def read_inputs(specs: list[str], *, null_separated: bool) -> Iterable:
    """This process's inputs (all of them, or its shard under torchrun), streamed.

    Under torchrun every rank expands the same specs and keeps its own share, so stdin
    (which only one process can read) is refused there.
    """
    from .. import distributed
    from ..images import iter_inputs

    if not specs:
        raise UsageError("no inputs given", "name image files or directories, or - to read paths from stdin")
    if distributed.is_distributed() and "-" in specs:
        raise UsageError("reading paths from stdin (-) is not supported under torchrun", "name files or directories")
    return distributed.shard(iter_inputs(specs, null_separated=null_separated))


def load(model_source: str):
    """The model, on the CPU in float32 (the engine moves and casts it)."""
    from ..checkpoints import load_model

    return load_model(model_source)


def wants_progress(*, quiet: bool, stdout_streams: bool) -> bool:
    """A bar on stderr only for a person watching it: not with --quiet, not off a terminal,
    not on ranks other than 0, and not when data already streams to the same terminal."""
    from .. import distributed

    if quiet or not output.show_progress() or not distributed.is_main():
        return False
    return not (stdout_streams and output.stdout_is_terminal())


def prefetch(specs: list[str], items: Iterable, *, counted: bool) -> Iterable:
    """The inputs as a list when `counted` (so a bar knows the total and the ETA), unless
    they come from stdin, which must stream."""
    return list(items) if counted and "-" not in specs else items


class ProgressBar:
    """Images done, images/s and ETA on stderr (rich, on the stderr console); a no-op when
    not `enabled`. `stop()` ends it early, before a table is printed on the terminal."""

    def __init__(self, enabled: bool, description: str, total: int | None = None) -> None:
        self._progress = None
        self._task = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn,
        )  # fmt: skip
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task) -> Text:
                # Over the whole run: a batch's results arrive in a burst, which fools
                # rich's windowed estimate (thousands of img/s).
                rate = task.completed / task.elapsed if task.elapsed and task.completed else None
                return Text(f"{rate:.1f} img/s" if rate else "", style="progress.data.speed")

        # redirect_stdout would send stdout's data through the stderr console: never.
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
            TimeRemainingColumn(), console=output.stderr, transient=True, redirect_stdout=False,
        )  # fmt: skip
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
            output.error(result.message)

    def exit_code(self) -> int:
        """0 if all succeeded, 1 if some failed; raises InputNotFound (66) if none succeeded."""
        if self.ok == 0:
            if self.failed == 0:
                raise InputNotFound("no inputs: nothing to process")
            what = "the input" if self.failed == 1 else f"none of the {self.failed} inputs"
            raise InputNotFound(f"{what} could not be read" if self.failed == 1 else f"{what} could be read")
        if self.failed:
            output.error(f"{self.failed} of {self.ok + self.failed} inputs failed; the others were processed")
            return EXIT_PARTIAL
        return EXIT_OK
