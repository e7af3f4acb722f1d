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
    assert stdout == f"{hub.url}/{REPO}\n" and err == ""
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
    # and its default (torchvision) backend resamples within a level or so of it
    pixels = transformers.AutoImageProcessor.from_pretrained(out)(images=real_images(), return_tensors="pt")
    assert (pixels["pixel_values"] - x).abs().max() <= 0.05

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


# --------------------------------------------------------------------------- the card


def test_the_card_states_the_run_and_its_front_matter_holds_the_validation(run_dir, tmp_path, run_cli):
    from huggingface_hub import ModelCard

    out = tmp_path / "hf"
    rc, stdout, err = run_cli("push", run_dir, REPO, "--out", out, "--no-upload")
    assert rc == 0, err
    assert stdout == f"{out}\n"
    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "deit", "distillation"} <= set(meta["tags"])
    # the model-index holds the run's validation of these weights (the last epoch's)
    last = records(run_dir)[-1]
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "validation"
    got = {m["type"]: m["value"] for m in result["metrics"]}
    want = {"accuracy": last["val_top1"], "top_k_accuracy": last["val_top3"], "loss": last["val_loss"]}
    assert got == pytest.approx(want, abs=1e-4)
    # huggingface_hub reads the card as the Hub will
    card = ModelCard(readme)
    assert {(r.metric_type, round(r.metric_value, 2)) for r in card.data.eval_results} == {
        (k, round(v, 2)) for k, v in want.items()
    }
    # the training procedure, from the run's summary and options
    body = readme.lower()
    for fact in (
        "distilled data-efficient image transformer",
        "distillation token",
        "| recipe | `plain` |",
        "| epochs | 2 |",
        "| batch size (global) | 6 |",
        "cosine decay",
        "| augmentation | none",
        "| image size | 32x32 |",
        "hard, teacher `teacher.safetensors`",
        "12 training images in 3 classes",
        "validated on 6 held-out images",
        "`checks`, `horizontal`, `vertical`",
        "shorter side is resized to 36 pixels",
        "bicubic",
        f"deit classify image.jpg -m {REPO}".lower(),
        "automodelforimageclassification",
    ):
        assert fact in body, fact
    assert "not recorded" not in body
    assert str(run_dir.parent) not in readme  # no local paths on a public card
    # preprocessor_config.json states the same evaluation transform
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 36} and pre["crop_size"] == {"height": 32, "width": 32}
    assert pre["resample"] == 3 and pre["image_mean"] == [0.485, 0.456, 0.406]


def test_a_model_without_a_run_summary_gets_a_card_that_says_what_is_not_known(tmp_path, run_cli):
    import transformers

    src = tiny_model(tmp_path / "plain.safetensors", distilled=False)
    out = tmp_path / "hf"
    rc, _, err = run_cli("push", src, REPO, "--out", out, "--no-upload", "--license", "mit")
    assert rc == 0, err
    assert "no run summary" in err
    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["license"] == "mit" and "model-index" not in meta and "distillation" not in meta["tags"]
    sections = readme.split("\n## ")
    for title in ("Training data", "Training procedure", "Evaluation results"):
        (section,) = [s for s in sections if s.startswith(title)]
        assert "Not recorded in these weights" in section, title
    assert "is not distilled" in readme
    # a model that is not distilled is transformers' ViT, with our logits
    model = deit_cli.load_model(str(src))
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "ViTForImageClassification"
    x = torch.stack([eval_transform(model.preprocessing)(img) for img in real_images()])
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - model(x)).abs().max() <= 1e-4


def test_weights_away_from_their_run_keep_their_validation_and_mark_the_recipe_defaults(run_dir, tmp_path, run_cli):
    import shutil

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "model.safetensors", lone / "flowers.safetensors")
    out = tmp_path / "hf"
    rc, _, err = run_cli("push", lone / "flowers.safetensors", REPO, "--out", out, "--no-upload")
    assert rc == 0, err
    readme = (out / "README.md").read_text()
    # the summary in the weights still has the last validation
    metrics = front_matter(readme)["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == pytest.approx(records(run_dir)[-1]["val_top1"], abs=1e-4)
    # but the batch size given at training time is not known: the recipe's default, said to be one
    assert "| batch size (global) | 64 (the recipe's default) |" in readme
    assert "| epochs | 2 |" in readme  # the summary's own
    # best.safetensors is the best epoch's weights: its validation is that epoch's
    rc, _, err = run_cli("push", run_dir / "best.safetensors", REPO, "--out", tmp_path / "best", "--no-upload")
    assert rc == 0, err
    best = (tmp_path / "best" / "README.md").read_text()
    epoch = json.loads(_run_summary(run_dir / "best.safetensors"))["epochs"]
    assert f"after epoch {epoch}:" in best


def _run_summary(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["deit.run"]


# --------------------------------------------------------------------------- flags


def test_private_revision_and_commit_message_reach_the_hub(run_dir, hub, run_cli):
    rc, stdout, err = run_cli(
        "push", run_dir, REPO, "--private", "--revision", "v1", "--commit-message", "first flowers"
    )
    assert rc == 0, err
    assert stdout == f"{hub.url}/{REPO}/tree/v1\n"
    assert hub.created[-1]["visibility"] == "private"
    (pushed,) = hub.pushed
    assert pushed.revision == "v1" and pushed.summary == "first flowers"
    assert sorted(pushed.files) == sorted(FOLDER_FILES)
    assert hub.files(REPO, "main") == {}  # the branch got the commit
    # a second push to the same repo (it exists now) is a second commit; JSON on request
    rc, stdout, err = run_cli("push", run_dir, REPO, "--json")
    assert rc == 0, err
    record = json.loads(stdout)
    assert record["url"] == f"{hub.url}/{REPO}" and record["commit_url"].endswith(hub.pushed[-1].commit)
    assert len(hub.pushed) == 2 and hub.pushed[-1].revision == "main"


def test_the_token_may_come_from_the_login_file(run_dir, hub, run_cli, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    rc, _, err = run_cli("push", run_dir, REPO)
    assert rc == 0, err
    assert len(hub.pushed) == 1


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("repo_id", ["tiny-deit", "a/b/c", f"{REPO}@dev", "me/bad..name", "../x"])
def test_a_repo_id_that_is_not_owner_name_is_a_usage_error(run_dir, hub, run_cli, repo_id, tmp_path):
    rc, stdout, err = run_cli("push", run_dir, repo_id, "--out", tmp_path / "hf")
    assert rc == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "owner/name" in err
    assert hub.count() == 0 and not (tmp_path / "hf").exists()


def test_no_upload_needs_out_and_out_is_not_overwritten_without_force(run_dir, tmp_path, run_cli):
    rc, stdout, err = run_cli("push", run_dir, REPO, "--no-upload")
    assert rc == 2 and stdout == "" and "--out" in err
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, stdout, err = run_cli("push", run_dir, REPO, "--no-upload", "--out", out)
    assert rc == 73 and "--force" in err
    assert (out / "mine.txt").read_text() == "keep me"
    rc, stdout, err = run_cli("push", run_dir, REPO, "--no-upload", "--out", out, "--force")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(FOLDER_FILES)


def test_no_token_or_a_refused_one_is_access_denied(run_dir, hub, run_cli, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    rc, stdout, err = run_cli("push", run_dir, REPO, "--out", tmp_path / "a")
    assert rc == 77 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "token" in err
    assert hub.count() == 0
    monkeypatch.setenv("HF_TOKEN", "hf_not_this_one")
    rc, stdout, err = run_cli("push", run_dir, REPO)
    assert rc == 77 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "refused" in err
    assert hub.pushed == [] and REPO not in hub.repos


def test_an_unreachable_hub_is_69(run_dir, hf_env, run_cli, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # hf_env's endpoint: nothing listens there
    rc, stdout, err = run_cli("push", run_dir, REPO)
    assert rc == 69 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "unreachable" in err


def test_a_failing_hub_is_69(run_dir, hub, run_cli):
    hub.fast_retries()
    hub.fail_with = 503
    rc, stdout, err = run_cli("push", run_dir, REPO)
    assert rc == 69 and stdout == ""
    assert len(err.strip().splitlines()) == 1


def test_a_card_the_hub_refuses_is_a_usage_error(run_dir, hub, run_cli):
    hub.licenses = {"apache-2.0", "mit"}
    rc, stdout, err = run_cli("push", run_dir, REPO, "--license", "my own terms")
    assert rc == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "license" in err
    assert hub.pushed == []
