"""Training input throughput: `deit train`'s loader beside timm's DataLoader, in one run.

    PYTHONPATH=. python benchmarks/train_input.py [--images 256] [--batch 64] [--workers 1 2] [--rounds 5]
        [--large 32] [--large-batch 16]

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
worker count.

Then, reported separately, phone photos: --large JPEGs of 4000x3000 (--large-size; quality
90, photo-like; 8 distinct pictures, copied to make up the number), batch --large-batch,
the same rounds with --large-warmup and --large-timed batches, between

- deit: `TrainLoader` as `deit train` makes it (threads up to 2 workers), which decodes a
  JPEG at the reduced DCT scale (1/2, 1/4, 1/8) at which the drawn crop still covers 224;
- deit --full-decode: the same loader decoding every image at full size (`reduce=False`);
- timm: its DataLoader as above, which decodes every image at full size.

--large 0 leaves this part out. A benchmark prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
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


def make_large_jpegs(root: Path, n: int, w: int, h: int) -> list[tuple[Path, int]]:
    """`n` phone-photo-sized JPEGs: 8 distinct pictures (each takes seconds to make), copied."""
    files = make_jpegs(root / "distinct", min(n, 8), w, h)
    out = []
    for i in range(n):
        src, cls = files[i % len(files)]
        dst = root / f"class{cls}" / f"{i:05d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out.append((dst, cls))
    shutil.rmtree(root / "distinct")
    return out


def deit_batches(files, batch: int, workers: int, processes: bool | None, reduce: bool = True):
    """`deit train`'s loader, epoch after epoch: (image counts of its batches, its close)."""
    from deit_cli.engine.train.augment import TrainTransform
    from deit_cli.engine.train.data import TrainSet
    from deit_cli.engine.train.loader import TrainLoader
    from deit_cli.images.inputs import InputItem
    from deit_cli.variants import find_variant

    pre = find_variant("deit-tiny").preprocessing
    transform = TrainTransform(pre, rand_augment=AUTO_AUGMENT, reprob=RE_PROB)
    data = TrainSet("bench", [InputItem(str(p)) for p, _ in files], [c for _, c in files], ["class0", "class1"])
    loader = TrainLoader(data, transform, batch_size=batch, seed=0, workers=workers, processes=processes, reduce=reduce)
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


def run_rounds(loaders: dict, rounds: int, warmup: int, timed: int) -> tuple[dict, dict, dict]:
    """Each loader in turn, in an order rotating by round: (img/s, CPU ms/img, first-batch
    seconds) per loader name, one value a round."""
    names = list(loaders)
    rates, cpu, first = ({name: [] for name in names} for _ in range(3))
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            batches, close = loaders[name]()
            try:
                next(batches)
                first[name].append(time.perf_counter() - t)
                for _ in range(warmup - 1):
                    next(batches)
                t, c = time.perf_counter(), cpu_seconds()
                n = sum(next(batches) for _ in range(timed))
                rates[name].append(n / (time.perf_counter() - t))
                cpu[name].append(1000 * (cpu_seconds() - c) / n)
            finally:
                close()
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:.0f}" for name in names))
    return rates, cpu, first


def print_medians(rates: dict, cpu: dict, first: dict, rounds: int) -> dict:
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"\nmedians over {rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    print(f"  {'':<26} {'img/s':>7} {'CPU ms/img':>11} {'first batch s':>14}")
    for name, m in medians.items():
        print(f"  {name:<26} {m:7.1f} {statistics.median(cpu[name]):11.2f} {statistics.median(first[name]):14.2f}")
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=4, help="batches before the timing starts")
    ap.add_argument("--timed", type=int, default=8, help="batches timed in each round")
    ap.add_argument("--large", type=int, default=32, help="phone-photo JPEGs for the second part (0: none)")
    ap.add_argument("--large-size", default="4000x3000", help="WxH of those")
    ap.add_argument("--large-batch", type=int, default=16)
    ap.add_argument("--large-warmup", type=int, default=2)
    ap.add_argument("--large-timed", type=int, default=4)
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--only-large", action="store_true", help="leave the first part out")
    args = ap.parse_args()

    print(f"cores: {os.cpu_count()}, torch {torch.__version__}, load average: {os.getloadavg()[0]:.2f}")
    if not args.only_large:
        small_set(args)
    if args.large:
        large_set(args)


def small_set(args) -> None:
    w, h = (int(v) for v in args.size.split("x"))
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
        medians = print_medians(*run_rounds(loaders, args.rounds, args.warmup, args.timed), args.rounds)
    if not args.no_timm:
        print("ratio to timm's DataLoader at the same workers:")
        for k in args.workers:
            timm = medians[f"timm DataLoader x{k}"]
            for kind in ("processes", "threads"):
                print(f"  deit {kind} x{k}: {medians[f'deit {kind} x{k}'] / timm:.2f}")


def large_set(args) -> None:
    w, h = (int(v) for v in args.large_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_large_jpegs(root, args.large, w, h)
        size = sum(p.stat().st_size for p, _ in files) / len(files) / 1e6
        print(
            f"\nlarge JPEGs: {len(files)} of {w}x{h} ({size:.1f} MB each), batch {args.large_batch}; each round, "
            f"each loader: {args.large_warmup} batches of warm-up, then {args.large_timed} timed"
        )
        loaders = {}
        for k in args.workers:
            loaders[f"deit x{k}"] = lambda k=k: deit_batches(files, args.large_batch, k, processes=None)
            loaders[f"deit --full-decode x{k}"] = lambda k=k: deit_batches(
                files, args.large_batch, k, processes=None, reduce=False
            )
            if not args.no_timm:
                loaders[f"timm DataLoader x{k}"] = lambda k=k: timm_batches(root, args.large_batch, k)
        rates, cpu, first = run_rounds(loaders, args.rounds, args.large_warmup, args.large_timed)
        medians = print_medians(rates, cpu, first, args.rounds)
    print("ratios at the same workers (medians):")
    for k in args.workers:
        full = medians[f"deit --full-decode x{k}"]
        line = f"  x{k}: deit / deit --full-decode {medians[f'deit x{k}'] / full:.2f}"
        if not args.no_timm:
            timm = medians[f"timm DataLoader x{k}"]
            line += f", deit / timm {medians[f'deit x{k}'] / timm:.2f}, deit --full-decode / timm {full / timm:.2f}"
        print(line)


if __name__ == "__main__":
    main()
