"""`deit train` at the paper's scale, proved small: the raw model is the one saved, mixup's
soft targets on every batch, --resume never drops a flag, SIGTERM and torchrun stops at one
step, a NaN on one rank stops all, and one host synchronisation per step at most."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TORCHRUN, randomize, signal_after_the_first_epoch, subprocess_env, torchrun, torchrun_env
from PIL import Image
from test_train import CLASSES, _train_args, make_set, plain, save_model
from training import ARCH, config_file, load_weights, records

from deit_cli.engine.train import loop as train_loop
from deit_cli.engine.train.options import Events, TrainOptions
from deit_cli.engine.train.recipes import resolve_recipe
from deit_cli.engine.train.run_dir import read_run_checkpoint, restore_rng, rng_state
from deit_cli.images.transform import eval_transform
from deit_cli.model import DeiT, DeiTConfig
from deit_cli.variants import Preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = {"horizontal": CLASSES["horizontal"], "vertical": CLASSES["vertical"]}


def _mixup_args(data: Path, run: Path, cfg: Path, batch: int) -> list:
    return [
        "train",
        data,
        "-o",
        run,
        "--config",
        cfg,
        "--recipe",
        "plain",
        "--mixup",
        "0.8",
        "--smoothing",
        "0.1",
        "--batch-size",
        str(batch),
        "--epochs",
        "1",
        "--lr",
        "1e-12",
        "--device",
        "cpu",
        "--workers",
        "0",
        "-q",
    ]


def _reference_mixup_loss(data: Path) -> float:
    """The soft-target CE of the initial model on each image against its smoothed one-hot
    row (an image mixed with itself), averaged: what one-image shares must compute. The
    learning rate is 1e-12, so the weights of the second step are the first's."""
    model = DeiT(DeiTConfig(**ARCH, distilled=False, num_classes=2))
    model.init_weights(0)
    model.eval()
    t = eval_transform(Preprocessing(32))
    losses = []
    for c, name in enumerate(sorted(TWO)):
        for f in sorted((data / "train" / name).glob("*.png")):
            logits = model(t(Image.open(f).convert("RGB"))[None])
            target = torch.full((1, 2), 0.1 / 2)
            target[0, c] = 1 - 0.1 + 0.1 / 2
            losses.append(torch.sum(-target * F.log_softmax(logits, -1)).item())
    return float(np.mean(losses))


def test_mixup_on_a_one_image_share_is_the_smoothed_one_hot_loss(tmp_path, run_cli):
    data = make_set(tmp_path / "data", 1, classes=TWO)
    cfg = config_file(tmp_path / "cfg.json", num_classes=2)
    want = _reference_mixup_loss(data)
    rc, _, err = run_cli(*_mixup_args(data, tmp_path / "one", cfg, batch=1))
    assert rc == 0, err
    assert abs(records(tmp_path / "one")[0]["train_loss"] - want) < 1e-5
    # two processes at batch 2: each rank's share is one image
    proc = torchrun(*_mixup_args(data, tmp_path / "two", cfg, batch=2), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert abs(records(tmp_path / "two")[0]["train_loss"] - want) < 1e-5


def test_the_raw_model_is_saved_and_the_ema_beside_it(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 6)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    rc, _, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "--config",
        cfg,
        "--recipe",
        "plain",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--val-split",
        "0.34",
        "--model-ema",
        "--model-ema-decay",
        "0.9",
    )
    assert rc == 0, err
    run = tmp_path / "run"
    ckpt = read_run_checkpoint(run / "checkpoint.pt")
    raw, ema = load_weights(run / "model.safetensors"), load_weights(run / "ema.safetensors")
    for k in raw:
        assert torch.equal(raw[k], ckpt["model"][k].float()), k
        assert torch.equal(ema[k], ckpt["ema"][k].float()), k
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    for r in records(run):
        assert {"val_top1", "val_top1_ema", "val_top3_ema", "val_loss_ema"} <= set(r), r


def test_the_ema_note_says_how_much_of_the_init_remains(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 4)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    rc, _, err = run_cpu(
        *plain(
            data,
            tmp_path / "run",
            cfg,
            "--batch-size",
            "4",
            "--model-ema",
            "--model-ema-decay",
            "0.99996",
        )
    )
    assert rc == 0, err
    note = [line for line in err.splitlines() if "EMA" in line]
    assert len(note) == 1 and "100% of the initial weights" in note[0] and "--model-ema-decay" in note[0]


def test_resume_refuses_a_flag_that_would_change_the_run(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 4)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    base = ["train", data, "-o", tmp_path / "run", "--config", cfg, "--recipe", "plain", "--batch-size", "4"]
    rc, _, err = run_cpu(*base, "--epochs", "1", "--lr", "1e-3")
    assert rc == 0, err
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "run", "--resume", "--batch-size", "8", "--seed", "3")
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert "--batch-size 8 (the run has 4)" in line and "--seed 3 (the run has 0)" in line
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "run", "--resume", "--lr", "1e-3", "--recipe", "plain")
    assert rc == 0 or "--lr" not in err, err  # the same values are no change
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "run", "--resume", "--epochs", "2", "--workers", "0")
    assert rc == 0, err
    assert [r["epoch"] for r in records(tmp_path / "run")] == [1, 2]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    data = make_set(tmp_path / "data", 40)  # 30 steps an epoch
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    cmd = [sys.executable, "-m", "deit_cli", *_train_args(data, tmp_path / "cut", cfg), "--workers", "0"]
    rc, err = signal_after_the_first_epoch(cmd, signal.SIGTERM, env=subprocess_env())
    assert rc == 143, err
    assert "interrupted at epoch 2" in err and "--resume" in err
    ckpt = read_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and 1 <= ckpt["step_in_epoch"] < 30


def test_auto_resume_is_one_command_for_the_start_and_every_requeue(tmp_path, run_cpu):
    """A cluster requeues a preempted job with the same command line: --auto-resume starts
    the run, resumes it after the SIGTERM, and ends as the run that was never cut; run once
    more after the end, it trains nothing."""
    data = make_set(tmp_path / "data", 40)  # 30 steps an epoch
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    rc, _, err = run_cpu(*_train_args(data, tmp_path / "whole", cfg), "-q", "--workers", "0")
    assert rc == 0, err

    job = [*_train_args(data, tmp_path / "cut", cfg), "--workers", "0", "--auto-resume"]
    rc, err = signal_after_the_first_epoch(
        [sys.executable, "-m", "deit_cli", *job], signal.SIGTERM, env=subprocess_env()
    )
    assert rc == 143, err
    assert read_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    rc, _, err = run_cpu(*job, "-q")
    assert rc == 0, err
    whole, cut = (
        load_weights(tmp_path / "whole" / "model.safetensors"),
        load_weights(tmp_path / "cut" / "model.safetensors"),
    )
    assert set(whole) == set(cut) and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert [r["train_loss"] for r in records(tmp_path / "cut")] == [
        r["train_loss"] for r in records(tmp_path / "whole")
    ]

    rc, _, err = run_cpu(*job, "-q")  # requeued once more after the end
    assert rc == 0, err
    assert len(records(tmp_path / "cut")) == 3
    assert torch.equal(load_weights(tmp_path / "cut" / "model.safetensors")["pos_embed"], cut["pos_embed"])

    rc, _, err = run_cpu(*job, "--force")
    assert rc == 2 and "--auto-resume and --force" in err
    (tmp_path / "cut" / "checkpoint.pt").unlink()  # a run dir with a run but nothing to resume is kept, not replaced
    rc, _, err = run_cpu(*job)
    assert rc == 73 and "already holds a run" in err


class _CrashAt(Events):
    """A run that dies (as a killed node would) at a given step of the first epoch."""

    def __init__(self, step: int):
        self.at = step

    def step(self, epoch, step, loss, lr, images):
        if step == self.at:
            raise RuntimeError("the node died")


def test_checkpoint_every_saves_mid_epoch(tmp_path):
    data = make_set(tmp_path / "data", 4)
    opts = TrainOptions(
        data=str(data),
        run_dir=tmp_path / "run",
        recipe=resolve_recipe("plain", {"batch_size": 2, "epochs": 1}),
        scratch=True,
        config=DeiTConfig(**ARCH, distilled=False, num_classes=3),
        device="cpu",
        workers=0,
        checkpoint_every=1e-9,
    )
    with pytest.raises(RuntimeError, match="the node died"):
        train_loop.train(opts, _CrashAt(3))
    ckpt = read_run_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (0, 3, 3)


def test_one_process_reads_the_device_once_per_log_window(tmp_path, monkeypatch):
    data = make_set(tmp_path / "data", 8)  # 24 images, batch 2: 12 steps
    opts = TrainOptions(
        data=str(data),
        run_dir=tmp_path / "run",
        recipe=resolve_recipe("plain", {"batch_size": 2, "epochs": 1}),
        scratch=True,
        config=DeiTConfig(**ARCH, distilled=False, num_classes=3),
        device="cpu",
        workers=0,
        log_every=4,
    )
    reads = []
    steps = []

    class Count(Events):
        def step(self, epoch, step, loss, lr, images):
            steps.append(step)

    for name in ("item", "tolist", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            if self.requires_grad or self.grad_fn is not None or self.dim() <= 1:
                reads.append((_name, len(steps)))
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train_loop.train(opts, Count())
    during = [r for r in reads if 0 < r[1] < 12]  # between the first and the last step
    assert len(steps) == 12
    assert len(during) <= 12 // 4, during


def test_training_dtype_is_bf16_only_on_a_gpu_that_has_it():
    assert train_loop.training_dtype("auto", torch.device("cpu")) is None
    assert train_loop.training_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert train_loop.training_dtype("auto", torch.device("cuda")) is want


def test_each_rank_gets_its_own_rng_state_back():
    torch.manual_seed(1)
    a = rng_state(torch.device("cpu"))
    torch.manual_seed(2)
    b = rng_state(torch.device("cpu"))
    assert restore_rng([a, b], 1, 2, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), b["torch"])
    assert restore_rng([a, b], 0, 2, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), a["torch"])
    assert not restore_rng([a, b], 0, 4, torch.device("cpu"))  # saved by 2 processes, resumed by 4


# --------------------------------------------------------------------------- torchrun


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    data = make_set(tmp_path / "data", 40)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    whole = torchrun(*_train_args(data, tmp_path / "whole", cfg)[:-2], "-q", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    cmd = [*TORCHRUN, "-m", "deit_cli", *_train_args(data, tmp_path / "cut", cfg)[:-2], "--workers", "0"]
    # to the launcher, as a cluster's scheduler does
    _, err = signal_after_the_first_epoch(cmd, signal.SIGTERM, env=torchrun_env(tmp_path), cwd=tmp_path)
    assert err.count("interrupted at epoch 2") == 2, err  # both ranks, the same step
    steps = {line.split("step ")[1].split(";")[0] for line in err.splitlines() if "interrupted at" in line}
    assert len(steps) == 1, err
    ckpt = read_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and 1 <= ckpt["step_in_epoch"] < 30
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    resumed = torchrun(*_train_args(data, tmp_path / "cut", cfg)[:-2], "-q", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_weights(tmp_path / "whole" / "model.safetensors"), load_weights(tmp_path / "cut" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_nan_on_one_rank_stops_both_without_a_hang(tmp_path):
    # A patch embedding so large that a black image overflows in the first norm (NaN)
    # while a mid-grey one, near the normalisation mean, stays finite: one rank's share each.
    data = tmp_path / "data"
    for name, rgb in (("black", (0, 0, 0)), ("grey", (124, 116, 104))):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), rgb).save(data / name / "0.png")
    m = randomize(DeiT(DeiTConfig(**ARCH, distilled=False, num_classes=2)), 1)
    with torch.no_grad():
        m.patch_embed.proj.weight.fill_(1e18)
        m.patch_embed.proj.bias.zero_()
    student = save_model(tmp_path / "big.safetensors", m, ["black", "grey"])
    args = [
        "train",
        data,
        "-o",
        tmp_path / "run",
        "-m",
        student,
        "--recipe",
        "plain",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    proc = torchrun(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "timed out" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "loss is" in line]
    assert len(lines) == 2 and all("at epoch 1" in line for line in lines), proc.stderr


def test_torchrun_makes_one_reduction_per_step(tmp_path):
    data = make_set(tmp_path / "data", 8)  # 24 images, batch 4: 6 steps
    script = tmp_path / "count.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch.distributed as dist
            from deit_cli.engine.train import loop
            from deit_cli.engine.train.options import TrainOptions
            from deit_cli.engine.train.recipes import resolve_recipe
            from deit_cli.model import DeiTConfig

            calls = []
            original = dist.all_reduce
            def counted(*a, **kw):
                calls.append(1)
                return original(*a, **kw)
            dist.all_reduce = counted
            opts = TrainOptions(data={str(data)!r}, run_dir=__import__("pathlib").Path({str(tmp_path / "run")!r}),
                                recipe=resolve_recipe("plain", {{"batch_size": 4, "epochs": 1}}), scratch=True,
                                config=DeiTConfig(**{ARCH!r}, distilled=False, num_classes=3), device="cpu",
                                workers=0)
            loop.train(opts)
            rank = __import__("os").environ["RANK"]
            __import__("pathlib").Path({str(tmp_path)!r}, "reduce." + rank).write_text(str(len(calls)))
            """
        )
    )
    proc = subprocess.run(
        [*TORCHRUN, str(script)], capture_output=True, text=True, env=torchrun_env(tmp_path), cwd=tmp_path, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    counts = [int((tmp_path / f"reduce.{rank}").read_text()) for rank in (0, 1)]  # files: stdout interleaves
    # 6 steps: one exchange each, one before the first, and the epoch's sums and stop check
    assert len(counts) == 2 and all(c <= 6 + 4 for c in counts), counts


def test_the_hires_recipe_fine_tunes_at_384(tmp_path, run_cpu):
    from test_train import tiny_model

    from deit_cli.engine.train.student import build_student

    recipe = resolve_recipe("hires", {})
    assert (recipe.epochs, recipe.batch_size, recipe.peak_lr(), recipe.min_lr, recipe.weight_decay) == (
        30,
        512,
        5e-6,
        5e-6,
        1e-8,
    )
    assert recipe.rand_augment == "rand-m9-mstd0.5-inc1" and (recipe.mixup, recipe.cutmix) == (0.8, 1.0)
    # the release fine-tuned in eval mode (set_training_mode=args.finetune == ''): no drop path
    assert recipe.drop_path == 0.0
    source = tiny_model(tmp_path / "tiny.safetensors", distilled=False)
    opts = TrainOptions(data="", run_dir=tmp_path / "run", recipe=recipe, model=str(source))
    assert build_student(opts, sorted(CLASSES), Events()).config.image_size == 384
    data = make_set(tmp_path / "data", 2)
    rc, out, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "-m",
        source,
        "--recipe",
        "hires",
        "--image-size",
        "40",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--json",
    )
    assert rc == 0, err
    import json

    summary = json.loads(out)
    assert summary["recipe"] == "hires"
    assert load_weights(tmp_path / "run" / "model.safetensors")["pos_embed"].shape[1] == 1 + 25  # 40 px, patch 8


def test_the_saved_model_keeps_the_evaluation_transform_it_was_validated_with(tmp_path, run_cpu):
    import deit_cli

    data = make_set(tmp_path / "data", 4)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    rc, _, err = run_cpu(
        *plain(
            data,
            tmp_path / "run",
            cfg,
            "--batch-size",
            "4",
            "--eval-crop-ratio",
            "0.95",
        )
    )
    assert rc == 0, err
    for name in ("model.safetensors", "best.safetensors"):
        assert deit_cli.load_model(str(tmp_path / "run" / name)).preprocessing.crop_pct == 0.95
