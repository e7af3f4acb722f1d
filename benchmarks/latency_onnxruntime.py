"""CPU latency of the graph `deit export` writes, in ONNX Runtime, against deit's own
runner (engine.runner.prepare) on the same weights, at batch 1 and 32.

    python benchmarks/latency_onnxruntime.py [--model deit-tiny-distilled] [--batch 1,32]
        [--rounds 7] [--iters 20,3] [--dtype fp32] [--opset 18] [--threads N]

Needs the onnx extra (`pip install 'deit-cli[onnx]'`). Weights are the registry variant's
architecture with seeded random weights (nothing is downloaded); the graph is exported
and checked exactly as `deit export` does it. The two run interleaved, round by round, in
one process, with the same thread count; reported: the median over rounds of each
round's median latency, the spread over rounds, and onnxruntime / deit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit-tiny-distilled")
    ap.add_argument("--batch", default="1,32", help="comma list of batch sizes")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", default="20,3", help="calls per round, per batch size (the last repeats)")
    ap.add_argument("--dtype", default="fp32", help="the exported graph's dtype: fp32 or fp16 (deit's runner: fp32)")
    ap.add_argument("--opset", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: torch's)")
    args = ap.parse_args()
    import onnxruntime as ort

    from deit_cli.checkpoints import random_model
    from deit_cli.engine.export import INPUT_NAME, export_model
    from deit_cli.engine.runner import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    batches = [int(b) for b in args.batch.split(",")]
    iters = [int(i) for i in args.iters.split(",")]
    iters += [iters[-1]] * (len(batches) - len(iters))

    model = random_model(args.model)
    path = Path(tempfile.mkdtemp()) / "deit.onnx"
    t = time.perf_counter()
    result = export_model(model, path, dtype=args.dtype, opset=args.opset)
    export_s = time.perf_counter() - t
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runner = prepare(model, device="cpu", dtype="fp32")
    print(
        f"{args.model} (random weights), CPU, {threads} threads; graph: opset {result.opset}, {result.dtype}, "
        f"exported and checked in {export_s:.1f} s (max |diff| {result.max_abs_diff:.2e}); "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}; deit path {runner.path}"
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
