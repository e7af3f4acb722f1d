"""Files we write get the mode any other tool would give them (0666 & ~umask, 0777 &
~umask for directories), whichever command writes them; temporaries never survive."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from colours import COLOURS

from deit_cli.errors import InputNotFound
from deit_cli.files import input_error


def modes(root: Path) -> dict[str, int]:
    """Every path under root (and root itself) -> its permission bits."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.lstat().st_mode) for p in paths}


def expect(root: Path, mask: int) -> dict[str, int]:
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): (0o777 if p.is_dir() else 0o666) & ~mask for p in paths}


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def labelled_set(tmp_path, colour_dir) -> Path:
    root = tmp_path / "set"
    for name in COLOURS:
        (root / name).mkdir(parents=True)
        shutil.copy(colour_dir / f"{name}.png", root / name / "a.png")
    return root


@pytest.mark.parametrize("to, name", [("deit", "m.safetensors"), ("timm", "t.safetensors"), ("hf", "hf")])
def test_convert_outputs(run_cli, model_path, tmp_path, umask, to, name):
    dst = tmp_path / "out" / name
    dst.parent.mkdir()
    rc, _, err = run_cli("convert", model_path, dst, "--to", to)
    assert rc == 0, err
    assert modes(dst) == expect(dst, umask)
    if to == "hf":
        assert {"hf/model.safetensors", "hf/config.json", "hf/preprocessor_config.json"} <= set(modes(dst))
    assert sorted(p.name for p in dst.parent.iterdir()) == [name]  # no temporaries


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".jsonl"])
def test_extract_features_outputs(run_cpu, model_path, colour_dir, tmp_path, umask, suffix):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / f"feats{suffix}"
    rc, _, err = run_cpu("extract-features", colour_dir, "--model", model_path, "-o", dst, "-q")
    assert rc == 0, err
    written = sorted(out.iterdir())
    assert [p.name for p in written] == (["feats.npy", "feats.paths.jsonl"] if suffix == ".npy" else [dst.name])
    for p in written:
        assert modes(p) == expect(p, umask)


def test_eval_predictions(run_cpu, model_path, labelled_set, tmp_path, umask):
    dst = tmp_path / "predictions.jsonl"
    rc, _, err = run_cpu("eval", labelled_set, "--model", model_path, "--predictions", dst, "--json")
    assert rc == 0, err
    assert modes(dst) == expect(dst, umask)


@pytest.mark.parametrize(
    "error, why",
    [
        (FileNotFoundError(2, "x"), "no such file"),
        (PermissionError(13, "x"), "permission denied"),
        (IsADirectoryError(21, "x"), "is a directory"),
        (OSError(5, "Input/output error"), "cannot read"),
    ],
)
def test_one_input_error_mapping(error, why):
    e = input_error("some/file", error)
    assert isinstance(e, InputNotFound) and e.exit_code == 66
    assert e.message.startswith("some/file: ") and why in e.message


@pytest.mark.parametrize("command", ["eval", "convert"])
def test_a_directory_where_a_file_is_expected_is_66_everywhere(run_cli, tmp_path, command):
    d = tmp_path / "dir.csv"
    d.mkdir()
    if command == "eval":
        rc, _, err = run_cli("eval", tmp_path, "--labels", d)  # a list file that is a directory
    else:
        (d / "x.safetensors").mkdir()
        rc, _, err = run_cli("convert", d / "x.safetensors", tmp_path / "o.safetensors")
    assert rc == 66, err
    assert len(err.strip().splitlines()) == 1
