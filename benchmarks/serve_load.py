"""Load on `deit serve`: a bounded load generator on loopback (a fixed request count and a
time cap per level, so it stops by itself), against `deit serve` with dynamic batching,
with `--max-batch-size 1`, and (with --naive) the server users write: a transformers
image-classification pipeline behind FastAPI, one request at a time.

    python benchmarks/serve_load.py [--requests 128] [--concurrency 1,8,32] [--reps 3] [--naive]
    python benchmarks/serve_load.py --model runs/x/model.safetensors --device cuda --dtype bf16
    python benchmarks/serve_load.py --concurrency 1 --backends torch,onnxruntime   # single-client latency

Each request carries one of 64 500x375 JPEGs as base64 (`/score`). Prints, per server and
concurrency: requests/s (= images/s here), p50/p90/p99 latency, the mean batch size (from
the server's own /metrics), the error rate; medians over --reps runs, the servers
interleaved (the machine is shared); then the ratios. Also `deit bench --end-to-end` at
the same batch size, the ceiling the server should come close to. The model defaults to a
random-init deit-tiny-distilled written to a temporary file (no download). With
--backends, the deit servers run once per `--backend` (interleaved); the last lines are the
single-client latency (concurrency 1: p50 and p99) of each server.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NAIVE = """
import base64, io, sys
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from transformers import pipeline

pipe = pipeline("image-classification", model=sys.argv[1], device=sys.argv[3])
app = FastAPI()

@app.get("/health")
async def health():
    return {"status": "ready"}

@app.post("/score")
async def score(request: Request):
    body = await request.json()
    images = [Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for s in body["input_data"]]
    out = pipe(images, top_k=5)
    return [[{"label": p["label"], "score": p["score"]} for p in preds] for preds in out]

print("serving", flush=True, file=sys.stderr)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int | None, env: dict):
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.stop()
            raise SystemExit("server did not start: " + "".join(self.lines))
        time.sleep(0.2)
        found = re.search(r"http://127\.0\.0\.1:(\d+)", "".join(self.lines))
        self.port = int(found.group(1)) if found else port
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the naive server prints before it listens
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit("server never answered /health")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def request(port: int, method: str, path: str, body: bytes | None = None, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        if own:
            conn.close()


def batch_stats(port: int) -> tuple[float, float] | None:
    """(sum, count) of deit_batch_size from /metrics; None for a server without it."""
    status, text, _ = request(port, "GET", "/metrics")
    if status != 200:
        return None
    text = text.decode()
    s = re.search(r"^deit_batch_size_sum (\S+)", text, re.M)
    c = re.search(r"^deit_batch_size_count (\S+)", text, re.M)
    return (float(s.group(1)), float(c.group(1))) if s and c else None


def load(port: int, bodies: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    """`requests` POST /score from `concurrency` keep-alive clients (or until max_seconds)."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + max_seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if issued[0] >= requests or time.monotonic() > deadline:
                    break
                i = issued[0]
                issued[0] += 1
            t = time.perf_counter()
            try:
                status, _, _ = request(port, "POST", "/score", bodies[i % len(bodies)], conn)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            took = time.perf_counter() - t
            with lock:
                if status == 200:
                    latencies.append(took)
                else:
                    errors[0] += 1
        conn.close()

    before = batch_stats(port)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = batch_stats(port)
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")

    mean_batch = None
    if before and after and after[1] > before[1]:
        mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    done = len(lat) + errors[0]
    return {
        "rps": len(lat) / wall,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "batch": mean_batch,
        "errors": errors[0] / done if done else 0.0,
        "n": done,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Checkpoint (default: random-init deit-tiny-distilled, written to a temp file).")
    ap.add_argument("--requests", type=int, default=128, help="Requests per concurrency level.")
    ap.add_argument("--seconds", type=float, default=60.0, help="Time cap per level.")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="--max-batch-size of the batching server.")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="--max-delay-ms of the batching server.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--naive", action="store_true", help="Also the transformers pipeline behind FastAPI.")
    ap.add_argument("--no-bench", action="store_true", help="Skip `deit bench --end-to-end`.")
    ap.add_argument("--serve-args", default="", help="More `deit serve` flags for both deit servers, e.g. '-j 1'.")
    ap.add_argument(
        "--backends", default="", help="Comma list of `deit serve --backend` values to run the deit servers with."
    )
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import numpy as np
    import torch
    from PIL import Image

    from deit_cli.checkpoints import random_model
    from deit_cli.checkpoints.writing import canonical_tensors, deit_metadata, save_safetensors, write_hf

    tmp = Path(tempfile.mkdtemp(prefix="deit-serve-load-"))
    try:
        model_path = args.model
        if model_path is None or args.naive:
            model = random_model("deit-tiny-distilled")
            if model_path is None:
                model_path = str(tmp / "tiny.safetensors")
                save_safetensors(Path(model_path), canonical_tensors(model, torch.float32), deit_metadata(model))
            if args.naive:
                (tmp / "hf").mkdir()
                write_hf(tmp / "hf", model, torch.float32)
        images = tmp / "images"
        images.mkdir()
        bodies = []
        for i in range(64):
            buf = io.BytesIO()
            img = Image.fromarray((np.random.default_rng(i).random((375, 500, 3)) * 255).astype("uint8"))
            img.save(buf, "JPEG", quality=90)
            (images / f"{i}.jpg").write_bytes(buf.getvalue())
            bodies.append(json.dumps({"input_data": [base64.b64encode(buf.getvalue()).decode()]}).encode())

        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "DEIT_API_KEY": "",
        }
        deit = [
            sys.executable,
            "-m",
            "deit_cli",
            "serve",
            "-m",
            model_path,
            "--port",
            "0",
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--max-queue",
            "1024",
            *args.serve_args.split(),
        ]
        servers = {}
        backends = [b for b in args.backends.split(",") if b] or [None]
        for b in backends:
            flags, tag = (["--backend", b], f" [{b}]") if b else ([], "")
            servers[f"deit serve (batches of {args.batch}){tag}"] = (
                deit + flags + ["--max-batch-size", str(args.batch), "--max-delay-ms", str(args.delay_ms)],
                None,
            )
            servers[f"deit serve --max-batch-size 1{tag}"] = (deit + flags + ["--max-batch-size", "1"], None)
        if args.naive:
            script = tmp / "naive.py"
            script.write_text(NAIVE)
            port = free_port()
            servers["transformers pipeline + FastAPI"] = (
                [sys.executable, str(script), str(tmp / "hf"), str(port), args.device],
                port,
            )

        results: dict[tuple[str, int], list[dict]] = {}
        for rep in range(args.reps):  # interleaved: each rep runs every server once
            for name, (cmd, port) in servers.items():
                server = Server(cmd, port, env)
                try:
                    for _ in range(3):  # untimed warm-up requests
                        request(server.port, "POST", "/score", bodies[0])
                    for c in levels:
                        r = load(server.port, bodies, c, args.requests, args.seconds)
                        results.setdefault((name, c), []).append(r)
                        print(
                            f"rep {rep + 1} {name:<36} c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50']:8.1f} ms"
                            f"  p99 {r['p99']:8.1f} ms  batch {r['batch'] or 0:5.1f}  n={r['n']}",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    server.stop()

        bench = None
        if not args.no_bench:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deit_cli",
                    "bench",
                    "-m",
                    model_path,
                    "--end-to-end",
                    str(images),
                    "-b",
                    str(args.batch),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--json",
                    "--reps",
                    str(max(3, args.reps)),
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            if out.returncode == 0:
                bench = json.loads(out.stdout)[0]["images_per_s"]
            else:
                print("deit bench --end-to-end failed: " + out.stderr.strip().splitlines()[-1], file=sys.stderr)

        med = {
            k: {
                f: statistics.median([r[f] for r in v if r[f] is not None] or [float("nan")])
                for f in ("rps", "p50", "p90", "p99", "batch", "errors")
            }
            for k, v in results.items()
        }
        print(
            f"# {len(bodies)} distinct 500x375 JPEGs, 1 image per request, {args.requests} requests per level, "
            f"medians of {args.reps} interleaved runs; device {args.device}, dtype {args.dtype}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'server':<36} {'clients':>7} {'img/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'batch':>6} {'errors':>7}"
        )
        for (name, c), m in med.items():
            batch = f"{m['batch']:6.1f}" if m["batch"] == m["batch"] else f"{'-':>6}"
            print(
                f"{name:<36} {c:>7} {m['rps']:8.1f} {m['p50']:8.1f} {m['p90']:8.1f} {m['p99']:8.1f} {batch} "
                f"{m['errors']:7.1%}"
            )
        names = list(servers)
        print()
        for c in levels:
            base = med[(names[0], c)]["rps"]
            line = f"clients {c:>3}: batching / max-batch-size 1 = {base / med[(names[1], c)]['rps']:.2f}x"
            if args.naive:
                line += f"; batching / naive = {base / med[(names[-1], c)]['rps']:.2f}x"
            if bench:
                line += f"; served / deit bench --end-to-end -b {args.batch} ({bench:.1f} img/s) = {base / bench:.0%}"
            print(line)
        if 1 in levels:
            print()
            for name in names:
                m = med[(name, 1)]
                print(f"single client: {name:<44} p50 {m['p50']:7.1f} ms  p99 {m['p99']:7.1f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
