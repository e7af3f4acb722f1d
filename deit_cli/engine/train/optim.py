"""The optimisation: the optimizers (AdamW; LAMB as DeiT III runs it) and their parameter
groups, the learning-rate schedule, the weights' EMA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...model import DeiT
from .recipes import Recipe

__all__ = ["NO_WEIGHT_DECAY", "OPTIMIZERS", "Lamb", "ModelEma", "build_optimizer", "ema_note", "lr_at", "param_groups"]

OPTIMIZERS = ("adamw", "lamb")

NO_WEIGHT_DECAY = ("cls_token", "dist_token", "pos_embed")  # 3-d, but not weights (the original release)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on parameters with two or more dimensions (linear weights, the patch
    convolution), not on biases, norms, LayerScale, cls_token, dist_token or pos_embed (the
    release's groups, for AdamW and LAMB alike: timm's `add_weight_decay` with the model's
    `no_weight_decay()`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and name.split(".")[-1] not in NO_WEIGHT_DECAY:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class Lamb(torch.optim.Optimizer):
    """LAMB as DeiT III trains with it (apex's FusedLAMB, `--opt fusedlamb`): Adam moments with
    bias correction on the gradients divided by max(1, global norm / max_grad_norm) (the clip
    is inside the step, over every parameter), then per tensor, where weight decay is on,
    update = m̂ / (√v̂ + eps) + wd·w scaled by the trust ratio ‖w‖ / ‖update‖ (1 where either
    norm is 0); a group without weight decay takes the plain Adam update (no trust ratio: apex's
    `use_nvlamb=False`). w ← w − lr·update."""

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        every = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not every:
            return loss
        clip = None
        if self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(every)))  # the global norm
            clip = (norm / self.max_grad_norm).clamp_(min=1.0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            step = self.state[params[0]]["step"].item()  # every tensor of a group steps together
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            grads = [p.grad for p in params]
            if clip is not None:
                grads = torch._foreach_div(grads, clip)  # the gradients themselves are left as they are
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m, 1 - beta1**step)
            torch._foreach_div_(update, denom)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
                w = torch.stack(torch._foreach_norm(params))  # (tensors,)
                u = torch.stack(torch._foreach_norm(update))
                ratio = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
                torch._foreach_mul_(update, list(ratio.unbind()))
            torch._foreach_add_(params, update, alpha=-group["lr"])
        return loss


def build_optimizer(model: DeiT, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    if recipe.optimizer == "lamb":
        # eps 1e-8 and the global norm clipped to 1 inside the step: apex FusedLAMB's, which the
        # release ran (timm's Lamb defaults to eps 1e-6)
        return Lamb(
            param_groups(model, recipe.weight_decay),
            lr=recipe.peak_lr(),
            betas=recipe.betas,
            eps=recipe.opt_eps,
            max_grad_norm=1.0,
        )
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
