"""CPU latency of the graph `deit export` writes, in ONNX Runtime, against deit's own
runner (engine.runner.prepare) on the same weights, at batch 1 and 32.

    python benchmarks/latency_onnxruntime.py [--model deit-tiny-distilled] [--batch 1,32]
        [--rounds 7] [--iters 20,3] [--threads N]

Needs the onnx extra (`pip install 'deit-cli[onnx]'`). Weights are the registry variant's
architecture with seeded random weights (nothing is downloaded); the graph is the one
`--backend onnxruntime` runs (engine.ort: exported and checked exactly as `deit export` does
it, cached, checked again on load). `deit bench --compare onnxruntime` measures the same. The two run interleaved, round by round, in
one process, with the same thread count; reported: the median over rounds of each
round's median latency, the spread over rounds, and onnxruntime / deit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit-tiny-distilled")
    ap.add_argument("--batch", default="1,32", help="comma list of batch sizes")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", default="20,3", help="calls per round, per batch size (the last repeats)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: torch's)")
    args = ap.parse_args()
    import onnxruntime as ort

    from deit_cli.checkpoints import random_model
    from deit_cli.engine import ort as backend
    from deit_cli.engine.export import INPUT_NAME, GraphSpec
    from deit_cli.engine.runner import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    batches = [int(b) for b in args.batch.split(",")]
    iters = [int(i) for i in args.iters.split(",")]
    iters += [iters[-1]] * (len(batches) - len(iters))

    model = random_model(args.model)
    t = time.perf_counter()
    exported = backend.stats["exported"]
    session = backend.OnnxRuntimeModel(model, threads=threads).session(GraphSpec("logits", "avg", None, "fp32"))
    how = "exported and checked" if backend.stats["exported"] > exported else "read from the cache and checked"
    load_s = time.perf_counter() - t
    runner = prepare(model, device="cpu", dtype="fp32")
    print(
        f"{args.model} (random weights), CPU, {threads} threads; graph: fp32, {how} in {load_s:.1f} s "
        f"({backend.cache_dir()}); onnxruntime {ort.__version__}, torch {torch.__version__}; deit path {runner.path}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    g = torch.Generator().manual_seed(0)
    S = model.config.image_size
    with torch.inference_mode():
        for batch, n in zip(batches, iters):
            x = torch.randn(batch, 3, S, S, generator=g)
            feeds = {INPUT_NAME: x.numpy()}
            fns = {"deit": lambda: runner(x), "onnxruntime": lambda: session.run(None, feeds)}
            for fn in fns.values():  # warm-up: allocations, oneDNN primitives, ORT's arena
                for _ in range(3):
                    fn()
            p50: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    ts = []
                    for _ in range(n):
                        t = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t)
                    p50[k].append(statistics.median(ts) * 1e3)
            med = {k: statistics.median(v) for k, v in p50.items()}
            for k, v in p50.items():
                print(
                    f"batch {batch:>3}  {k:<12} median {med[k]:8.2f} ms  ({batch / med[k] * 1e3:7.1f} img/s; "
                    f"rounds {min(v):.2f}..{max(v):.2f})"
                )
            print(f"batch {batch:>3}  onnxruntime / deit latency: {med['onnxruntime'] / med['deit']:.2f}x")


if __name__ == "__main__":
    main()
