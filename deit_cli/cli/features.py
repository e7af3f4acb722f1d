"""`deit extract-features INPUTS... [-o FILE]`: one embedding per image (or all its tokens).

The pools, the file formats and their writers are `deit_cli.engine.features`; this module
parses the flags and reports.
"""

from __future__ import annotations

from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Iterable

import typer

from ..config import dtype_name, pool_name
from ..errors import UsageError
from . import output
from .inputs import image_options, load, positioned, prefetch, read_inputs, wants_progress
from .options import (
    DEFAULT_MODEL_NAME,
    AllowTruncatedOpt,
    BatchSizeOpt,
    CropPctOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    InputsArg,
    ModelOpt,
    NoExifOpt,
    NullOpt,
    QuietOpt,
    ResizeOpt,
    WorkersOpt,
)


class OutFormat(str, Enum):
    npy = "npy"
    safetensors = "safetensors"
    jsonl = "jsonl"


class Pool(str, Enum):
    token = "token"
    avg = "avg"
    cls = "cls"
    dist = "dist"
    tokens = "tokens"
    mean = "mean"  # the old name of avg


_SUFFIXES = {".npy": "npy", ".safetensors": "safetensors", ".jsonl": "jsonl"}


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
            help="As timm names them: token (the class token; for a distilled model the mean of the class and "
            "distillation tokens; the default), avg (the mean of the patch tokens), cls, dist, or tokens (all).",
        ),
    ] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise each feature vector.")] = False,
    out_dtype: Annotated[
        str, typer.Option("--out-dtype", help="Stored precision: fp32 or fp16 (float32/float16 also accepted).")
    ] = "fp32",
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
    from .. import distributed
    from ..engine import features as engine
    from ..files import check_destination

    fmt = _choose_format(out, format_)
    stored = dtype_name(out_dtype, allowed=("fp32", "fp16"))
    options = image_options(batch_size, workers, crop_pct, resize, no_exif, allow_truncated)
    if out is not None:
        check_destination(out, force=force)
        if fmt == "npy":
            check_destination(engine.sidecar_path(out), force=force)
    device = distributed.local_device(device)
    show = wants_progress(quiet=quiet, stdout_streams=out is None)
    items = read_inputs(inputs, null_separated=null)  # checked now, read lazily
    with distributed.init(device):
        net = load(model)
        output.set_batch_size(batch_size)
        items = prefetch(inputs, items, counted=show)
        chosen = pool_name(pool.value) if pool else engine.default_pool(net.config)
        shape = engine.feature_shape(net.config, chosen)
        meta = {"model": str(net.source), "pool": chosen, "normalize": normalize}
        write = partial(_write, out=out, fmt=fmt, shape=shape, stored=stored, meta=meta, quiet=quiet)
        with output.ProgressBar(show, "extracting", len(items) if isinstance(items, list) else None) as bar:
            results = bar.wrap(
                engine.extract_features(
                    net, items, pool=chosen, normalize=normalize, device=device, dtype=dtype, options=options
                )
            )
            if not distributed.is_distributed():
                code = write(results)
            else:
                shard = partial(engine.write_shard, shape=shape)
                with distributed.merged_shards(results, shard, engine.read_shard, near=out) as merged:
                    bar.stop()
                    # Rank 0 writes the one output for every rank; the others are done.
                    code = 0 if merged is None else write(positioned(merged))
    raise typer.Exit(code)


def _write(results: Iterable, *, out: Path | None, fmt: str, shape, stored: str, meta: dict, quiet: bool) -> int:
    """Consume `results` into the destination; returns the exit code. When none could be
    read, the error is raised before the files are renamed into place: nothing is left."""
    from ..engine import features as engine

    tally = output.Tally()
    counted = tally.counting(results)
    if out is None:
        for r in counted:
            output.write_jsonl(engine.feature_record(r, stored))
        return tally.exit_code()
    codes: list[int] = []
    rows = engine.write_features(
        counted,
        out,
        fmt=fmt,
        shape=shape,
        out_dtype=stored,
        metadata=meta,
        before_commit=lambda: codes.append(tally.exit_code()),
    )
    if not quiet:
        dims = "×".join(map(str, shape))
        where = f" (paths in {engine.sidecar_path(out)})" if fmt == "npy" else ""
        output.info(f"wrote {rows} × {dims} {stored} features to {out}{where}")
    return codes[0]


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


def register(app: typer.Typer) -> None:
    app.command("extract-features")(extract_features)
