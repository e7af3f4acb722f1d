"""`deit bench`: runs offline for every variant, reports what it documents with sane
values, compares with timm and transformers when they are there, and says so when not.
Numbers are never asserted against a time: a benchmark is a command, not a test."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from deit_cli.variants import VARIANTS

FAST = ["--device", "cpu", "--random-init", "--warmup", "1", "--iters", "1", "--reps", "1", "--json"]
FIELDS = {
    "model",
    "impl",
    "mode",
    "device",
    "device_name",
    "dtype",
    "batch",
    "images_per_s",
    "images_per_s_min",
    "images_per_s_max",
    "ms_per_batch",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "peak_memory_mb",
    "memory",
    "params",
    "gmacs_per_image",
    "tflops",
    "peak_tflops",
    "pct_of_peak",
    "deit_speedup",
    "compile",
    "threads",
    "path",
    "torch",
    "warmup",
    "iters",
    "reps",
}


def bench_json(run_cli, *args: str) -> list[dict]:
    rc, out, err = run_cli("bench", *args)
    assert rc == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list) and rows
    return rows


# DeiT III: deit3-small benched in test_deit3.py, every variant's cost checked there without a run
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.family == "DeiT"], ids=lambda v: v.name)
def test_every_variant_benches_offline_with_sane_numbers(run_cli, variant):
    (row,) = bench_json(run_cli, "--model", variant.name, "--batch", "1", *FAST)
    assert FIELDS <= set(row)
    assert row["model"] == variant.name and row["impl"] == "deit" and row["mode"] == "model"
    assert row["device"] == "cpu" and row["dtype"] == "fp32" and row["batch"] == 1
    for key in ("images_per_s", "ms_per_batch", "latency_ms_p50", "latency_ms_p99", "tflops", "params"):
        assert row[key] > 0, key
    assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    assert row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_p99"]
    assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] >= 0
    # the cost the published tables give ("FLOPs" there are multiply-accumulates)
    assert row["gmacs_per_image"] == pytest.approx(variant.gmacs, rel=0.03)
    assert row["params"] / 1e6 == pytest.approx(variant.params_m, rel=0.01)
    assert row["torch"] and row["device_name"] and row["threads"] >= 1


def test_sweep_dtypes_threads_peak_and_csv(run_cli):
    args = ["--model", "deit-tiny", "--batch", "1,3", "--dtype", "fp32,bf16", "--threads", "1", "--peak-tflops", "2"]
    rows = bench_json(run_cli, *args, *FAST)
    assert [(r["dtype"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 3), ("bf16", 1), ("bf16", 3)]
    for r in rows:
        assert r["threads"] == 1 and r["peak_tflops"] == 2 and r["pct_of_peak"] > 0
    rc, out, err = run_cli("bench", "--model", "deit-tiny", "--batch", "2", *FAST[:-1], "--csv")
    assert rc == 0, err
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["impl"] == "deit" and row["batch"] == "2" and float(row["images_per_s"]) > 0


def test_compare_runs_the_peers_on_the_same_weights(run_cli):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    rows = bench_json(
        run_cli,
        "--model",
        "deit-tiny-distilled",
        "--batch",
        "2",
        "--compare",
        "timm,transformers",
        *FAST[:-5],
        "--reps",
        "2",
        "--json",
    )
    assert [r["impl"] for r in rows] == ["deit", "timm", "transformers"]
    assert rows[0]["deit_speedup"] == pytest.approx(1.0)
    for r in rows[1:]:
        assert r["deit_speedup"] > 0 and r["images_per_s"] > 0
        assert r["max_abs_diff"] <= 1e-4  # the same weights: the same logits
        assert r["batch"] == 2 and r["dtype"] == "fp32" and r["device"] == "cpu"


def test_compare_skips_a_missing_peer_with_a_clear_message(tmp_path):
    # `import timm` fails in this process, as if it were not installed.
    code = "import sys; sys.modules['timm'] = None\nfrom deit_cli.cli.app import main\nsys.exit(main(sys.argv[1:]))\n"
    args = ["bench", "--model", "deit-tiny", "--batch", "1", "--compare", "timm", *FAST]
    p = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert "timm is not installed; skipping it" in p.stderr
    rows = json.loads(p.stdout)
    assert [r["impl"] for r in rows] == ["deit"]


def test_end_to_end_splits_input_and_model_time(run_cli, tmp_path):
    from imagegen import noise, smooth

    for i in range(5):
        (noise if i % 2 else smooth)(300 + 10 * i, 240).save(tmp_path / f"img{i}.jpg")
    rows = bench_json(
        run_cli, "--model", "deit-tiny", "--batch", "2", "--end-to-end", str(tmp_path), "--workers", "2", *FAST
    )
    (row,) = rows
    assert row["mode"] == "end-to-end" and row["images"] == 5
    assert row["input_s"] >= 0 and row["model_s"] > 0 and row["images_per_s"] > 0


@pytest.mark.parametrize("args", [["--batch", "0"], ["--batch", "x"], ["--compare", "onnx"], ["--dtype", "fp8"]])
def test_usage_errors(run_cli, args):
    rc, out, err = run_cli("bench", "--model", "deit-tiny", *FAST, *args)
    assert rc == 2 and out == ""
    assert err.strip()
