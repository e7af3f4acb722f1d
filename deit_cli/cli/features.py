"""`deit extract-features INPUTS... [-o FILE]`: one embedding per image (or all its tokens).

Outputs: FILE.npy (rows in input order, written incrementally so memory stays flat, with
FILE.paths.jsonl beside it), FILE.safetensors (tensor "features", paths in the metadata),
FILE.jsonl, or JSON lines on stdout. Files are written to a temporary beside the target
and renamed when complete.
"""

from __future__ import annotations

import json
import os
import struct
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Iterator

import typer

from ..errors import UsageError
from . import output
from .inputs import (
    AllowTruncatedOpt, BatchSizeOpt, CropPctOpt, InputsArg, NoExifOpt, NullOpt, ProgressBar, ResizeOpt, Tally,
    WorkersOpt, image_options, load, prefetch, read_inputs, wants_progress,
)  # fmt: skip
from .options import DEFAULT_MODEL_NAME, DeviceOpt, DtypeOpt, ForceOpt, ModelOpt, QuietOpt

if TYPE_CHECKING:
    import numpy as np


class OutFormat(str, Enum):
    npy = "npy"
    safetensors = "safetensors"
    jsonl = "jsonl"


class Pool(str, Enum):
    cls = "cls"
    dist = "dist"
    avg = "avg"
    mean = "mean"
    tokens = "tokens"


class OutDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


_SUFFIXES = {".npy": "npy", ".safetensors": "safetensors", ".jsonl": "jsonl"}


def sidecar_path(path: Path) -> Path:
    """Where the paths of FILE.npy's rows go: FILE.paths.jsonl."""
    return path.with_suffix(".paths.jsonl")


def extract_features(
    inputs: InputsArg,
    out: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="FILE.npy, FILE.safetensors or FILE.jsonl (default: JSON lines on stdout)."
        ),
    ] = None,
    format_: Annotated[
        OutFormat | None, typer.Option("--format", "-F", help="npy, safetensors or jsonl (default: from -o's suffix).")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL_NAME,
    pool: Annotated[
        Pool | None,
        typer.Option(
            "--pool",
            help="cls, dist (distillation token), avg (their mean; default for distilled models), "
            "mean (of the patch tokens) or tokens (all of them).",
        ),
    ] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise each feature vector.")] = False,
    out_dtype: Annotated[OutDtype, typer.Option("--out-dtype", help="Stored precision.")] = OutDtype.float32,
    force: ForceOpt = False,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    crop_pct: CropPctOpt = None,
    resize: ResizeOpt = None,
    no_exif: NoExifOpt = False,
    allow_truncated: AllowTruncatedOpt = False,
    null: NullOpt = False,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Extract features: one vector per image (or all its tokens), in input order.

    -o FILE.npy writes the rows incrementally, with the image paths in FILE.paths.jsonl
    (one record per input: {"row", "path"}, or {"path", "error"} for one that failed).
    Exit code 0: all written; 1: some inputs failed; 66: none could be read.
    """
    from .. import distributed, engine

    fmt = _choose_format(out, format_)
    options = image_options(batch_size, workers, crop_pct, resize, no_exif, allow_truncated)
    if out is not None:
        from ..checkpoints.writing import check_destination

        check_destination(out, force=force)
        if fmt == "npy":
            check_destination(sidecar_path(out), force=force)
    device = distributed.local_device(device)
    show = wants_progress(quiet=quiet, stdout_streams=out is None)
    items = read_inputs(inputs, null_separated=null)  # checked now, read lazily
    with distributed.init(device):
        net = load(model)
        items = prefetch(inputs, items, counted=show)
        chosen = pool.value if pool else engine.default_pool(net.config)
        shape = engine.feature_shape(net.config, chosen)
        meta = {"model": str(net.source), "pool": chosen, "normalize": normalize}
        sink = _Sink(fmt, out, shape, out_dtype.value, meta, quiet=quiet)
        with ProgressBar(show, "extracting", len(items) if isinstance(items, list) else None) as bar:
            results = bar.wrap(engine.extract_features(net, items, pool=chosen, normalize=normalize, device=device,
                                                       dtype=dtype, options=options))  # fmt: skip
            if not distributed.is_distributed():
                code = sink.write(results)
            else:
                write = partial(_write_shard, shape=shape)
                with distributed.merged_shards(results, write, _read_shard, near=out) as merged:
                    bar.stop()
                    # Rank 0 writes the one output for every rank; the others are done.
                    code = 0 if merged is None else sink.write(_positioned(merged))
    raise typer.Exit(code)


def _choose_format(out: Path | None, format_: OutFormat | None) -> str:
    if format_ is not None:
        fmt = format_.value
    elif out is None:
        fmt = "jsonl"
    else:
        fmt = _SUFFIXES.get(out.suffix.lower())
        if fmt is None:
            raise UsageError(f"{out}: unknown output type", "use .npy, .safetensors or .jsonl, or give --format")
    if fmt != "jsonl" and out is None:
        raise UsageError(f"--format {fmt} writes a file", "give -o FILE")
    return fmt


def _positioned(results: Iterable) -> Iterator:
    for pos, r in enumerate(results):
        r.position = pos
        yield r


# --------------------------------------------------------------------------- writing


class _Sink:
    """Writes features to their destination; failures are counted and shown on stderr."""

    def __init__(self, fmt: str, out: Path | None, shape: tuple[int, ...], out_dtype: str, meta: dict[str, Any],
                 *, quiet: bool) -> None:  # fmt: skip
        self.fmt, self.out, self.shape, self.out_dtype, self.meta, self.quiet = fmt, out, shape, out_dtype, meta, quiet
        self.tally = Tally()

    def write(self, results: Iterable) -> int:
        """Consume `results`; returns the exit code (raises for "none could be read", after
        removing the temporary files, so nothing half-made is left)."""
        if self.out is None:
            for r in results:
                self.tally.add(r)
                output.write_jsonl(self._record(r))
            return self.tally.exit_code()
        from ..checkpoints.writing import atomic_path

        with atomic_path(self.out) as tmp:
            if self.fmt == "jsonl":
                with open(tmp, "w", encoding="utf-8") as f:
                    for r in results:
                        self.tally.add(r)
                        f.write(json.dumps(self._record(r), ensure_ascii=False) + "\n")
                code = self.tally.exit_code()
            elif self.fmt == "npy":
                with atomic_path(sidecar_path(self.out)) as tmp_side:
                    _write_npy(results, tmp, tmp_side, self.shape, self.out_dtype, self.tally)
                    code = self.tally.exit_code()
                    _user_mode(tmp_side)
            else:
                code = self._write_safetensors(results, tmp)
            _user_mode(tmp)
        if not self.quiet:
            dims = "×".join(map(str, self.shape))
            where = f" (paths in {sidecar_path(self.out)})" if self.fmt == "npy" else ""
            output.info(f"wrote {self.tally.ok} × {dims} {self.out_dtype} features to {self.out}{where}")
        return code

    def _record(self, r) -> dict[str, Any]:
        if not r.ok:
            return {"path": r.path, "error": r.error}
        rec = {"path": r.path, "features": r.features.astype(self.out_dtype).tolist()}
        if r.notes:
            rec["notes"] = r.notes
        return rec

    def _write_safetensors(self, results: Iterable, tmp: Path) -> int:
        paths: list[str] = []
        errors: list[dict[str, str]] = []

        def good() -> Iterator:
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
            n = _write_npy(good(), tmp_rows, None, self.shape, self.out_dtype, self.tally)
            code = self.tally.exit_code()
            metadata = {
                "format": "pt",
                "paths": json.dumps(paths, ensure_ascii=False),
                "errors": json.dumps(errors, ensure_ascii=False),
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()},
            }
            _npy_to_safetensors(tmp_rows, tmp, (n, *self.shape), self.out_dtype, metadata)
        finally:
            tmp_rows.unlink(missing_ok=True)
        return code


def _user_mode(path: Path) -> None:
    """The permissions a new file gets from the umask (temporary files are private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# A .npy header of fixed size, so the row count can be patched in when it is known.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    import numpy as np

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


def _write_npy(results: Iterable, path: Path, side: Path | None, shape, dtype: str, tally: Tally | None) -> int:
    """Good results' features as rows of `path`; one JSON line per input in `side`
    ({"row", "path"[, "notes"]} or {"path", "error"}). Returns the number of rows."""
    with NpyWriter(path, shape, dtype) as writer, (open(side, "w", encoding="utf-8") if side else _Null()) as f:
        for r in results:
            if tally is not None:
                tally.add(r)
            if r.ok:
                rec = {"row": writer.count, "path": r.path}
                if r.notes:
                    rec["notes"] = r.notes
                writer.append(r.features)
            else:
                rec = {"path": r.path, "error": r.error}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return writer.count


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, text: str) -> None:
        pass


def _npy_to_safetensors(rows: Path, dst: Path, shape: tuple[int, ...], dtype: str, metadata: dict[str, str]) -> None:
    import numpy as np

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header = {
        "__metadata__": metadata,
        "features": {"dtype": {"float32": "F32", "float16": "F16"}[dtype], "shape": list(shape),
                     "data_offsets": [0, nbytes]},  # fmt: skip
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


def _write_shard(results: Iterable, stem: Path, *, shape: tuple[int, ...]) -> None:
    _write_npy(results, stem.with_suffix(".npy"), stem.with_suffix(".jsonl"), shape, "float32", None)


def _read_shard(stem: Path) -> Iterator:
    import numpy as np

    from ..engine import Features

    rows = None
    with open(stem.with_suffix(".jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "error" in rec:
                yield Features(-1, rec["path"], rec["error"])
                continue
            if rows is None:  # mapped only when there is a row: numpy cannot map 0 bytes
                rows = np.load(stem.with_suffix(".npy"), mmap_mode="r")
            yield Features(-1, rec["path"], None, rec.get("notes", []), np.array(rows[rec["row"]]))


def register(app: typer.Typer) -> None:
    app.command("extract-features")(extract_features)
