"""What `deit explain` costs over `deit classify`, per image, on the same images.

    PYTHONPATH=. python benchmarks/explain_overhead.py --model deit-tiny-distilled --images 16 --repeats 5

Random-init weights of a registry architecture (the cost does not depend on the values),
synthetic JPEGs written to a temporary directory. The jobs run in turn within each repeat
(after one warm-up of each), so that a busy machine slows them alike; each row is the
median over the repeats of the job's time per image, wall clock and CPU (all threads), and
the median of its per-repeat ratio to classify (or, for the model-only rows, to
runner.logits):

    classify             engine.classify: decode, eval transform, the fast runner (SDPA)
    explain maps         engine.explain: the same inputs, the explicit-attention forward and the maps
    explain + files      the same, plus write_explanations: a PNG (and with --raw an .npy) per image
    model only           one batch already in memory: runner.logits vs attention_maps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deit_cli.checkpoints import random_model
from deit_cli.engine import explain as explain_engine
from deit_cli.engine.classify import classify
from deit_cli.engine.results import ImageOptions
from deit_cli.engine.runner import prepare
from deit_cli.images import eval_transform, iter_inputs


def make_images(d: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:240, 0:320]
        base = np.stack([x * 0.8, y, 255 - x * 0.6], -1) + rng.normal(0, 20, (240, 320, 3))
        p = d / f"img{i:03d}.jpg"
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


def interleaved(jobs: dict, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per run of each job, the jobs taking turns in every repeat."""
    for fn in jobs.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - w, time.process_time() - c))
    return times


def report(times: dict[str, list[tuple[float, float]]], per: int) -> None:
    names = list(times)
    base = times[names[0]]
    for name in names:
        row = []
        for k in (0, 1):  # wall, then CPU (all threads): the CPU time is less at the mercy of a busy machine
            ts = [t[k] for t in times[name]]
            ratio = statistics.median(t[k] / b[k] for t, b in zip(times[name], base))
            row.append(f"{statistics.median(ts) / per * 1e3:>10.2f} {ratio:>7.2f}x")
        print(f"{name:<44} " + "   ".join(row))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit-tiny-distilled", help="a registry name (random-init weights)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="rollout", choices=explain_engine.METHODS)
    ap.add_argument("--raw", action="store_true", help="also write the .npy files")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = random_model(args.model)
    options = ImageOptions(batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        paths = make_images(tmp / "in", args.images)
        n = len(paths)

        def run_classify():
            out = list(classify(model, iter_inputs(paths), top=5, device=args.device, options=options))
            assert all(r.ok for r in out)

        def run_maps():
            out = list(
                explain_engine.explain(
                    model, iter_inputs(paths), method=args.method, device=args.device, options=options
                )
            )
            assert all(r.ok for r in out)

        def run_files():
            out_dir = tmp / "out"
            out_dir.mkdir(exist_ok=True)
            results = explain_engine.explain(
                model, iter_inputs(paths), method=args.method, device=args.device, options=options
            )
            out = list(explain_engine.write_explanations(results, out_dir, raw=args.raw, force=True, model=args.model))
            assert all(r.ok and r.files for r in out)

        t = eval_transform(model.preprocessing)
        from deit_cli.images import decode_image

        x = torch.stack([t(decode_image(p).image) for p in paths[: args.batch_size]])
        runner = prepare(model, device=args.device)
        b = len(x)

        jobs = {
            "classify": run_classify,
            f"explain maps ({args.method})": run_maps,
            f"explain + files ({args.method}{', raw' if args.raw else ''})": run_files,
        }
        model_jobs = {
            "model only: runner.logits (SDPA)": lambda: runner.logits(x),
            f"model only: attention_maps ({args.method})": lambda: explain_engine.attention_maps(model, x, args.method),
        }
        times = interleaved(jobs, args.repeats)
        model_times = interleaved(model_jobs, args.repeats)

    print(
        f"# {args.model} (random init), {n} images of 320x240 JPEG, batch {args.batch_size}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"{'job':<44} {'wall ms/img':>11} {'ratio':>7}   {'CPU ms/img':>10} {'ratio':>7}")
    report(times, n)
    report(model_times, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
