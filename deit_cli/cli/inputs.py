"""What the commands over images share: building `ImageOptions` from the flags, reading
the inputs (sharded under torchrun), loading the model, and whether to draw a bar.

Importing this module must not import torch (`--help` stays fast): the engine, the images
layer and torch are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..errors import UsageError
from . import output
from .options import Resize

if TYPE_CHECKING:
    from ..engine.results import ImageOptions


def image_options(
    batch_size: int,
    workers: int | None,
    crop_pct: float | None,
    resize: Resize | str | None,
    no_exif: bool,
    allow_truncated: bool,
) -> ImageOptions:
    from ..engine.results import ImageOptions

    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise UsageError(f"--crop-pct must be in (0, 1], not {crop_pct:g}")
    resize = resize.value if isinstance(resize, Resize) else resize
    if resize is not None and resize not in ("shorter", "squash"):
        raise UsageError(f"unknown --resize {resize!r}; use shorter or squash")
    return ImageOptions(
        batch_size=batch_size,
        workers=workers,
        crop_pct=crop_pct,
        resize_mode=resize,
        exif_transpose=not no_exif,
        allow_truncated=allow_truncated,
    )


def read_inputs(specs: list[str], *, null_separated: bool) -> Iterable:
    """This process's inputs (all of them, or its shard under torchrun), streamed.

    Under torchrun every rank expands the same specs and keeps its own share, so stdin
    (which only one process can read) is refused there.
    """
    from .. import distributed
    from ..images.inputs import iter_inputs

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


def positioned(results: Iterable) -> Iterator:
    """Merged torchrun results, numbered again by their global input position."""
    for pos, r in enumerate(results):
        r.position = pos
        yield r
