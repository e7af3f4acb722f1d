"""What a run is asked to do: `TrainOptions`, the `Events` it reports, its errors, the
checks of its options, and what `--resume` may change.

A resumed run continues with the settings it was started with. A flag given again with
`--resume` must agree with the saved one, except those that cannot change the run's
maths (`RESUME_MAY_CHANGE`: `--epochs` extends the run; device, workers, compile,
logging, reporting and checkpoint timing); any other difference is refused with one line
naming each flag, never silently replaced. `--report-to`, when not given again, continues
as the run reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ...config import DeiTConfig, check_threshold
from ...errors import EXIT_DATA, EXIT_INTERRUPTED, EXIT_TERMINATED, DeiTError, UsageError
from ...variants import DEFAULT_MODEL
from .recipes import Recipe
from .report import check_report_to

__all__ = [
    "RESUME_MAY_CHANGE",
    "Events",
    "TrainOptions",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingTerminated",
    "check_options",
    "distillation_kind",
    "resumed_options",
]


class TrainingInterrupted(DeiTError):
    """Ctrl-C: a checkpoint was saved at a step boundary (exit 130)."""

    exit_code = EXIT_INTERRUPTED


class TrainingTerminated(TrainingInterrupted):
    """SIGTERM (a cluster's preemption): a checkpoint was saved at a step boundary (exit 143)."""

    exit_code = EXIT_TERMINATED


class TrainingDiverged(DeiTError):
    """The loss became NaN or infinite (exit 65)."""

    exit_code = EXIT_DATA


# The TrainOptions a flag given with --resume may change: they do not change the run's maths.
RESUME_MAY_CHANGE = ("device", "workers", "compile", "log_every", "checkpoint_every", "report_to", "resume_epochs")
# The flag each TrainOptions field is spelled as (for the one-line refusal).
FLAGS = {
    "model": "--model",
    "scratch": "--scratch",
    "config": "--config",
    "image_size": "--image-size",
    "teacher": "--teacher",
    "teacher_weights": "--teacher-weights",
    "distillation": "--distillation",
    "alpha": "--alpha",
    "tau": "--tau",
    "val": "--val",
    "val_split": "--val-split",
    "dtype": "--dtype",
    "grad_accum": "--grad-accum",
    "seed": "--seed",
    "multi_label": "--multi-label",
    "threshold": "--threshold",
    "recipe": "--recipe",
    "ema_decay": "--model-ema-decay",
    "bce": "--bce-loss",
    "eval_crop_pct": "--eval-crop-ratio",
}


@dataclass
class TrainOptions:
    """Everything a run needs besides the recipe. `distillation` None: hard with a teacher.

    `given` names the fields (and recipe fields) the user set explicitly; with `resume`
    those must agree with the saved run (see the module docstring)."""

    data: str
    run_dir: Path
    recipe: Recipe
    model: str = DEFAULT_MODEL
    scratch: bool = False
    config: DeiTConfig | None = None  # --config: the architecture for --scratch
    image_size: int | None = None
    teacher: str | None = None
    teacher_weights: str | None = None
    distillation: str | None = None
    alpha: float = 0.5
    tau: float = 1.0
    val: str | None = None
    val_split: float | None = None
    resume: bool = False
    force: bool = False
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on a CUDA device that has it, fp32 elsewhere
    compile: bool = False
    grad_accum: int = 1
    workers: int | None = None
    seed: int = 0
    resume_epochs: int | None = None  # --resume with --epochs: train the run to this many epochs
    multi_label: bool = False  # False: the training set decides (any list of labels makes it multi-label)
    threshold: float | None = None  # multi-label: where a label is predicted (None: 0.5)
    log_every: int | None = None  # steps between reads of the loss (None: about twice a second)
    checkpoint_every: float | None = None  # minutes between mid-epoch checkpoints (None: each epoch only)
    report_to: str = "none"  # or "tensorboard": event files in RUN_DIR/tensorboard (the tensorboard extra)
    full_decode: bool = False  # True: every image at full size (timm's pixels); False: large JPEGs reduced
    given: frozenset[str] = field(default_factory=frozenset)

    def to_plain(self) -> dict:
        d = {k.name: getattr(self, k.name) for k in fields(self) if k.name != "given"}
        d["run_dir"] = str(self.run_dir)
        d["recipe"] = self.recipe.to_dict()
        d["config"] = self.config.to_dict() if self.config else None
        return d


class Events:
    """What a run reports (the CLI renders it); every method is a no-op here."""

    def note(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int) -> None: ...
    def step(self, epoch: int, step: int, loss: float, lr: float, images: int) -> None: ...
    def epoch_end(self, record: dict) -> None: ...


def distillation_kind(opts: TrainOptions) -> str:
    kind = opts.distillation
    if kind is None:
        return "hard" if opts.teacher else "none"
    if kind not in ("none", "soft", "hard"):
        raise UsageError(f"--distillation must be none, soft or hard, not {kind!r}")
    if kind != "none" and opts.teacher is None:
        raise UsageError(f"--distillation {kind} needs a --teacher")
    if kind == "none" and opts.teacher is not None:
        raise UsageError("--teacher with --distillation none: the teacher would not be used; drop one of them")
    return kind


def check_options(opts: TrainOptions) -> None:
    """The checks that need no data: one line (exit 2) for the first that fails."""
    check_threshold(opts.threshold)
    if opts.multi_label and opts.teacher is not None:
        raise UsageError(
            "--teacher with --multi-label: distillation is for single-label training only",
            "train the multi-label model without a teacher",
        )
    if opts.grad_accum < 1:
        raise UsageError("--grad-accum must be at least 1")
    if not 0 <= opts.alpha <= 1:
        raise UsageError(f"--alpha must be in [0, 1], not {opts.alpha:g}")
    if opts.tau <= 0:
        raise UsageError(f"--tau must be positive, not {opts.tau:g}")
    if opts.log_every is not None and opts.log_every < 1:
        raise UsageError(f"--log-every must be at least 1, not {opts.log_every}")
    if opts.checkpoint_every is not None and opts.checkpoint_every <= 0:
        raise UsageError(f"--checkpoint-every must be a positive number of minutes, not {opts.checkpoint_every:g}")
    distillation_kind(opts)
    check_report_to(opts.report_to)  # a missing extra fails here, before any work


def resumed_options(opts: TrainOptions, saved: dict, epochs_done: int) -> TrainOptions:
    """The saved run's options, with what `opts` may change; a differing flag is refused."""
    saved = {"full_decode": True, **saved}  # a run saved before --full-decode existed decoded every image in full
    saved_recipe = Recipe.from_dict(saved["recipe"])
    saved_config = DeiTConfig.from_dict(saved["config"]) if saved.get("config") else None
    differ = []
    for name in sorted(opts.given):
        if name in RESUME_MAY_CHANGE or name == "epochs":
            continue
        if name in Recipe.__dataclass_fields__:
            now, was = getattr(opts.recipe, name), getattr(saved_recipe, name)
            flag = FLAGS.get(name, "--" + name.replace("_", "-"))
            if name == "lr":
                now, was = opts.recipe.peak_lr(), saved_recipe.peak_lr()
        elif name in TrainOptions.__dataclass_fields__:
            now = getattr(opts, name)
            was = saved_config if name == "config" else saved.get(name)
            if name == "recipe":
                now, was = opts.recipe.name, saved_recipe.name
            flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        else:
            continue
        if now != was:
            differ.append(f"{flag} {_shown(now)} (the run has {_shown(was)})")
    if differ:
        raise UsageError(
            f"{opts.run_dir}: --resume continues the run as it was started; it differs in " + "; ".join(differ),
            "drop those flags to resume (only --epochs, --device, --workers, --compile, --log-every, "
            "--checkpoint-every and --report-to may change), or start a new run",
        )
    keep = {k: getattr(opts, k) for k in RESUME_MAY_CHANGE}
    if "report_to" not in opts.given:  # a run reported to a tracker goes on reporting there
        keep["report_to"] = saved.get("report_to") or "none"
    fixed = ("recipe", "config", "run_dir", "data", "resume", "force", "given", *keep)
    merged = replace(
        opts,
        **{k: v for k, v in saved.items() if k in TrainOptions.__dataclass_fields__ and k not in fixed},
        recipe=saved_recipe,
        config=saved_config,
        resume=True,
        **keep,
    )
    if merged.resume_epochs is not None:
        if merged.resume_epochs < epochs_done:
            raise UsageError(f"--epochs {merged.resume_epochs}: the run has done {epochs_done} epochs already")
        merged = replace(merged, recipe=replace(merged.recipe, epochs=merged.resume_epochs))
    check_report_to(merged.report_to)  # the run's tracker may be one this machine lacks
    return merged


def _shown(value) -> str:
    if isinstance(value, DeiTConfig):
        return "another --config"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
