"""Batch-1 CPU latency of deit's fast path against ONNX Runtime on the same weights.

    python benchmarks/latency_onnxruntime.py [--rounds 15] [--iters 20]

ONNX Runtime is not a dependency: `pip install onnxruntime onnx onnxscript` first. The two
run interleaved round by round in one process; medians of per-round p50 latencies.
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
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import onnxruntime as ort

    from deit_cli.engine.runner import prepare
    from deit_cli.checkpoints import random_model

    model = random_model(args.model)
    x = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    path = Path(tempfile.mkdtemp()) / "deit.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runner = prepare(model, device="cpu", dtype="fp32")
    feeds = {name: x.numpy()}
    with torch.inference_mode():
        diff = (torch.from_numpy(session.run(None, feeds)[0]) - runner(x)).abs().max().item()
    fns = {"deit": lambda: runner(x), "onnxruntime": lambda: session.run(None, feeds)}
    for fn in fns.values():
        for _ in range(5):
            fn()
    p50 = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for k, fn in fns.items():
                ts = []
                for _ in range(args.iters):
                    t = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t)
                p50[k].append(statistics.median(ts) * 1e3)
    print(f"{args.model}, batch 1, fp32, {torch.get_num_threads()} threads; max |logit diff| {diff:.2e}")
    for k, v in p50.items():
        print(f"{k:<12} p50 latency median {statistics.median(v):6.2f} ms  (rounds: {min(v):.2f}..{max(v):.2f})")
    print(f"onnxruntime / deit: {statistics.median(p50['onnxruntime']) / statistics.median(p50['deit']):.2f}x")


if __name__ == "__main__":
    main()
