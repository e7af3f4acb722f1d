"""`--backend onnxruntime`: the graph `deit export` writes, cached on disk and checked on
every load, gives deit's answers; the cache is reused and never trusted blindly; bench
compares with it as a peer; without onnxruntime the flag is one line and `auto` is torch.
`--backend openvino`: the same graph compiled by OpenVINO in fp32 gives the same answers, a
compiled graph that does not is an error (never a fallback), and serve's auto counts it."""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache of the test's own (DEIT_CACHE), empty at the start."""
    monkeypatch.setenv("DEIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def classify_json(run_cpu, model_path, colour_dir, *args):
    rc, out, err = run_cpu("classify", colour_dir, "-m", model_path, "--format", "jsonl", "--scores", "logit", *args)
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_classify_with_a_graph_backend_equals_torch(run_cpu, model_path, colour_dir, cache, backend):
    torch_rows = classify_json(run_cpu, model_path, colour_dir, "--backend", "torch", "--top", "6")
    ort_rows = classify_json(run_cpu, model_path, colour_dir, "--backend", backend, "--top", "6")
    assert len(torch_rows) == len(ort_rows) == len(list(colour_dir.iterdir()))
    for a, b in zip(torch_rows, ort_rows):
        assert a["path"] == b["path"]
        got = {p["index"]: p["score"] for p in b["predictions"]}
        for p in a["predictions"]:
            assert got[p["index"]] == pytest.approx(p["score"], abs=1e-4)
        assert a["predictions"][0]["index"] == b["predictions"][0]["index"]
    assert len(list(cache.glob("*.onnx"))) == 1  # built once, into the cache (openvino compiles it)


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_runner_logits_and_features_equal_the_reference(model_path, backend):
    from deit_cli.engine import ort
    from deit_cli.engine.runner import prepare

    model = deit_cli.load_model(str(model_path))
    runner = prepare(model, device="cpu", backend=backend)
    assert runner.path == backend
    if backend == "openvino":  # OpenVINO's CPU default is bf16 where the CPU has it; compiled f32 here
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
    before = ort.stats["exported"]
    prepare(model, device="cpu", backend=backend)  # a second load reads the cached graph
    assert ort.stats["exported"] == before


def test_the_cache_is_reused_not_rebuilt(model_path, cache):
    from deit_cli.engine import ort
    from deit_cli.engine.runner import prepare

    model = deit_cli.load_model(str(model_path))
    before = dict(ort.stats)
    prepare(model, device="cpu", backend="onnxruntime")
    (graph,) = cache.glob("*.onnx")
    mtime = graph.stat().st_mtime_ns
    prepare(model, device="cpu", backend="onnxruntime")  # a second load: read, checked, not exported
    assert ort.stats["exported"] - before["exported"] == 1
    assert ort.stats["loaded"] - before["loaded"] == 1
    assert graph.stat().st_mtime_ns == mtime and list(cache.glob("*.onnx")) == [graph]

    # Other weights: another key, another file; the first one stays.
    other = deit_cli.load_model(str(model_path))
    with torch.no_grad():
        other.head.bias.add_(1.0)
    prepare(other, device="cpu", backend="onnxruntime")
    assert len(list(cache.glob("*.onnx"))) == 2 and ort.stats["exported"] - before["exported"] == 2


@pytest.mark.parametrize("damage", ["corrupt", "other weights", "wrong key"])
def test_a_bad_cache_file_is_rebuilt_never_trusted(model_path, cache, damage):
    from deit_cli.engine import ort
    from deit_cli.engine.runner import prepare

    model = deit_cli.load_model(str(model_path))
    prepare(model, device="cpu", backend="onnxruntime")
    (graph,) = cache.glob("*.onnx")
    if damage == "corrupt":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    else:
        # A real graph, checked by onnx and onnxruntime, but of other weights: under this file's
        # name ("other weights": its own key inside; "wrong key": this file's key, wrong weights).
        other = deit_cli.load_model(str(model_path))
        with torch.no_grad():
            other.head.bias.add_(1.0)
        prepare(other, device="cpu", backend="onnxruntime")
        (theirs,) = set(cache.glob("*.onnx")) - {graph}
        if damage == "wrong key":
            import onnx

            proto = onnx.load(str(theirs))
            for p in proto.metadata_props:
                if p.key == ort.KEY_META:
                    p.value = graph.stem
            onnx.save(proto, str(theirs))
        theirs.replace(graph)
    rebuilt = ort.stats["rebuilt"]
    runner = prepare(model, device="cpu", backend="onnxruntime")
    assert ort.stats["rebuilt"] == rebuilt + 1
    x = images(2, model.config.image_size, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), atol=1e-4, rtol=0)
    prepare(model, device="cpu", backend="onnxruntime")  # the rebuilt file is good: read, not rebuilt
    assert ort.stats["rebuilt"] == rebuilt + 1


def test_bench_compare_onnxruntime_prints_the_peer_row(run_cli, model_path):
    rc, out, err = run_cli(
        "bench", "-m", model_path, "--device", "cpu", "--batch", "1,3", "--compare", "onnxruntime",
        "--warmup", "1", "--iters", "2", "--reps", "2", "--json",
    )  # fmt: skip
    assert rc == 0, err
    rows = json.loads(out)
    assert [(r["impl"], r["batch"]) for r in rows] == [("deit", 1), ("onnxruntime", 1), ("deit", 3), ("onnxruntime", 3)]
    for r in rows[1::2]:
        assert r["max_abs_diff"] <= 1e-4 and r["deit_speedup"] > 0 and r["images_per_s"] > 0
        assert r["path"] == "fp32 graph (deit export)"


def test_bench_backend_onnxruntime_runs_deit_on_it(run_cli, model_path):
    rc, out, err = run_cli(
        "bench", "-m", model_path, "--device", "cpu", "--batch", "2", "--backend", "onnxruntime",
        "--warmup", "1", "--iters", "1", "--reps", "1", "--json",
    )  # fmt: skip
    assert rc == 0, err
    (row,) = json.loads(out)
    assert row["impl"] == "deit" and row["path"] == "onnxruntime"


def test_onnxruntime_needs_the_cpu_and_fp32(run_cpu, model_path, colour_dir):
    rc, out, err = run_cpu("classify", colour_dir, "-m", model_path, "--backend", "onnxruntime", "--dtype", "bf16")
    assert rc == 2 and out == "" and "--backend onnxruntime runs fp32 on the CPU" in err
    assert len(err.strip().splitlines()) == 1


def run_without_onnxruntime(*args):
    """`deit ARGS...` in a process where `import onnxruntime` fails, as if not installed."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from deit_cli.cli.app import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_without_onnxruntime_the_flag_is_one_line_and_auto_is_torch(model_path, colour_dir):
    p = run_without_onnxruntime("classify", colour_dir, "-m", model_path, "--device", "cpu", "--backend", "onnxruntime")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: --backend onnxruntime needs onnxruntime, not installed here (pip install 'deit-cli[onnx]')"
    ]
    p = run_without_onnxruntime("classify", colour_dir, "-m", model_path, "--device", "cpu", "--format", "jsonl")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == len(list(colour_dir.iterdir()))
    p = run_without_onnxruntime(
        "bench", "-m", model_path, "--device", "cpu", "--batch", "1", "--compare", "onnxruntime",
        "--warmup", "1", "--iters", "1", "--reps", "1", "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "onnxruntime is not installed; skipping it in --compare (pip install 'deit-cli[onnx]')" in p.stderr
    assert [r["impl"] for r in json.loads(p.stdout)] == ["deit"]


def test_help_shows_the_flag_without_importing_torch_or_onnxruntime():
    for command in ("classify", "bench", "serve"):
        probe = (
            f"import sys; from deit_cli.cli.app import main; rc = main(['{command}', '--help']); "
            "print(sorted({'torch', 'onnx', 'onnxruntime', 'openvino'} & set(sys.modules)), file=sys.stderr); "
            "sys.exit(rc)"
        )
        p = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert p.returncode == 0 and "--backend" in p.stdout
        assert p.stderr.strip().endswith("[]")


def test_serve_auto_picks_a_backend_per_batch_size_with_the_same_answers(model_path):
    from deit_cli.engine.serve import ServedModel

    model = deit_cli.load_model(str(model_path))
    auto = ServedModel(model, device="cpu", backend="auto")
    plain = ServedModel(model, device="cpu", backend="torch")
    auto.warm_up(max_batch_size=4)
    plain.warm_up(max_batch_size=4)
    assert set(auto.choice) == {1, 4} and set(auto.choice.values()) <= {"torch", *auto.others}
    assert "onnxruntime" in auto.others  # and openvino, where installed
    assert ("openvino" in auto.others) == (importlib.util.find_spec("openvino") is not None)
    assert plain.choice == {}
    S = model.config.image_size
    for n in (1, 3, 4):
        x = list(images(n, S, seed=n))
        for name in ("torch", *auto.others):  # whichever was measured fastest, the answers agree
            auto.choice = dict.fromkeys(auto.choice, name)
            got = auto.probabilities(x)
            assert abs(got - plain.probabilities(x)).max() <= 1e-4


@needs_openvino
def test_an_openvino_graph_that_answers_differently_is_an_error(run_cpu, model_path, colour_dir, monkeypatch):
    from deit_cli.engine import ov

    def off_by_a_little(self, names, feeds, run=ov._Compiled.run):
        return [out + 1e-2 for out in run(self, names, feeds)]

    monkeypatch.setattr(ov._Compiled, "run", off_by_a_little)
    rc, out, err = run_cpu("classify", colour_dir, "-m", model_path, "--backend", "openvino")
    assert rc == 65 and out == ""
    assert len(err.strip().splitlines()) == 1 and "export check failed" in err


@needs_openvino
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
