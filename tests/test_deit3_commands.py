"""`deit serve` and `deit push` on a DeiT III: the server answers through the runner as
`deit classify` does, and push writes timm's hub layout (transformers has no class for DeiT
III), which timm loads from the tests' loopback hub with no code of ours: the same labels,
the same preprocessing, the same logits."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakehub import fake_hub, hf_env  # noqa: F401 - fixtures
from imagegen import noise, smooth
from references import timm_model

import deit_cli
from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.engine.push import TIMM_FOLDER_FILES
from deit_cli.images import eval_transform

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["apple", "bear", "cat", "dog", "eel"]
REPO = "someone/deit3-little"


@pytest.fixture(scope="module")
def little(tmp_path_factory) -> Path:
    """timm's deit3_small at 64 pixels, 2 blocks, 5 labelled classes, random weights (LayerScale
    far from its init), saved by deit."""
    ref = timm_model("deit3_small_patch16_224", seed=3, img_size=64, depth=2, num_classes=5)
    d = tmp_path_factory.mktemp("deit3-commands")
    save_safetensors(d / "bare.safetensors", {k: v.contiguous() for k, v in ref.state_dict().items()}, {})
    model = deit_cli.load_model(str(d / "bare.safetensors"))
    model.labels = list(LABELS)
    save_safetensors(d / "little.safetensors", model.state_dict(), deit_metadata(model))
    return d / "little.safetensors"


def pictures(tmp_path: Path) -> list[Path]:
    paths = []
    for i, img in enumerate([smooth(80, 61), noise(64, 90, seed=1), smooth(64, 64)]):
        img.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    return paths


def test_serve_answers_a_deit3_as_classify_does(little, tmp_path, run_cpu):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from deit_cli.checkpoints import load_model
    from deit_cli.engine.serve import ServedModel
    from deit_cli.serve.app import create_app
    from deit_cli.serve.service import Settings

    paths = pictures(tmp_path)
    served = ServedModel(load_model(str(little)), device="cpu")
    with TestClient(create_app(served, Settings(max_images=8))) as client:
        body = {"input_data": [base64.b64encode(p.read_bytes()).decode() for p in paths], "params": {"top_k": 5}}
        r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    rc, out, err = run_cpu("classify", *paths, "-m", little, "--format", "json", "--top", "5")
    assert rc == 0, err
    for answer, record in zip(r.json(), json.loads(out)):
        assert [p["label"] for p in answer] == [p["label"] for p in record["predictions"]]
        np.testing.assert_allclose([p["score"] for p in answer], [p["score"] for p in record["predictions"]], atol=1e-5)


def test_push_writes_timms_layout_and_timm_loads_it_from_the_hub(little, tmp_path, run_cli, fake_hub):  # noqa: F811
    out = tmp_path / "folder"
    rc, _, err = run_cli("push", little, REPO, "--no-upload", "--out", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(TIMM_FOLDER_FILES)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "deit3_small_patch16_224" and config["num_classes"] == 5
    assert config["label_names"] == LABELS
    pre, ours = config["pretrained_cfg"], deit_cli.load_model(str(little))
    want = ours.preprocessing
    assert (pre["input_size"], pre["crop_pct"], pre["interpolation"], pre["mean"], pre["std"]) == (
        [3, 64, 64],
        want.crop_pct,
        want.interpolation,
        list(want.mean),
        list(want.std),
    )
    card = (out / "README.md").read_text()
    assert 'timm.create_model("hf-hub:someone/deit3-little", pretrained=True)' in card
    assert "library_name: timm" in card and "DeiT III" in card

    # timm, from the loopback hub, with no code of ours
    fake_hub.serve_repos({REPO: out})
    theirs = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    assert theirs.pretrained_cfg["label_names"] == LABELS
    imgs = [smooth(80, 61), noise(64, 90, seed=1), smooth(64, 64)]
    x = torch.stack([eval_transform(ours.preprocessing)(img) for img in imgs])
    # timm's transform from the pretrained_cfg is our evaluation transform
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=theirs))
    assert (torch.stack([transform(img) for img in imgs]) - x).abs().max() <= 1e-5
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() <= 1e-4
        # and deit reads the folder back as it wrote it
        back = deit_cli.load_model(str(out))
        assert back.labels == LABELS and back.preprocessing == ours.preprocessing
        assert (back(x) - ours(x)).abs().max() <= 1e-5


def test_a_distilled_deit3_is_refused_in_one_line(tmp_path, run_cli):
    from deit_cli.config import DeiTConfig
    from deit_cli.model import DeiT

    m = DeiT(
        DeiTConfig(
            image_size=32,
            patch_size=8,
            embed_dim=32,
            depth=1,
            num_heads=2,
            num_classes=2,
            layer_scale_init=1e-4,
            pos_embed_prefix=False,
        )
    )
    save_safetensors(tmp_path / "d.safetensors", m.state_dict(), deit_metadata(m))
    rc, _, err = run_cli("push", tmp_path / "d.safetensors", REPO, "--no-upload", "--out", tmp_path / "o")
    assert rc == 2 and "timm has no DeiT III with a distillation token" in err
    assert len(err.strip().splitlines()) <= 2  # the line and its hint
    assert not (tmp_path / "o").exists()


def test_the_card_of_a_deit3_run_states_its_recipe(tmp_path, run_cpu, run_cli):
    from test_train import make_set

    from deit_cli.config import DeiTConfig

    make_set(tmp_path / "data", 3)
    cfg = DeiTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        distilled=False,
        num_classes=3,
        layer_scale_init=1e-4,
        pos_embed_prefix=False,
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    rc, _, err = run_cpu(
        "train",
        tmp_path / "data",
        "-o",
        tmp_path / "run",
        "--recipe",
        "deit3",
        "--config",
        tmp_path / "cfg.json",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "-q",
    )
    assert rc == 0, err
    rc, _, err = run_cli("push", tmp_path / "run", REPO, "--no-upload", "--out", tmp_path / "folder")
    assert rc == 0, err
    card = (tmp_path / "folder" / "README.md").read_text()
    for words in (
        "LAMB",
        "3-Augment (one of grayscale, solarization, Gaussian blur, then colour jitter 0.3)",
        "binary cross-entropy on binarized targets",
        "| stochastic depth (drop path) | 0.05 in every block |",
        "peak 0.004 (not scaled by the batch)",
        "models_v2, LayerScale at 0.0001",
    ):
        assert words in card, words
