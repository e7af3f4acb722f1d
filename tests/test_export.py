"""`deit export`: the ONNX graph gives our logits (or features) in onnxruntime, carries its
labels and preprocessing, reproduces `deit classify` with the README's example, and is
never left behind (or put over something) when it is wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import images, randomize

import deit_cli
from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.config import DeiTConfig
from deit_cli.model import DeiT

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["tabby, tabby cat", "café", "red fox", "goldfish", "daisy", "tulip", "oak", "kite", "axe", "zebra"]


def tiny(distilled: bool, seed: int) -> DeiT:
    """A small random DeiT at 224 (every weight seeded random, so every mapping matters)."""
    cfg = DeiTConfig(
        image_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, distilled=distilled, num_classes=len(LABELS)
    )
    m = randomize(DeiT(cfg), seed)
    m.labels, m.source = list(LABELS), f"tiny-{'distilled' if distilled else 'plain'}"
    return m


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, distilled, seed in (("distilled", True, 1), ("plain", False, 2)):
        m = tiny(distilled, seed)
        out[name] = d / f"{name}.safetensors"
        save_safetensors(out[name], m.state_dict(), deit_metadata(m))
    return out


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_graph(sess, x: torch.Tensor) -> np.ndarray:
    return sess.run(None, {"pixel_values": x.numpy()})[0]


def export_json(run_cli, *args) -> dict:
    rc, out, err = run_cli("export", *args, "--json")
    assert rc == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------- the graph is our model


@pytest.mark.parametrize("size", [224, 160])
@pytest.mark.parametrize("kind", ["distilled", "plain"])
def test_onnxruntime_logits_equal_ours(run_cli, tiny_paths, tmp_path, kind, size):
    src = tiny_paths[kind]
    before = src.read_bytes()
    dst = tmp_path / "m.onnx"
    args = ["--image-size", str(size)] if size != 224 else []
    summary = export_json(run_cli, src, dst, *args)
    assert summary["checked_batches"] == [1, 3] and summary["max_abs_diff"] <= summary["tolerance"] <= 2e-4
    assert summary["head"] == ("avg" if kind == "distilled" else "cls") and summary["image_size"] == size
    assert src.read_bytes() == before  # SRC is never touched

    model = deit_cli.load_model(str(src), image_size=size)  # resampled position embeddings
    sess = session(dst)
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("pixel_values", "tensor(float)", ["batch", 3, size, size])
    assert (outp.name, outp.type, outp.shape) == ("logits", "tensor(float)", ["batch", len(LABELS)])
    for batch in (1, 3):  # a dynamic batch axis; inputs other than the export's own check
        x = images(batch, size, seed=10 + batch)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(run_graph(sess, x), want, atol=1e-4, rtol=0)

    # self-contained: the metadata parses back and matches the model
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["deit.labels"]) == LABELS == model.labels
    assert meta["deit.multi_label"] == "false"
    pre = json.loads(meta["deit.preprocessing"])
    assert pre == {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.preprocessing).items()},
        "resize_size": model.preprocessing.resize_size,
    }
    assert pre["image_size"] == size and pre["resize_size"] == int(size / 0.875) and pre["interpolation"] == "bicubic"
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert DeiTConfig.from_dict(json.loads(meta["deit.config"])) == model.config
    assert meta["deit.source"] == str(src) and meta["deit.origin"] == f"tiny-{kind}"
    assert meta["deit.version"] == deit_cli.__version__
    assert meta["deit.output"] == "logits" and meta["deit.dtype"] == "fp32"
    from deit_cli.engine.export import read_metadata

    parsed = read_metadata(dst)
    assert parsed["labels"] == LABELS and parsed["multi_label"] is False and parsed["preprocessing"] == pre


def test_fp16_within_tolerance_and_same_top1(tiny_paths, tmp_path):
    from deit_cli.engine.export import TOLERANCES, export_model, read_metadata

    dst = tmp_path / "half.onnx"
    model = deit_cli.load_model(str(tiny_paths["distilled"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_model(model, dst, dtype="fp16", head="cls")  # the library API
    assert result.dtype == "fp16" and result.top1_agreement == 1.0 and result.max_abs_diff <= result.tolerance
    assert model.dtype == torch.float32 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert read_metadata(dst)["dtype"] == "fp16" and read_metadata(dst)["head"] == "cls"
    weights = [t for t in onnx.load(str(dst)).graph.initializer if t.dims and np.prod(t.dims) > 100]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)  # stored in fp16
    x = images(8, 224, seed=5)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), "cls").numpy()
    got = run_graph(session(dst), x)  # float32 in, float32 out, whatever the stored dtype
    atol, rtol = TOLERANCES[torch.float16]
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= atol + rtol * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_features_equal_extract_features(run_cli, run_cpu, model_path, colour_dir, tmp_path):
    dst = tmp_path / "feats.onnx"
    summary = export_json(run_cli, model_path, dst, "--features", "--pool", "avg")
    assert summary["output"] == "features" and summary["pool"] == "avg" and summary["output_shape"] == ["batch", 8]
    files = sorted(colour_dir.glob("*.png"))
    rc, _, err = run_cpu("extract-features", *files, "--model", model_path, "--pool", "avg", "-o", tmp_path / "f.npy")
    assert rc == 0, err
    want = np.load(tmp_path / "f.npy")
    from colours import model_inputs

    x = model_inputs(deit_cli.load_model(str(model_path)), files)
    sess = session(dst)
    assert sess.get_outputs()[0].name == "features"
    np.testing.assert_allclose(run_graph(sess, x), want, atol=1e-4, rtol=0)
    assert sess.get_modelmeta().custom_metadata_map["deit.pool"] == "avg"


# --------------------------------------------------------------------------- the README's example


def readme_example() -> str:
    """The onnxruntime example of the export guide (docs/export.md, linked from the README)."""
    for name in ("docs/export.md", "README.md"):
        path = ROOT / name
        if path.is_file():
            for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
                if "onnxruntime" in block and "deit.preprocessing" in block:
                    return block
    raise AssertionError("no onnxruntime example in docs/export.md or README.md")


def test_readme_example_gives_classify_top5(run_cli, run_cpu, tiny_paths, tmp_path, monkeypatch, capsys):
    from imagegen import save_with_orientation, smooth

    src = tiny_paths["distilled"]
    assert run_cli("export", src, tmp_path / "model.onnx", "--quiet", "--json")[0] == 0
    # a photo-like JPEG, not square, rotated by its EXIF tag: every preprocessing step matters
    save_with_orientation(smooth(300, 410), tmp_path / "photo.jpg", 6, quality=90)
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README example", "exec"), scope)  # noqa: S102 - our own documentation
    assert capsys.readouterr().out == f"{scope['top5']}\n"

    rc, out, err = run_cpu("classify", "photo.jpg", "--model", src, "--top", "5", "--json")
    assert rc == 0, err
    (record,) = json.loads(out)
    want = [(p["label"], p["score"]) for p in record["predictions"]]
    got = scope["top5"]
    assert [label for label, _ in got] == [label for label, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=2e-6)


# --------------------------------------------------------------------------- bad input


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_existing_destination_is_73_unless_force(run_cli, model_path, tmp_path):
    dst = tmp_path / "m.onnx"
    dst.write_bytes(b"mine")
    rc, out, err = run_cli("export", model_path, dst)
    assert rc == 73 and out == "" and "already exists" in err and "--force" in err
    assert dst.read_bytes() == b"mine"
    rc, out, err = run_cli("export", model_path, dst, "--force")  # piped: one JSON record, no --json needed
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["destination"] == str(dst) and session(dst).get_outputs()[0].shape == ["batch", 6]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file"])
def test_unwritable_destination_is_73(run_cli, model_path, tmp_path, where):
    (tmp_path / "file").write_text("x")
    dst = tmp_path / ("nowhere" if where == "missing-dir" else "file") / "m.onnx"
    rc, out, err = run_cli("export", model_path, dst)
    assert rc == 73 and out == "" and len(err.strip().splitlines()) == 1


def test_unwritable_directory_is_73(run_cli, model_path, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    try:
        rc, _, err = run_cli("export", model_path, d / "m.onnx")
        assert rc == 73 and "not writable" in err
    finally:
        d.chmod(0o700)


@pytest.mark.parametrize("opset", ["5", "16", "26", "999"])
def test_unknown_opset_is_a_usage_error_and_writes_nothing(run_cli, model_path, tmp_path, opset):
    rc, out, err = run_cli("export", model_path, tmp_path / "m.onnx", "--opset", opset)
    assert rc == 2 and out == "" and f"--opset {opset}" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx", "onnxscript"])
def test_missing_extra_is_one_line_naming_the_extra(run_cli, model_path, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    rc, out, err = run_cli("export", model_path, tmp_path / "m.onnx")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: deit export needs {missing}, not installed here (pip install 'deit-cli[onnx]')"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_mismatch_is_65_and_leaves_nothing(run_cli, model_path, tmp_path, monkeypatch, existing):
    from deit_cli.engine import export as engine

    real = engine._reference
    monkeypatch.setattr(engine, "_reference", lambda *a: real(*a) + 0.01)  # our answer moves; the graph's does not
    dst = tmp_path / "m.onnx"
    if existing:
        dst.write_bytes(b"mine")
    rc, out, err = run_cli("export", model_path, dst, *(["--force"] if existing else []))
    assert rc == 65 and out == ""
    assert "export check failed" in err and "nothing written" in err and len(err.strip().splitlines()) == 1
    assert (dst.read_bytes() == b"mine") if existing else not dst.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--head", "dist"], "needs a distilled model"),
        (["--pool", "avg"], "--pool needs --features"),
        (["--features", "--head", "cls"], "choose one"),
        (["--dtype", "bf16"], "unknown precision"),
        (["--image-size", "100"], "not a multiple of the patch size 16"),
    ],
)
def test_usage_errors(run_cli, tiny_paths, tmp_path, args, message):
    rc, out, err = run_cli("export", tiny_paths["plain"], tmp_path / "m.onnx", *args)
    assert rc == 2 and out == "" and message in err
    assert list(tmp_path.iterdir()) == []


def test_panel_on_a_terminal(run_cli, model_path, tmp_path, monkeypatch):
    from deit_cli.cli import output

    monkeypatch.setattr(output, "stdout_is_terminal", lambda: True)
    rc, out, _ = run_cli("export", model_path, tmp_path / "b.onnx", "--head", "dist")
    assert rc == 0 and "exported" in out and "pixel_values float32 [batch × 3 × 32 × 32]" in out
    assert "logits float32 [batch × 6]" in out and "head dist" in out and "top-1 agreement 100%" in out


def test_help_does_not_import_torch_or_onnx():
    probe = (
        "import sys; from deit_cli.cli.app import main; rc = main(['export', '--help']); "
        "print(sorted({'torch', 'onnx', 'onnxruntime'} & set(sys.modules)), file=sys.stderr); sys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Usage" in p.stdout
    assert p.stderr.strip().endswith("[]")
