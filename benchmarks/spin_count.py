"""Batch-1 latency against libgomp's spin count, on a quiet machine and with other work on
the cores: the trade-off behind deit's default (GOMP_SPINCOUNT=1000, deit_cli/_openmp.py).

    python benchmarks/spin_count.py [--spins 1000,30000,300000] [--busy 0,4] [--runs 3]
        [--model deit-tiny-distilled] [--reps 5] [--seconds 0.5]

For each number of busy processes (CPU-bound Python loops, started before and killed by
pid after, each also ending by itself after --max-seconds) and each spin count, runs
`deit bench --device cpu --random-init --batch 1 --compare onnxruntime` in a fresh process
with GOMP_SPINCOUNT set (libgomp reads it once, at load), --runs times, round-robin over
the spin counts. Prints per row the medians over runs of deit's p50 and p90 latency, its
images/s, and deit / ONNX Runtime (bench's own ratio, interleaved in the same process;
blank without the onnx extra). A user's own GOMP_SPINCOUNT wins over deit's default, so a
dedicated machine can take whatever this measures best there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def bench(args: argparse.Namespace, spin: str) -> dict[str, dict]:
    deit = shutil.which("deit") or ""
    cmd = [deit] if deit else [sys.executable, "-m", "deit_cli"]
    cmd += ["bench", "--model", args.model, "--device", "cpu", "--random-init", "--batch", "1"]
    cmd += ["--reps", str(args.reps), "--seconds", str(args.seconds), "--format", "jsonl"]
    if args.compare:
        cmd += ["--compare", "onnxruntime"]
    env = {**os.environ, "GOMP_SPINCOUNT": spin}
    env.pop("OMP_WAIT_POLICY", None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.max_seconds)
    if p.returncode != 0:
        raise SystemExit(f"deit bench failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return {r["impl"]: r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit-tiny-distilled")
    ap.add_argument("--spins", default="1000,30000,300000", help="GOMP_SPINCOUNT values (300000 is libgomp's default)")
    ap.add_argument("--busy", default="0,4", help="numbers of busy processes to run beside it")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--max-seconds", type=float, default=300, help="bound on each bench run and busy process")
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="deit only (no onnx extra)")
    args = ap.parse_args()
    spins = args.spins.split(",")
    print(f"{args.model}, batch 1, fp32, CPU ({os.cpu_count()} cores); medians over {args.runs} runs")
    print(f"{'busy':>4} {'GOMP_SPINCOUNT':>14} {'p50 ms':>8} {'p90 ms':>8} {'img/s':>7} {'deit/ORT':>8}  load")
    for busy in (int(b) for b in args.busy.split(",")):
        hogs = [
            subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.max_seconds * len(spins) * args.runs)])
            for _ in range(busy)
        ]
        try:
            time.sleep(1.0 if hogs else 0.0)
            got: dict[str, list[dict]] = {s: [] for s in spins}
            for _ in range(args.runs):
                for s in spins:
                    got[s].append(bench(args, s))
            for s in spins:
                deit = [r["deit"] for r in got[s]]
                ratio = [r["onnxruntime"]["deit_speedup"] for r in got[s] if "onnxruntime" in r]
                med = lambda key: statistics.median(d[key] for d in deit)  # noqa: E731
                print(
                    f"{busy:>4} {s:>14} {med('latency_ms_p50'):8.2f} {med('latency_ms_p90'):8.2f} "
                    f"{med('images_per_s'):7.1f} {statistics.median(ratio) if ratio else float('nan'):8.2f}  "
                    f"{os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            for h in hogs:
                h.kill()
                h.wait()


if __name__ == "__main__":
    main()
