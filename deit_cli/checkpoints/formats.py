"""Reading checkpoint files safely: the format comes from the magic bytes, never the name.

A pickle is only ever read with `torch.load(weights_only=True)` and a short allow-list of
globals that real DeiT checkpoints contain; there is no fallback.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, first_line
from ..files import input_error

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"

# safetensors' own reader refuses headers over 100 MB; so do we, before reading it.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# Globals real DeiT checkpoints pickle besides tensors: the `args` of the original
# training script and timm's train.py, and numpy scalars in mmengine's metadata.
_SAFE_GLOBALS: list = [argparse.Namespace]
try:  # numpy scalars and dtypes (e.g. a best-accuracy float in mmengine's message hub)
    import numpy as _np
    from numpy._core.multiarray import scalar as _np_scalar

    _SAFE_GLOBALS += [_np.dtype, _np_scalar, *(type(_np.dtype(t)) for t in ("float64", "float32", "int64"))]
except ImportError:  # numpy < 2 or absent: such checkpoints are refused, naming the global
    pass

_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


def detect_format(path: Path) -> str:
    """The checkpoint format from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, 2)
    except OSError as e:
        raise input_error(path, e) from None
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)", "the download or copy was probably interrupted")
    if head[:4] == b"PK\x03\x04":
        return TORCH_ZIP
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(
            f"{path}: a bare pickle or a legacy (pre-1.6, non-zip) torch file, which is not read",
            "re-save it with torch.save() in PyTorch >= 1.6, or convert it to safetensors",
        )
    raise CheckpointError(
        f"{path}: not a checkpoint (neither safetensors nor a torch zip file)",
        "deit reads .safetensors and torch.save() files (.pth, .pt, .bin)",
    )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, after checking its header ourselves:
    its size, duplicate keys, and that every tensor lies inside the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (header of {n} bytes in a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: safetensors header has duplicate key {e.args[0]!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}") from None
        if not (0 <= start <= end <= data_len):
            raise CheckpointError(f"{path}: truncated safetensors file (tensor {key!r} lies past the end)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({first_line(e, type(e).__name__)})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_torch(path: Path) -> object:
    """A torch.save() zip file, unpickled with weights_only=True and our allow-list only."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # torch warns before failing on pickle protocol >= 3 files; the error says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - every failure here is a bad checkpoint
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(
            r"Unsupported (?:global|operand)[^\n]*?([\w.]+\.[\w]+)", msg
        )
        if m:
            # torch drops the module of builtins from the name (`exec` for builtins.exec)
            name = m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"
            raise CheckpointError(
                f"{path}: refused: the pickle needs {name}, which is not allowed in a checkpoint",
                "only tensors and plain data are read; this file may run code when loaded elsewhere",
            ) from None
        m = re.search(r"Unsupported operand (\d+)", msg)
        if m:
            raise CheckpointError(
                f"{path}: refused: the pickle uses opcode {m.group(1)}, which the safe reader does not support",
                "re-save it with torch.save()'s default pickle protocol, or convert it to safetensors",
            ) from None
        if "Weights only load failed" in msg:
            # torch's own text suggests weights_only=False; keep only what went wrong
            m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
            raise CheckpointError(
                f"{path}: refused: {first_line(m.group(1)) if m else 'the pickle holds more than tensors'}",
                "only tensors and plain data are read; this file may run code when loaded elsewhere",
            ) from None
        raise CheckpointError(f"{path}: unreadable torch checkpoint ({first_line(e, type(e).__name__)})") from None


def find_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded torch object: the object itself, or the entry of a
    training checkpoint that holds them (the original release's `model`, timm's and
    mmpretrain's `state_dict`, or an EMA copy when that is all there is)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("model", "state_dict", "model_ema", "state_dict_ema", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    raise CheckpointError(
        f"{path}: no dictionary of tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
    )


def check_tensors(sd: dict[str, torch.Tensor], path: Path | str) -> None:
    """Every tensor must be a dense floating-point tensor."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {k} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_quantized:
            raise CheckpointError(f"{path}: {k} is a {v.layout} tensor; only dense tensors are read")
        if v.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {k} has dtype {v.dtype}; model weights must be floating point")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out
