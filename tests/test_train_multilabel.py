"""`deit train --multi-label`: one step equals a reference written here (BCE-with-logits on
the class head, AdamW), a small model learns a generated multi-label set, classify and eval
agree with the run's validation, and bad input is refused clearly.

The set: 32-pixel images of four stripes (8 px, one patch wide) in 1-3 colours of a small
palette, some plain grey (an empty label list: a negative example); labels = the colours
present."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, torchrun
from PIL import Image
from training import ARCH, assert_one_step, load_weights, records
from training import config_file as _config_file

from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.model import DeiT, DeiTConfig

PALETTE = {"blue": (30, 40, 220), "green": (30, 190, 40), "red": (220, 30, 30), "yellow": (230, 220, 30)}

pytestmark = pytest.mark.usefixtures("one_thread")


def config_file(path: Path, **kw) -> Path:
    return _config_file(path, num_classes=4, **kw)


def stripes(names: list[str], seed: int, size: int = 32) -> Image.Image:
    """Four stripes, each one of `names` (all of them present), vertical or horizontal;
    plain grey for no names."""
    rng = np.random.default_rng(seed)
    a = np.full((size, size, 3), 128.0)
    if names:
        cells = list(names) + list(rng.choice(names, 4 - len(names)))
        rng.shuffle(cells)
        for k, name in enumerate(cells):
            a[:, 8 * k : 8 * k + 8] = PALETTE[name]
        if rng.random() < 0.5:
            a = a.transpose(1, 0, 2)
    a += rng.normal(0, 12, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_jsonl(root: Path, split: str, n: int, seed: int, colours=tuple(PALETTE)) -> Path:
    """root/SPLIT.jsonl over root/SPLIT/*.png; every eighth image has no label."""
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, lines = sorted(colours), []
    for i in range(n):
        k = int(rng.integers(1, min(3, len(names)) + 1)) if i % 8 else 0
        chosen = sorted(rng.choice(names, k, replace=False).tolist()) if k else []
        stripes(chosen, seed * 1000 + i).save(root / split / f"{i:03d}.png")
        lines.append(json.dumps({"image_url": f"{split}/{i:03d}.png", "label": chosen}))
    path = root / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def micro_f1(predicted: list[set], truth: list[set]) -> float:
    tp = sum(len(p & t) for p, t in zip(predicted, truth))
    fp = sum(len(p - t) for p, t in zip(predicted, truth))
    fn = sum(len(t - p) for p, t in zip(predicted, truth))
    return 2 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------- one step


def test_one_step_equals_a_bce_reference(tmp_path, run_cpu):
    """A distilled student without a teacher: BCE on the class head only; the distillation
    head is neither trained nor saved."""
    colours = ("blue", "green", "red")
    data = make_jsonl(tmp_path / "data", "train", 12, seed=5, colours=colours)
    m = randomize(DeiT(DeiTConfig(**ARCH, distilled=True, num_classes=3)), 1)
    m.labels = list(colours)
    student = tmp_path / "student.safetensors"
    save_safetensors(student, m.state_dict(), deit_metadata(m))
    lr, wd = 1e-3, 0.05
    rc, _, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "-m",
        student,
        "--recipe",
        "plain",
        "--multi-label",
        "--epochs",
        "1",
        "--batch-size",
        "12",
        "--lr",
        lr,
        "--weight-decay",
        wd,
        "-q",
    )
    assert rc == 0, err
    ours = load_weights(tmp_path / "run" / "model.safetensors")

    # the reference: the model's own forward in training mode, the class head's logits
    import deit_cli
    from deit_cli.images import decode_image, eval_transform

    ref = deit_cli.load_model(str(student)).train().requires_grad_(True)
    t = eval_transform(ref.preprocessing)
    recs = rows(data)
    x = torch.stack([t(decode_image(str(data.parent / r["image_url"])).image) for r in recs])
    y = torch.tensor([[float(c in r["label"]) for c in colours] for r in recs])
    cls_logits = ref.head(ref.forward_features(x)[:, 0])
    loss = F.binary_cross_entropy_with_logits(cls_logits, y)  # mean over the 12 x 3 elements
    no_decay = ("cls_token", "dist_token", "pos_embed")
    params = {n: p for n, p in ref.named_parameters() if not n.startswith("head_dist.")}
    decay = [p for n, p in params.items() if p.ndim >= 2 and n not in no_decay]
    other = [p for n, p in params.items() if not (p.ndim >= 2 and n not in no_decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}], lr=lr, eps=1e-8
    )
    loss.backward()
    opt.step()
    want = {n: p.detach() for n, p in params.items()}

    assert set(ours) == set(want) and "head_dist.weight" not in ours
    before = load_weights(student)
    assert_one_step(ours, want, before, lr)
    model = deit_cli.load_model(str(tmp_path / "run" / "model.safetensors"))
    assert model.multi_label is True and model.threshold == 0.5 and model.labels == list(colours)


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from deit_cli.cli.app import main

    tmp = tmp_path_factory.mktemp("learn")
    train = make_jsonl(tmp / "data", "train", 64, seed=1)
    val = make_jsonl(tmp / "data", "val", 24, seed=2)
    t0 = time.perf_counter()
    rc = main(
        [
            "train",
            str(train),
            "--val",
            str(val),
            "-o",
            str(tmp / "run"),
            "--config",
            str(config_file(tmp / "cfg.json")),
            "--recipe",
            "plain",
            "--epochs",
            "20",
            "--batch-size",
            "16",
            "--lr",
            "5e-3",
            "--warmup-epochs",
            "1",
            "--device",
            "cpu",
            "--threshold",
            "0.5",
            "-q",
        ]
    )
    return rc, tmp, val, time.perf_counter() - t0


def test_it_learns_a_multi_label_set(learned):
    rc, tmp, _, seconds = learned
    assert rc == 0
    recs = records(tmp / "run")
    assert [r["epoch"] for r in recs] == list(range(1, 21))
    last = recs[-1]
    assert last["val_map"] >= 0.9 and last["val_f1_micro"] >= 0.8 and last["val_f1_macro"] >= 0.8, last
    assert recs[0]["val_f1_micro"] < last["val_f1_micro"] and last["train_loss"] < recs[0]["train_loss"]
    assert {"val_map", "val_f1_micro", "val_f1_macro", "val_iou_micro", "val_iou_macro", "val_loss"} <= set(last)
    assert last["val_threshold"] == 0.5 and last["val_images"] == 24
    assert seconds < 60
    # best.safetensors is the epoch with the best mAP
    best = max(recs, key=lambda r: r["val_map"])
    from safetensors import safe_open

    with safe_open(str(tmp / "run" / "best.safetensors"), "pt") as f:
        summary = json.loads(f.metadata()["deit.run"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_map"] == best["val_map"]
    assert summary["multi_label"] is True and summary["threshold"] == 0.5


def test_classify_and_eval_agree_with_the_run(learned, run_cpu):
    _, tmp, val, _ = learned
    import deit_cli

    model_file = tmp / "run" / "model.safetensors"
    for name in ("model.safetensors", "best.safetensors"):
        m = deit_cli.load_model(str(tmp / "run" / name))
        assert m.multi_label is True and m.threshold == 0.5 and m.labels == sorted(PALETTE)
        assert not m.config.distilled
    rc, out, err = run_cpu("eval", val, "-m", model_file, "--json")
    assert rc == 0, err
    ev = json.loads(out)
    assert ev["multi_label"] is True and ev["images"] == 24
    last = records(tmp / "run")[-1]
    for key in ("map", "f1_micro", "f1_macro", "iou_micro", "iou_macro"):
        assert ev[key] == pytest.approx(last[f"val_{key}"], abs=1e-6), key
    truth = [set(r["label"]) for r in rows(val)]
    rc, out, err = run_cpu(
        "classify",
        *[val.parent / r["image_url"] for r in rows(val)],
        "-m",
        model_file,
        "--format",
        "jsonl",
        "--top",
        "4",
    )
    assert rc == 0, err
    predicted = [{p["label"] for p in json.loads(line)["predictions"]} for line in out.splitlines()]
    assert len(predicted) == 24
    assert micro_f1(predicted, truth) == pytest.approx(ev["f1_micro"], abs=1e-6)
    assert any(not p for p in predicted)  # the grey images: no label over the threshold, not an error


def test_label_lists_imply_multi_label_and_csv_pipes_too(tmp_path, run_cpu):
    train = make_jsonl(tmp_path / "data", "train", 8, seed=3)
    cfg = config_file(tmp_path / "cfg.json")
    rc, out, err = run_cpu(
        "train", train, "-o", tmp_path / "run", "--config", cfg, "--recipe", "plain", "--epochs", "1", "--json"
    )
    assert rc == 0, err
    s = json.loads(out)
    assert s["multi_label"] is True and s["train_images"] == 8  # the empty lists are examples too
    csv = tmp_path / "data" / "train.csv"
    csv.write_text("path,label\n" + "".join(f"{r['image_url']},{'|'.join(r['label'])}\n" for r in rows(train)))
    rc, out, err = run_cpu(
        "train",
        csv,
        "-o",
        tmp_path / "run2",
        "--config",
        cfg,
        "--recipe",
        "plain",
        "--epochs",
        "1",
        "--val-split",
        "0.25",
        "--json",
    )
    assert rc == 0, err
    s = json.loads(out)
    assert s["multi_label"] is True and s["train_images"] + s["val_images"] == 8 and s["val_images"] >= 1
    assert "val_map" in records(tmp_path / "run2")[0]


def test_a_class_folder_tree_trains_as_multi_label_when_asked(tmp_path, run_cpu):
    train = make_jsonl(tmp_path / "data", "train", 8, seed=3)
    for r in rows(train)[1:7]:  # one label per image, as folders
        (tmp_path / "tree" / r["label"][0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(train.parent / r["image_url"], tmp_path / "tree" / r["label"][0] / Path(r["image_url"]).name)
    classes = sorted(p.name for p in (tmp_path / "tree").iterdir())
    rc, out, err = run_cpu(
        "train",
        tmp_path / "tree",
        "-o",
        tmp_path / "run",
        "--config",
        config_file(tmp_path / "c.json"),
        "--recipe",
        "plain",
        "--epochs",
        "1",
        "--multi-label",
        "--threshold",
        "0.4",
        "--json",
    )
    assert rc == 0, err
    s = json.loads(out)
    assert s["multi_label"] is True and s["classes"] == classes and s["threshold"] == 0.4
    import deit_cli

    assert deit_cli.load_model(str(tmp_path / "run" / "model.safetensors")).threshold == 0.4


def test_torchrun_two_processes_give_the_same_model_and_metrics(tmp_path, run_cli):
    train = make_jsonl(tmp_path / "data", "train", 12, seed=7)
    val = make_jsonl(tmp_path / "data", "val", 7, seed=8)  # odd: the ranks hold different shares
    args = [
        "train",
        train,
        "--val",
        val,
        "--config",
        config_file(tmp_path / "cfg.json"),
        "--recipe",
        "plain",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "-q",
    ]
    rc, _, err = run_cli(*args, "-o", tmp_path / "one")
    assert rc == 0, err
    proc = torchrun(*args, "-o", tmp_path / "two", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    one, two = (
        load_weights(tmp_path / "one" / "model.safetensors"),
        load_weights(tmp_path / "two" / "model.safetensors"),
    )
    for k in one:
        assert (one[k] - two[k]).abs().max() <= 1e-4, k
    r1, r2 = records(tmp_path / "one")[-1], records(tmp_path / "two")[-1]
    assert r2["val_images"] == 7
    for key in ("val_map", "val_f1_micro", "val_f1_macro", "val_iou_micro", "val_iou_macro", "val_loss"):
        assert r2[key] == pytest.approx(r1[key], abs=1e-4), key


def test_the_augmented_recipe_mixes_the_label_vectors(tmp_path, run_cpu):
    from deit_cli.engine.train.augment import Mixup

    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    mx, my = Mixup(0.8, 0.0, 0.5, 0.0, 4)(x, y, np.random.default_rng(0))
    lam = float(mx[0, 0, 0, 0] - 2) / (0 - 2)  # row 0 mixed with row 2: lam·0 + (1 − lam)·2
    torch.testing.assert_close(my, lam * y + (1 - lam) * y.flip(0))
    # the scratch recipe (mixup, cutmix, RandAugment, erasing, EMA) runs; smoothing is off, with a note
    train = make_jsonl(tmp_path / "data", "train", 6, seed=4)
    rc, _, err = run_cpu(
        "train",
        train,
        "-o",
        tmp_path / "run",
        "--config",
        config_file(tmp_path / "cfg.json"),
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--multi-label",
    )
    assert rc == 0, err
    assert "label smoothing (0.1) does not apply to multi-label training" in err
    assert all(np.isfinite(r["train_loss"]) for r in records(tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["multi_label"] is True and ckpt["args"]["recipe"]["smoothing"] == 0.0


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small(tmp_path):
    return make_jsonl(tmp_path / "data", "train", 8, seed=6), config_file(tmp_path / "cfg.json")


def plain(data, run, cfg, *extra):
    return ("train", data, "-o", run, "--config", cfg, "--recipe", "plain", "--epochs", "1", *extra)


def test_a_validation_label_unknown_to_training_is_refused(tmp_path, run_cpu, small):
    data, cfg = small
    val = tmp_path / "data" / "val.jsonl"
    val.write_text(json.dumps({"image_url": "train/001.png", "label": ["red", "mauve"]}) + "\n")
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg, "--val", val))
    assert rc == 65 and "validation labels unknown to training: 'mauve'" in err
    assert not (tmp_path / "run").exists()


def test_single_label_training_with_a_multi_label_validation_set_is_refused(tmp_path, run_cpu, small):
    data, cfg = small
    single = tmp_path / "data" / "single.jsonl"
    single.write_text(
        "".join(
            json.dumps({"image_url": r["image_url"], "label": r["label"][0]}) + "\n" for r in rows(data) if r["label"]
        )
    )
    rc, _, err = run_cpu(*plain(single, tmp_path / "run", cfg, "--val", data))
    assert rc == 65 and "single-label run" in err and "--multi-label" in err


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_a_threshold_outside_0_1_is_a_usage_error(tmp_path, run_cpu, small, value):
    data, cfg = small
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg, "--threshold", value))
    assert rc == 2 and "[0, 1]" in err


def test_a_threshold_needs_multi_label_training(tmp_path, run_cpu, small):
    data, cfg = small
    single = tmp_path / "data" / "single.jsonl"
    single.write_text(
        "".join(
            json.dumps({"image_url": r["image_url"], "label": r["label"][0]}) + "\n" for r in rows(data) if r["label"]
        )
    )
    rc, _, err = run_cpu(*plain(single, tmp_path / "run", cfg, "--threshold", "0.3"))
    assert rc == 2 and "multi-label" in err


def test_a_teacher_with_multi_label_is_a_usage_error(tmp_path, run_cpu, small):
    data, cfg = small
    teacher = tmp_path / "t.safetensors"
    m = randomize(DeiT(DeiTConfig(**ARCH, distilled=False, num_classes=4)), 2)
    m.labels = sorted(PALETTE)
    save_safetensors(teacher, m.state_dict(), deit_metadata(m))
    for extra in (["--multi-label"], []):  # given, or implied by the lists
        rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg, "--teacher", teacher, *extra))
        assert rc == 2 and "--teacher" in err and "single-label" in err, err
    assert not (tmp_path / "run").exists()


def test_resuming_a_single_label_run_with_multi_label_data_is_refused(tmp_path, run_cpu, small):
    data, cfg = small
    single = tmp_path / "data" / "single.jsonl"
    single.write_text(
        "".join(
            json.dumps({"image_url": r["image_url"], "label": r["label"][0]}) + "\n" for r in rows(data) if r["label"]
        )
    )
    run = tmp_path / "run"
    assert run_cpu(*plain(single, run, cfg, "-q"))[0] == 0
    before = (run / "checkpoint.pt").read_bytes()
    data_lists = tmp_path / "data" / "lists.jsonl"
    data_lists.write_text(data.read_text())
    single.write_text(data.read_text())  # the run's data file now gives lists of labels
    rc, _, err = run_cpu("train", single, "-o", run, "--resume", "--epochs", "2")
    assert rc == 65 and "the run is single-label, but the data is multi-label" in err
    rc, _, err = run_cpu("train", single, "-o", run, "--resume", "--epochs", "2", "--multi-label")
    assert rc == 2 and "single-label" in err and "--multi-label" in err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_set_of_only_empty_lists_is_refused(tmp_path, run_cpu, small):
    _, cfg = small
    f = tmp_path / "none.jsonl"
    f.write_text("".join(json.dumps({"image_url": f"data/train/{i:03d}.png", "label": []}) + "\n" for i in range(3)))
    rc, _, err = run_cpu(*plain(f, tmp_path / "run", cfg))
    assert rc == 65 and "no labels" in err


def test_a_pipe_in_a_jsonl_label_asks_for_a_list(tmp_path, run_cpu, small):
    data, cfg = small
    f = tmp_path / "pipe.jsonl"
    f.write_text(json.dumps({"image_url": "data/train/001.png", "label": "red|blue"}) + "\n")
    rc, _, err = run_cpu(*plain(f, tmp_path / "run", cfg))
    assert rc == 65 and "holds '|'" in err and '["a", "b"]' in err


def test_a_corrupt_validation_image_is_skipped_and_counted(tmp_path, run_cpu, small):
    data, cfg = small
    (tmp_path / "data" / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    val = tmp_path / "data" / "val.jsonl"
    val.write_text(
        "".join(line + "\n" for line in data.read_text().splitlines()[:4])
        + json.dumps({"image_url": "train/broken.png", "label": ["red"]})
        + "\n"
    )
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg, "--val", val))
    assert rc == 0, err
    rec = records(tmp_path / "run")[0]
    assert rec["val_images"] == 4 and rec["val_skipped"] == 1 and "broken.png" in rec["val_skipped_images"][0]
