"""The optimisation: AdamW parameter groups, the learning-rate schedule, the weights' EMA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...model import DeiT
from .recipes import Recipe

__all__ = ["NO_WEIGHT_DECAY", "ModelEma", "build_optimizer", "ema_note", "lr_at", "param_groups"]

NO_WEIGHT_DECAY = ("cls_token", "dist_token", "pos_embed")  # 3-d, but not weights (the original release)


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


def build_optimizer(model: DeiT, recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cpu", "cuda")  # one kernel per step for all parameters
    return torch.optim.AdamW(
        param_groups(model, recipe.weight_decay),
        lr=recipe.peak_lr(),
        betas=recipe.betas,
        eps=recipe.opt_eps,
        fused=fused,
    )


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
    """An exponential moving average of the weights: ema = decay·ema + (1 − decay)·model,
    as timm's ModelEma (no warm-up). It is reported and saved beside the raw model, never
    instead of it: the paper evaluates the raw weights."""

    def __init__(self, model: DeiT, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: DeiT) -> None:
        ema, now = list(self.module.state_dict().values()), list(model.state_dict().values())
        floats = [(e, m) for e, m in zip(ema, now) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - self.decay)
        for e, m in zip(ema, now):
            if not e.is_floating_point():
                e.copy_(m)


def ema_note(decay: float, total_steps: int) -> str | None:
    """A note when an EMA of `decay` over the whole run still holds more than 1% of the
    initial weights (decay^steps), with the decay that would fit; None when it fits."""
    left = decay**total_steps
    if left <= 0.01:
        return None
    fit = 0.01 ** (1 / max(total_steps, 1))
    return (
        f"the EMA (decay {decay:g}) will still hold {100 * left:.0f}% of the initial weights after this run's "
        f"{total_steps} steps; --model-ema-decay {math.floor(fit * 1e5) / 1e5:g} or lower would fit "
        "(ema.safetensors is saved beside the raw model, which is the one reported)"
    )
