"""`deit train`: one step equals a reference built from timm, it learns, it resumes exactly
after a real Ctrl-C, torchrun trains the same model, and bad input is refused clearly.

Everything runs on tiny DeiTs (32-pixel images, patch 8, 32 dimensions, 2 blocks) and a
few dozen generated images."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, signal_after_the_first_epoch, subprocess_env, torchrun
from PIL import Image
from training import ARCH, assert_one_step, load_weights, records
from training import config_file as _config_file

from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.model import DeiT, DeiTConfig

TIMM_ARCH = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# Three classes a small model tells apart: a colour and a stripe direction each.
CLASSES = {"horizontal": ((220, 40, 40), 0), "vertical": ((40, 200, 40), 1), "checks": ((40, 40, 220), 2)}

pytestmark = pytest.mark.usefixtures("one_thread")


def config_file(path: Path, **kw) -> Path:
    return _config_file(path, num_classes=3, **kw)


def pattern(kind: int, rgb, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    phase = int(rng.integers(0, 8))
    on = [(y + phase) // 4 % 2, (x + phase) // 4 % 2, ((x + phase) // 4 + (y + phase) // 4) % 2][kind]
    a = np.where(on[..., None] == 1, np.array(rgb), 255 - np.array(rgb)).astype(np.float64)
    a += rng.normal(0, 20, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_set(root: Path, n_train: int, n_val: int = 0, classes=CLASSES) -> Path:
    """A class-folder tree: root/train/CLASS/*.png (and root/val/... when n_val)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, (name, (rgb, kind)) in enumerate(classes.items()):
            if not n:
                continue
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pattern(kind, rgb, seed=1000 * c + i + (500 if split == "val" else 0)).save(d / f"{i:03d}.png")
    return root


def save_model(path: Path, model: DeiT, labels) -> Path:
    model.labels = list(labels)
    save_safetensors(path, model.state_dict(), deit_metadata(model))
    return path


def tiny_model(path: Path, *, distilled: bool = True, num_classes: int = 3, seed: int = 1, labels=None) -> Path:
    m = randomize(DeiT(DeiTConfig(**ARCH, distilled=distilled, num_classes=num_classes)), seed)
    return save_model(path, m, labels or sorted(CLASSES)[:num_classes] + [f"x{i}" for i in range(num_classes - 3)])


# --------------------------------------------------------------------------- one step


def timm_reference_step(student: Path, teacher: Path | None, data: Path, kind: str, lr: float, wd: float):
    """One AdamW step written from timm's VisionTransformerDistilled and the paper's loss."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    import deit_cli
    from deit_cli.images import decode_image, eval_transform

    sd = load_weights(student)
    ref = VisionTransformerDistilled(**TIMM_ARCH, num_classes=3)
    ref.load_state_dict(sd)
    ref.set_distilled_training(True)
    ref.train()
    pre = deit_cli.load_model(str(student)).preprocessing
    t = eval_transform(pre)
    classes = sorted(p.name for p in (data / "train").iterdir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((data / "train" / name).iterdir())]
    x = torch.stack([t(decode_image(str(f)).image) for f, _ in files])
    y = torch.tensor([c for _, c in files])

    cls_logits, dist_logits = ref(x)
    base = F.cross_entropy(cls_logits, y)
    if kind == "none":
        loss = base
    else:
        tnet = VisionTransformer(**TIMM_ARCH, num_classes=3)
        tnet.load_state_dict(load_weights(teacher))
        with torch.no_grad():
            z_t = tnet.eval()(x)
        if kind == "hard":
            dist = F.cross_entropy(dist_logits, z_t.argmax(1))
        else:
            tau = 1.0
            dist = (
                F.kl_div(
                    F.log_softmax(dist_logits / tau, 1), F.log_softmax(z_t / tau, 1), reduction="sum", log_target=True
                )
                * tau
                * tau
                / dist_logits.numel()
            )
        loss = 0.5 * base + 0.5 * dist
    no_decay = ("cls_token", "dist_token", "pos_embed")
    params = dict(ref.named_parameters())
    decay = [p for n, p in params.items() if p.ndim >= 2 and n not in no_decay]
    other = [p for n, p in params.items() if not (p.ndim >= 2 and n not in no_decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}], lr=lr, eps=1e-8
    )
    loss.backward()
    opt.step()
    return {k: v.detach() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_one_step_equals_the_timm_reference(tmp_path, run_cpu, kind):
    data = make_set(tmp_path / "data", 4)
    student = tiny_model(tmp_path / "student.safetensors", seed=1)
    teacher = tiny_model(tmp_path / "teacher.safetensors", distilled=False, seed=2)
    lr, wd = 1e-3, 0.05
    extra = [] if kind == "none" else ["--teacher", teacher, "--distillation", kind]
    rc, _, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "-m",
        student,
        "--recipe",
        "plain",
        "--epochs",
        "1",
        "--batch-size",
        "12",
        "--lr",
        lr,
        "--weight-decay",
        wd,
        "--warmup-epochs",
        "0",
        "-q",
        *extra,
    )
    assert rc == 0, err
    ours = load_weights(tmp_path / "run" / "model.safetensors")
    ref = timm_reference_step(student, teacher, data, kind, lr, wd)
    before = load_weights(student)
    if kind == "none":  # no teacher: the distillation head is neither trained nor saved
        assert "head_dist.weight" not in ours
    assert set(ours) == set(ref) - ({"head_dist.weight", "head_dist.bias"} if kind == "none" else set())
    assert_one_step(ours, ref, before, lr)


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A small DeiT trained from scratch on a generated set (shared by the tests below)."""
    from deit_cli.cli.app import main

    tmp = tmp_path_factory.mktemp("learn")
    data = make_set(tmp / "data", 32, 8)
    cfg = config_file(tmp / "cfg.json")
    t0 = time.perf_counter()
    rc = main(
        [
            "train",
            str(data),
            "-o",
            str(tmp / "run"),
            "--config",
            str(cfg),
            "--recipe",
            "plain",
            "--epochs",
            "15",
            "--batch-size",
            "16",
            "--lr",
            "5e-3",
            "--warmup-epochs",
            "1",
            "--device",
            "cpu",
            "--seed",
            "3",
            "--json",
        ]
    )
    return rc, tmp, time.perf_counter() - t0


def test_it_learns_from_scratch(learned):
    rc, tmp, seconds = learned
    assert rc == 0
    recs = records(tmp / "run")
    assert [r["epoch"] for r in recs] == list(range(1, 16))
    # percent of 24 images; at least 22 right at the end (timm's init gets 22 or 23 over seeds)
    assert recs[0]["val_top1"] <= 70 and recs[-1]["val_top1"] >= 90, [r["val_top1"] for r in recs]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert seconds < 60
    assert {"lr", "train_loss", "images_per_s", "seconds", "skipped", "val_top1", "val_loss"} <= set(recs[0])


def test_the_trained_model_loads_and_classifies(learned, run_cpu):
    _, tmp, _ = learned
    import deit_cli

    model = deit_cli.load_model(str(tmp / "run" / "model.safetensors"))
    assert model.labels == sorted(CLASSES)
    assert model.config.num_classes == 3 and not model.config.distilled
    folder = tmp / "data" / "val" / "vertical"
    rc, out, err = run_cpu("classify", folder, "-m", tmp / "run" / "model.safetensors", "--format", "jsonl")
    assert rc == 0, err
    labels = [json.loads(line)["predictions"][0]["label"] for line in out.splitlines()]
    assert len(labels) == 8 and labels.count("vertical") >= 6, labels  # the run gets 22 of 24 right
    # `deit eval` on the validation folders agrees with the run's own validation
    rc, out, err = run_cpu(
        "eval", tmp / "data" / "val", "-m", tmp / "run" / "model.safetensors", "--topk", "1", "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["top1"] == pytest.approx(records(tmp / "run")[-1]["val_top1"])
    # the run's summary travels with the weights; best.safetensors loads too
    from safetensors import safe_open

    with safe_open(str(tmp / "run" / "model.safetensors"), "pt") as f:
        run = json.loads(f.metadata()["deit.run"])
    assert run["classes"] == sorted(CLASSES) and run["epochs"] == 15
    assert deit_cli.load_model(str(tmp / "run" / "best.safetensors")).labels == sorted(CLASSES)
    # checkpoint.pt is plain data
    ckpt = torch.load(tmp / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 15 and ckpt["classes"] == sorted(CLASSES)


def test_the_augmented_recipe_runs_with_every_part_on(tmp_path, run_cpu):
    """scratch's RandAugment, mixup/cutmix, erasing, drop path, repeated augmentation, EMA."""
    data = make_set(tmp_path / "data", 6, 2)
    cfg = config_file(tmp_path / "cfg.json", distilled=True)
    teacher = tiny_model(tmp_path / "teacher.safetensors", distilled=False, seed=2)
    rc, out, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "--config",
        cfg,
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--teacher",
        teacher,
        "--model-ema",
        "--json",
        "--grad-accum",
        "2",
    )
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["recipe"] == "scratch" and summary["distillation"] == "hard"
    assert all(np.isfinite(r["train_loss"]) for r in records(tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    final = load_weights(tmp_path / "run" / "model.safetensors")
    assert "head_dist.weight" in final  # with a teacher, both heads are trained and kept
    # model.safetensors holds the raw weights (what the paper reports); the EMA is ema.safetensors
    ema = load_weights(tmp_path / "run" / "ema.safetensors")
    assert torch.equal(final["head.weight"], ckpt["model"]["head.weight"])
    assert torch.equal(ema["head.weight"], ckpt["ema"]["head.weight"])
    assert not torch.equal(final["head.weight"], ema["head.weight"])
    record = records(tmp_path / "run")[-1]
    assert record["val_top1"] is not None or "val_top1_ema" not in record
    assert summary["ema"].endswith("ema.safetensors") and "EMA (decay" in err  # 12 steps cannot wash out the init


def test_csv_jsonl_and_a_validation_split(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 5)
    files = sorted((data / "train").rglob("*.png"))
    (tmp_path / "list.csv").write_text(
        "path,label\n" + "".join(f"data/train/{f.parent.name}/{f.name},{f.parent.name}\n" for f in files)
    )
    (tmp_path / "list.jsonl").write_text(
        "".join(json.dumps({"image_url": str(f), "label": f.parent.name}) + "\n" for f in files)
    )
    for i, src in enumerate(("list.csv", "list.jsonl")):
        rc, out, err = run_cpu(
            "train",
            tmp_path / src,
            "-o",
            tmp_path / f"run{i}",
            "--config",
            config_file(tmp_path / "cfg.json"),
            "--recipe",
            "plain",
            "--epochs",
            "1",
            "--val-split",
            "0.2",
            "--json",
        )
        assert rc == 0, err
        s = json.loads(out)
        assert s["classes"] == sorted(CLASSES)
        assert (s["train_images"], s["val_images"]) == (12, 3)  # one image per class held out


# --------------------------------------------------------------------------- resume


def _train_args(data: Path, run: Path, cfg: Path) -> list[str]:
    return [
        "train",
        str(data),
        "-o",
        str(run),
        "--config",
        str(cfg),
        "--recipe",
        "plain",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
    ]


def test_resume_after_a_real_ctrl_c_is_bit_identical(tmp_path, run_cli):
    data = make_set(tmp_path / "data", 40)  # 30 steps an epoch
    cfg = config_file(tmp_path / "cfg.json")
    rc, _, err = run_cli(*_train_args(data, tmp_path / "whole", cfg), "-q", "--workers", "0")
    assert rc == 0, err

    cmd = [sys.executable, "-m", "deit_cli", *_train_args(data, tmp_path / "cut", cfg), "--workers", "2"]
    rc, err = signal_after_the_first_epoch(cmd, signal.SIGINT, env=subprocess_env())
    assert rc == 130, err
    assert "interrupted at epoch 2" in err and "--resume" in err
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 1 <= ckpt["step_in_epoch"] < 30  # mid-epoch
    assert not (tmp_path / "cut" / "model.safetensors").exists()

    rc, _, err = run_cli(*_train_args(data, tmp_path / "cut", cfg), "-q", "--resume")
    assert rc == 0, err
    whole, cut = (
        load_weights(tmp_path / "whole" / "model.safetensors"),
        load_weights(tmp_path / "cut" / "model.safetensors"),
    )
    assert set(whole) == set(cut)
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
    assert [r["train_loss"] for r in records(tmp_path / "cut")] == [
        r["train_loss"] for r in records(tmp_path / "whole")
    ]


# --------------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_train_the_same_model(tmp_path, run_cli):
    data = make_set(tmp_path / "data", 6)
    cfg = config_file(tmp_path / "cfg.json")
    args = [
        "train",
        data,
        "--config",
        cfg,
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
    r1, r2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["train_images"] for r in r2] == [18, 18]
    assert abs(r1[-1]["train_loss"] - r2[-1]["train_loss"]) <= 1e-4


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small(tmp_path):
    return make_set(tmp_path / "data", 3), config_file(tmp_path / "cfg.json")


def plain(data, run, cfg, *extra):
    return ("train", data, "-o", run, "--config", cfg, "--recipe", "plain", "--epochs", "1", *extra)


def test_an_empty_class_folder_is_refused(tmp_path, run_cpu, small):
    data, cfg = small
    (data / "train" / "empty").mkdir()
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg))
    assert rc == 65 and "'empty' has no images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing made for a run that never started


def test_a_single_class_is_refused(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 3, classes={"only": ((200, 0, 0), 0)})
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", config_file(tmp_path / "cfg.json")))
    assert rc == 65 and "only one class" in err


def test_unknown_validation_labels_are_refused(tmp_path, run_cpu, small):
    data, cfg = small
    make_set(tmp_path / "other", 0, 2, classes={"horizontal": ((220, 40, 40), 0), "diagonal": ((9, 9, 9), 1)})
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg, "--val", tmp_path / "other" / "val"))
    assert rc == 65 and "validation labels unknown to training: 'diagonal'" in err


def test_a_teacher_with_other_classes_is_refused(tmp_path, run_cpu, small):
    data, _ = small
    student = tiny_model(tmp_path / "s.safetensors")
    teacher = tiny_model(tmp_path / "t.safetensors", distilled=False, num_classes=5)
    rc, _, err = run_cpu(
        "train", data, "-o", tmp_path / "run", "-m", student, "--teacher", teacher, "--recipe", "plain"
    )
    assert rc == 65 and "5 classes, the data has 3" in err
    # torchvision teacher weights for another class count: the same refusal
    import torchvision

    net = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=5)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    rc, _, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "-m",
        student,
        "--teacher",
        "torchvision:squeezenet1_1",
        "--teacher-weights",
        tmp_path / "tv.pth",
        "--recipe",
        "plain",
    )
    assert rc == 65 and "the teacher has 5 classes" in err and "the data has 3" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_teacher_needs_a_distilled_student(tmp_path, run_cpu, small):
    data, _ = small
    student = tiny_model(tmp_path / "s.safetensors", distilled=False)
    teacher = tiny_model(tmp_path / "t.safetensors", distilled=False)
    rc, _, err = run_cpu(
        "train", data, "-o", tmp_path / "run", "-m", student, "--teacher", teacher, "--recipe", "plain"
    )
    assert rc == 2 and "needs a distilled student" in err and "distillation token" in err


def test_a_corrupt_image_is_skipped_and_counted(tmp_path, run_cpu, small):
    data, cfg = small
    (data / "train" / "checks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rc, _, err = run_cpu(*plain(data, tmp_path / "run", cfg, "--batch-size", "10", "--epochs", "2"))
    assert rc == 0, err
    recs = records(tmp_path / "run")
    assert [r["skipped"] for r in recs] == [1, 1]
    assert "broken.png" in recs[0]["skipped_images"][0]
    assert "1 images skipped" in err and "broken.png" in err


def test_a_run_dir_holding_a_run_is_refused_without_force(tmp_path, run_cpu, small):
    data, cfg = small
    run = tmp_path / "run"
    assert run_cpu(*plain(data, run, cfg, "-q"))[0] == 0
    before = (run / "model.safetensors").read_bytes()
    rc, _, err = run_cpu(*plain(data, run, cfg))
    assert rc == 73 and "already holds a run" in err and "--resume" in err
    assert (run / "model.safetensors").read_bytes() == before
    assert run_cpu(*plain(data, run, cfg, "-q", "--force", "--seed", "5"))[0] == 0
    assert (run / "model.safetensors").read_bytes() != before


def test_a_resume_whose_data_has_other_classes_is_refused(tmp_path, run_cpu, small):
    data, cfg = small
    run = tmp_path / "run"
    assert run_cpu(*plain(data, run, cfg, "-q"))[0] == 0
    other = make_set(tmp_path / "other", 3, classes={**CLASSES, "dots": ((9, 9, 9), 0)})
    rc, _, err = run_cpu("train", other, "-o", run, "--resume")
    assert rc == 65 and "classes differ" in err and "'dots'" in err


def test_a_nan_loss_stops_the_run(tmp_path, run_cpu, small):
    data, _ = small
    m = randomize(DeiT(DeiTConfig(**ARCH, distilled=False, num_classes=3)), 1)
    with torch.no_grad():
        m.head.bias[0] = float("nan")
    student = save_model(tmp_path / "nan.safetensors", m, sorted(CLASSES))
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "run", "-m", student, "--recipe", "plain")
    assert rc == 65 and "loss is nan at epoch 1, step 1" in err and "no checkpoint" in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, run_cpu, small):
    data, cfg = small
    run = tmp_path / "run"
    assert run_cpu(*plain(data, run, cfg, "-q"))[0] == 0
    before = (run / "checkpoint.pt").read_bytes()
    limit = len(before) // 2  # the models (a quarter of the checkpoint) fit; the checkpoint does not
    env = subprocess_env()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "deit_cli",
            "train",
            str(data),
            "-o",
            str(run),
            "--resume",
            "--epochs",
            "2",
            "--device",
            "cpu",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert p.returncode == 74, p.stderr
    assert "checkpoint.pt: write failed: file too large" in p.stderr
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [f for f in run.iterdir() if f.name.startswith(".")]  # no temporary left behind


def test_torchvision_and_timm_teachers_distil_with_their_own_input(tmp_path, run_cpu):
    import timm
    import torchvision

    data = make_set(tmp_path / "data", 4)
    student = tiny_model(tmp_path / "student.safetensors")
    tv = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    tm = timm.create_model("test_vit", pretrained=False, num_classes=3)  # 160 px, mean/std 0.5
    save_safetensors(tmp_path / "tm.safetensors", tm.state_dict(), {"format": "pt"})
    for i, (spec, weights) in enumerate((("torchvision:squeezenet1_1", "tv.pth"), ("timm:test_vit", "tm.safetensors"))):
        rc, out, err = run_cpu(
            "train",
            data,
            "-o",
            tmp_path / f"run{i}",
            "-m",
            student,
            "--teacher",
            spec,
            "--teacher-weights",
            tmp_path / weights,
            "--recipe",
            "plain",
            "--epochs",
            "1",
            "--json",
        )
        assert rc == 0, err
        assert json.loads(out)["distillation"] == "hard"
        assert "head_dist.weight" in load_weights(tmp_path / f"run{i}" / "model.safetensors")
        # timm's test_vit wants 160 px with mean/std 0.5: the batch is adapted, and a note says so
        assert ("resized/renormalised" in err) == (spec.startswith("timm"))


def test_grad_accum_makes_the_same_step(tmp_path, run_cpu, small):
    data, cfg = small
    for name, extra in (("one", []), ("three", ["--grad-accum", "3"])):
        rc, _, err = run_cpu(*plain(data, tmp_path / name, cfg, "--batch-size", "9", "--epochs", "2", "-q", *extra))
        assert rc == 0, err
    one, three = (
        load_weights(tmp_path / "one" / "model.safetensors"),
        load_weights(tmp_path / "three" / "model.safetensors"),
    )
    for k in one:
        assert (one[k] - three[k]).abs().max() <= 1e-5, k


def test_a_source_with_other_classes_gets_new_heads_and_keeps_the_rest(tmp_path, run_cpu, small):
    data, _ = small
    source = tiny_model(tmp_path / "five.safetensors", num_classes=5, labels=[f"c{i}" for i in range(5)])
    rc, _, err = run_cpu(
        "train", data, "-o", tmp_path / "run", "-m", source, "--recipe", "plain", "--epochs", "1", "--lr", "1e-9"
    )
    assert rc == 0, err
    assert "has 5 classes, the data 3: classifier heads re-initialised" in err
    import deit_cli

    model = deit_cli.load_model(str(tmp_path / "run" / "model.safetensors"))
    assert model.config.num_classes == 3 and model.labels == sorted(CLASSES)
    before, after = load_weights(source), load_weights(tmp_path / "run" / "model.safetensors")
    assert (after["pos_embed"] - before["pos_embed"]).abs().max() < 1e-6  # the backbone is the source's
    head = after["head.weight"]  # the new head: N(0, 0.02) as timm initialises a Linear, zero bias
    assert abs(head.std().item() - 0.02) < 0.004 and head.abs().max() < 0.12 and after["head.bias"].abs().max() < 1e-6


def test_image_size_resamples_the_position_embeddings(tmp_path, run_cpu, small):
    data, _ = small
    source = tiny_model(tmp_path / "s.safetensors")
    rc, _, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "-m",
        source,
        "--recipe",
        "plain",
        "--epochs",
        "1",
        "--image-size",
        "48",
        "-q",
    )
    assert rc == 0, err
    import deit_cli

    model = deit_cli.load_model(str(tmp_path / "run" / "model.safetensors"))
    assert model.config.image_size == 48 and model.pos_embed.shape[1] == 2 + 36  # cls, dist + (48/8)² patches
