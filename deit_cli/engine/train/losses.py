"""The training losses: the base classification loss and the paper's distillation loss.

With class logits `z_c`, distillation logits `z_d` (the distillation token's head),
teacher logits `z_t` (the teacher in eval mode, no gradients, on the same augmented
batch), targets `y`, temperature τ and weight α:

    base = cross_entropy(z_c, y)                 label-smoothed, or soft-target CE under mixup
    hard = cross_entropy(z_d, z_t.argmax(1))
    soft = kl_div(log_softmax(z_d / τ), log_softmax(z_t / τ), reduction="sum", log_target=True)
           · τ² / z_d.numel()                    the original release's normalisation (B·C), not batchmean
    loss = (1 − α) · base + α · distillation      (just `base` with distillation "none")

The base loss is chosen by the kind of targets (`base_loss`). Multi-label targets are
multi-hot vectors `y ∈ [0, 1]^C` (mixed by mixup/cutmix, never smoothed), and the base
loss is binary cross-entropy with logits on the class head, averaged over every element
(B·C; torch's default `reduction="mean"`):

    base = mean(−y·log σ(z_c) − (1 − y)·log(1 − σ(z_c)))

(multi-label training has no teacher, so no distillation term).

DeiT III's base loss (`bce`, the release's `--bce-loss`) is the same binary cross-entropy
on targets binarized first, `y' = [y > 0]` (engine.py's `targets.gt(0.0)`): a mixed pair's
two classes both become 1 whatever the mixing weight (class indices become one-hot
vectors). Smoothing would make every target positive, so the recipe refuses the two together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTILLATION_KINDS = ("none", "soft", "hard")


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a distribution per sample (mixup/cutmix targets)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against class indices, smoothed by `smoothing` (0: plain CE)."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy with logits against multi-hot (or mixed) targets, the mean over
    all B·C elements (torch's default reduction), computed in float32."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class BinarizedBCE(nn.Module):
    """DeiT III's loss: BCE with logits against `target > 0` (class indices: one-hot), the
    mean over all B·C elements, computed in float32."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            target = F.one_hot(target, logits.shape[-1])
        return F.binary_cross_entropy_with_logits(logits.float(), target.gt(0.0).float())


def base_loss(*, soft_targets: bool, smoothing: float, multi_label: bool = False, bce: bool = False) -> nn.Module:
    """The classification loss for the targets a batch carries: multi-hot vectors
    (multi-label: BCE), distributions under mixup/cutmix (the smoothing is in them then),
    class indices otherwise; with `bce`, DeiT III's BCE on binarized targets for all three."""
    if bce:
        if smoothing:
            raise ValueError("binarized BCE needs smoothing 0 (smoothed targets are all above 0)")
        return BinarizedBCE()
    if multi_label:
        if smoothing:
            raise ValueError("label smoothing does not apply to multi-label training")
        return MultiLabelBCE()
    return SoftTargetCrossEntropy() if soft_targets else LabelSmoothingCrossEntropy(smoothing)


def soft_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    return (
        F.kl_div(
            F.log_softmax(dist_logits / tau, dim=1),
            F.log_softmax(teacher_logits / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (tau * tau)
        / dist_logits.numel()
    )


def hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


class DistillationLoss(nn.Module):
    """(1 − α)·base(z_c, y) + α·distillation(z_d, z_t), or base alone for "none"."""

    def __init__(self, base: nn.Module, kind: str = "none", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if kind not in DISTILLATION_KINDS:
            raise ValueError(f"distillation must be one of {', '.join(DISTILLATION_KINDS)}, not {kind!r}")
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau

    def forward(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
    ) -> torch.Tensor:
        base = self.base(cls_logits, target)
        if self.kind == "none":
            return base
        teacher_logits = teacher_logits.float()
        if self.kind == "soft":
            distillation = soft_distillation(dist_logits.float(), teacher_logits, self.tau)
        else:
            distillation = hard_distillation(dist_logits, teacher_logits)
        return base * (1 - self.alpha) + distillation * self.alpha
