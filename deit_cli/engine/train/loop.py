"""The training loop: `train(options)` from a data set to a run directory.

    train()            set up (data, student, teacher, optimizer, resume), then per epoch:
      train_one_epoch  batches -> student (+ teacher) -> loss -> AdamW step, EMA, schedule
      evaluate         top-1 / top-5 / loss on the validation set (multi-label: mAP, F1, IoU)
      save             checkpoint.pt, best.safetensors, metrics.jsonl; model.safetensors at the end

Under torchrun every rank takes its share of each global batch (DDP averages the
gradients; the loss is scaled so the step is the global batch's whatever the split), the
metrics are summed across ranks (multi-label: every rank's scores gathered, so mAP is
exact), and only rank 0 writes.

Multi-label training (`multi_label`, or any list of labels in the training set) uses
multi-hot targets and BCE-with-logits on the class head (losses.MultiLabelBCE), no
label smoothing and no teacher; "best" is by validation mAP, and the saved models are
marked multi-label with their threshold. Nothing here prints: what the
CLI shows comes through the `Events` callbacks.
"""

from __future__ import annotations

import copy
import io
import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...config import DeiTConfig, check_threshold
from ...errors import (
    EXIT_DATA,
    EXIT_INTERRUPTED,
    CheckpointError,
    DeiTError,
    InputNotFound,
    OutputExists,
    UsageError,
)
from ...files import atomic_path
from ...model import DeiT
from ...variants import DEFAULT_MODEL, Preprocessing, find_variant, variant_for_config
from ..runner import resolve_device
from . import data as train_data
from .augment import Mixup, build_transform
from .losses import DistillationLoss, base_loss
from .recipes import Recipe

RUN_FILES = ("model.safetensors", "best.safetensors", "checkpoint.pt", "metrics.jsonl")
CHECKPOINT_FORMAT = "deit-train/1"
NO_WEIGHT_DECAY = ("cls_token", "dist_token", "pos_embed")  # 3-d, but not weights (the original release)
META_RUN = "deit.run"


class TrainingInterrupted(DeiTError):
    exit_code = EXIT_INTERRUPTED


class TrainingDiverged(DeiTError):
    """The loss became NaN or infinite (exit 65)."""

    exit_code = EXIT_DATA


@dataclass
class TrainOptions:
    """Everything a run needs besides the recipe. `distillation` None: hard with a teacher."""

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
    dtype: str = "fp32"
    compile: bool = False
    grad_accum: int = 1
    workers: int | None = None
    seed: int = 0
    resume_epochs: int | None = None  # --resume with --epochs: train the run to this many epochs
    multi_label: bool = False  # False: the training set decides (any list of labels makes it multi-label)
    threshold: float | None = None  # multi-label: where a label is predicted (None: 0.5)

    def to_plain(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
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


# --------------------------------------------------------------------------- pieces


class TrainingHeads(nn.Module):
    """The student as training sees it: (class logits, distillation logits or None).

    The same function as `DeiT.forward_features` + the heads, except that the last block
    runs its queries, projection and MLP on the class/distillation tokens only: the
    heads read nothing else, so the patch rows of that block never reach the loss (the
    gradient is exactly the same; the work is about 7% less, as in the inference runner).
    """

    def __init__(self, model: DeiT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        P = m.config.num_prefix_tokens
        x = m.patch_embed(x)
        prefix = [m.cls_token.expand(x.shape[0], -1, -1)]
        if m.dist_token is not None:
            prefix.append(m.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + m.pos_embed  # (B, prefix + patches, D)
        for block in m.blocks[:-1]:
            x = block(x)
        tokens = m.norm(_last_block_prefix(m.blocks[-1], x, P))  # (B, prefix, D)
        cls = m.head(tokens[:, 0])
        dist = m.head_dist(tokens[:, 1]) if m.head_dist is not None else None
        return cls, dist


def _last_block_prefix(block, x: torch.Tensor, P: int) -> torch.Tensor:
    """`block(x)[:, :P]`, computing only what those rows need (keys and values of all)."""
    from ...model import _drop_path

    B, N, C = x.shape
    attn = block.attn
    H = attn.num_heads
    h = block.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :P], w[:C], b[:C] if b is not None else None)  # (B, P, C)
    kv = F.linear(h, w[C:], b[C:] if b is not None else None)  # (B, N, 2C)
    q = q.view(B, P, H, C // H).transpose(1, 2)  # (B, heads, P, head_dim)
    k, v = kv.view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, head_dim)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, P, C)  # (B, P, C)
    y = x[:, :P] + _drop_path(attn.proj(a), block.drop_path, block.training)
    return y + _drop_path(block.mlp(block.norm2(y)), block.drop_path, block.training)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on parameters with two or more dimensions (linear weights, the patch
    convolution), not on biases, norms, cls_token, dist_token or pos_embed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and name.split(".")[-1] not in NO_WEIGHT_DECAY:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, recipe: Recipe, steps_per_epoch: int) -> float:
    """Per-step schedule: linear warm-up from warmup_lr, then cosine from the peak to min_lr."""
    peak = recipe.peak_lr()
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    total = recipe.epochs * steps_per_epoch
    if step < warmup:
        return recipe.warmup_lr + (peak - recipe.warmup_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return recipe.min_lr + 0.5 * (peak - recipe.min_lr) * (1 + math.cos(math.pi * t))


class ModelEma:
    """An exponential moving average of the weights: ema = decay·ema + (1 − decay)·model."""

    def __init__(self, model: DeiT, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: DeiT) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            e.lerp_(m, 1 - self.decay) if e.is_floating_point() else e.copy_(m)


class Teacher(nn.Module):
    """A teacher in eval mode without gradients; the student's batch is renormalised and
    resized to what the teacher expects when `expects` (a Preprocessing) says otherwise."""

    def __init__(self, net: nn.Module, student: Preprocessing, expects: Preprocessing | None, fast=None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.fast = fast  # a DeiT teacher runs on the inference engine's fast path (engine.runner)
        self.adapt = expects is not None and (
            expects.image_size != student.image_size
            or tuple(expects.mean) != tuple(student.mean)
            or tuple(expects.std) != tuple(student.std)
        )
        self.size = expects.image_size if expects is not None else student.image_size
        to = expects or student
        self.register_buffer("scale", torch.tensor(student.std).div(torch.tensor(to.std)).view(1, 3, 1, 1), False)
        self.register_buffer(
            "shift",
            (torch.tensor(student.mean) - torch.tensor(to.mean)).div(torch.tensor(to.std)).view(1, 3, 1, 1),
            False,
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapt:
            x = x * self.scale + self.shift
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        if self.fast is not None:
            return self.fast(x).clone()  # out of inference mode: the loss may save it for backward
        return self.net(x)


def load_teacher(spec: str, weights: str | None, num_classes: int) -> tuple[nn.Module, Preprocessing | None, str]:
    """(teacher network, the input it expects or None for any, a description)."""
    kind, _, name = spec.partition(":")
    if kind in ("torchvision", "timm") and name:
        if weights is None:
            raise UsageError(f"--teacher {spec} needs --teacher-weights FILE (its trained state dict)")
        if kind == "torchvision":
            import torchvision

            try:
                net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            except (ValueError, KeyError):
                raise UsageError(f"--teacher {spec}: torchvision has no model {name!r}") from None
            expects = None
        else:
            try:
                import timm
            except ImportError:
                raise UsageError(f"--teacher {spec}: timm is not installed") from None
            try:
                net = timm.create_model(name, pretrained=False, num_classes=num_classes)
            except RuntimeError as e:
                raise UsageError(f"--teacher {spec}: {e}") from None
            cfg = net.pretrained_cfg
            expects = Preprocessing(
                image_size=cfg.get("input_size", (3, 224, 224))[-1],
                mean=tuple(cfg.get("mean", Preprocessing.mean)),
                std=tuple(cfg.get("std", Preprocessing.std)),
            )
        _load_teacher_weights(net, Path(weights), spec, num_classes)
        return net, expects, spec
    if weights is not None:
        raise UsageError("--teacher-weights goes with --teacher torchvision:NAME or timm:NAME")
    from ...checkpoints import load_model

    net = load_model(spec)
    if net.config.num_classes != num_classes:
        raise CheckpointError(
            f"teacher {spec} has {net.config.num_classes} classes, the data has {num_classes}",
            "the teacher must be trained on the same classes",
        )
    return net, net.preprocessing, spec


def _load_teacher_weights(net: nn.Module, path: Path, spec: str, num_classes: int) -> None:
    from ...checkpoints.formats import (
        SAFETENSORS,
        detect_format,
        find_state_dict,
        read_safetensors,
        read_torch,
    )

    if not path.is_file():
        raise InputNotFound(f"{path}: no such file")
    sd = read_safetensors(path)[0] if detect_format(path) == SAFETENSORS else find_state_dict(read_torch(path), path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    expected = net.state_dict()
    shaped = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if shaped:
        k = shaped[-1]
        got, want = tuple(sd[k].shape), tuple(expected[k].shape)
        if got[:1] != want[:1] and want[:1] == (num_classes,):
            raise CheckpointError(
                f"{path}: the teacher has {got[0]} classes ({k} {got}), the data has {num_classes}",
                "the teacher must be trained on the same classes",
            )
        raise CheckpointError(f"{path}: does not fit {spec}: {k} is {got}, expected {want}")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit {spec}: "
            + "; ".join(
                x
                for x in (
                    missing and f"missing {', '.join(missing[:3])}",
                    unexpected and f"unexpected {', '.join(unexpected[:3])}",
                )
                if x
            )
        )
    net.load_state_dict(sd)


@torch.no_grad()
def _init_head(linear: nn.Linear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(linear.weight.shape)
    nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04, generator=g)
    linear.weight.copy_(t)
    linear.bias.zero_()


def _rebuild(model: DeiT, config: DeiTConfig, seed: int) -> DeiT:
    """`model`'s weights in a DeiT of `config` (heads that changed shape start afresh)."""
    new = DeiT(config)
    sd = model.state_dict()
    own = new.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    new.load_state_dict(keep, strict=False)
    for name in ("head", "head_dist"):
        layer = getattr(new, name)
        if layer is not None and f"{name}.weight" not in keep:
            _init_head(layer, seed + (name == "head_dist"))
    new.preprocessing, new.source, new.origin, new.variant = model.preprocessing, model.source, model.origin, None
    return new


def build_student(opts: TrainOptions, classes: list[str], events: Events) -> DeiT:
    """The model to train: pretrained (fine-tuning) or random (--scratch), with heads for
    `classes`; a distilled model keeps its distillation head only when there is a teacher."""
    n = len(classes)
    if opts.scratch:
        if opts.config is not None:
            config, pre = opts.config, None
        else:
            variant = find_variant(opts.model)
            if variant is not None:
                config, pre = variant.config, variant.preprocessing
            else:
                from ...checkpoints import read_checkpoint

                config, pre = read_checkpoint(opts.model).config, None
        config = replace(config, num_classes=n, dist_head=True)
        if opts.image_size:
            config = replace(config, image_size=opts.image_size)
        model = DeiT(config)
        model.init_weights(opts.seed)
        model.preprocessing = replace(pre, image_size=config.image_size) if pre else Preprocessing(config.image_size)
        model.source = model.origin = f"{opts.model if opts.config is None else 'config'} (scratch)"
    else:
        from ...checkpoints import load_model

        model = load_model(opts.model, image_size=opts.image_size)
        if model.config.num_classes != n:
            events.note(
                f"{opts.model} has {model.config.num_classes} classes, the data {n}: classifier heads re-initialised"
            )
            model = _rebuild(model, replace(model.config, num_classes=n), opts.seed)
    cfg = model.config
    if opts.teacher is not None:
        if not cfg.distilled:
            raise UsageError(
                f"--teacher needs a distilled student, and {opts.model} has no distillation token",
                "use a distilled architecture (e.g. -m deit-tiny-distilled) or train without --teacher",
            )
        if not cfg.dist_head:
            events.note("the student has no distillation head: a new one is initialised")
            model = _rebuild(model, replace(cfg, dist_head=True), opts.seed)
    elif cfg.has_dist_head:
        events.note("no teacher: the class head alone is trained, and the model is saved without a distillation head")
        model = _rebuild(model, replace(cfg, dist_head=False), opts.seed)
    model.labels = list(classes)
    if model.variant is None:
        model.variant = variant_for_config(model.config)
    return model


def _distillation_kind(opts: TrainOptions) -> str:
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


# --------------------------------------------------------------------------- Ctrl-C


class _StopFlag:
    """Set by the first Ctrl-C (the run stops at the next step boundary); a second one
    interrupts at once. Only the main thread can install a handler; elsewhere it is inert."""

    def __init__(self):
        self.set = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What train_one_epoch needs, in one place."""

    opts: TrainOptions
    recipe: Recipe
    model: DeiT
    student: nn.Module  # TrainingHeads, DDP-wrapped under torchrun, compiled with --compile
    teacher: Teacher | None
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    mixup: Mixup
    device: torch.device
    amp_dtype: torch.dtype | None
    transform: object
    sets: train_data.Sets
    steps_per_epoch: int
    rank: int
    world: int
    stop: _StopFlag
    events: Events
    global_step: int = 0
    running: dict = field(default_factory=dict)


def _autocast(run: _Run):
    if run.amp_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.amp_dtype)


def _all_sum(values: list[float]) -> list[float]:
    if not distributed.is_distributed():
        return values
    t = distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    return t.tolist()


def train_one_epoch(run: _Run, epoch: int, start_step: int, save_checkpoint) -> dict:
    """One epoch of optimizer steps from `start_step`; returns the epoch's train metrics.
    Stops at a step boundary on Ctrl-C (checkpoint saved) or a non-finite loss."""
    r, opts = run.recipe, run.opts
    run.student.train()
    sums = run.running or {"loss": 0.0, "samples": 0, "failed": [], "seconds": 0.0}
    started = time.perf_counter()
    batches = train_data.iter_epoch(
        run.sets.train,
        run.transform,
        batch_size=r.batch_size,
        seed=opts.seed,
        epoch=epoch,
        start_step=start_step,
        rank=run.rank,
        world_size=run.world,
        repeats=r.repeated_aug,
        workers=opts.workers,
    )
    lr = lr_at(run.global_step, r, run.steps_per_epoch)
    try:
        for batch in batches:
            lr = lr_at(run.global_step, r, run.steps_per_epoch)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss_value, n = _step(run, batch, epoch)
            sums["loss"] += loss_value
            sums["samples"] += n
            sums["failed"] += batch.failed
            run.global_step += 1
            stop = 0 if run.world == 1 else _all_sum([float(run.stop.set)])[0]
            if run.rank == 0:
                run.events.step(epoch, batch.step, loss_value / max(n, 1), lr, n)
            if run.stop.set or stop:
                sums["seconds"] += time.perf_counter() - started
                run.running = sums
                path = save_checkpoint(epoch, batch.step + 1)
                raise TrainingInterrupted(
                    f"interrupted at epoch {epoch + 1}, step {batch.step + 1}; checkpoint saved to {path}",
                    "continue with the same command and --resume",
                )
    finally:
        batches.close()
    sums["seconds"] += time.perf_counter() - started
    loss_sum, samples, seconds = _all_sum([sums["loss"], float(sums["samples"]), sums["seconds"]])
    failed = [f for rank_failed in distributed.gather_objects(sums["failed"]) for f in rank_failed]
    run.running = {}
    return {
        "lr": lr,
        "train_loss": loss_sum / max(samples, 1),
        "train_images": int(samples),
        "images_per_s": samples / max(seconds / run.world, 1e-9),
        "seconds": seconds / run.world,
        "skipped": len(failed),
        "skipped_images": failed,
    }


def _step(run: _Run, batch: train_data.TrainBatch, epoch: int) -> tuple[float, int]:
    """Forward, backward and one optimizer step on this rank's share of a global batch.
    Returns (this share's summed loss, its images)."""
    n_local = batch.images.shape[0]
    n_global = n_local if run.world == 1 else int(_all_sum([float(n_local)])[0])
    if n_global == 0:
        return 0.0, 0
    x = batch.images.to(run.device, non_blocking=True)
    y = batch.targets.to(run.device, non_blocking=True)
    if n_local == 0:  # this rank's images all failed: take part in the gradient sum with zero
        x = torch.zeros((1, 3, run.model.config.image_size, run.model.config.image_size), device=run.device)
        y = (
            torch.zeros((1, run.model.config.num_classes), device=run.device)
            if run.sets.train.multi_label
            else torch.zeros(1, dtype=torch.long, device=run.device)
        )
    if run.mixup.active and x.shape[0] > 1:
        x, y = run.mixup(x, y, np.random.default_rng(train_data.sample_seed(run.opts.seed, epoch, -1 - batch.step)))
    micro = max(1, min(run.opts.grad_accum, x.shape[0]))
    chunks = list(zip(x.tensor_split(micro), y.tensor_split(micro)))
    total = 0.0
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = run.student.no_sync() if (run.world > 1 and not last) else nullcontext()
        with sync:
            with _autocast(run):
                cls_logits, dist_logits = run.student(xc)
                teacher_logits = run.teacher(xc) if run.teacher is not None else None
                loss = run.criterion(cls_logits, dist_logits, teacher_logits, yc)
            value = loss.item()
            if not math.isfinite(value):
                raise _Diverged(value)
            if n_local == 0:
                loss = loss * 0.0
            elif micro > 1 or run.world > 1:
                # each share's mean, weighted so the summed (DDP: averaged) gradient is the
                # global batch's mean
                loss = loss * (xc.shape[0] * run.world / n_global)
            run.scaler.scale(loss).backward()
            total += value * xc.shape[0] if n_local else 0.0
    if run.recipe.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.recipe.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    return total, n_local


class _Diverged(Exception):
    def __init__(self, value: float):
        self.value = value


@torch.no_grad()
def evaluate(
    model: DeiT, val: train_data.TrainSet, *, device: torch.device, amp_dtype, batch_size: int, workers: int | None
) -> dict:
    """Top-1 and top-5 (percent) and cross-entropy of `model` (inference heads) on `val`,
    summed over ranks."""
    from ...images.batches import iter_batches
    from ...images.transform import eval_transform

    was_training = model.training
    model.eval()
    k = min(5, model.config.num_classes)
    indexed = list(distributed.shard(list(enumerate(val.items))))
    items = [item for _, item in indexed]
    targets = torch.tensor([val.targets[i] for i, _ in indexed], dtype=torch.long)
    correct1 = correctk = loss_sum = seen = 0.0
    failed: list[str] = []
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for b in iter_batches(items, eval_transform(model.preprocessing), batch_size, workers=workers):
        failed += [err for _, err in b.failed]
        if not b.positions:
            continue
        y = targets[b.positions].to(device)
        with ctx:
            logits = model(b.tensor.to(device)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correctk += (top == y[:, None]).any(1).sum().item()
        seen += len(y)
    correct1, correctk, loss_sum, seen = _all_sum([correct1, correctk, loss_sum, seen])
    failed = [f for rank_failed in distributed.gather_objects(failed) for f in rank_failed]
    model.train(was_training)
    # percentages, as `deit eval` and timm report them
    return {
        "val_top1": 100 * correct1 / seen if seen else None,
        f"val_top{k}": 100 * correctk / seen if seen else None,
        "val_loss": loss_sum / seen if seen else None,
        "val_images": int(seen),
        "val_skipped": len(failed),
        "val_skipped_images": failed,
    }


@torch.no_grad()
def evaluate_multi_label(
    model: DeiT,
    val: train_data.TrainSet,
    *,
    device: torch.device,
    amp_dtype,
    batch_size: int,
    workers: int | None,
    threshold: float,
) -> dict:
    """mAP, F1 and IoU (micro and macro) at `threshold`, with `deit eval`'s definitions
    (engine.evaluate.MultiLabelMetrics), and the BCE loss of `model` on `val`; every
    rank's scores are gathered, so the metrics are exact under torchrun."""
    from ...images.batches import iter_batches
    from ...images.transform import eval_transform
    from ..evaluate import MultiLabelMetrics, ScoredImage

    was_training = model.training
    model.eval()
    indexed = list(distributed.shard(list(enumerate(val.items))))
    items = [item for _, item in indexed]
    metrics = MultiLabelMetrics(len(val.classes), threshold)
    loss_sum = 0.0
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for b in iter_batches(items, eval_transform(model.preprocessing), batch_size, workers=workers):
        for (item, err), p in zip(b.failed, b.failed_positions):
            metrics.add(ScoredImage(indexed[p][0], item.path, err, targets=val.targets[indexed[p][0]]))
        if not b.positions:
            continue
        with ctx:
            logits = model(b.tensor.to(device)).float()
        y = val.target_tensor([indexed[p][0] for p in b.positions]).to(device)
        loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item()
        for p, row in zip(b.positions, logits.sigmoid().cpu().numpy()):
            i = indexed[p][0]
            metrics.add(ScoredImage(i, items[p].path, targets=val.targets[i], scores=row))
    (loss_sum,) = _all_sum([loss_sum])
    metrics = metrics.reduced()
    model.train(was_training)
    d = metrics.to_dict(val.classes)
    seen = d["images"]
    return {
        "val_map": d["map"],
        "val_f1_micro": d["f1_micro"],
        "val_f1_macro": d["f1_macro"],
        "val_iou_micro": d["iou_micro"],
        "val_iou_macro": d["iou_macro"],
        "val_threshold": threshold,
        "val_loss": loss_sum / (seen * len(val.classes)) if seen else None,  # per element, as in training
        "val_images": seen,
        "val_skipped": d["failed"],
        "val_skipped_images": [f["error"] for f in d["failed_images"]],
    }


# --------------------------------------------------------------------------- files


def save_model(path: Path, model: DeiT, summary: dict | None) -> None:
    from ...checkpoints.writing import canonical_tensors, deit_metadata, save_safetensors

    meta = deit_metadata(model)
    if summary is not None:
        meta[META_RUN] = json.dumps(summary)
    with atomic_path(path) as tmp:
        save_safetensors(tmp, canonical_tensors(model, torch.float32), meta)


def _write_metrics(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _read_metrics(path: Path, before_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= before_epoch]


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExists(f"{run_dir}: exists and is not a directory")
    holds = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise InputNotFound(f"{run_dir}: no checkpoint.pt to resume from")
        return
    if holds and not force:
        raise OutputExists(
            f"{run_dir}: already holds a run ({', '.join(holds)})",
            "continue it with --resume, or replace it with --force",
        )


def create_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Make RUN_DIR (and, with --force, clear the old run's files), once the inputs are known good."""
    if resume:
        return
    holds = [name for name in RUN_FILES if (run_dir / name).exists()]
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputExists(f"{run_dir}: cannot create the directory ({e.strerror})") from None
        for name in holds:
            (run_dir / name).unlink()
    distributed.barrier()


def read_run_checkpoint(path: Path) -> dict:
    from ...checkpoints.formats import read_torch

    ckpt = read_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a deit train checkpoint")
    return ckpt


# --------------------------------------------------------------------------- train


def train(opts: TrainOptions, events: Events | None = None) -> dict:
    """Train as `opts` says; returns the run's summary (also stored in model.safetensors).

    Under torchrun this joins the process group for the run (gloo on CPU, nccl on CUDA)."""
    with distributed.init(distributed.local_device(opts.device)):
        return _train(opts, events or Events())


def _train(opts: TrainOptions, events: Events) -> dict:
    started = time.perf_counter()
    check_threshold(opts.threshold)
    if opts.multi_label and opts.teacher is not None:
        raise UsageError(
            "--teacher with --multi-label: distillation is for single-label training only",
            "train the multi-label model without a teacher",
        )
    prepare_run_dir(opts.run_dir, resume=opts.resume, force=opts.force)
    ckpt = None
    if opts.resume:
        ckpt = read_run_checkpoint(opts.run_dir / "checkpoint.pt")
        if opts.multi_label and not ckpt.get("multi_label", False):
            raise UsageError(
                f"{opts.run_dir}: the run is single-label; --multi-label cannot change it on resume",
                "start a new run for multi-label training",
            )
        saved = ckpt["args"]
        keep = {k: getattr(opts, k) for k in ("device", "workers", "compile", "resume_epochs")}
        fixed = ("recipe", "config", "run_dir", "data", "resume", "force", *keep)
        opts = replace(
            opts,
            **{k: v for k, v in saved.items() if k in TrainOptions.__dataclass_fields__ and k not in fixed},
            recipe=Recipe.from_dict(saved["recipe"]),
            config=DeiTConfig.from_dict(saved["config"]) if saved.get("config") else None,
            resume=True,
            **keep,
        )
        if opts.resume_epochs is not None:
            opts = replace(opts, recipe=replace(opts.recipe, epochs=opts.resume_epochs))
            if opts.resume_epochs < ckpt["epoch"]:
                raise UsageError(f"--epochs {opts.resume_epochs}: the run has done {ckpt['epoch']} epochs already")
    recipe = opts.recipe
    if opts.grad_accum < 1:
        raise UsageError("--grad-accum must be at least 1")
    if not 0 <= opts.alpha <= 1:
        raise UsageError(f"--alpha must be in [0, 1], not {opts.alpha:g}")
    if opts.tau <= 0:
        raise UsageError(f"--tau must be positive, not {opts.tau:g}")
    kind = _distillation_kind(opts)
    sets = train_data.find_sets(
        opts.data, val=opts.val, val_split=opts.val_split, multi_label=True if opts.multi_label else None
    )
    classes = sets.train.classes
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
        train_data.check_classes(ckpt["classes"], classes)
    threshold = 0.5 if opts.threshold is None else float(opts.threshold)
    if multi:
        if opts.teacher is not None:
            raise UsageError(
                "--teacher with multi-label data (lists of labels): distillation is for single-label training only",
                "train the multi-label model without a teacher",
            )
        if recipe.smoothing:
            events.note(f"label smoothing ({recipe.smoothing:g}) does not apply to multi-label training: off")
            recipe = replace(recipe, smoothing=0.0)
        opts = replace(opts, recipe=recipe, multi_label=True, threshold=threshold)
    elif opts.threshold is not None:
        raise UsageError("--threshold goes with multi-label training (--multi-label, or lists of labels)")

    rank, world = distributed.world()
    device = resolve_device(distributed.local_device(opts.device))
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[_dtype_key(opts.dtype)]
    torch.manual_seed(opts.seed + rank)

    if ckpt is not None:
        model = DeiT(DeiTConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        pre = ckpt.get("preprocessing")
        model.preprocessing = Preprocessing(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})
        model.labels, model.source, model.origin = list(classes), ckpt["source"], ckpt["source"]
        model.variant = variant_for_config(model.config)
    else:
        model = build_student(opts, classes, events)
    model.multi_label, model.threshold = multi, threshold  # saved with the weights (deit_metadata)
    model.set_drop_path(recipe.drop_path)
    model.to(device).train().requires_grad_(True)

    teacher = None
    if opts.teacher is not None:
        net, expects, _ = load_teacher(opts.teacher, opts.teacher_weights, len(classes))
        fast = None
        if isinstance(net, DeiT):
            from ..runner import prepare

            fast = prepare(net, device=device, dtype=amp_dtype or torch.float32, compile=opts.compile)
        teacher = Teacher(net, model.preprocessing, expects, fast).to(device)
        if teacher.adapt:
            events.note(
                f"the teacher expects {expects.image_size}px with its own mean/std: "
                "each batch is resized/renormalised for it"
            )

    student: nn.Module = TrainingHeads(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    if opts.compile:
        student = torch.compile(student)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        param_groups(model, recipe.weight_decay),
        lr=recipe.peak_lr(),
        betas=recipe.betas,
        eps=recipe.opt_eps,
        fused=fused,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEma(model, recipe.ema_decay) if recipe.model_ema else None
    mixup = Mixup(recipe.mixup, recipe.cutmix, recipe.mixup_switch_prob, recipe.smoothing, len(classes))
    criterion = DistillationLoss(
        base_loss(soft_targets=mixup.active, smoothing=recipe.smoothing, multi_label=multi), kind, opts.alpha, opts.tau
    )
    n_order = len(sets.train)
    spe = train_data.steps_per_epoch(n_order, recipe.batch_size)
    run = _Run(
        opts,
        recipe,
        model,
        student,
        teacher,
        criterion,
        optimizer,
        scaler,
        ema,
        mixup,
        device,
        amp_dtype,
        build_transform(model.preprocessing, recipe),
        sets,
        spe,
        rank,
        world,
        _StopFlag(),
        events,
    )

    start_epoch, start_step = 0, 0
    best_key = "val_map" if multi else "val_top1"  # what "best" is judged by
    best = {best_key: None, "epoch": None}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step_in_epoch"]
        run.global_step = ckpt["global_step"]
        run.running = ckpt.get("running") or {}
        best = ckpt.get("best") or best
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    create_run_dir(opts.run_dir, resume=opts.resume)
    metrics_path = opts.run_dir / "metrics.jsonl"
    history = _read_metrics(metrics_path, start_epoch) if ckpt is not None else []

    def plain_summary(epoch_done: int) -> dict:
        out = {
            "epochs": epoch_done,
            "steps": run.global_step,
            "classes": classes,
            "recipe": recipe.name,
            "distillation": kind,
            "teacher": opts.teacher,
            "train_images": len(sets.train),
            "val_images": len(sets.val) if sets.val else 0,
            f"best_{best_key}": best[best_key],
            "best_epoch": best["epoch"],
            "source": model.origin,
            "multi_label": multi,
        }
        if multi:
            out["threshold"] = threshold
        return out

    def save_checkpoint(epoch: int, step_in_epoch: int) -> Path:
        path = opts.run_dir / "checkpoint.pt"
        if rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "config": model.config.to_dict(),
                "classes": classes,
                "preprocessing": _plain_pre(model.preprocessing),
                "source": model.origin or "",
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": run.global_step,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
                "args": opts.to_plain(),
                "best": best,
                "running": run.running,
                "multi_label": multi,
            }
            buffer = io.BytesIO()  # serialised first, so that a failing write is an OSError (exit 74)
            torch.save(state, buffer)
            with atomic_path(path) as tmp:
                tmp.write_bytes(buffer.getbuffer())
        distributed.barrier()
        return path

    with run.stop.installed():
        for epoch in range(start_epoch, recipe.epochs):
            if rank == 0:
                events.epoch_start(epoch, recipe.epochs, spe, start_step)
            try:
                record = {"epoch": epoch + 1, **train_one_epoch(run, epoch, start_step, save_checkpoint)}
            except _Diverged as e:
                last = opts.run_dir / "checkpoint.pt"
                where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was saved yet"
                raise TrainingDiverged(
                    f"loss is {e.value} at epoch {epoch + 1}, step {run.global_step % spe + 1}; stopped ({where})",
                    "lower --lr, or check the data and the model",
                ) from None
            start_step = 0
            evaluated = ema.module if ema is not None else model
            if sets.val is not None:
                batch = max(1, recipe.batch_size // world)
                if multi:
                    record.update(
                        evaluate_multi_label(
                            evaluated,
                            sets.val,
                            device=device,
                            amp_dtype=amp_dtype,
                            batch_size=batch,
                            workers=opts.workers,
                            threshold=threshold,
                        )
                    )
                else:
                    record.update(
                        evaluate(
                            evaluated,
                            sets.val,
                            device=device,
                            amp_dtype=amp_dtype,
                            batch_size=batch,
                            workers=opts.workers,
                        )
                    )
                score = record[best_key]
                if score is not None and (best[best_key] is None or score > best[best_key]):
                    best = {best_key: score, "epoch": epoch + 1}
                    if rank == 0:
                        save_model(opts.run_dir / "best.safetensors", evaluated, plain_summary(epoch + 1))
            history.append(record)
            save_checkpoint(epoch + 1, 0)
            if rank == 0:
                _write_metrics(metrics_path, history)
            # a Ctrl-C during evaluation or saving stops here; one after the epoch's line,
            # at the next epoch's first step boundary
            stop = run.stop.set or (run.world > 1 and _all_sum([float(run.stop.set)])[0] > 0)
            if rank == 0:
                events.epoch_end(record)
            if stop:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch + 1}; checkpoint saved",
                    "continue with the same command and --resume",
                )

    final = ema.module if ema is not None else model
    summary = plain_summary(recipe.epochs)
    summary["final"] = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if not k.endswith("_images") or k in ("train_images", "val_images")
    }
    model_path = opts.run_dir / "model.safetensors"
    if rank == 0:
        save_model(model_path, final, summary)
        if sets.val is None:  # no validation: the best model is the last one
            save_model(opts.run_dir / "best.safetensors", final, summary)
    distributed.barrier()
    summary.update(
        run_dir=str(opts.run_dir),
        model=str(model_path),
        best=str(opts.run_dir / "best.safetensors"),
        seconds=time.perf_counter() - started,
    )
    return summary


def _plain_pre(pre: Preprocessing) -> dict:
    return {
        "image_size": pre.image_size,
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "resize_mode": pre.resize_mode,
    }


def _dtype_key(name: str) -> str:
    from ...config import dtype_name

    return dtype_name(name)
