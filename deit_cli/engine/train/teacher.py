"""The teacher of distillation through attention: a deit model source, or a torchvision /
timm architecture with its state dict (read with the safe loader, loaded strictly)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, InputNotFound, UsageError
from ...variants import Preprocessing

__all__ = ["Teacher", "load_teacher"]


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
        scale = torch.tensor(student.std).div(torch.tensor(to.std)).view(1, 3, 1, 1)
        shift = (torch.tensor(student.mean) - torch.tensor(to.mean)).div(torch.tensor(to.std)).view(1, 3, 1, 1)
        self.register_buffer("scale", scale, False)
        self.register_buffer("shift", shift, False)

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
        _load_weights(net, Path(weights), spec, num_classes)
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


def _load_weights(net: nn.Module, path: Path, spec: str, num_classes: int) -> None:
    from ...checkpoints.formats import SAFETENSORS, detect_format, find_state_dict, read_safetensors, read_torch
    from ...checkpoints.loading import check_state_dict

    if not path.is_file():
        raise InputNotFound(f"{path}: no such file")
    sd = read_safetensors(path)[0] if detect_format(path) == SAFETENSORS else find_state_dict(read_torch(path), path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    # a teacher trained on other classes is the likely mistake: say so before the generic check
    for k, want in net.state_dict().items():
        got = tuple(sd[k].shape) if k in sd else None
        if got is not None and got[:1] != tuple(want.shape)[:1] and tuple(want.shape)[:1] == (num_classes,):
            raise CheckpointError(
                f"{path}: the teacher has {got[0]} classes ({k} {got}), the data has {num_classes}",
                "the teacher must be trained on the same classes",
            )
    check_state_dict(net, sd, f"{path} (for {spec})")
    net.load_state_dict(sd)
