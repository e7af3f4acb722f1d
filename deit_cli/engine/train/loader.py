"""The training input pipeline: decoding and augmenting images off the training loop.

A `TrainLoader` is made once per run and serves every epoch. Its workers are processes
(a torch DataLoader whose workers persist across epochs, each building a whole share of
a global batch), so decoding and augmentation scale past one process's GIL; or threads
in this process (per image), which start at once and do better on a few cores. Either
runs on into the next epoch while the loop finishes one.

What a batch holds depends on none of this: the sampler gives, in this process, the
global positions of this rank's share of each global batch, and each sample is augmented
with its own generator seeded by (seed, epoch, position) (`data.sample_seed`). So the
batches are bit-identical for any number of workers, threads, processes or ranks, and a
run resumed at a step continues exactly. An image that fails to decode is skipped and
counted (`TrainBatch.failed`), never a crash.

Batches hold uint8 images (normalised on the device, `Stepper.step`) and, where the
transform draws random erasing, each image's drawn box and noise seed (`TrainBatch.erase`).

A large JPEG (a phone's 4000x3000) is decoded at reduced scale: the transform draws its crop
from the size in the header, and the JPEG is decoded at the largest DCT scale (1/2, 1/4,
1/8) at which the crop still covers the output size, a fraction of a full decode's work.
The draws are the same and the crop the same part of the picture; the pixels differ from a
full decode's by the resampling (libjpeg's scaled decode, then a shorter bicubic resize).
Other formats, smaller JPEGs and crops too small for it decode at full size, exactly as
`reduce=False` (`deit train --full-decode`) decodes every image: timm's pixels.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ...images.inputs import InputItem
from .data import TrainBatch, TrainSet, epoch_order, sample_seed, steps_per_epoch

Key = tuple[int, int, int]  # (epoch, position in the epoch, index into the set)


def default_workers(local_world_size: int | None = None) -> int:
    """Workers per process: this machine's cores shared by its ranks, at most 8."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, local_world_size)))


def default_processes(workers: int) -> bool:
    """Processes beyond 2 workers, where threads would queue on the GIL; threads up to 2,
    where a process's start-up and a batch's trip through shared memory cost more than
    the GIL does (benchmarks/train_input.py, on 2 cores)."""
    return workers > 2


def load_sample(item: InputItem, transform, seed: int, options: dict, reduce: bool = True):
    """((the augmented tensor, its erasing draws or None), None), or (None, the one-line
    reason the image was skipped). A transform returns the tensor, or (tensor, erasing
    draws) as `TrainTransform` does.

    With `reduce`, a transform that draws its crop from the size (`draw`, `reduction`,
    `finish`, as `TrainTransform` and `ThreeAugment`) has a JPEG decoded at the reduced
    scale its crop allows; the draws are the same ones, in the same order."""
    from ...images.decode import ImageError, decode_image

    rng = random.Random(seed)
    try:
        if reduce and hasattr(transform, "draw"):
            drawn = []

            def reduction(width: int, height: int) -> int:  # a JPEG's upright size, before its pixels
                drawn.append(transform.draw(width, height, rng))
                return transform.reduction(drawn[0])

            decoded = decode_image(item, **options, reduce=reduction)
            if drawn:
                reduced = decoded.region if decoded.scale > 1 else None
                out = transform.finish(decoded.image, drawn[0], rng, reduced)
            else:  # not a JPEG: drawn from the decoded size
                out = transform(decoded.image, rng)
        else:
            out = transform(decode_image(item, **options).image, rng)
        return (out if isinstance(out, tuple) else (out, None)), None
    except ImageError as e:
        return None, e.one_line()
    except Exception as e:  # noqa: BLE001 - one odd image never stops a run
        return None, f"{item.path}: {type(e).__name__}: {e}"


class _Shares(Sampler[list[Key]]):
    """A batch sampler: this rank's share of each global batch (positions rank, rank +
    world_size, ...), from (`epoch`, `start_step`) on, epoch after epoch without end, so
    the workers never wait at an epoch's end while the loop starts the next one."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int, repeats: int):
        self.n, self.batch_size, self.seed, self.repeats = n, batch_size, seed, repeats
        self.rank, self.world_size = rank, world_size
        self.epoch = self.start_step = 0

    @property
    def steps(self) -> int:
        return steps_per_epoch(self.n, self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, start = self.epoch, self.start_step
        while True:
            order = epoch_order(self.n, seed=self.seed, epoch=epoch, repeats=self.repeats)
            for step in range(start, self.steps):
                positions = range(step * self.batch_size, min((step + 1) * self.batch_size, len(order)))
                yield [(epoch, p, order[p]) for p in positions[self.rank :: self.world_size]]
            epoch, start = epoch + 1, 0


class _Samples(Dataset):
    """Decodes and augments the images of a share; `__getitems__` returns the share as
    (images, targets, erase, failed), so a worker process hands over one tensor per batch.
    `erase` is None where no image of the share drew an erasing box, else (n, 5) int64
    rows (top, left, height, width, noise seed), -1 for an image left alone."""

    def __init__(self, data: TrainSet, transform, seed: int, decode_options: dict, reduce: bool):
        self.data, self.transform, self.seed, self.options = data, transform, seed, decode_options
        self.reduce = reduce

    def load(self, key: Key):
        epoch, position, index = key
        seed = sample_seed(self.seed, epoch, position)
        return load_sample(self.data.items[index], self.transform, seed, self.options, self.reduce)

    def __getitems__(self, keys: list[Key]):
        return self.assemble([self.load(k) for k in keys], keys)

    def assemble(self, loaded, keys: list[Key]):
        rows, erases, indices, failed = [], [], [], []
        for (sample, err), (_, _, index) in zip(loaded, keys):
            if sample is None:
                failed.append(err)
            else:
                rows.append(sample[0])
                erases.append(sample[1])
                indices.append(index)
        if not rows:
            return torch.empty(0, dtype=torch.uint8), self.data.target_tensor(indices), None, failed
        images = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype)
        if get_worker_info() is not None:  # stacked straight into shared memory: no copy to send it
            images.share_memory_()
        # numpy's copy, not torch.stack: in a loader thread torch's would start an OpenMP team
        # whose spinning threads take the cores from the decoding (at 1 worker thread on 2
        # cores, 5.1 CPU ms an image against 3.3; benchmarks/train_input.py)
        np.stack([row.numpy() for row in rows], out=images.numpy())
        erase = None
        if any(e is not None for e in erases):
            erase = torch.tensor([(-1,) * 5 if e is None else e for e in erases], dtype=torch.int64)
        return images, self.data.target_tensor(indices), erase, failed


def _as_is(batch):
    return batch


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group, and SLURM's scancel sends SIGTERM to every
    # process of the job: the run stops at a step boundary and shuts its workers down
    # itself, which a worker dead of the signal would stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainLoader:
    """This process's share of every global batch of a run, epoch after epoch.

    `transform(image, rng)` augments one decoded image with its own `random.Random`.
    `workers` processes (or threads, `processes=False`) decode and augment; 0 works in
    this process; None picks `default_workers()`. `processes` None picks
    `default_processes(workers)`: threads up to 2 workers, processes beyond.
    `pin_memory` (for a CUDA device; ignored where there is no accelerator) hands over
    page-locked batches, which `.to(device, non_blocking=True)` copies without blocking.
    `reduce` False decodes every image at full size (`load_sample`): timm's pixels, where
    True decodes a large JPEG at the reduced scale its crop allows.
    Worker processes start with the first epoch and serve the run's every epoch;
    `close()` (or a `with` block) stops them.
    """

    def __init__(
        self,
        data: TrainSet,
        transform,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        repeats: int = 1,
        workers: int | None = None,
        processes: bool | None = None,
        pin_memory: bool = False,
        decode_options: dict | None = None,
        prefetch: int = 2,
        reduce: bool = True,
    ):
        self.workers = default_workers() if workers is None else max(0, workers)
        self.processes = default_processes(self.workers) if processes is None else processes
        self.pin_memory = pin_memory and torch.accelerator.is_available()  # nothing to pin for without one
        self.prefetch = prefetch
        self._shares = _Shares(len(data), batch_size, seed, rank, world_size, repeats)
        self._samples = _Samples(data, transform, seed, decode_options or {}, reduce)
        self._loader: DataLoader | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stream: Iterator | None = None  # batches from (epoch, step) `_next` on
        self._next: tuple[int, int] | None = None
        if self.processes or self.workers == 0:
            self._loader = DataLoader(
                self._samples,
                batch_sampler=self._shares,
                num_workers=self.workers,
                collate_fn=_as_is,
                pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0,
                prefetch_factor=prefetch if self.workers else None,
                worker_init_fn=_worker_init if self.workers else None,
                # its own generator: DataLoader draws a seed per iterator, which must not
                # move the run's torch generator (a resumed run restores that one)
                generator=torch.Generator(),
            )
        else:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="deit-train-data")

    @property
    def steps(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        return self._shares.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        """This process's share of each global batch of `epoch`, from `start_step` on (one
        epoch at a time). A share whose images all failed is still a batch (of 0 images).

        The workers run on into the next epoch while this one is used; asking for another
        epoch or step than the one that follows (an epoch left half-read, a jump) starts
        them again there."""
        if self._next != (epoch, start_step):
            self._restart(epoch, start_step)
        steps = self.steps
        for step in range(start_step, steps):
            self._next = None  # until the batch is in hand: a failure leaves no position
            images, targets, erase, failed = next(self._stream)
            self._next = (epoch, step + 1) if step + 1 < steps else (epoch + 1, 0)
            yield TrainBatch(step, images, targets, failed, erase)

    def _restart(self, epoch: int, start_step: int) -> None:
        self._shares.epoch, self._shares.start_step = epoch, start_step
        if self._loader is not None:
            self._stream = iter(self._loader)  # persistent workers: the same processes, emptied
        else:
            if self._stream is not None:
                self._stream.close()
            self._stream = self._threaded()
        self._next = (epoch, start_step)

    def _threaded(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]]:
        # per image, `prefetch` shares beyond the next one in flight: on a few cores the
        # share wanted next is done soonest
        pending = []
        try:
            for keys in self._shares:  # without end
                pending.append((keys, [self._pool.submit(self._samples.load, k) for k in keys]))
                if len(pending) > self.prefetch + 1:
                    yield self._done(*pending.pop(0))
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()

    def _done(self, keys, futures):
        images, targets, erase, failed = self._samples.assemble([f.result() for f in futures], keys)
        if self.pin_memory and images.numel():
            images, targets = images.pin_memory(), targets.pin_memory()
        return images, targets, erase, failed

    def close(self) -> None:
        """Stop the workers (processes or threads)."""
        if self._pool is not None and self._stream is not None:
            self._stream.close()
        self._stream = self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._loader is not None:
            # DataLoader has no public close; its persistent iterator owns the processes
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._loader = None

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
