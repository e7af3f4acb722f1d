"""The training loop: `train(options)` from a data set to a run directory.

    train()            set up (data, student, teacher, optimizer, resume), then per epoch:
      train_one_epoch  batches -> student (+ teacher) -> loss -> AdamW step, EMA, schedule
      validate         the raw model (and the EMA) on the validation set
      save             checkpoint.pt, best.safetensors, metrics.jsonl; model.safetensors at the end
      report           with --report-to: each logged step's loss and lr, each epoch's record

Under torchrun every rank takes its share of each global batch (DDP averages the
gradients; the loss is scaled so the step is the global batch's whatever the split), and
one reduction per step carries the global image count, the stop and save requests and the
loss, so every rank stops, saves or diverges at the same step. On one process the loss
stays on the device and is read every `log_every` steps: no host synchronisation per step.

Ctrl-C or SIGTERM (a cluster's preemption) saves a checkpoint at the next step boundary
and stops (exit 130 / 143); `checkpoint_every` minutes also saves mid-epoch. Nothing here
prints: what the CLI shows comes through the `Events` callbacks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ... import distributed
from ...config import DeiTConfig, dtype_name
from ...devices import resolve_device
from ...errors import UsageError
from ...model import DeiT
from ...variants import Preprocessing, variant_for_config
from . import data as train_data
from .augment import Mixup, build_transform
from .loader import TrainLoader
from .losses import DistillationLoss, base_loss
from .optim import ModelEma, build_optimizer, ema_note, lr_at
from .options import (
    Events,
    TrainingDiverged,
    TrainOptions,
    check_options,
    distillation_kind,
    resumed_options,
)
from .recipes import for_model
from .report import Report, open_report
from .run_dir import (
    create_run_dir,
    prepare_run_dir,
    read_metrics,
    read_run_checkpoint,
    restore_rng,
    save_model,
    write_checkpoint,
    write_metrics,
)
from .step import Stepper
from .stop import Stop
from .student import TrainingHeads, architecture, build_student
from .teacher import Teacher, load_teacher
from .validate import validate

__all__ = ["Events", "TrainOptions", "train", "training_dtype"]


def train(opts: TrainOptions, events: Events | None = None) -> dict:
    """Train as `opts` says; returns the run's summary (also stored in model.safetensors).

    Under torchrun this joins the process group for the run (gloo on CPU, nccl on CUDA)."""
    with distributed.init(distributed.local_device(opts.device)):
        return _train(opts, events or Events())


def training_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). "auto": bf16 on a CUDA device that has it, else fp32."""
    if name.strip().lower() == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name(name)]


def _train(opts: TrainOptions, events: Events) -> dict:
    started = time.perf_counter()
    check_options(opts)
    prepare_run_dir(opts.run_dir, resume=opts.resume, force=opts.force)
    ckpt = None
    if opts.resume:
        ckpt = read_run_checkpoint(opts.run_dir / "checkpoint.pt")
        if opts.multi_label and not ckpt.get("multi_label", False):
            raise UsageError(
                f"{opts.run_dir}: the run is single-label; --multi-label cannot change it on resume",
                "start a new run for multi-label training",
            )
        opts = resumed_options(opts, ckpt["args"], ckpt["epoch"])
    kind = distillation_kind(opts)
    sets, opts = _find_data(opts, ckpt, events)
    if ckpt is None and opts.recipe.sizes is not None:  # DeiT III: lr, drop path and size by the model's width
        opts = replace(opts, recipe=for_model(opts.recipe, architecture(opts), scratch=opts.scratch))
    recipe, classes, multi = opts.recipe, sets.train.classes, sets.train.multi_label

    # ---- where and how
    rank, world = distributed.world()
    device = resolve_device(distributed.local_device(opts.device))
    amp_dtype = training_dtype(opts.dtype, device)
    if device.type == "cuda":  # TF32 for what runs in fp32 (--dtype fp32, and the fp32 ops under autocast)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(opts.seed + rank)  # drop path draws: per process

    # ---- the models
    model = _resumed_student(ckpt, classes) if ckpt is not None else build_student(opts, classes, events)
    model.multi_label, model.threshold = (
        multi,
        0.5 if opts.threshold is None else opts.threshold,
    )  # saved with the weights (deit_metadata)
    model.set_drop_path(recipe.drop_path, uniform=recipe.drop_path_schedule == "uniform")
    model.to(device).train().requires_grad_(True)
    teacher = _teacher(opts, model, device, amp_dtype, events) if opts.teacher is not None else None
    student: nn.Module = TrainingHeads(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    if opts.compile:
        student = torch.compile(student)

    # ---- the optimisation
    optimizer = build_optimizer(model, recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEma(model, recipe.ema_decay) if recipe.model_ema else None
    mixup = Mixup(recipe.mixup, recipe.cutmix, recipe.mixup_switch_prob, recipe.smoothing, len(classes))
    loss = base_loss(soft_targets=mixup.active, smoothing=recipe.smoothing, multi_label=multi, bce=recipe.bce)
    stepper = Stepper(
        student,
        model,
        teacher,
        DistillationLoss(loss, kind, opts.alpha, opts.tau),
        optimizer,
        scaler,
        ema,
        mixup,
        device=device,
        amp_dtype=amp_dtype,
        grad_accum=opts.grad_accum,
        clip_grad=recipe.clip_grad,
        world=world,
        preprocessing=model.preprocessing,
    )
    loader = TrainLoader(
        sets.train,
        build_transform(model.preprocessing, recipe),
        batch_size=recipe.batch_size,
        seed=opts.seed,
        rank=rank,
        world_size=world,
        repeats=recipe.repeated_aug,
        workers=opts.workers,
        pin_memory=device.type == "cuda",
        reduce=not opts.full_decode,
    )
    spe = loader.steps
    if ema is not None and (note := ema_note(recipe.ema_decay, recipe.epochs * spe)):
        events.note(note)

    # ---- where the run stands
    state = RunState(best_key="val_map" if multi else "val_top1")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        state.restore(ckpt)
        if not restore_rng(ckpt["rng"], rank, world, device):
            events.note(f"the run was saved by {len(ckpt['rng'])} processes: drop path draws start afresh here")
    create_run_dir(opts.run_dir, resume=opts.resume)
    history = read_metrics(opts.run_dir / "metrics.jsonl", state.epoch) if ckpt is not None else []
    run = Run(opts, model, ema, stepper, loader, sets, state, events)

    resume_step = state.global_step if ckpt is not None else None
    with (
        Stop().installed() as stop,
        loader,
        open_report(opts.report_to, opts.run_dir, rank=rank, resume_step=resume_step) as report,
    ):
        run.stop, run.report = stop, report
        for epoch in range(state.epoch, recipe.epochs):
            if rank == 0:
                events.epoch_start(epoch, recipe.epochs, spe, state.step_in_epoch)
            record = {"epoch": epoch + 1, **train_one_epoch(run, epoch)}
            if sets.val is not None:
                record.update(_validation(run, device, amp_dtype))
                score = record[state.best_key]
                if score is not None and (state.best[state.best_key] is None or score > state.best[state.best_key]):
                    state.best = {state.best_key: score, "epoch": epoch + 1}
                    if rank == 0:
                        save_model(opts.run_dir / "best.safetensors", model, _summary(run, epoch + 1))
            history.append(record)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            report.epoch(state.global_step, record)  # before the checkpoint: a resume purges only what follows it
            _save_checkpoint(run)
            if rank == 0:
                write_metrics(opts.run_dir / "metrics.jsonl", history)
            # a signal during validation or saving stops here, after the epoch's line
            stopping = run.stop.agreed()
            if rank == 0:
                events.epoch_end(record)
            if stopping:
                raise stopping(f"interrupted after epoch {epoch + 1}; checkpoint saved", RESUME_HINT)

    summary = _summary(run, recipe.epochs)
    summary["final"] = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if not k.endswith("_images") or k in ("train_images", "val_images")
    }
    model_path = opts.run_dir / "model.safetensors"
    if rank == 0:
        save_model(model_path, model, summary)
        if sets.val is None:  # no validation: the best model is the last one
            save_model(opts.run_dir / "best.safetensors", model, summary)
        if ema is not None:
            save_model(opts.run_dir / "ema.safetensors", ema.module, {**summary, "weights": "ema"})
    distributed.barrier()
    summary.update(
        run_dir=str(opts.run_dir),
        model=str(model_path),
        best=str(opts.run_dir / "best.safetensors"),
        seconds=time.perf_counter() - started,
    )
    if ema is not None:
        summary["ema"] = str(opts.run_dir / "ema.safetensors")
    return summary


RESUME_HINT = "continue with the same command and --resume"


# --------------------------------------------------------------------------- set-up


def _find_data(opts: TrainOptions, ckpt: dict | None, events: Events) -> tuple[train_data.Sets, TrainOptions]:
    """The training and validation sets, checked against a resumed run; `opts` with the
    multi-label settings the data decides."""
    sets = train_data.find_sets(
        opts.data, val=opts.val, val_split=opts.val_split, multi_label=True if opts.multi_label else None
    )
    multi = sets.train.multi_label
    if sets.skipped:
        events.note(f"{len(sets.skipped)} entries have no label and are skipped (e.g. {sets.skipped[0]})")
    if ckpt is not None:
        if bool(ckpt.get("multi_label", False)) != multi:
            was, now = ("multi-label", "single-label") if ckpt.get("multi_label") else ("single-label", "multi-label")
            raise train_data.DatasetError(
                f"{opts.run_dir}: the run is {was}, but the data is {now}"
                + (" (it gives lists of labels)" if multi else ""),
                "resume with the data the run started with, or start a new run",
            )
        train_data.check_classes(ckpt["classes"], sets.train.classes)
    if not multi:
        if opts.threshold is not None:
            raise UsageError("--threshold goes with multi-label training (--multi-label, or lists of labels)")
        return sets, opts
    if opts.teacher is not None:
        raise UsageError(
            "--teacher with multi-label data (lists of labels): distillation is for single-label training only",
            "train the multi-label model without a teacher",
        )
    recipe = opts.recipe
    if recipe.smoothing:
        events.note(f"label smoothing ({recipe.smoothing:g}) does not apply to multi-label training: off")
        recipe = replace(recipe, smoothing=0.0)
    threshold = 0.5 if opts.threshold is None else float(opts.threshold)
    return sets, replace(opts, recipe=recipe, multi_label=True, threshold=threshold)


def _resumed_student(ckpt: dict, classes: list[str]) -> DeiT:
    model = DeiT(DeiTConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    pre = ckpt["preprocessing"]
    model.preprocessing = Preprocessing.from_dict(pre)
    model.labels, model.source, model.origin = list(classes), ckpt["source"], ckpt["source"]
    model.variant = variant_for_config(model.config)
    return model


def _teacher(opts: TrainOptions, student: DeiT, device: torch.device, amp_dtype, events: Events) -> Teacher:
    net, expects, _ = load_teacher(opts.teacher, opts.teacher_weights, student.config.num_classes)
    fast = None
    if isinstance(net, DeiT):  # a DeiT teacher runs on the inference engine's fast path
        from ..runner import prepare

        fast = prepare(net, device=device, dtype=amp_dtype or torch.float32, compile=opts.compile)
    teacher = Teacher(net, student.preprocessing, expects, fast).to(device)
    if teacher.adapt:
        events.note(
            f"the teacher expects {expects.image_size}px with its own mean/std: each batch is resized/renormalised for it"
        )
    return teacher


# --------------------------------------------------------------------------- state


@dataclass
class RunState:
    """Where the run stands: what a checkpoint saves besides the weights and optimizer."""

    best_key: str  # what "best" is judged by: val_top1, or val_map for multi-label
    epoch: int = 0  # epochs done
    step_in_epoch: int = 0  # steps of the current epoch done
    global_step: int = 0
    best: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)  # the current epoch's sums, for a mid-epoch resume

    def __post_init__(self):
        self.best = self.best or {self.best_key: None, "epoch": None}

    def restore(self, ckpt: dict) -> None:
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.running = ckpt.get("running") or {}
        self.best = ckpt.get("best") or self.best


@dataclass
class Run:
    """What an epoch needs: the options, the model and its stepper, the data, the state."""

    opts: TrainOptions  # opts.recipe is the run's recipe
    model: DeiT
    ema: ModelEma | None
    stepper: Stepper
    loader: TrainLoader  # decoding and augmentation, made once per run
    sets: train_data.Sets
    state: RunState
    events: Events
    stop: Stop | None = None
    report: Report = field(default_factory=Report)


def _summary(run: Run, epochs_done: int) -> dict:
    s, train = run.state, run.sets.train
    out = {
        "epochs": epochs_done,
        "steps": s.global_step,
        "classes": train.classes,
        "recipe": run.opts.recipe.name,
        "distillation": run.stepper.criterion.kind,
        "teacher": run.opts.teacher,
        "train_images": len(train),
        "val_images": len(run.sets.val) if run.sets.val else 0,
        f"best_{s.best_key}": s.best[s.best_key],
        "best_epoch": s.best["epoch"],
        "source": run.model.origin,
        "multi_label": train.multi_label,
        "weights": "raw",
    }
    if train.multi_label:
        out["threshold"] = run.opts.threshold
    return out


def _save_checkpoint(run: Run) -> None:
    m, s = run.model, run.state
    run.report.flush()  # what was reported up to here is on disk before the checkpoint says so
    write_checkpoint(
        run.opts.run_dir / "checkpoint.pt",
        {
            "model": m.state_dict(),
            "config": m.config.to_dict(),
            "classes": run.sets.train.classes,
            "preprocessing": m.preprocessing.to_dict(),
            "source": m.origin or "",
            "optimizer": run.stepper.optimizer.state_dict(),
            "scaler": run.stepper.scaler.state_dict(),
            "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "epoch": s.epoch,
            "step_in_epoch": s.step_in_epoch,
            "global_step": s.global_step,
            "args": run.opts.to_plain(),
            "best": s.best,
            "running": s.running,
            "multi_label": run.sets.train.multi_label,
        },
        run.stepper.device,
    )


def _validation(run: Run, device: torch.device, amp_dtype) -> dict:
    """The raw model's validation record, and with an EMA the EMA's as `*_ema` keys."""
    kw = dict(
        device=device,
        amp_dtype=amp_dtype,
        batch_size=max(1, run.opts.recipe.batch_size // run.stepper.world),
        workers=run.opts.workers,
        threshold=run.opts.threshold,
    )
    record = validate(run.model, run.sets.val, **kw)
    if run.ema is not None:
        ema = validate(run.ema.module, run.sets.val, **kw)
        record.update({f"{k}_ema": v for k, v in ema.items() if k.startswith("val_") and not k.endswith("_images")})
    return record


# --------------------------------------------------------------------------- the epoch


def train_one_epoch(run: Run, epoch: int) -> dict:
    """Optimizer steps from the run's position to the end of `epoch`; returns the epoch's
    train metrics. Stops at a step boundary on a signal (checkpoint saved) or a non-finite loss.

    After each step one exchange (`Stepper.exchange`) carries the next batch's image count,
    the stop and save requests and, when read, the loss window: under torchrun a reduction
    every step; on one process a host synchronisation only every `log_every` steps, at the
    epoch's end, or when a stop or save is due. The report gets the loss every `log_every`
    steps of the epoch and at its end, whatever else read it, so a resumed run reports the
    same steps and values as an uninterrupted one (a window cut by a checkpoint is carried
    in it)."""
    r, opts, s, stepper = run.opts.recipe, run.opts, run.state, run.stepper
    spe = run.loader.steps
    world, rank, stop = stepper.world, distributed.world()[0], run.stop
    stepper.student.train()
    sums = s.running or {"loss": 0.0, "samples": 0, "failed": [], "seconds": 0.0}
    sums.setdefault("reported", [0.0, 0.0])  # loss sum and images since the last reported step
    s.running = {}
    started = last_save = time.perf_counter()
    log_every = opts.log_every or _default_log_every(stepper.device)
    batches = run.loader.epoch(epoch, s.step_in_epoch)
    lr, loss_shown, window_from = lr_at(s.global_step, r, spe), None, s.step_in_epoch
    try:
        batch = next(batches, None)
        n_global = stepper.exchange([_count(batch)], read=False)[0]
        while batch is not None:
            lr = lr_at(s.global_step, r, spe)
            for group in stepper.optimizer.param_groups:
                group["lr"] = lr
            if n_global > 0:
                mix_seed = train_data.sample_seed(opts.seed, epoch, -1 - batch.step)
                stepper.step(batch.images, batch.targets, n_global, mix_seed, s.global_step, batch.erase)
            sums["samples"] += _count(batch)
            sums["failed"] += batch.failed
            s.global_step += 1
            s.step_in_epoch = batch.step + 1

            following = next(batches, None)
            now = time.perf_counter()
            save_due = opts.checkpoint_every is not None and now - last_save >= 60 * opts.checkpoint_every
            last = following is None
            due = last or s.step_in_epoch % log_every == 0  # reported: the same steps in a resumed run
            read = world > 1 or due or stop.requested or save_due
            n_global, interrupt, terminate, save, window = stepper.exchange(
                [_count(following), stop.interrupt, stop.terminate, save_due], read=read
            )
            if read:  # the loss of the steps since the last read: check it, count it, show it
                _check_finite(window, run, epoch, window_from, batch.step)
                sums["loss"] += window[0]
                loss_shown = window[0] / window[1] if window[1] else loss_shown
                window_from = s.step_in_epoch
                reported = sums["reported"]
                reported[0], reported[1] = reported[0] + window[0], reported[1] + window[1]
                if due:
                    if reported[1]:
                        run.report.step(s.global_step, reported[0] / reported[1], lr)
                    sums["reported"] = [0.0, 0.0]
            if rank == 0:
                run.events.step(epoch, batch.step, loss_shown, lr, _count(batch))
            stopping = stop.error(interrupt, terminate)
            if (stopping or save) and not last:  # (at the epoch's end, its own checkpoint follows)
                sums["seconds"] += now - started
                s.running = sums
                _save_checkpoint(run)
                s.running = {}
                if stopping:
                    raise stopping(
                        f"interrupted at epoch {epoch + 1}, step {s.step_in_epoch}; checkpoint saved to "
                        f"{opts.run_dir / 'checkpoint.pt'}",
                        RESUME_HINT,
                    )
                started = last_save = time.perf_counter()  # the save is not training time
            batch = following
    finally:
        batches.close()
    sums["seconds"] += time.perf_counter() - started
    loss_sum = sums["loss"]  # the windows were summed over ranks as they were read
    samples, seconds = distributed.sum_across([float(sums["samples"]), sums["seconds"]])
    failed = [f for rank_failed in distributed.gather_objects(sums["failed"]) for f in rank_failed]
    return {
        "lr": lr,
        "train_loss": loss_sum / max(samples, 1),
        "train_images": int(samples),
        "images_per_s": samples / max(seconds / world, 1e-9),
        "seconds": seconds / world,
        "skipped": len(failed),
        "skipped_images": failed,
    }


def _count(batch: train_data.TrainBatch | None) -> int:
    return 0 if batch is None else batch.images.shape[0]


def _default_log_every(device: torch.device) -> int:
    # a read costs a device synchronisation: cheap on the CPU, a stall of the queue on a GPU
    return 1 if device.type == "cpu" else 20


def _check_finite(window: list[float], run: Run, epoch: int, first: int, last: int) -> None:
    """Stop every rank with one line when the loss window holds a non-finite loss."""
    loss_sum, _, bad = window
    if not bad and math.isfinite(loss_sum):
        return
    where = run.stepper.first_bad()
    last_ckpt = run.opts.run_dir / "checkpoint.pt"
    saved = f"the last good checkpoint is {last_ckpt}" if last_ckpt.is_file() else "no checkpoint was saved yet"
    step = f"step {where[0] % run.loader.steps + 1}" if where else f"steps {first + 1}-{last + 1}"
    value = where[1] if where else "not finite"
    raise TrainingDiverged(
        f"loss is {value} at epoch {epoch + 1}, {step}; stopped ({saved})",
        "lower --lr, or check the data and the model",
    )
