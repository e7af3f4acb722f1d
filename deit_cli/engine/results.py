"""What every job shares: how images are read (`ImageOptions`), the per-image `Result`,
and the loop that runs a computation over batches and gives each input its row."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..images.batches import iter_batches
from ..images.inputs import InputItem
from ..images.transform import eval_transform
from ..model import DeiT


@dataclass(frozen=True)
class ImageOptions:
    """How inputs are read and preprocessed (the model's own eval transform by default)."""

    batch_size: int = 32
    workers: int | None = None  # decode threads; None: min(8, CPU count); 0: in the caller
    crop_pct: float | None = None  # None: the model's
    resize_mode: str | None = None  # "shorter" | "squash"; None: the model's
    exif_transpose: bool = True
    allow_truncated: bool = False


def reason(path: str, error: str) -> str:
    # The images layer's messages start with the path; a record keys them by path already.
    prefix = f"{path}: "
    return error[len(prefix) :] if error.startswith(prefix) else error


@dataclass
class Result:
    """What every per-image result has: where it was, and why it failed if it did."""

    position: int  # 0-based input position
    path: str
    error: str | None = None  # why this input failed (without the path); None when it did not
    notes: list[str] = field(default_factory=list)  # e.g. "first frame of 12"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def message(self) -> str:
        """One line for stderr: the path and what went wrong."""
        return f"{self.path}: {self.error}"


def run_batches(
    model: DeiT, items: Iterable[InputItem], options: ImageOptions, compute: Callable[[torch.Tensor], Any]
) -> Iterator[tuple[int, InputItem, Any, str | None, list[str]]]:
    """(position, item, this input's row of compute(batch) or None, error, notes), in order."""
    transform = eval_transform(model.preprocessing, crop_pct=options.crop_pct, resize_mode=options.resize_mode)
    batches = iter_batches(
        items,
        transform,
        options.batch_size,
        workers=options.workers,
        exif_transpose=options.exif_transpose,
        allow_truncated=options.allow_truncated,
    )
    with closing(batches):  # `| head -1`: stop decoding at once, leave no threads behind
        for batch in batches:
            out = compute(batch.tensor) if batch.positions else None
            for pos, item, row, err, notes in batch.entries():
                yield pos, item, (None if row is None else out[row]), err, notes
