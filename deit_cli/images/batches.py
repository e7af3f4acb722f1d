"""Batches: decode and transform inputs in a thread pool, yield them in input order, the
failed ones listed beside the good ones (one bad input never stops the others)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, DEFAULT_URL_TIMEOUT, ImageError, decode_image
from .inputs import InputItem


@dataclass
class Batch:
    """Up to batch_size consecutive inputs: the decoded ones stacked, the failed listed.

    `positions[i]` is the global input position (0-based) of `items[i]` and tensor row i;
    `failed_positions[j]` that of `failed[j]`. Inputs start..start+count-1 are all here,
    so a caller can emit records in input order with `entries()`.
    """

    index: int
    start: int
    count: int
    items: list[InputItem]
    positions: list[int]
    tensor: torch.Tensor  # (n, 3, H, W) float32; n may be 0
    notes: list[list[str]]
    failed: list[tuple[InputItem, str]]
    failed_positions: list[int]

    def entries(self) -> Iterator[tuple[int, InputItem, int | None, str | None, list[str]]]:
        """(position, item, tensor row or None, error or None, notes) in input order."""
        good = {p: i for i, p in enumerate(self.positions)}
        bad = dict(zip(self.failed_positions, self.failed))
        for pos in range(self.start, self.start + self.count):
            if pos in good:
                i = good[pos]
                yield pos, self.items[i], i, None, self.notes[i]
            else:
                item, err = bad[pos]
                yield pos, item, None, err, []


_Loaded = tuple[InputItem, "torch.Tensor | None", "str | None", list[str]]


def _load(item: InputItem, transform: Callable, options: dict) -> _Loaded:
    if item.error:
        return item, None, item.error, []
    try:
        decoded = decode_image(item, **options)
        return item, transform(decoded.image), None, decoded.notes
    except ImageError as exc:
        return item, None, exc.one_line(), []
    except Exception as exc:  # one odd input must not stop a million others
        return item, None, f"{item.path}: {type(exc).__name__}: {exc}", []


def _assemble(index: int, start: int, loaded: list[_Loaded], transform: Callable) -> Batch:
    items, positions, rows, notes, failed, failed_positions = [], [], [], [], [], []
    for pos, (item, tensor, err, item_notes) in enumerate(loaded, start):
        if tensor is None:
            failed.append((item, err or "failed"))
            failed_positions.append(pos)
        else:
            items.append(item)
            positions.append(pos)
            rows.append(tensor)
            notes.append(item_notes)
    if rows:
        try:
            # numpy's stack is several times faster than torch.stack on CPU here, where
            # torch's intra-op threads compete with the decode threads.
            tensor = torch.from_numpy(np.stack([row.numpy() for row in rows]))
        except (RuntimeError, TypeError):  # a custom transform's tensor numpy cannot view
            tensor = torch.stack(rows)
    else:
        size = getattr(transform, "image_size", 0)
        tensor = torch.empty((0, 3, size, size), dtype=torch.float32)
    return Batch(index, start, len(loaded), items, positions, tensor, notes, failed, failed_positions)


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    chunk: list[InputItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_batches(
    items: Iterable[InputItem],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    workers: int | None = None,
    exif_transpose: bool = True,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    url_timeout: float = DEFAULT_URL_TIMEOUT,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Decode and transform `items` in a thread pool; yield batches in input order.

    Each batch covers `batch_size` consecutive inputs (fewer at the end), the failed ones
    included as `Batch.failed`. At most `prefetch` batches beyond the one being consumed
    are in flight, so memory stays flat however many inputs there are. `workers=0`
    decodes in the calling thread (for debugging); None means min(8, CPU count).
    Closing the generator early cancels queued work and joins the threads.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    options = dict(
        exif_transpose=exif_transpose, allow_truncated=allow_truncated, max_pixels=max_pixels, timeout=url_timeout
    )
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    chunks = _chunks(items, batch_size)
    if workers <= 0:
        start = 0
        for index, chunk in enumerate(chunks):
            loaded = [_load(item, transform, options) for item in chunk]
            yield _assemble(index, start, loaded, transform)
            start += len(chunk)
        return

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deit-decode")
    pending: deque[list[Future]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append([pool.submit(_load, item, transform, options) for item in chunk])

    try:
        for _ in range(prefetch + 1):
            submit_next()
        index = start = 0
        while pending:
            futures = pending.popleft()
            loaded = [f.result() for f in futures]
            submit_next()
            yield _assemble(index, start, loaded, transform)
            index += 1
            start += len(loaded)
    finally:
        # Reached on exhaustion, on an exception and on close() (`deit ... | head -1`):
        # drop queued decodes, wait for the running ones, leave no thread behind.
        pool.shutdown(wait=True, cancel_futures=True)
