"""One optimizer step on this rank's share of a global batch (`Stepper`), and the one
exchange per step that every rank agrees on: the next batch's image count, the stop and
save requests and, when read, the loss window kept on the device."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from ... import distributed
from .augment import erase_batch, norm_tensors, normalize

__all__ = ["Stepper"]


class Stepper:
    """One optimizer step on this rank's share of a global batch: normalisation and random
    erasing of uint8 images on the device, mixup/cutmix, forward (with the teacher), the
    loss, backward over `grad_accum` micro-batches, the optimizer, the EMA.

    `preprocessing` (default: the model's) gives the normalisation's mean and std.

    The loss stays on the device: `exchange` reads the window of summed losses, with the
    per-step numbers all ranks must agree on, in one reduction."""

    def __init__(
        self,
        student,
        model,
        teacher,
        criterion,
        optimizer,
        scaler,
        ema,
        mixup,
        *,
        device,
        amp_dtype,
        grad_accum,
        clip_grad,
        world,
        preprocessing=None,
    ):
        self.student, self.model, self.teacher, self.criterion = student, model, teacher, criterion
        self.optimizer, self.scaler, self.ema, self.mixup = optimizer, scaler, ema, mixup
        self.device, self.amp_dtype, self.grad_accum, self.clip_grad, self.world = (
            device,
            amp_dtype,
            grad_accum,
            clip_grad,
            world,
        )
        pre = preprocessing if preprocessing is not None else getattr(model, "preprocessing", None)
        self._norm = norm_tensors(pre, device) if pre is not None else None
        self._erase_rng: torch.Generator | None = None
        self._zero_window()

    def _zero_window(self) -> None:
        z = torch.zeros((), dtype=torch.float32, device=self.device)
        self.loss_sum, self.images, self.bad = z.clone(), z.clone(), z.clone()  # since the last read
        self.bad_step, self.bad_value = torch.full((), -1.0, device=self.device), z.clone()

    def first_bad(self) -> tuple[int, float] | None:
        """(global step, loss) of this rank's first non-finite loss in the window, if any."""
        step = int(self.bad_step.item())
        return (step, self.bad_value.item()) if step >= 0 else None

    def exchange(self, numbers: list[float], *, read: bool) -> list:
        """`numbers` summed over ranks (as they are on one process); with `read`, also the
        loss window (loss sum, images, non-finite count), which then starts afresh."""
        numbers = [float(v) for v in numbers]
        if self.world == 1 and not read:
            return [*numbers, None]
        values = torch.tensor(numbers, dtype=torch.float32, device=self.device)
        if read:
            values = torch.cat([values, torch.stack([self.loss_sum, self.images, self.bad])])
        if self.world > 1:
            values = distributed.all_reduce_sum(values if self.device.type == "cuda" else values.cpu())
        out = values.double().tolist()  # the one host synchronisation of the step
        if not read:
            return [*out, None]
        window = out[-3:]
        if not window[2] and math.isfinite(window[0]):
            self._zero_window()
        return [*out[:-3], window]

    def prepare(self, x: torch.Tensor, erase: torch.Tensor | None = None) -> torch.Tensor:
        """Images on the device, as the model takes them: uint8 ones normalised, then
        erased where `erase` says (`augment.erase_batch`); float ones as they are."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            if self._norm is None:
                raise ValueError("uint8 images need the preprocessing's mean and std (Stepper(preprocessing=))")
            x = normalize(x, *self._norm)
        if erase is not None and x.shape[0]:
            if self._erase_rng is None:
                self._erase_rng = torch.Generator(device=self.device)
            erase_batch(x, erase, self._erase_rng)
        return x

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_global: int,
        mix_seed: int,
        global_step: int,
        erase: torch.Tensor | None = None,
    ) -> None:
        """`x`: uint8 images (normalised here) or float ones (as they are); `erase`: their
        random erasing draws (`TrainBatch.erase`)."""
        model, world = self.model, self.world
        n_local = x.shape[0]
        x = self.prepare(x, erase)
        y = y.to(self.device, non_blocking=True)
        if n_local == 0:  # this rank's images all failed: take part in the gradient sum with zero
            size = model.config.image_size
            x = torch.zeros((1, 3, size, size), device=self.device)
            y = torch.zeros((1, *y.shape[1:]), dtype=y.dtype, device=self.device)
        if self.mixup.active:  # always, so the targets are what the criterion expects (one image: itself)
            x, y = self.mixup(x, y, np.random.default_rng(mix_seed))
        micro = max(1, min(self.grad_accum, x.shape[0]))
        chunks = list(zip(x.tensor_split(micro), y.tensor_split(micro)))
        for i, (xc, yc) in enumerate(chunks):
            sync = self.student.no_sync() if (world > 1 and i < len(chunks) - 1) else nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    cls_logits, dist_logits = self.student(xc)
                    teacher_logits = self.teacher(xc) if self.teacher is not None else None
                    loss = self.criterion(cls_logits, dist_logits, teacher_logits, yc)
                if n_local:
                    self._count(loss.detach().float(), xc.shape[0], global_step)
                    # each share's mean, weighted so the summed (DDP: averaged) gradient is the global batch's mean
                    loss = loss * (xc.shape[0] * world / n_global)
                else:
                    loss = loss * 0.0
                self.scaler.scale(loss).backward()
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model)

    def _count(self, loss: torch.Tensor, n: int, global_step: int) -> None:
        finite = torch.isfinite(loss)
        first = (~finite) & (self.bad_step < 0)
        self.bad_value = torch.where(first, loss, self.bad_value)
        self.bad_step = torch.where(first, float(global_step), self.bad_step)
        self.bad += (~finite).float()
        self.loss_sum += loss * n
        self.images += n
