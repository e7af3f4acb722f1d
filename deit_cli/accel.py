"""Speed paths shared by classify, extract-features, eval and bench.

`prepare()` returns a Runner that takes float32 image batches on the CPU, moves and casts
them, and returns float32 results. (Plain version; the bench work extends it.)
"""

from __future__ import annotations

import torch

from .checkpoints.loading import resolve_device, resolve_dtype
from .model import DeiT


class Runner:
    def __init__(self, model: DeiT, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.config = model.config

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype, non_blocking=True)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, prefix + patches, D), float32."""
        return self.model.forward_features(self._input(x)).float()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, head: str = "avg") -> torch.Tensor:
        tokens = self.model.forward_features(self._input(x))
        return self.model.forward_head(tokens, head).float()

    __call__ = logits


def prepare(model: DeiT, *, device="cpu", dtype=None, compile: bool = False) -> Runner:
    if compile:
        raise NotImplementedError("compile is not available yet")
    return Runner(model, resolve_device(device), resolve_dtype(dtype))
