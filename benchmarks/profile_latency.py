"""Where the time goes in one deit forward on the CPU: torch.profiler over deit's runner
(engine.runner.prepare) at a batch size, grouped per op, plus the wall time per block
and the Python around the ops (wall minus the sum of the op self-times).

    python benchmarks/profile_latency.py [--model deit-tiny-distilled] [--batch 1] [--iters 50]
        [--threads N] [--top 25]

Random weights of the registry variant (nothing downloaded). Prints the op table
(self CPU time, calls, share of the forward) and a summary by kind: matmuls (oneDNN
linear with fused bias/GELU/add), attention (SDPA at 197 tokens), LayerNorm, the
patch embedding, the last block on the prefix tokens, and what is not in any op.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit-tiny-distilled")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile, record_function

    from deit_cli.checkpoints import random_model
    from deit_cli.engine.runner import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_model(args.model)
    runner = prepare(model, device="cpu", dtype="fp32")
    fast = runner._logits.__self__  # FastDeiT
    S = model.config.image_size
    x = torch.randn(args.batch, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(10):
            runner(x)
        # Wall time of the whole call and of its parts, outside the profiler (it adds overhead).
        wall, parts = [], {"embed": [], "blocks 0..10": [], "last block (prefix)": [], "norm+head": []}
        for _ in range(args.iters):
            t0 = time.perf_counter()
            h = fast._embed(x)
            t1 = time.perf_counter()
            for blk in fast.blocks[:-1]:
                h = blk(h)
            t2 = time.perf_counter()
            h = fast.last(h)
            t3 = time.perf_counter()
            type(model).forward_head(fast, fast.norm(h), head="avg")  # as FastDeiT.logits calls it
            t4 = time.perf_counter()
            for k, (a, b) in zip(parts, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                parts[k].append((b - a) * 1e3)
            t = time.perf_counter()
            runner(x)
            wall.append((time.perf_counter() - t) * 1e3)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(args.iters):
                with record_function("forward"):
                    runner(x)
    med = statistics.median(wall)
    print(f"{args.model} fp32 batch {args.batch}, {torch.get_num_threads()} threads, path {runner.path}")
    print(f"runner(x): median {med:.2f} ms over {args.iters} calls (min {min(wall):.2f})")
    for k, v in parts.items():
        print(f"  {k:<22} {statistics.median(v):7.2f} ms")
    events = prof.key_averages()
    fwd = next(e for e in events if e.key == "forward")
    total = fwd.cpu_time_total
    ops = sorted((e for e in events if e.key != "forward"), key=lambda e: -e.self_cpu_time_total)
    print(f"\nprofiled forward: {total / args.iters / 1e3:.2f} ms per call (profiler overhead included)")
    print(f"{'op':<48} {'self ms/call':>12} {'calls/fwd':>9} {'share':>7}")
    kinds: dict[str, float] = {}
    for e in ops:
        share = e.self_cpu_time_total / total
        k = e.key
        kind = (
            "matmul (oneDNN linear, fused)"
            if "linear" in k or k in ("aten::mm", "aten::addmm")
            else "attention (SDPA)"
            if "attention" in k or "flash" in k or "sdpa" in k
            else "layer norm"
            if "layer_norm" in k
            else "copies/views/alloc"
            if k
            in (
                "aten::copy_",
                "aten::empty",
                "aten::contiguous",
                "aten::clone",
                "aten::view",
                "aten::permute",
                "aten::unbind",
                "aten::select",
                "aten::transpose",
                "aten::reshape",
                "aten::_reshape_alias",
                "aten::as_strided",
                "aten::expand",
                "aten::slice",
                "aten::cat",
                "aten::empty_like",
                "aten::_unsafe_view",
                "aten::to",
                "aten::_to_copy",
                "aten::empty_strided",
                "aten::detach",
                "aten::alias",
                "aten::resize_",
            )
            else "other ops"
        )
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total
        if ops.index(e) < args.top:
            print(
                f"{k[:48]:<48} {e.self_cpu_time_total / args.iters / 1e3:12.3f} {e.count / args.iters:9.1f} {share:7.1%}"
            )
    print("\nby kind (self time, share of the profiled forward):")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<32} {t / args.iters / 1e3:7.2f} ms  {t / total:6.1%}")
    outside = total - sum(kinds.values())
    print(f"  {'Python and dispatch outside ops':<32} {outside / args.iters / 1e3:7.2f} ms  {outside / total:6.1%}")


if __name__ == "__main__":
    main()
