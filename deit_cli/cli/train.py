"""`deit train DATA -o RUN_DIR`: fine-tune, train from scratch, distil through attention."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from . import output
from .options import (
    DEFAULT_MODEL_NAME,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    WorkersOpt,
)


class RecipeName(str, Enum):
    scratch = "scratch"
    finetune = "finetune"
    hires = "hires"
    plain = "plain"
    deit3 = "deit3"
    deit3_finetune = "deit3-finetune"


class OptimizerName(str, Enum):
    adamw = "adamw"
    lamb = "lamb"


class DropPathSchedule(str, Enum):
    linear = "linear"
    uniform = "uniform"


class Distillation(str, Enum):
    none = "none"
    soft = "soft"
    hard = "hard"


class ReportTo(str, Enum):
    none = "none"
    tensorboard = "tensorboard"


def train(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            show_default=False,
            help="Class-folder tree (with train/ and val/ inside, or one tree and --val-split), a CSV/TSV list "
            '(`path,label`; `a|b` for several) or JSON lines ({"image_url" or "path": ..., "label": ... or '
            "[...]}).",
        ),
    ],
    run_dir: Annotated[
        Path,
        typer.Option(
            "--output", "-o", show_default=False, help="The run directory (model.safetensors, checkpoint.pt, ...)."
        ),
    ],
    model: ModelOpt = DEFAULT_MODEL_NAME,
    scratch: Annotated[
        bool, typer.Option("--scratch", help="Start from random weights with --model's architecture.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="A DeiTConfig as JSON: the architecture for --scratch (implies it).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=1, help="Train at this size (position embeddings resampled).")
    ] = None,
    recipe: Annotated[
        RecipeName | None,
        typer.Option(
            "--recipe",
            help="Defaults for every flag below: scratch, finetune (default from pretrained weights), "
            "hires (fine-tune trained weights at 384 px, the original README's), plain (nothing random but the "
            "data order), deit3 (DeiT III's ImageNet-1k pre-training: 3-Augment, BCE, LAMB; lr, drop path and size "
            "by the model's width) or deit3-finetune (DeiT III's 20-epoch fine-tune to the final resolution).",
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            min=1,
            help="Epochs (recipe: scratch 300, finetune 30, hires 30, plain 10, deit3 800, deit3-finetune 20).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "--batch",
            "-b",
            min=1,
            help="The GLOBAL batch, split across processes under torchrun (timm's is per GPU), "
            "so any number of processes trains the same model.",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate, as is (default: the recipe's base rate x batch/512)."),
    ] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help="Where the cosine schedule ends.")] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option("--warmup-epochs", help="Linear warm-up, in epochs (0: the first step uses the full --lr)."),
    ] = None,
    warmup_lr: Annotated[float | None, typer.Option("--warmup-lr", help="Where the warm-up starts.")] = None,
    unscale_lr: Annotated[
        bool | None,
        typer.Option(
            "--unscale-lr/--scale-lr",
            help="The recipe's base rate is the peak whatever the batch (deit3 recipes), or scaled by batch/512.",
            show_default=False,
        ),
    ] = None,
    optimizer: Annotated[
        OptimizerName | None,
        typer.Option(
            "--optimizer", help="adamw, or lamb (DeiT III's: apex FusedLAMB's eps 1e-8, global norm clipped to 1)."
        ),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="Weight decay (weights of 2+ dimensions only).")
    ] = None,
    smoothing: Annotated[float | None, typer.Option("--smoothing", help="Label smoothing.")] = None,
    mixup: Annotated[float | None, typer.Option("--mixup", help="Mixup alpha (0: off).")] = None,
    cutmix: Annotated[float | None, typer.Option("--cutmix", help="CutMix alpha (0: off).")] = None,
    reprob: Annotated[float | None, typer.Option("--reprob", help="Random-erasing probability.")] = None,
    three_augment: Annotated[
        bool | None,
        typer.Option(
            "--three-augment/--no-three-augment",
            help="DeiT III's 3-Augment (grayscale, solarization or blur, then colour jitter) instead of RandAugment.",
            show_default=False,
        ),
    ] = None,
    simple_crop: Annotated[
        bool | None,
        typer.Option(
            "--simple-crop/--no-simple-crop",
            help="3-Augment's simple crop (resize, reflect-padded 4-px random crop; the release's --src).",
            show_default=False,
        ),
    ] = None,
    color_jitter: Annotated[
        float | None, typer.Option("--color-jitter", help="3-Augment's colour jitter (deit3: 0.3).")
    ] = None,
    bce_loss: Annotated[
        bool | None,
        typer.Option(
            "--bce-loss/--no-bce-loss",
            help="Binary cross-entropy on binarized (mixed) targets, DeiT III's loss; needs --smoothing 0.",
            show_default=False,
        ),
    ] = None,
    eval_crop_ratio: Annotated[
        float | None,
        typer.Option(
            "--eval-crop-ratio",
            help="Validate at this center-crop ratio (deit3 recipes: 1.0, the release's); default: the model's.",
        ),
    ] = None,
    drop_path: Annotated[float | None, typer.Option("--drop-path", help="Stochastic-depth rate.")] = None,
    drop_path_schedule: Annotated[
        DropPathSchedule | None,
        typer.Option(
            "--drop-path-schedule",
            help="linear (0 at the first block to --drop-path at the last; DeiT) or uniform (every block; DeiT III).",
        ),
    ] = None,
    repeated_aug: Annotated[
        int | None, typer.Option("--repeated-aug", min=1, help="Repeated augmentation: copies of each image per epoch.")
    ] = None,
    model_ema: Annotated[
        bool | None,
        typer.Option(
            "--model-ema/--no-model-ema",
            help="Keep an EMA of the weights (saved as model.safetensors).",
            show_default=False,
        ),
    ] = None,
    model_ema_decay: Annotated[
        float | None, typer.Option("--model-ema-decay", help="EMA decay per step (recipe: 0.99996).")
    ] = None,
    clip_grad: Annotated[float | None, typer.Option("--clip-grad", help="Clip the gradient norm to this.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order, augmentation and initialisation.")] = 0,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="A deit model source, or torchvision:NAME / timm:NAME with --teacher-weights."),
    ] = None,
    teacher_weights: Annotated[
        Path | None,
        typer.Option(
            "--teacher-weights", help="The teacher's state dict (read with the safe loader; same classes as the data)."
        ),
    ] = None,
    distillation: Annotated[
        Distillation | None, typer.Option("--distillation", help="none, soft or hard (default: hard with a teacher).")
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the distillation loss.")] = 0.5,
    tau: Annotated[float, typer.Option("--tau", help="Temperature of soft distillation.")] = 1.0,
    multi_label: Annotated[
        bool,
        typer.Option(
            "--multi-label",
            help='Any number of labels per image (JSONL "label": [...], '
            "CSV `a|b`; implied by such lists): sigmoid scores, BCE loss, mAP/F1/IoU.",
        ),
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Multi-label: a label is predicted at or above this "
            "score (validation F1/IoU; saved with the model).  \\[default: 0.5]",
            show_default=False,
        ),
    ] = None,
    val: Annotated[str | None, typer.Option("--val", help="A validation set (same forms as DATA).")] = None,
    val_split: Annotated[
        float | None,
        typer.Option("--val-split", help="Hold out this fraction of DATA, per class, for validation (deterministic)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in RUN_DIR with its saved settings (with --epochs: up to that many)."
        ),
    ] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(
            "--auto-resume",
            help="--resume when RUN_DIR holds a checkpoint, else start the run there: one command for the "
            "first start and every requeue after a preemption.",
        ),
    ] = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Training precision (autocast; fp32 master weights): auto (bf16 on a CUDA GPU that has it, "
            "fp32 elsewhere), fp32, bf16 or fp16.",
        ),
    ] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the student.")] = False,
    grad_accum: Annotated[
        int,
        typer.Option(
            "--grad-accum", min=1, help="Split each batch into this many passes (less memory, the same step)."
        ),
    ] = 1,
    workers: WorkersOpt = None,
    full_decode: Annotated[
        bool,
        typer.Option(
            "--full-decode",
            help="Decode every image at full size, for timm's exact pixels. By default a large JPEG is decoded at "
            "the reduced scale (1/2, 1/4, 1/8) at which its random crop still covers the training size: the same "
            "crop, resampled otherwise, several times faster on phone photos.",
        ),
    ] = False,
    log_every: Annotated[
        int | None,
        typer.Option(
            "--log-every",
            min=1,
            help="Read the loss every N steps (each read waits for the device) \\[default: 1 on CPU, 20 on a GPU].",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        float | None,
        typer.Option(
            "--checkpoint-every",
            metavar="MINUTES",
            help="Also save checkpoint.pt mid-epoch every this many minutes (a preempted run loses at most that).",
        ),
    ] = None,
    report_to: Annotated[
        ReportTo,
        typer.Option(
            "--report-to",
            help="Also report the loss and lr of each logged step and each epoch's metrics to: none, or "
            "tensorboard (event files in RUN_DIR/tensorboard; `tensorboard --logdir RUN_DIR`; needs "
            "`pip install 'deit-cli\\[tensorboard]'`). With --resume: the run's, unless given.",
        ),
    ] = ReportTo.none,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a DeiT (or train one from scratch) on a labelled image set, optionally distilling a teacher through the distillation token, as in the paper.

    RUN_DIR receives model.safetensors (the raw weights at the end: what the paper reports), best.safetensors (the raw weights of the best validation epoch), ema.safetensors (with --model-ema), checkpoint.pt (resume with --resume), metrics.jsonl and, with --report-to tensorboard, tensorboard/ (event files). Ctrl-C or SIGTERM (preemption) saves a checkpoint at the next step and exits 130 / 143; --checkpoint-every saves mid-epoch too.

    --resume continues the run with its saved settings: a flag given again must agree with them (only --epochs, --device, --workers, --compile, --log-every, --checkpoint-every and --report-to may change). On a cluster that requeues preempted jobs, give --auto-resume: the same command starts the run, then resumes it after each preemption.

    Under torchrun the same command trains the same model on any number of processes when mixup/cutmix and drop path are off (--recipe plain, or --mixup 0 --cutmix 0 --drop-path 0): mixup pairs images within each process's share, and drop path draws per process.

    Multi-label (--multi-label, implied by lists of labels): BCE on the class head, validation mAP and F1/IoU at --threshold, best.safetensors by mAP; the saved models are multi-label.

    Exit codes: 2 bad flags, 65 bad data, teacher or a non-finite loss, 66 data not found, 69 --report-to's extra not installed, 73 RUN_DIR holds a run (use --resume or --force), 74 write failed, 130 interrupted, 143 terminated (SIGTERM).
    """
    from .. import distributed
    from ..config import DeiTConfig
    from ..engine.train.loop import TrainOptions
    from ..engine.train.loop import train as run_train
    from ..engine.train.recipes import resolve_recipe

    if resume and force:
        raise UsageError("--resume and --force disagree; give one of them")
    if auto_resume:
        if force:
            raise UsageError("--auto-resume and --force disagree; give one of them")
        from ..engine.train.run_dir import has_checkpoint

        resume = resume or has_checkpoint(run_dir)
    cfg = None
    if config is not None:
        try:
            cfg = DeiTConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
        except OSError as e:
            from ..files import input_error

            raise input_error(config, e) from None
        except (ValueError, TypeError) as e:
            raise UsageError(f"{config}: not a DeiTConfig ({e})") from None
        scratch = True
    name = recipe.value if recipe else ("scratch" if scratch else "finetune")
    overrides = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        min_lr=min_lr,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        weight_decay=weight_decay,
        smoothing=smoothing,
        mixup=mixup,
        cutmix=cutmix,
        reprob=reprob,
        drop_path=drop_path,
        repeated_aug=repeated_aug,
        model_ema=model_ema,
        ema_decay=model_ema_decay,
        clip_grad=clip_grad,
        unscale_lr=unscale_lr,
        optimizer=optimizer.value if optimizer else None,
        three_augment=three_augment,
        simple_crop=simple_crop,
        color_jitter=color_jitter,
        bce=bce_loss,
        drop_path_schedule=drop_path_schedule.value if drop_path_schedule else None,
        eval_crop_pct=eval_crop_ratio,
    )
    opts = TrainOptions(
        data=data,
        run_dir=run_dir,
        recipe=resolve_recipe(name, overrides),
        model=model,
        scratch=scratch,
        config=cfg,
        image_size=image_size,
        teacher=teacher,
        teacher_weights=str(teacher_weights) if teacher_weights else None,
        distillation=distillation.value if distillation else None,
        alpha=alpha,
        tau=tau,
        val=val,
        val_split=val_split,
        resume=resume,
        force=force,
        device=device,
        dtype=dtype,
        compile=compile_,
        grad_accum=grad_accum,
        workers=workers,
        seed=seed,
        resume_epochs=epochs if resume else None,
        multi_label=multi_label,
        threshold=threshold,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        report_to=report_to.value,
        full_decode=full_decode,
        given=_given(ctx, overrides),
    )
    output.set_batch_size(opts.recipe.batch_size)
    main = distributed.is_main()
    events = _Events(bar=main and not quiet and output.show_progress(), quiet=quiet or not main)
    try:
        summary = run_train(opts, events)
    finally:
        events.close()
    if main and json_:
        output.write_json(summary)
    elif main and not quiet:
        best = summary.get("best_val_top1")
        best_map = summary.get("best_val_map")
        output.info(
            f"trained {summary['epochs']} epochs ({summary['steps']} steps) in {summary['seconds']:.1f} s"
            + (f"; best val top-1 {best:.2f}% (epoch {summary['best_epoch']})" if best is not None else "")
            + (f"; best val mAP {best_map:.4f} (epoch {summary['best_epoch']})" if best_map is not None else "")
            + (f"; multi-label, threshold {summary['threshold']:g}" if summary.get("multi_label") else "")
            + f"; model: {summary['model']}"
        )


# The flags (by parameter name) that are TrainOptions fields of another name, or no field.
_FIELDS = {
    "compile_": "compile",
    "epochs": "resume_epochs",
    "json_": None,
    "quiet": None,
    "force": None,
    "resume": None,
    "auto_resume": None,
    "run_dir": None,
    "data": None,
    # recipe values: given through `overrides` under their field names
    "model_ema_decay": None,
    "bce_loss": None,
    "eval_crop_ratio": None,
}


def _given(ctx: typer.Context | None, overrides: dict) -> frozenset[str]:
    """The TrainOptions and recipe fields the user gave explicitly (what --resume checks)."""
    given = {k for k, v in overrides.items() if v is not None}
    if ctx is not None:
        for name in ctx.params:
            source = ctx.get_parameter_source(name)
            if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
                field = _FIELDS.get(name, name)
                if field is not None and name not in overrides:
                    given.add(field)
    return frozenset(given)


class _Events:
    """Progress: a rich bar on a terminal, one plain line per epoch when piped."""

    def __init__(self, *, bar: bool, quiet: bool):
        self.bar, self.quiet = bar, quiet
        self._progress = self._task = None
        self._started = time.perf_counter()
        self._images = 0

    def note(self, message: str) -> None:
        if not self.quiet:
            output.info(f"note: {message}")

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        if not self.bar:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.close()
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=output.stderr,
            transient=True,
            redirect_stdout=False,
        )
        self._task = self._progress.add_task("train", total=steps, completed=start_step, info="")
        self._started, self._images = time.perf_counter(), 0
        self._progress.start()

    def step(self, epoch: int, step: int, loss: float | None, lr: float, images: int) -> None:
        if self._progress is None:
            return
        self._images += images
        rate = self._images / max(time.perf_counter() - self._started, 1e-9)
        shown = "-" if loss is None else f"{loss:.4f}"
        self._progress.update(self._task, advance=1, info=f"loss {shown}  lr {lr:.2e}  {rate:.1f} img/s")

    def epoch_end(self, record: dict) -> None:
        self.close()
        if self.quiet:
            return
        parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.3g}"]
        if record.get("val_top1") is not None:
            parts.append(f"val top-1 {record['val_top1']:.2f}%")
        if record.get("val_map") is not None:

            def num(key: str) -> str:
                return "-" if record.get(key) is None else f"{record[key]:.3f}"

            parts.append(
                f"val mAP {num('val_map')}  F1 {num('val_f1_micro')}/{num('val_f1_macro')}  "
                f"IoU {num('val_iou_micro')}/{num('val_iou_macro')} (micro/macro @ {record['val_threshold']:g})"
            )
        parts += [f"{record['images_per_s']:.1f} img/s", f"{record['seconds']:.1f} s"]
        if record.get("skipped"):
            shown = "; ".join(record["skipped_images"][:3])
            parts.append(f"{record['skipped']} images skipped ({shown}{'; ...' if record['skipped'] > 3 else ''})")
        output.info("  ".join(parts))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def register(app: typer.Typer) -> None:
    app.command("train")(train)
