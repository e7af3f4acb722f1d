"""Features: one vector per image (or all its tokens), and the files they are written to.

    for r in extract_features(model, iter_inputs(["photos/"]), pool="token"):
        print(r.path, r.features.shape if r.ok else r.error)

Pools are named as timm names them: `token` is what timm's `forward_head(pre_logits=True)`
returns (the class token; for a distilled model the mean of the class and distillation
tokens), `avg` the mean of the patch tokens (timm's `global_pool="avg"`), `cls` and `dist`
one token each, `tokens` all of them.

Files: FILE.npy (rows in input order, written incrementally so memory stays flat, with
FILE.paths.jsonl beside it), FILE.safetensors (tensor "features", paths in the metadata),
FILE.jsonl. Each is written to a temporary beside the target and renamed when complete.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..config import POOLS, DeiTConfig, pool_name
from ..errors import UsageError
from ..files import atomic_path
from ..images.inputs import InputItem
from ..model import DeiT
from .results import ImageOptions, Result, reason, run_batches
from .runner import prepare

__all__ = [
    "POOLS",
    "FILE_FORMATS",
    "OUT_DTYPES",
    "Features",
    "check_pool",
    "default_pool",
    "feature_shape",
    "pool_tokens",
    "extract_features",
    "sidecar_path",
    "feature_record",
    "write_features",
    "NpyWriter",
    "write_shard",
    "read_shard",
]

FILE_FORMATS = ("npy", "safetensors", "jsonl")
OUT_DTYPES = {"fp32": "float32", "fp16": "float16"}  # stored precision -> numpy dtype
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16"}


@dataclass
class Features(Result):
    features: np.ndarray | None = None  # float32: (D,) pooled, or (tokens, D) for pool "tokens"


def default_pool(config: DeiTConfig) -> str:
    """token: the class token, or for a distilled model the mean of the class and
    distillation tokens (what its classifier reads)."""
    return "token"


def feature_shape(config: DeiTConfig, pool: str) -> tuple[int, ...]:
    """The shape of one image's features for `pool`."""
    if pool_name(pool) == "tokens":
        return (config.num_prefix_tokens + config.num_patches, config.embed_dim)
    return (config.embed_dim,)


def check_pool(config: DeiTConfig, pool: str) -> str:
    pool = pool_name(pool)
    if pool == "dist" and not config.distilled:
        raise UsageError("pool 'dist' needs a distilled model (this one has no distillation token)")
    return pool


def pool_tokens(tokens: torch.Tensor, pool: str, config: DeiTConfig, *, normalize: bool = False) -> torch.Tensor:
    """All tokens (B, prefix + patches, D) -> features: token (B, D), avg (B, D), cls (B, D),
    dist (B, D) or tokens (B, prefix + patches, D). `normalize`: L2 over the last dimension."""
    pool = check_pool(config, pool)
    if pool == "tokens":
        out = tokens
    elif pool == "cls" or (pool == "token" and not config.distilled):
        out = tokens[:, 0]
    elif pool == "dist":
        out = tokens[:, 1]
    elif pool == "token":
        out = (tokens[:, 0] + tokens[:, 1]) / 2
    else:  # avg: the patch tokens only, as timm's global_pool="avg"
        out = tokens[:, config.num_prefix_tokens :].mean(dim=1)
    if normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
    return out


def extract_features(
    model: DeiT,
    items: Iterable[InputItem],
    *,
    pool: str | None = None,
    normalize: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions = ImageOptions(),
) -> Iterator[Features]:
    """Each input's features (float32 numpy), pooled from the model's `forward_features`
    as `pool` says (default: `default_pool`), optionally L2-normalised, in input order."""
    cfg = model.config
    pool = check_pool(cfg, pool or default_pool(cfg))
    runner = prepare(model, device=device, dtype=dtype)

    def compute(x: torch.Tensor) -> np.ndarray:
        feats = pool_tokens(runner.features(x), pool, cfg, normalize=normalize)
        return feats.float().cpu().numpy()

    def results() -> Iterator[Features]:
        for pos, item, row, err, notes in run_batches(model, items, options, compute):
            if err is not None:
                yield Features(pos, item.path, reason(item.path, err))
            else:
                yield Features(pos, item.path, None, list(notes), row)

    return results()


# --------------------------------------------------------------------------- files


def sidecar_path(path: Path) -> Path:
    """Where the paths of FILE.npy's rows go: FILE.paths.jsonl."""
    return path.with_suffix(".paths.jsonl")


def feature_record(r: Features, out_dtype: str = "fp32") -> dict[str, Any]:
    """One input's JSON record: {"path", "features", "notes"?} or {"path", "error"}."""
    if not r.ok:
        return {"path": r.path, "error": r.error}
    rec: dict[str, Any] = {"path": r.path, "features": r.features.astype(OUT_DTYPES[out_dtype]).tolist()}
    if r.notes:
        rec["notes"] = r.notes
    return rec


def write_features(
    results: Iterable[Features],
    path: Path,
    *,
    fmt: str,
    shape: tuple[int, ...],
    out_dtype: str = "fp32",
    metadata: dict[str, Any] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> int:
    """Consume `results` into `path` (and, for npy, its sidecar); returns the rows written.

    `before_commit` runs once everything is written and before the files are renamed into
    place: an exception there (e.g. "none of the inputs could be read") leaves nothing.
    """
    if fmt not in FILE_FORMATS:
        raise UsageError(f"unknown feature file format {fmt!r}; use {', '.join(FILE_FORMATS)}")
    dtype = OUT_DTYPES[out_dtype]
    check = before_commit or (lambda: None)
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            rows = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for r in results:
                    rows += r.ok
                    f.write(json.dumps(feature_record(r, out_dtype), ensure_ascii=False) + "\n")
            check()
        elif fmt == "npy":
            with atomic_path(sidecar_path(path)) as tmp_side:
                rows = _write_npy(results, tmp, tmp_side, shape, dtype)
                check()
        else:
            rows = _write_safetensors(results, tmp, shape, dtype, metadata or {}, check)
    return rows


def _write_safetensors(
    results: Iterable[Features], tmp: Path, shape, dtype: str, meta: dict[str, Any], check: Callable[[], None]
) -> int:
    paths: list[str] = []
    errors: list[dict[str, str]] = []

    def good() -> Iterator[Features]:
        for r in results:
            if r.ok:
                paths.append(r.path)
            else:
                errors.append({"path": r.path, "error": r.error})
            yield r

    # The header (with every path) comes first in a safetensors file, so the rows go to
    # a temporary .npy beside it first and are copied after the header: memory stays flat.
    tmp_rows = tmp.with_name(tmp.name + ".rows")
    try:
        n = _write_npy(good(), tmp_rows, None, shape, dtype)
        check()
        metadata = {
            "format": "pt",
            "paths": json.dumps(paths, ensure_ascii=False),
            "errors": json.dumps(errors, ensure_ascii=False),
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
        }
        _npy_to_safetensors(tmp_rows, tmp, (n, *shape), dtype, metadata)
    finally:
        tmp_rows.unlink(missing_ok=True)
    return n


# A .npy header of fixed size, so the row count can be patched in when it is known.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    room = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2
    if len(text) + 1 > room:
        raise ValueError(f"shape {shape} does not fit a .npy header")
    return _NPY_MAGIC + struct.pack("<H", room) + (text.ljust(room - 1) + "\n").encode("latin1")


class NpyWriter:
    """Rows appended to a .npy file one at a time; the header is rewritten with the final
    count on close. Memory stays flat however many rows."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: str) -> None:
        self.row_shape, self.dtype, self.count = tuple(row_shape), dtype, 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(_npy_header((0, *self.row_shape), dtype))

    def append(self, row: np.ndarray) -> None:
        if tuple(row.shape) != self.row_shape:
            raise ValueError(f"row of shape {tuple(row.shape)}, expected {self.row_shape}")
        self._f.write(row.astype(self.dtype, copy=False).tobytes(order="C"))
        self.count += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.seek(0)
        self._f.write(_npy_header((self.count, *self.row_shape), self.dtype))
        self._f.close()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_npy(results: Iterable[Features], path: Path, side: Path | None, shape, dtype: str) -> int:
    """Good results' features as rows of `path`; one JSON line per input in `side`
    (`_row_records`), when given. Returns the number of rows."""
    with NpyWriter(path, shape, dtype) as writer:
        records = _row_records(results, writer)
        if side is None:
            for _ in records:
                pass
        else:
            with open(side, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return writer.count


def _row_records(results: Iterable[Features], writer: NpyWriter) -> Iterator[dict[str, Any]]:
    """Each input's record ({"row", "path"[, "notes"]} or {"path", "error"}), its features
    appended to `writer` on the way."""
    for r in results:
        if r.ok:
            rec = {"row": writer.count, "path": r.path}
            if r.notes:
                rec["notes"] = r.notes
            writer.append(r.features)
        else:
            rec = {"path": r.path, "error": r.error}
        yield rec


def _npy_to_safetensors(rows: Path, dst: Path, shape: tuple[int, ...], dtype: str, metadata: dict[str, str]) -> None:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header = {
        "__metadata__": metadata,
        "features": {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]},
    }
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(rows, "rb") as src, open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        src.seek(_NPY_HEADER_BYTES)
        while chunk := src.read(1 << 24):
            f.write(chunk)


# --------------------------------------------------------------------------- torchrun shards


def write_shard(results: Iterable[Features], stem: Path, *, shape: tuple[int, ...]) -> None:
    """torchrun: one rank's results as STEM.npy (float32, exact) and their records in STEM.jsonl."""
    with NpyWriter(stem.with_suffix(".npy"), shape, "float32") as writer:
        distributed.write_jsonl_shard(_row_records(results, writer), stem)


def read_shard(stem: Path) -> Iterator[Features]:
    """A shard's results, in the rank's order (positions are set by the caller)."""
    rows = None
    for rec in distributed.read_jsonl_shard(stem):
        if "error" in rec:
            yield Features(-1, rec["path"], rec["error"])
            continue
        if rows is None:  # mapped only when there is a row: numpy cannot map 0 bytes
            rows = np.load(stem.with_suffix(".npy"), mmap_mode="r")
        yield Features(-1, rec["path"], None, rec.get("notes", []), np.array(rows[rec["row"]]))
