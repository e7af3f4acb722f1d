"""Multi-label models: the model knows it is one (and its threshold) through every format,
classify reports the labels over the threshold with sigmoid scores, eval gives mAP, F1 and
IoU computed exactly as documented."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from colours import LABELS, colour_files, colour_model, model_inputs

from deit_cli.engine.metrics import MultiLabelMetrics, ScoredImage, average_precision


@pytest.fixture(scope="module")
def multi_path(tmp_path_factory) -> Path:
    """The colour model as a multi-label model with threshold 0.3 (class head only)."""
    from deit_cli.checkpoints.writing import deit_metadata, save_safetensors

    m = colour_model()
    m.multi_label, m.threshold = True, 0.3
    path = tmp_path_factory.mktemp("multi") / "multi.safetensors"
    save_safetensors(path, m.state_dict(), deit_metadata(m))
    return path


def sigmoid_scores(model_path: Path, paths) -> np.ndarray:
    """(images, classes): the model's own sigmoid scores, one image at a time."""
    from deit_cli.checkpoints import load_model

    model = load_model(str(model_path))
    x = model_inputs(model, paths)
    with torch.no_grad():
        return torch.cat([model(x[i : i + 1]) for i in range(len(x))]).sigmoid().numpy()


def over(scores: np.ndarray, t: float, top: int = 99) -> list[int]:
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= t]
    return order[:top]


def test_the_model_knows_it_is_multi_label(multi_path):
    from deit_cli import load_model

    model = load_model(str(multi_path))
    assert model.multi_label is True and model.threshold == 0.3


@pytest.mark.parametrize("threshold, top", [(None, 5), ("0.6", 5), ("0", 2), ("1", 5)])
def test_classify_reports_the_labels_over_the_threshold(run_cpu, multi_path, colour_dir, threshold, top):
    files = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    args = ["classify", *files, "-m", multi_path, "--format", "jsonl", "--top", str(top)]
    rc, out, err = run_cpu(*args, *(["--threshold", threshold] if threshold else []))
    assert rc == 0, err
    t = 0.3 if threshold is None else float(threshold)
    for rec, scores in zip(map(json.loads, out.splitlines()), sigmoid_scores(multi_path, files)):
        assert rec["threshold"] == t
        want = over(scores, t, top)
        assert [p["index"] for p in rec["predictions"]] == want  # best first; maybe none
        np.testing.assert_allclose([p["score"] for p in rec["predictions"]], scores[want], atol=1e-6)
    if threshold == "1":  # nothing reaches 1.0: empty lists, not errors
        assert all(json.loads(line)["predictions"] == [] for line in out.splitlines())


def test_classify_table_and_csv_show_an_empty_result(run_cpu, multi_path, colour_dir):
    rc, out, _ = run_cpu("classify", colour_dir / "red.png", "-m", multi_path, "--threshold", "1", "--format", "csv")
    assert rc == 0 and out.splitlines()[1].startswith(str(colour_dir / "red.png"))
    rc, out, _ = run_cpu("classify", colour_dir / "red.png", "-m", multi_path, "--threshold", "1", "--format", "table")
    assert rc == 0 and "no label at or above the threshold" in " ".join(out.split())


def test_threshold_outside_0_1_is_a_usage_error(run_cpu, multi_path, colour_dir):
    rc, out, err = run_cpu("classify", colour_dir / "red.png", "-m", multi_path, "--threshold", "1.5")
    assert rc == 2 and out == "" and "[0, 1]" in err


@pytest.mark.parametrize("to", ["deit", "hf"])
def test_convert_keeps_it(run_cli, multi_path, tmp_path, to):
    from deit_cli import load_model

    dst = tmp_path / ("m.safetensors" if to == "deit" else "hf")
    rc, _, err = run_cli("convert", multi_path, dst, "--to", to)
    assert rc == 0, err
    back = load_model(str(dst))
    assert back.multi_label is True and back.threshold == 0.3
    if to == "hf":
        import transformers

        hf = transformers.AutoModelForImageClassification.from_pretrained(dst)
        assert hf.config.problem_type == "multi_label_classification"
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = load_model(str(multi_path))(x)
            np.testing.assert_allclose(hf(pixel_values=x).logits.numpy(), ours.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- metrics


def test_metrics_against_a_hand_computed_case():
    # 4 images, 3 classes. Class 0: positives at scores .9 and .4, a negative at .6:
    # ranked .9(+) .6(-) .4(+) .1(-): AP = 1/2·1 + 1/2·2/3 = 5/6. Class 1: its one positive
    # ranked second: AP = 1/2. Class 2 has no positive: left out of mAP.
    scores = np.array([[0.9, 0.2, 0.1], [0.6, 0.85, 0.8], [0.4, 0.8, 0.3], [0.1, 0.1, 0.2]], np.float32)
    targets = [[0], [], [0, 1], []]
    m = MultiLabelMetrics(3, threshold=0.5)
    for i, (s, t) in enumerate(zip(scores, targets)):
        m.add(ScoredImage(i, f"{i}.png", targets=t, scores=s))
    m.add(ScoredImage(4, "bad.png", "not an image", targets=[1]))
    d = m.to_dict(["a", "b", "c"], per_class=True)
    assert d["map"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    # at 0.5: class 0 TP 1 (.9) FP 1 (.6) FN 1 (.4); class 1 TP 1 (.8) FP 1 (.85) FN 0;
    # class 2 TP 0 FP 1 (.8) FN 0
    assert d["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 1))
    assert d["iou_micro"] == pytest.approx(2 / (2 + 3 + 1))
    assert d["f1_macro"] == pytest.approx((2 / 4 + 2 / 3 + 0) / 3)
    assert d["iou_macro"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert d["images"] == 4 and d["failed"] == 1 and d["threshold"] == 0.5
    assert [(r["label"], r["positives"], r["predicted"]) for r in d["per_class"]] == [
        ("a", 2, 2),
        ("b", 1, 2),
        ("c", 0, 1),
    ]
    assert d["per_class"][2]["ap"] is None


def test_average_precision_is_scikit_learns_definition():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], size=30).astype(np.float32)  # ties included
        y = rng.random(30) < 0.4
        if y.any():
            assert average_precision(s, y) == pytest.approx(sklearn.average_precision_score(y, s))


# --------------------------------------------------------------------------- eval


@pytest.fixture
def multi_set(tmp_path, colour_dir) -> Path:
    """A JSONL set: each colour image labelled with its colour and, for some, a second one."""
    root = tmp_path / "set"
    (root / "img").mkdir(parents=True)
    lines = []
    for i, name in enumerate(LABELS):
        shutil.copy(colour_dir / f"{name}.png", root / "img" / f"{name}.png")
        labels = [name] if i % 2 else [name, LABELS[(i + 1) % len(LABELS)]]
        lines.append(json.dumps({"image_url": f"img/{name}.png", "label": labels}))
    shutil.copy(colour_dir / "mixed.png", root / "img" / "mixed.png")
    lines.append(json.dumps({"path": "img/mixed.png", "label": []}))  # a negative example
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    return root / "val.jsonl"


def test_eval_reports_what_classify_predicts(run_cpu, multi_path, multi_set, tmp_path):
    rc, out, err = run_cpu(
        "eval", multi_set, "-m", multi_path, "--json", "--per-class", "--predictions", tmp_path / "p.jsonl"
    )
    assert rc == 0, err
    s = json.loads(out)
    assert s["multi_label"] is True and s["threshold"] == 0.3 and s["images"] == 7
    # micro-F1 from what classify says for the same images
    rows = [json.loads(line) for line in multi_set.read_text().splitlines()]
    paths = [multi_set.parent / r.get("image_url", r.get("path")) for r in rows]
    rc, out, _ = run_cpu("classify", *paths, "-m", multi_path, "--format", "jsonl", "--top", "6")
    tp = fp = fn = 0
    for rec, row in zip(map(json.loads, out.splitlines()), rows):
        got, want = {p["label"] for p in rec["predictions"]}, set(row["label"])
        tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
    assert s["f1_micro"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s["map"] is not None and 0 <= s["map"] <= 1
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["targets"] for p in preds] == [r["label"] for r in rows]


def test_csv_with_pipes_is_multi_label(run_cpu, multi_path, colour_dir, tmp_path):
    shutil.copy(colour_dir / "red.png", tmp_path / "r.png")
    shutil.copy(colour_dir / "blue.png", tmp_path / "b.png")
    (tmp_path / "list.csv").write_text("path,label\nr.png,red|yellow\nb.png,blue\n")
    rc, out, err = run_cpu("eval", tmp_path / "list.csv", "-m", multi_path, "--json")
    assert rc == 0, err
    assert json.loads(out)["images"] == 2


def test_kind_mix_ups_are_clear_errors(run_cpu, multi_path, model_path, multi_set, tmp_path, colour_dir):
    folders = tmp_path / "folders"
    (folders / "red").mkdir(parents=True)
    shutil.copy(colour_dir / "red.png", folders / "red" / "a.png")
    rc, out, err = run_cpu("eval", folders, "-m", multi_path)
    assert rc == 65 and out == "" and "multi-label" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run_cpu("eval", multi_set, "-m", model_path)
    assert rc == 65 and "single-label" in err


def test_an_unknown_label_is_an_error(run_cpu, multi_path, multi_set):
    multi_set.write_text(multi_set.read_text() + json.dumps({"path": "img/red.png", "label": ["red", "mauve"]}) + "\n")
    rc, _, err = run_cpu("eval", multi_set, "-m", multi_path)
    assert rc == 65 and "mauve" in err


# --------------------------------------------------------------------------- serve


def test_serve_answers_the_labels_over_the_threshold(run_cpu, multi_path, colour_dir):
    import base64

    from starlette.testclient import TestClient

    from deit_cli.checkpoints import load_model
    from deit_cli.engine.serve import ServedModel
    from deit_cli.serve.app import create_app
    from deit_cli.serve.service import Settings

    files = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    want = sigmoid_scores(multi_path, files)
    with TestClient(create_app(ServedModel(load_model(str(multi_path)), device="cpu"), Settings())) as client:
        for params, t in (({}, 0.3), ({"threshold": 0.6}, 0.6)):
            r = client.post("/score", json={"input_data": images, "params": params})
            assert r.status_code == 200, r.text
            for answer, scores in zip(r.json(), want):
                assert [a["label"] for a in answer] == [LABELS[i] for i in over(scores, t)]
                np.testing.assert_allclose([a["score"] for a in answer], scores[over(scores, t)], atol=1e-5)
        r = client.post(
            "/v2/models/deit/infer",
            json={"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images}]},
        )
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], want.shape), want, atol=1e-5)
        assert outputs["predicted"]["data"] == [bool(v) for v in (want >= 0.3).ravel()]
        assert client.post("/score", json={"input_data": images[:1], "params": {"threshold": 2}}).status_code == 400


def test_export_says_it_is_multi_label(run_cli, multi_path, tmp_path):
    pytest.importorskip("onnxruntime")
    from deit_cli.engine.export import read_metadata

    rc, _, err = run_cli("export", multi_path, tmp_path / "m.onnx")
    assert rc == 0, err
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["multi_label"] is True and meta["threshold"] == 0.3
