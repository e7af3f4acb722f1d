"""Training input throughput: `deit train`'s loader beside timm's DataLoader, in one run.

    PYTHONPATH=. python benchmarks/train_input.py [--images 256] [--batch 64] [--workers 1 2] [--rounds 5]

Both sides decode JPEGs (generated in a temporary folder: photo-like, 500x375, quality 90)
and apply the DeiT training augmentation at 224: random resized crop (bicubic), flip,
RandAugment "rand-m9-mstd0.5-inc1", normalisation, random erasing (p 0.25, per-pixel).
timm's DataLoader does all of it on the CPU, into float32 batches; deit's loader stops at
uint8 batches with each image's erasing draws, the normalisation and the erasing noise
being done on the device in the training step (`Stepper.step`), which this benchmark
does not time:

- deit processes: `TrainLoader(..., processes=True)`, persistent worker processes;
- deit threads: `TrainLoader(..., processes=False)`, a thread pool in this process (what
  `iter_epoch` did before the loader);
- timm: `timm.data.create_transform(224, is_training=True, auto_augment=..., interpolation=
  "bicubic", re_prob=0.25, re_mode="pixel")` over `timm.data.ImageDataset`, in a torch DataLoader
  (shuffled, last batch dropped), as timm's train.py runs it on a CPU.

Rounds interleave the loaders in a rotating order, so a busy machine slows all alike. In
its turn a loader is made (its workers started), runs --warmup batches, then --timed
batches are timed, and it is closed, so that no loader works in another's turn. Both run
epoch after epoch without a stall at an epoch's end (deit's workers run on into the next
epoch; timm gets one sampler over many epochs), which is what a long run sees. Prints
img/s per round; the medians of img/s, of CPU milliseconds per image (this process and
its workers: other work on a shared machine disturbs it less than wall time) and of the
time to the first batch (start-up); and each deit loader's ratio to timm's at the same
worker count. A benchmark prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 224
AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
RE_PROB = 0.25


def make_jpegs(root: Path, n: int, w: int, h: int) -> list[tuple[Path, int]]:
    """Photo-like JPEGs (smooth shapes plus grain), in two class folders."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    files = []
    for i in range(n):
        cls = i % 2
        (root / f"class{cls}").mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(5, 60, 3)
        base = np.stack(
            [127 + 100 * np.sin(x / fx + phase), 127 + 100 * np.cos(y / fy), 127 + 60 * np.sin((x + y) / 23)]
        )
        img = np.clip(base.transpose(1, 2, 0) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / f"class{cls}" / f"{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        files.append((path, cls))
    return files


def deit_batches(files, batch: int, workers: int, processes: bool):
    """`deit train`'s loader, epoch after epoch: (image counts of its batches, its close)."""
    from deit_cli.engine.train.augment import TrainTransform
    from deit_cli.engine.train.data import TrainSet
    from deit_cli.engine.train.loader import TrainLoader
    from deit_cli.images.inputs import InputItem
    from deit_cli.variants import find_variant

    pre = find_variant("deit-tiny").preprocessing
    transform = TrainTransform(pre, rand_augment=AUTO_AUGMENT, reprob=RE_PROB)
    data = TrainSet("bench", [InputItem(str(p)) for p, _ in files], [c for _, c in files], ["class0", "class1"])
    loader = TrainLoader(data, transform, batch_size=batch, seed=0, workers=workers, processes=processes)
    stream = (b.images.shape[0] for epoch in itertools.count() for b in loader.epoch(epoch))
    return stream, loader.close


def timm_batches(root: Path, batch: int, workers: int):
    """timm's training transform in a torch DataLoader: (image counts of its batches, its close).
    One sampler runs over many epochs, so timm pays no stall at an epoch's end either."""
    from PIL import ImageOps
    from timm.data import ImageDataset, create_transform

    # timm's PosterizeIncreasing asks for 0 bits at full magnitude, which Pillow 13
    # refuses (older Pillow gave a black image); keep 1 bit, as deit's RandAugment does
    if not hasattr(ImageOps.posterize, "bench_patched"):
        posterize = ImageOps.posterize
        ImageOps.posterize = lambda img, bits: posterize(img, max(1, bits))
        ImageOps.posterize.bench_patched = True

    transform = create_transform(
        SIZE, is_training=True, auto_augment=AUTO_AUGMENT, interpolation="bicubic", re_prob=RE_PROB, re_mode="pixel"
    )
    dataset = ImageDataset(str(root), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=1000 * len(dataset))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers, persistent_workers=workers > 0
    )
    it = iter(loader)

    def close():
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    return (x.shape[0] for x, _ in it), close


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live child processes (workers)."""
    total = time.process_time()
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; utime and stime follow at 11 and 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=4, help="batches before the timing starts")
    ap.add_argument("--timed", type=int, default=8, help="batches timed in each round")
    ap.add_argument("--no-timm", action="store_true")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))

    print(f"cores: {os.cpu_count()}, torch {torch.__version__}, load average: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_jpegs(root, args.images, w, h)
        print(
            f"{len(files)} JPEGs of {w}x{h}, batch {args.batch}; each round, each loader: {args.warmup} batches "
            f"of warm-up (start-up included), then {args.timed} timed"
        )
        loaders = {}
        for k in args.workers:
            loaders[f"deit processes x{k}"] = lambda k=k: deit_batches(files, args.batch, k, processes=True)
            loaders[f"deit threads x{k}"] = lambda k=k: deit_batches(files, args.batch, k, processes=False)
            if not args.no_timm:
                loaders[f"timm DataLoader x{k}"] = lambda k=k: timm_batches(root, args.batch, k)
        names = list(loaders)
        rates, cpu, first = ({name: [] for name in names} for _ in range(3))
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                batches, close = loaders[name]()
                try:
                    next(batches)
                    first[name].append(time.perf_counter() - t)
                    for _ in range(args.warmup - 1):
                        next(batches)
                    t, c = time.perf_counter(), cpu_seconds()
                    n = sum(next(batches) for _ in range(args.timed))
                    rates[name].append(n / (time.perf_counter() - t))
                    cpu[name].append(1000 * (cpu_seconds() - c) / n)
                finally:
                    close()
            print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:.0f}" for name in names))

    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"\nmedians over {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    print(f"  {'':<22} {'img/s':>7} {'CPU ms/img':>11} {'first batch s':>14}")
    for name, m in medians.items():
        print(f"  {name:<22} {m:7.0f} {statistics.median(cpu[name]):11.2f} {statistics.median(first[name]):14.2f}")
    if not args.no_timm:
        print("ratio to timm's DataLoader at the same workers:")
        for k in args.workers:
            timm = medians[f"timm DataLoader x{k}"]
            for kind in ("processes", "threads"):
                print(f"  deit {kind} x{k}: {medians[f'deit {kind} x{k}'] / timm:.2f}")


if __name__ == "__main__":
    main()
