"""Reporting a run to an experiment tracker: `--report-to tensorboard` writes TensorBoard
event files to RUN_DIR/tensorboard/ (`pip install 'deit-cli[tensorboard]'`).

    train/loss, train/lr   each logged step (every `log_every` steps of an epoch, and its last):
                           the mean loss of the steps since the one logged before, and the lr
                           of the last of them
    val/KEY, epoch/KEY     each epoch, at its last step: every number of its metrics.jsonl
                           record, `val_X` as `val/X` (val/top1, val/top1_ema, val/map, ...)
                           and any other key K as `epoch/K` (epoch/train_loss, epoch/images_per_s)

Steps are global optimizer steps (the first step is step 1); an epoch's scalars sit at its
last step, on the loss curve's axis. Only rank 0 writes.

`--resume` appends to the same event files' folder: its writer purges every step after the
checkpoint's (TensorBoard's `purge_step`), which the resumed run then writes again, so a
resumed run's curves are an uninterrupted run's. What was reported up to a checkpoint is
flushed before the checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ...errors import EXIT_UNAVAILABLE, DeiTError

__all__ = ["REPORT_TO", "Report", "ReportUnavailable", "TensorBoardReport", "check_report_to", "open_report"]

REPORT_TO = ("none", "tensorboard")
INSTALL_HINT = "pip install 'deit-cli[tensorboard]'"
FOLDER = "tensorboard"  # under RUN_DIR
EVENT_FILES = "events.out.tfevents.*"


class ReportUnavailable(DeiTError):
    """The tracker `--report-to` names is not installed (exit 69, as `deit serve` without its extra)."""

    exit_code = EXIT_UNAVAILABLE


def check_report_to(name: str) -> None:
    """Refuse an unknown tracker (exit 2), or one whose extra is missing (exit 69)."""
    if name not in REPORT_TO:
        from ...errors import UsageError

        raise UsageError(f"--report-to must be {' or '.join(REPORT_TO)}, not {name!r}")
    if name == "tensorboard":
        _summary_writer()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        missing = exc.name or "tensorboard"
        raise ReportUnavailable(
            f"--report-to tensorboard needs the tensorboard extra ({missing} is not installed)", INSTALL_HINT
        ) from None
    return SummaryWriter


class Report:
    """Reports nowhere: `--report-to none`, and every rank but 0."""

    def step(self, step: int, loss: float, lr: float) -> None: ...
    def epoch(self, step: int, record: dict) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardReport(Report):
    """Scalars in TensorBoard event files under `log_dir`; `resume_step`: the step a resumed
    run continues after (what the previous writers logged beyond it is purged)."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        writer = _summary_writer()
        self.writer = writer(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, record: dict) -> None:
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers by tag: `val_X` -> `val/X`, any other key K -> `epoch/K`."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # lists (skipped_images), None (a metric without data), flags
        tag = f"val/{key[4:]}" if key.startswith("val_") else f"epoch/{key}"
        out[tag] = float(value)
    return out


@contextmanager
def open_report(report_to: str, run_dir: Path, *, rank: int, resume_step: int | None) -> Iterator[Report]:
    """The run's reporter, closed (so flushed) however the run ends. A new run (no
    `resume_step`) first removes the event files that a run it replaces left in
    RUN_DIR/tensorboard, so that its curves are its own."""
    folder = run_dir / FOLDER
    if rank == 0 and resume_step is None and folder.is_dir():
        for old in folder.glob(EVENT_FILES):
            old.unlink()
        with suppress(OSError):  # not empty: something of the user's is there
            folder.rmdir()
    report = TensorBoardReport(folder, resume_step) if rank == 0 and report_to == "tensorboard" else Report()
    try:
        yield report
    finally:
        report.close()
