"""Device and dtype names -> torch objects, for every layer that places a model
(checkpoints load onto a device, the engine runs on one): below both, so that
checkpoints never import the engine."""

from __future__ import annotations

import torch

from .config import dtype_name
from .errors import UsageError

__all__ = ["DTYPE_NAMES", "resolve_device", "resolve_dtype"]

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """fp32 | bf16 | fp16 (or float32, bfloat16, float16, half) -> torch dtype; None: fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return _TORCH_DTYPES[dtype_name(dtype)]


def resolve_device(device: str | torch.device) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch device, checked to exist here."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' requested but MPS is not available here")
    return dev
