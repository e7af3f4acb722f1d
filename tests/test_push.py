"""`deit push SOURCE REPO_ID`: a `deit train` run becomes a folder that transformers loads
with no code of ours (the distilled class for a distilled model, the same logits on real
images), with a model card whose front matter the Hub reads; it arrives on the tests'
loopback hub in one commit, byte for byte; and every refusal is one line and its code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakehub import fake_hub, hf_env  # noqa: F401 - fixtures
from imagegen import noise, smooth
from test_train import make_set, tiny_model
from training import config_file, records

import deit_cli
from deit_cli.engine.push import FOLDER_FILES
from deit_cli.images import eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "hf_write_token"
REPO = "someone/tiny-deit"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished `deit train` run: a distilled student, a teacher, a validation set."""
    from deit_cli.cli.app import main

    tmp = tmp_path_factory.mktemp("push-run")
    make_set(tmp / "flowers", 4, 2)
    config_file(tmp / "cfg.json", num_classes=3, distilled=True)
    tiny_model(tmp / "teacher.safetensors", distilled=False, seed=2)
    args = ["train", tmp / "flowers", "-o", tmp / "run", "--config", tmp / "cfg.json", "--recipe", "plain"]
    args += ["--epochs", "2", "--batch-size", "6", "--teacher", tmp / "teacher.safetensors", "--device", "cpu"]
    assert main([str(a) for a in args]) == 0
    return tmp / "run"


@pytest.fixture
def hub(fake_hub, monkeypatch):  # noqa: F811
    """The loopback hub, taking writes from TOKEN, which HF_TOKEN holds."""
    fake_hub.allow_writes(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake_hub


def front_matter(readme: str) -> dict:
    import yaml  # PyYAML: a dependency of huggingface_hub

    assert readme.startswith("---\n")
    head, _, _ = readme[4:].partition("\n---\n")
    return yaml.safe_load(head)


def real_images() -> list:
    return [smooth(50, 37), noise(41, 64, seed=1), smooth(32, 32)]


# --------------------------------------------------------------------------- the folder and the upload


def test_a_run_arrives_on_the_hub_in_one_commit_and_loads_in_transformers(run_dir, tmp_path, hub, run_cli, run_cpu):
    import transformers

    out = tmp_path / "hf"
    rc, stdout, err = run_cli("push", run_dir, REPO, "--out", out)
    assert rc == 0, err + str([(r.method, r.path) for r in hub.requests])
    assert stdout == f"{hub.url}/{REPO}\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(FOLDER_FILES)
    # one commit, and what arrived is the folder, byte for byte
    assert len(hub.pushed) == 1
    pushed = hub.pushed[0]
    assert pushed.repo_id == REPO and pushed.revision == "main"
    assert pushed.files == {name: (out / name).read_bytes() for name in FOLDER_FILES}
    assert hub.files(REPO) == pushed.files

    # transformers, with no code of ours: the distilled class, our labels, our logits
    ours = deit_cli.load_model(str(run_dir))
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "DeiTForImageClassificationWithTeacher"
    assert [hf.config.id2label[i] for i in range(3)] == ours.labels
    assert hf.config.label2id == {label: i for i, label in enumerate(ours.labels)}
    transform = eval_transform(ours.preprocessing)
    x = torch.stack([transform(img) for img in real_images()])
    with torch.no_grad():
        hf_logits = hf(pixel_values=x).logits
        assert (hf_logits - ours(x)).abs().max() <= 1e-4
    # its image processor (PIL) is our evaluation transform, aspect ratio kept
    processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    pixels = processor(images=real_images(), return_tensors="pt")["pixel_values"]
    assert (pixels - x).abs().max() <= 1e-6

    # `deit classify -m DIR` reads the folder: the same probabilities as transformers'
    paths = []
    for i, img in enumerate(real_images()):
        img.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    rc, stdout, err = run_cpu("classify", *paths, "-m", out, "--format", "jsonl", "--top", "3")
    assert rc == 0, err
    probs = hf_logits.softmax(-1)
    for row, p in zip(map(json.loads, stdout.splitlines()), probs):
        got = {pred["label"]: pred["score"] for pred in row["predictions"]}
        assert got == pytest.approx({hf.config.id2label[i]: p[i].item() for i in range(3)}, abs=1e-4)
    # and back from the hub by its id
    back = deit_cli.load_model(REPO)
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max() <= 1e-5
