"""`deit classify`: the right labels and probabilities in every format, bad inputs, options."""

from __future__ import annotations

import csv
import io
import json
import os
import sys

import numpy as np
import pytest
from colours import COLOURS, LABELS, colour_files, expected_scores
from imagegen import PDF_BYTES, truncated_jpeg
from PIL import Image


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def check_predictions(preds: list[dict], probs: np.ndarray, top: int) -> None:
    order = np.argsort(-probs)[:top]
    assert [p["rank"] for p in preds] == list(range(1, top + 1))
    assert [p["index"] for p in preds] == order.tolist()
    assert [p["label"] for p in preds] == [LABELS[i] for i in order]
    np.testing.assert_allclose([p["score"] for p in preds], probs[order], atol=1e-6)


def test_jsonl_reports_the_models_labels_and_probabilities(run_cpu, model_path, colour_dir):
    files = colour_files(colour_dir)
    rc, out, err = run_cpu("classify", *files, "--model", model_path, "--format", "jsonl", "--top", "3")
    assert rc == 0 and err == ""
    recs = records(out)
    assert [r["path"] for r in recs] == [str(f) for f in files]
    assert [r["predictions"][0]["label"] for r in recs] == LABELS
    for rec, probs in zip(recs, expected_scores(model_path, files)):
        check_predictions(rec["predictions"], probs, 3)
        assert rec["model"] == str(model_path) and rec["head"] == "avg"  # what the user named


def test_every_format_carries_the_same_numbers_exactly(run_cpu, model_path, colour_dir):
    files = [colour_dir / "mixed.png", *colour_files(colour_dir)[:3]]
    args = ["classify", *files, "--model", model_path, "--top", "4", "--format"]
    rc, out, _ = run_cpu(*args, "jsonl")
    assert rc == 0
    jsonl = records(out)
    rc, out, _ = run_cpu(*args, "json")
    assert rc == 0 and json.loads(out) == jsonl
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        rc, out, _ = run_cpu(*args, fmt)
        assert rc == 0
        rows = list(csv.DictReader(io.StringIO(out), delimiter=delimiter))
        assert list(rows[0]) == ["path", "rank", "index", "label", "score", "error"]
        assert len(rows) == 4 * len(files)
        flat = [(r["path"], p["rank"], p["index"], p["label"], p["score"]) for r in jsonl for p in r["predictions"]]
        assert [(r["path"], int(r["rank"]), int(r["index"]), r["label"], float(r["score"])) for r in rows] == flat
    for rec, probs in zip(jsonl, expected_scores(model_path, files)):
        check_predictions(rec["predictions"], probs, 4)


def test_table_for_a_few_images_and_one_table_for_many(run_cpu, model_path, colour_dir):
    files = colour_files(colour_dir)
    rc, out, _ = run_cpu("classify", files[0], "--model", model_path, "--format", "table", "--top", "2")
    assert rc == 0
    probs = expected_scores(model_path, files[:1])[0]
    assert str(files[0]) in out and "red" in out and "magenta" in out and "green" not in out
    assert f"{probs[0] * 100:.1f}%" in out and "█" in out
    rc, out, _ = run_cpu("classify", *files, "--model", model_path, "--format", "table")
    assert rc == 0
    lines = out.splitlines()
    for f, label in zip(files, LABELS):  # one row per image: its path and its best label
        assert any(f.name in line and f" {label} " in line for line in lines), (label, out)


@pytest.mark.parametrize("head", ["cls", "dist", "avg"])
def test_heads_and_logits(run_cpu, model_path, colour_dir, head):
    files = colour_files(colour_dir)[3:]
    rc, out, _ = run_cpu(
        "classify",
        *files,
        "--model",
        model_path,
        "--head",
        head,
        "--scores",
        "logit",
        "--top",
        "6",
        "--format",
        "jsonl",
    )
    assert rc == 0
    for rec, logits in zip(records(out), expected_scores(model_path, files, head=head, scores="logit")):
        assert rec["head"] == head
        check_predictions(rec["predictions"], logits, 6)


def test_top_is_capped_at_the_number_of_classes(run_cpu, model_path, colour_dir):
    rc, out, _ = run_cpu("classify", colour_dir / "red.png", "--model", model_path, "--top", "50")
    assert rc == 0 and len(records(out)[0]["predictions"]) == len(COLOURS)
    assert sum(p["score"] for p in records(out)[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "options, kwargs",
    [(["--crop-pct", "0.5"], {"crop_pct": 0.5}), (["--resize", "squash"], {"resize_mode": "squash"})],
)
def test_preprocessing_options(run_cpu, model_path, tmp_path, options, kwargs):
    # Red, blue and green bands: each option changes what the model sees, and the scores
    # follow the model on exactly that. (--no-exif is in test_features: rotating an image
    # about its centre keeps its mean colour, so only the patch tokens can show it.)
    a = np.zeros((40, 100, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:] = (0, 0, 255)
    a[:, 80:] = (0, 255, 0)
    path = tmp_path / "bands.png"
    Image.fromarray(a).save(path)
    rc, out, _ = run_cpu("classify", path, "--model", model_path, "--top", "6", *options)
    assert rc == 0
    want = expected_scores(model_path, [path], **kwargs)[0]
    assert not np.allclose(want, expected_scores(model_path, [path])[0], atol=1e-3)  # the option matters
    check_predictions(records(out)[0]["predictions"], want, 6)


@pytest.fixture
def mixed_inputs(tmp_path, colour_dir):
    """Good images interleaved with every kind of bad input the issue lists."""
    d = tmp_path / "in"
    d.mkdir()
    red, blue = colour_dir / "red.png", colour_dir / "blue.png"
    spaced = d / "with space.png"
    spaced.write_bytes(red.read_bytes())
    newline = d / "new\nline.png"
    newline.write_bytes(blue.read_bytes())
    dash = d / "-dash.png"
    dash.write_bytes((colour_dir / "green.png").read_bytes())
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("hello, not an image\n")
    (d / "doc.jpg").write_bytes(PDF_BYTES)
    truncated_jpeg(d / "cut.jpg")
    (tmp_path / "noimages").mkdir()
    inputs = [
        spaced,
        d / "missing.png",
        d / "empty.png",
        newline,
        d / "text.jpg",
        d / "doc.jpg",
        d / "cut.jpg",
        tmp_path / "noimages",
        dash,
    ]
    good = {str(spaced): "red", str(newline): "blue", str(dash): "green"}
    return [str(p) for p in inputs], good


def test_bad_inputs_get_error_records_and_the_rest_are_right(run_cpu, model_path, mixed_inputs):
    inputs, good = mixed_inputs
    rc, out, err = run_cpu("classify", "--model", model_path, "--batch-size", "2", "--", *inputs)
    assert rc == 1
    recs = records(out)
    assert [r["path"] for r in recs] == inputs  # input order, every input, keyed by its path
    for rec in recs:
        if rec["path"] in good:
            assert "error" not in rec and rec["predictions"][0]["label"] == good[rec["path"]]
        else:
            assert set(rec) == {"path", "error"} and rec["error"]
    errors = {r["path"]: r["error"] for r in recs if "error" in r}
    assert "no such file" in errors[inputs[1]]
    assert "empty" in errors[inputs[2]]
    assert "PDF" in errors[inputs[5]]
    assert "truncated" in errors[inputs[6]]
    assert "no images" in errors[inputs[7]]
    # one line on stderr per failure, then the summary
    err_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == len(errors) + 1 and "6 of 9 inputs failed" in err_lines[-1]
    # the same in CSV: an error row per failure, keyed by its path
    rc, out, _ = run_cpu("classify", "--model", model_path, "--format", "csv", "--top", "1", "--", *inputs)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 1 and [r["path"] for r in rows] == inputs
    assert {r["path"]: r["error"] for r in rows if r["error"]} == errors


def test_allow_truncated(run_cpu, model_path, tmp_path):
    path = truncated_jpeg(tmp_path / "cut.jpg")
    rc, out, _ = run_cpu("classify", path, "--model", model_path, "--allow-truncated")
    assert rc == 0 and "predictions" in records(out)[0]


def test_none_readable_is_66(run_cpu, model_path, tmp_path):
    (tmp_path / "a.jpg").write_text("text")
    rc, out, err = run_cpu("classify", tmp_path / "a.jpg", tmp_path / "missing.png", "--model", model_path)
    assert rc == 66
    assert [r["path"] for r in records(out)] == [str(tmp_path / "a.jpg"), str(tmp_path / "missing.png")]
    assert "none of the 2 inputs could be read" in err
    rc, out, err = run_cpu("classify", tmp_path / "missing.png", "--model", model_path, "--format", "json")
    assert rc == 66 and json.loads(out) == [
        {"path": str(tmp_path / "missing.png"), "error": "no such file or directory"}
    ]


def test_paths_from_stdin(run_cpu, model_path, colour_dir, monkeypatch):
    files = colour_files(colour_dir)[:3]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(map(str, files)).encode() + b"\n")))
    rc, out, _ = run_cpu("classify", "-", "--model", model_path)
    assert rc == 0 and [r["predictions"][0]["label"] for r in records(out)] == LABELS[:3]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\0".join(os.fsencode(f) for f in files))))
    rc, out, _ = run_cpu("classify", "-0", "-", "--model", model_path)
    assert rc == 0 and [r["path"] for r in records(out)] == [str(f) for f in files]


@pytest.mark.parametrize(
    "args",
    [
        ["--format", "xml"],
        ["--head", "both"],
        ["--top", "0"],
        ["--crop-pct", "1.5"],
        ["--resize", "stretch"],
        ["--dtype", "fp8"],
        ["--batch-size", "0"],
    ],
)
def test_usage_errors(run_cpu, model_path, colour_dir, args):
    rc, out, _ = run_cpu("classify", colour_dir / "red.png", "--model", model_path, *args)
    assert rc == 2 and out == ""


def test_low_precision(run_cpu, model_path, colour_dir):
    files = colour_files(colour_dir)
    rc, out, _ = run_cpu("classify", *files, "--model", model_path, "--dtype", "bf16", "--device", "cpu")
    assert rc == 0
    for rec, probs in zip(records(out), expected_scores(model_path, files)):
        assert rec["predictions"][0]["label"] == LABELS[int(probs.argmax())]
        assert rec["predictions"][0]["score"] == pytest.approx(float(probs.max()), abs=0.05)
