"""`deit train --report-to tensorboard`: the event files, read back with TensorBoard's own
reader, hold each logged step's loss and lr and metrics.jsonl value for value; a run
resumed after a crash or a real Ctrl-C draws the uninterrupted run's curves; torchrun
writes once; without the extra, one line and exit 69; `none` writes nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import signal_after_the_first_epoch, subprocess_env, torchrun
from test_train import make_set
from training import ARCH, config_file, records

from deit_cli.engine.train import loop as train_loop
from deit_cli.engine.train.options import Events, TrainOptions
from deit_cli.engine.train.recipes import resolve_recipe
from deit_cli.engine.train.run_dir import read_run_checkpoint
from deit_cli.model import DeiTConfig

pytest.importorskip("tensorboard")

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("epoch/images_per_s", "epoch/seconds")  # the clock's: no two runs agree on them


def scalars(run: Path, *, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under RUN/tensorboard as TensorBoard shows it: tag -> [(step, value)].
    `purge=False`: as the files hold them, before a resumed writer's purge applies."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tag_of(key: str) -> str:
    return f"val/{key[4:]}" if key.startswith("val_") else f"epoch/{key}"


def numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def assert_same_curves(got: dict, want: dict) -> None:
    """The same tags at the same steps, each once, with the same values (float32 apart)."""
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in points], tag
        assert len(set(steps)) == len(steps), tag
        if tag not in TIMING:
            assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-5, abs=1e-7), tag


def test_the_events_hold_each_logged_step_and_metrics_jsonl_value_for_value(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 6)  # 4 per class to train, 2 to validate: 6 steps of 2 an epoch
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    run = tmp_path / "run"
    rc, _, err = run_cpu(
        "train",
        data,
        "-o",
        run,
        "--config",
        cfg,
        "--recipe",
        "plain",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--val-split",
        "0.34",
        "--model-ema",
        "--model-ema-decay",
        "0.9",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--log-every",
        "4",
        "--report-to",
        "tensorboard",
        "-q",
    )
    assert rc == 0, err
    assert [p.name.startswith("events.out.tfevents.") for p in (run / "tensorboard").iterdir()] == [True]
    got, recs = scalars(run), records(run)

    # every 4 steps of an epoch and at its end, at the global step
    assert [s for s, _ in got["train/loss"]] == [s for s, _ in got["train/lr"]] == [4, 6, 10, 12]
    loss, lr = dict(got["train/loss"]), dict(got["train/lr"])
    for rec, windows in zip(recs, ([(4, 4), (6, 2)], [(10, 4), (12, 2)])):
        # each logged loss is its window's mean: weighted by the windows' lengths, the epoch's
        assert sum(loss[s] * n for s, n in windows) / 6 == pytest.approx(rec["train_loss"], rel=1e-5)
        assert lr[rec["epoch"] * 6] == pytest.approx(rec["lr"], rel=1e-6)

    # each epoch: every number of its metrics.jsonl record, at its last step; nothing else
    assert {"val/top1", "val/top1_ema", "val/loss", "val/loss_ema", "epoch/train_loss"} <= set(got)
    for rec in recs:
        want = numbers(rec)
        at_step = {tag: dict(points)[rec["epoch"] * 6] for tag, points in got.items() if not tag.startswith("train/")}
        assert sorted(at_step) == sorted(tag_of(k) for k in want)
        for key, value in want.items():
            assert at_step[tag_of(key)] == pytest.approx(value, rel=1e-6), key  # stored as float32


class _CrashAt(Events):
    """A run that dies (as a killed node would) at a step of the first epoch."""

    def __init__(self, step: int):
        self.at = step

    def step(self, epoch, step, loss, lr, images):
        if epoch == 0 and step == self.at:
            raise RuntimeError("the node died")


def test_a_crash_resumes_the_curves_without_a_repeated_or_lost_step(tmp_path):
    data = make_set(tmp_path / "data", 4)  # 12 images, batches of 2: 6 steps an epoch

    def opts(run: Path, **kw) -> TrainOptions:
        return TrainOptions(
            data=str(data),
            run_dir=run,
            recipe=resolve_recipe("plain", {"batch_size": 2, "epochs": 2}),
            scratch=True,
            config=DeiTConfig(**ARCH, distilled=False, num_classes=3),
            device="cpu",
            workers=0,
            log_every=4,
            **kw,
        )

    train_loop.train(opts(tmp_path / "whole", report_to="tensorboard"))
    cut = tmp_path / "cut"
    # a checkpoint after every step; the node dies after step 4 was reported, before its checkpoint
    with pytest.raises(RuntimeError, match="the node died"):
        train_loop.train(opts(cut, report_to="tensorboard", checkpoint_every=1e-9), _CrashAt(3))
    assert read_run_checkpoint(cut / "checkpoint.pt")["global_step"] == 3
    assert [s for s, _ in scalars(cut)["train/loss"]] == [4]
    # --resume without --report-to goes on reporting where the run did
    train_loop.train(opts(cut, resume=True))
    assert [s for s, _ in scalars(cut, purge=False)["train/loss"]] == [4, 4, 6, 10, 12]  # the files
    assert_same_curves(scalars(cut), scalars(tmp_path / "whole"))  # what TensorBoard shows


def test_a_run_resumed_after_a_real_ctrl_c_draws_the_uninterrupted_curves(tmp_path, run_cli):
    data = make_set(tmp_path / "data", 40, n_val=1)  # 30 steps an epoch
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)

    def args(run: Path) -> list:
        return [
            "train",
            data,
            "-o",
            run,
            "--config",
            cfg,
            "--recipe",
            "plain",
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--model-ema",
            "--model-ema-decay",
            "0.9",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--log-every",
            "4",
        ]

    rc, _, err = run_cli(*args(tmp_path / "whole"), "--report-to", "tensorboard", "-q")
    assert rc == 0, err
    cmd = [sys.executable, "-m", "deit_cli", *args(tmp_path / "cut"), "--report-to", "tensorboard"]
    rc, err = signal_after_the_first_epoch(cmd, signal.SIGINT, env=subprocess_env())
    assert rc == 130, err
    assert read_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] >= 1
    rc, _, err = run_cli(*args(tmp_path / "cut"), "--resume", "-q")
    assert rc == 0, err
    whole = scalars(tmp_path / "whole")
    assert [s for s, _ in whole["train/loss"]] == [e * 30 + s for e in range(3) for s in (*range(4, 30, 4), 30)]
    assert {"val/top1", "val/top1_ema"} <= set(whole)
    assert_same_curves(scalars(tmp_path / "cut", purge=False), whole)  # nothing repeated, even unpurged
    assert_same_curves(scalars(tmp_path / "cut"), whole)


def test_under_torchrun_rank_0_writes_the_one_process_curves(tmp_path, run_cli):
    data = make_set(tmp_path / "data", 2)  # 6 images, batches of 2: 3 steps an epoch
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
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
        "2",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--log-every",
        "2",
        "--report-to",
        "tensorboard",
        "-q",
    ]
    rc, _, err = run_cli(*args, "-o", tmp_path / "one")
    assert rc == 0, err
    proc = torchrun(*args, "-o", tmp_path / "two", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 1  # rank 0's
    one, two = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert [s for s, _ in two["train/loss"]] == [2, 3, 5, 6]  # the logged steps, though torchrun reads each
    assert sorted(one) == sorted(two)
    for tag in ("train/loss", "epoch/train_loss"):
        assert [v for _, v in two[tag]] == pytest.approx([v for _, v in one[tag]], abs=1e-4), tag


def test_without_tensorboard_one_line_and_exit_69_before_any_work(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 1)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    run = tmp_path / "run"
    args = ["train", data, "-o", run, "--config", cfg, "--recipe", "plain", "--device", "cpu"]
    # `import tensorboard` fails in this process, as if it were not installed
    code = "import sys; sys.modules['tensorboard'] = None\nfrom deit_cli.cli.app import main\nsys.exit(main(sys.argv[1:]))\n"

    def without_tensorboard(*more) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, args), *more],
            check=False,
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=120,
        )

    line = (
        "error: --report-to tensorboard needs the tensorboard extra (tensorboard is not installed) "
        "(pip install 'deit-cli[tensorboard]')"
    )
    p = without_tensorboard("--report-to", "tensorboard")
    assert p.returncode == 69, p.stderr
    assert p.stdout == "" and p.stderr.strip().splitlines() == [line]
    assert not run.exists()
    # a run that reports to TensorBoard, resumed where it is missing: refused before training
    rc, _, err = run_cpu(*args, "--epochs", "1", "--report-to", "tensorboard", "-q")
    assert rc == 0, err
    before = (run / "checkpoint.pt").read_bytes()
    p = without_tensorboard("--resume", "--epochs", "2")
    assert p.returncode == 69 and p.stderr.strip().splitlines() == [line], p.stderr
    assert (run / "checkpoint.pt").read_bytes() == before
    assert without_tensorboard("--resume", "--epochs", "2", "--report-to", "none", "-q").returncode == 0


def test_report_to_none_writes_no_tensorboard_folder(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 1)
    cfg = config_file(tmp_path / "cfg.json", num_classes=3)
    run = tmp_path / "run"
    args = ["train", data, "-o", run, "--config", cfg, "--recipe", "plain", "--epochs", "1", "--device", "cpu", "-q"]
    rc, _, err = run_cpu(*args)
    assert rc == 0, err
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()
    rc, _, err = run_cpu(*args, "--force", "--report-to", "tensorboard")
    assert rc == 0, err
    assert scalars(run)["epoch/train_loss"]
    # a run that replaces it (--force) takes the old run's curves away with it
    rc, _, err = run_cpu(*args, "--force", "--report-to", "none")
    assert rc == 0, err
    assert not (run / "tensorboard").exists()
