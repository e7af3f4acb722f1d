"""`--backend openvino`: the graph the onnxruntime backend builds and caches, compiled by
OpenVINO in fp32, gives deit's answers; a compiled graph that does not is an error, never
a fallback; bench runs deit on it beside onnxruntime; serve's auto counts it as a candidate;
without openvino the flag is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import images

import deit_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("openvino")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache of the test's own (DEIT_CACHE), empty at the start."""
    monkeypatch.setenv("DEIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def classify_json(run_cpu, model_path, colour_dir, *args):
    rc, out, err = run_cpu("classify", colour_dir, "-m", model_path, "--format", "jsonl", "--scores", "logit", *args)
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_classify_with_openvino_equals_torch(run_cpu, model_path, colour_dir, cache):
    torch_rows = classify_json(run_cpu, model_path, colour_dir, "--backend", "torch", "--top", "6")
    ov_rows = classify_json(run_cpu, model_path, colour_dir, "--backend", "openvino", "--top", "6")
    assert len(torch_rows) == len(ov_rows) == len(list(colour_dir.iterdir()))
    for a, b in zip(torch_rows, ov_rows):
        assert a["path"] == b["path"]
        got = {p["index"]: p["score"] for p in b["predictions"]}
        for p in a["predictions"]:
            assert got[p["index"]] == pytest.approx(p["score"], abs=1e-4)
        assert a["predictions"][0]["index"] == b["predictions"][0]["index"]
    assert len(list(cache.glob("*.onnx"))) == 1  # the onnxruntime backend's graph, built once


def test_runner_computes_in_fp32_and_equals_the_reference(model_path):
    from deit_cli.engine import ort
    from deit_cli.engine.runner import prepare

    model = deit_cli.load_model(str(model_path))
    runner = prepare(model, device="cpu", backend="openvino")
    assert runner.path == "openvino"
    # OpenVINO's CPU default is bf16 where the CPU has it; the graph is compiled f32
    assert runner._logits.__self__.precision == "<Type: 'float32'>"
    S = model.config.image_size
    for batch in (1, 5):  # the batch axis is dynamic: one graph for every size
        x = images(batch, S, seed=batch)
        with torch.no_grad():
            want = model(x)
            tokens = model.forward_features(x)
        torch.testing.assert_close(runner(x), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(runner.logits(x, "cls"), model.forward_head(tokens, "cls"), atol=1e-4, rtol=0)
        torch.testing.assert_close(runner.features(x), tokens, atol=1e-4, rtol=0)
    # a second load reads the cached graph: nothing is exported again
    before = ort.stats["exported"]
    prepare(model, device="cpu", backend="openvino")
    assert ort.stats["exported"] == before


def test_a_compiled_graph_that_answers_differently_is_an_error(run_cpu, model_path, colour_dir, monkeypatch):
    from deit_cli.engine import ov

    def off_by_a_little(self, names, feeds, run=ov._Compiled.run):
        return [out + 1e-2 for out in run(self, names, feeds)]

    monkeypatch.setattr(ov._Compiled, "run", off_by_a_little)
    rc, out, err = run_cpu("classify", colour_dir, "-m", model_path, "--backend", "openvino")
    assert rc == 65 and out == ""
    assert len(err.strip().splitlines()) == 1 and "export check failed" in err


def test_bench_runs_deit_on_openvino_beside_onnxruntime(run_cli, model_path):
    rc, out, err = run_cli(
        "bench", "-m", model_path, "--device", "cpu", "--batch", "1", "--backend", "openvino",
        "--compare", "onnxruntime", "--warmup", "1", "--iters", "2", "--reps", "2", "--json",
    )  # fmt: skip
    assert rc == 0, err
    deit, peer = json.loads(out)
    assert (deit["impl"], deit["path"]) == ("deit", "openvino")
    assert peer["impl"] == "onnxruntime" and peer["max_abs_diff"] <= 1e-4 and peer["deit_speedup"] > 0


def test_openvino_needs_the_cpu_and_fp32(run_cpu, model_path, colour_dir):
    rc, out, err = run_cpu("classify", colour_dir, "-m", model_path, "--backend", "openvino", "--dtype", "bf16")
    assert rc == 2 and out == "" and "--backend openvino runs fp32 on the CPU" in err
    assert len(err.strip().splitlines()) == 1


def test_without_openvino_the_flag_is_one_line(model_path, colour_dir):
    code = (
        "import sys; sys.modules['openvino'] = None\nfrom deit_cli.cli.app import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    args = ["classify", colour_dir, "-m", model_path, "--device", "cpu", "--backend", "openvino"]
    p = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: --backend openvino needs openvino, not installed here (pip install 'deit-cli[openvino]')"
    ]
