"""`deit extract-features`: the model's own features, pooled as asked, in every output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from colours import colour_files, expected_features, model_inputs
from imagegen import save_with_orientation
from PIL import Image

POOLS = ["token", "avg", "cls", "dist", "tokens", "mean"]


def inputs(colour_dir):
    return [*colour_files(colour_dir), colour_dir / "mixed.png"]


def jsonl_features(out: str) -> tuple[list[str], np.ndarray]:
    recs = [json.loads(line) for line in out.splitlines()]
    return [r["path"] for r in recs], np.array([r["features"] for r in recs], dtype=np.float32)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("normalize", [False, True])
def test_stdout_jsonl_is_forward_features_pooled(run_cpu, model_path, colour_dir, pool, normalize):
    files = inputs(colour_dir)
    rc, out, err = run_cpu(
        "extract-features",
        *files,
        "--model",
        model_path,
        "--pool",
        pool,
        "--batch-size",
        "3",
        *(["--normalize"] if normalize else []),
    )
    assert rc == 0 and err == ""
    paths, feats = jsonl_features(out)
    assert paths == [str(f) for f in files]
    want = expected_features(model_path, files, pool, normalize)
    np.testing.assert_allclose(feats, want, atol=1e-6)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-6)


def test_default_pool_of_a_distilled_model_is_token(run_cpu, model_path, colour_dir):
    files = inputs(colour_dir)
    rc, out, _ = run_cpu("extract-features", *files, "--model", model_path)
    assert rc == 0
    np.testing.assert_allclose(jsonl_features(out)[1], expected_features(model_path, files, "token"), atol=1e-6)


@pytest.mark.parametrize("pool", ["token", "avg", "tokens"])
def test_npy_with_paths_sidecar(run_cpu, model_path, colour_dir, tmp_path, pool):
    files = inputs(colour_dir)
    dst = tmp_path / "feats.npy"
    rc, out, err = run_cpu(
        "extract-features", *files, "--model", model_path, "-o", dst, "--pool", pool, "--batch-size", "4"
    )
    assert rc == 0 and out == "" and "wrote 7" in err
    feats = np.load(dst)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected_features(model_path, files, pool), atol=1e-6)
    side = [json.loads(line) for line in (tmp_path / "feats.paths.jsonl").read_text().splitlines()]
    assert side == [{"row": i, "path": str(f)} for i, f in enumerate(files)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npy", "feats.paths.jsonl"]  # no temporaries


def test_safetensors_with_paths_in_metadata_and_float16(run_cpu, model_path, colour_dir, tmp_path):
    from safetensors import safe_open

    files = inputs(colour_dir)
    dst = tmp_path / "feats.safetensors"
    rc, _, _ = run_cpu(
        "extract-features",
        *files,
        "--model",
        model_path,
        "-o",
        dst,
        "--pool",
        "mean",
        "--normalize",
        "--out-dtype",
        "fp16",
    )
    assert rc == 0
    with safe_open(str(dst), "np") as f:
        meta = f.metadata()
        feats = f.get_tensor("features")
    assert feats.dtype == np.float16 and feats.shape == (7, 8)
    want = expected_features(model_path, files, "mean", normalize=True)
    np.testing.assert_allclose(feats.astype(np.float32), want, atol=1e-3)
    assert json.loads(meta["paths"]) == [str(f) for f in files] and json.loads(meta["errors"]) == []
    assert meta["pool"] == "avg" and meta["normalize"] == "true" and meta["model"] == str(model_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.safetensors"]


def test_jsonl_file_and_float16_values_parse_back_exactly(run_cpu, model_path, colour_dir, tmp_path):
    files = inputs(colour_dir)
    dst = tmp_path / "feats.jsonl"
    rc, out, _ = run_cpu("extract-features", *files, "--model", model_path, "-o", dst, "--out-dtype", "float16")
    assert rc == 0 and out == ""
    paths, feats = jsonl_features(dst.read_text())
    want = expected_features(model_path, files, "token")
    assert paths == [str(f) for f in files]
    # every value is exactly a float16, the nearest to the model's float32 feature
    np.testing.assert_array_equal(feats.astype(np.float16).astype(np.float32), feats)
    np.testing.assert_allclose(feats, want.astype(np.float16).astype(np.float32), atol=1e-3)


def test_existing_output_is_73_unless_force(run_cpu, model_path, colour_dir, tmp_path):
    dst = tmp_path / "feats.npy"
    dst.write_bytes(b"mine")
    rc, out, err = run_cpu("extract-features", colour_dir / "red.png", "--model", model_path, "-o", dst)
    assert rc == 73 and "already exists" in err and "--force" in err and dst.read_bytes() == b"mine"
    (tmp_path / "other.npy").touch()
    (tmp_path / "other.paths.jsonl").write_text("mine")  # the sidecar is the user's too
    rc, _, _ = run_cpu("extract-features", colour_dir / "red.png", "--model", model_path, "-o", tmp_path / "other.npy")
    assert rc == 73 and (tmp_path / "other.paths.jsonl").read_text() == "mine"
    rc, _, _ = run_cpu("extract-features", colour_dir / "red.png", "--model", model_path, "-o", dst, "--force")
    assert rc == 0 and np.load(dst).shape == (1, 8)


def test_bad_inputs_are_recorded_and_the_rows_stay_right(run_cpu, model_path, colour_dir, tmp_path):
    good = colour_files(colour_dir)[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    files = [good[0], bad, good[1], tmp_path / "missing.png", good[2]]
    dst = tmp_path / "out" / "feats.npy"
    dst.parent.mkdir()
    rc, out, err = run_cpu("extract-features", *files, "--model", model_path, "-o", dst, "--batch-size", "2")
    assert rc == 1 and out == ""
    assert f"error: {bad}: not an image" in err and f"error: {tmp_path / 'missing.png'}: no such file" in err
    np.testing.assert_allclose(np.load(dst), expected_features(model_path, good, "token"), atol=1e-6)
    side = [json.loads(line) for line in (tmp_path / "out" / "feats.paths.jsonl").read_text().splitlines()]
    assert [r["path"] for r in side] == [str(f) for f in files]
    assert [r.get("row") for r in side] == [0, None, 1, None, 2]
    assert "not an image" in side[1]["error"] and "no such file" in side[3]["error"]
    # on stdout, error records in place
    rc, out, _ = run_cpu("extract-features", *files, "--model", model_path)
    recs = [json.loads(line) for line in out.splitlines()]
    assert rc == 1 and [r["path"] for r in recs] == [str(f) for f in files]
    assert [("error" in r) for r in recs] == [False, True, False, True, False]


def test_none_readable_is_66_and_writes_nothing(run_cpu, model_path, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    for name in ("feats.npy", "feats.safetensors", "feats.jsonl"):
        rc, out, err = run_cpu("extract-features", bad, "--model", model_path, "-o", tmp_path / name)
        assert rc == 66 and "could not be read" in err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.png"]


def test_no_exif_changes_the_patch_tokens(run_cpu, model_path, tmp_path):
    a = np.zeros((40, 100, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:] = (0, 0, 255)
    path = save_with_orientation(Image.fromarray(a), tmp_path / "rotated.png", 6)
    results = {}
    for exif in (True, False):
        rc, out, _ = run_cpu(
            "extract-features", path, "--model", model_path, "--pool", "tokens", *([] if exif else ["--no-exif"])
        )
        assert rc == 0
        results[exif] = jsonl_features(out)[1][0]
        from deit_cli.checkpoints import load_model

        model = load_model(str(model_path))
        want = model.forward_features(model_inputs(model, [path], exif_transpose=exif)).detach().numpy()[0]
        np.testing.assert_allclose(results[exif], want, atol=1e-6)
    assert not np.allclose(results[True], results[False], atol=1e-3)


@pytest.mark.parametrize(
    "args",
    [["--format", "npy"], ["-o", "feats.txt"], ["--pool", "max"], ["--out-dtype", "int8"]],
)
def test_usage_errors(run_cpu, model_path, colour_dir, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cpu("extract-features", colour_dir / "red.png", "--model", model_path, *args)
    assert rc == 2 and out == ""


def test_npy_writer_patches_the_count_in(tmp_path):
    from deit_cli.engine.features import NpyWriter

    rows = np.random.default_rng(0).standard_normal((1000, 3, 5)).astype(np.float32)
    with NpyWriter(tmp_path / "x.npy", (3, 5), "float16") as w:
        for row in rows:
            w.append(row)
    got = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert got.shape == (1000, 3, 5) and got.dtype == np.float16
    np.testing.assert_array_equal(got, rows.astype(np.float16))
