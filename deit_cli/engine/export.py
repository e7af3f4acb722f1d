"""ONNX export, checked before it is trusted.

    result = export("deit-tiny-distilled", Path("tiny.onnx"))          # any source load_model reads
    result = export_model(model, Path("feats.onnx"), features=True, pool="avg")

The graph takes `pixel_values` float32 (batch, 3, S, S), already preprocessed, and gives
`logits` float32 (batch, classes), or with `features` `features` float32 (batch, D)
((batch, tokens, D) for pool "tokens"); the batch axis is dynamic. An fp16 graph stores
and computes in fp16 but keeps float32 inputs and outputs, so the same client code runs
both. The file is self-contained: its metadata_props hold the labels, whether the model is
multi-label, the preprocessing, the config, the source and the deit version (`METADATA`).

Like `deit convert`, nothing is trusted unread: the graph is written to a temporary beside
DST, checked with onnx's checker, run with onnxruntime at batch 1 and 3 on a fixed input
and compared with our own model in fp32; it is renamed into place only within tolerance
(and, for fp16, with the same top-1 class on every row), else CheckpointError and nothing
is left at DST.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..config import DEFAULT_OPSET, EXPORT_DTYPES, dtype_name
from ..devices import resolve_dtype
from ..errors import CheckpointError, UsageError
from ..files import atomic_path, check_destination, same_path
from ..model import DeiT
from .classify import check_head
from .features import check_pool, default_pool, feature_shape, pool_tokens

__all__ = [
    "EXTRA",
    "INPUT_NAME",
    "MIN_OPSET",
    "CHECK_BATCHES",
    "TOLERANCES",
    "ExportResult",
    "GraphSpec",
    "check_input",
    "check_session",
    "export",
    "export_model",
    "require_extra",
    "onnx_metadata",
    "read_metadata",
]

EXTRA = "pip install 'deit-cli[onnx]'"
INPUT_NAME = "pixel_values"  # transformers' name for the same tensor
MIN_OPSET = 17  # LayerNormalization first appears in opset 17
CHECK_BATCHES = (1, 3)  # the check runs the graph at these batch sizes: the batch axis is really dynamic
# (atol, rtol) of the check against our fp32 model, as `deit convert`'s for the same stored dtype:
# the tolerance is atol + rtol * max |reference|. fp16 must also agree on every row's top-1 class.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 1e-2)}
# Keys of the metadata_props (all strings; JSON where a value is not one).
META = {
    "labels": "deit.labels",  # JSON list, one per class (empty for features)
    "multi_label": "deit.multi_label",  # "true"/"false": sigmoid per class instead of softmax
    "threshold": "deit.threshold",  # multi-label only: a label is predicted at or above this score
    "preprocessing": "deit.preprocessing",  # JSON: image_size, crop_pct, resize_size, resize_mode, ...
    "output": "deit.output",  # "logits" or "features"
    "head": "deit.head",  # logits: avg | cls | dist
    "pool": "deit.pool",  # features: token | avg | cls | dist | tokens
    "dtype": "deit.dtype",  # fp32 | fp16 (the weights and arithmetic; inputs/outputs are float32)
    "config": "deit.config",  # JSON DeiTConfig (image_size is the exported size)
    "source": "deit.source",  # what the user named
    "origin": "deit.origin",  # where the weights first came from (as `deit convert` records it)
    "version": "deit.version",
}


@dataclass(frozen=True)
class GraphSpec:
    """What the graph computes: logits through `head`, or features pooled by `pool`."""

    output: str  # "logits" | "features"
    head: str | None
    pool: str | None
    dtype: str  # fp32 | fp16


@dataclass
class ExportResult:
    source: str
    destination: str
    dtype: str
    opset: int
    image_size: int
    output: str  # logits | features
    head: str | None
    pool: str | None
    input_name: str
    input_shape: list[Any]  # ["batch", 3, S, S]
    output_name: str
    output_shape: list[Any]  # ["batch", classes] / ["batch", D] / ["batch", tokens, D]
    params: int
    bytes: int
    checked_batches: list[int]
    max_abs_diff: float
    tolerance: float
    top1_agreement: float  # fraction of checked rows whose top-1 class matches ours (logits)
    onnxruntime: str  # the version that ran the check


def require_extra() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or one line saying what to install. onnxscript is the exporter's."""
    missing = []
    mods = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            mods[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"deit export needs {', '.join(missing)}, not installed here", EXTRA)
    return mods["onnx"], mods["onnxruntime"]


class _Graph(nn.Module):
    """The module that is traced: float32 images -> float32 logits or pooled features."""

    def __init__(self, model: DeiT, spec: GraphSpec):
        super().__init__()
        self.spec, self.dtype = spec, resolve_dtype(spec.dtype)
        self.model = _copy_to(model, self.dtype) if model.dtype != self.dtype else model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _outputs(self.model, x.to(self.dtype), self.spec).float()


def _outputs(model: DeiT, x: torch.Tensor, spec: GraphSpec) -> torch.Tensor:
    tokens = model.forward_features(x)
    if spec.output == "features":
        return pool_tokens(tokens, spec.pool, model.config)
    return model.forward_head(tokens, spec.head)


@torch.inference_mode()
def _reference(model: DeiT, x: torch.Tensor, spec: GraphSpec) -> torch.Tensor:
    """Our answer: the reference forward in fp32, what the graph is compared with."""
    return _outputs(_copy_to(model, torch.float32) if model.dtype != torch.float32 else model, x, spec)


def _copy_to(model: DeiT, where) -> DeiT:
    """A copy on another device or dtype, with its labels, preprocessing and source
    (`nn.Module.to` would change the model in place)."""
    return copy.deepcopy(model).to(where)


def export(
    source: str,
    dst: Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    image_size: int | None = None,
    head: str | None = None,
    features: bool = False,
    pool: str | None = None,
    force: bool = False,
    tolerance: float | None = None,
) -> ExportResult:
    """Export any source `load_model` reads to an ONNX file at `dst` (see the module docstring)."""
    from ..checkpoints import build_model, read_checkpoint

    _check_options(dtype, opset, features, head, pool)
    require_extra()
    src_path = Path(source).expanduser()
    check_destination(dst, force=force, sources=(src_path,) if src_path.exists() else ())
    ckpt = read_checkpoint(source)
    if same_path(dst, ckpt.path):
        raise UsageError(f"{dst}: destination is the source; choose another path")
    model = build_model(ckpt, image_size=image_size)
    return export_model(
        model, dst, dtype=dtype, opset=opset, head=head, features=features, pool=pool, force=force, tolerance=tolerance
    )


def export_model(
    model: DeiT,
    dst: Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    head: str | None = None,
    features: bool = False,
    pool: str | None = None,
    force: bool = False,
    tolerance: float | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export a loaded model (its size is the graph's; `load_model(image_size=...)` resamples).
    The model is not changed; one on another device is copied to the CPU, where both the
    export and the check run. `metadata`: more metadata_props (the onnxruntime backend's
    cache key)."""
    dtype, opset = _check_options(dtype, opset, features, head, pool)
    onnx, ort = require_extra()
    check_destination(dst, force=force)
    if model.device.type != "cpu":
        model = _copy_to(model, "cpu")
    cfg = model.config
    if features:
        spec = GraphSpec("features", None, check_pool(cfg, pool or default_pool(cfg)), dtype)
        out_shape = ["batch", *feature_shape(cfg, spec.pool)]
    else:
        spec = GraphSpec("logits", check_head(model, head, hint="export --features instead"), None, dtype)
        out_shape = ["batch", cfg.num_classes]
    S = cfg.image_size
    in_shape = ["batch", cfg.in_chans, S, S]
    x = check_input(cfg)
    meta = {**onnx_metadata(model, spec), **(metadata or {})}
    with atomic_path(dst) as tmp:
        _write_graph(_Graph(model, spec), x[:2], tmp, opset, spec.output, meta)
        _check_graph(onnx, tmp, opset)
        diff, tol, agree = _check(ort, tmp, model, x, spec, tolerance)
        size = tmp.stat().st_size
    return ExportResult(
        source=str(model.source),
        destination=str(dst),
        dtype=dtype,
        opset=opset,
        image_size=S,
        output=spec.output,
        head=spec.head,
        pool=spec.pool,
        input_name=INPUT_NAME,
        input_shape=in_shape,
        output_name=spec.output,
        output_shape=out_shape,
        params=sum(p.numel() for p in model.parameters()),
        bytes=size,
        checked_batches=list(CHECK_BATCHES),
        max_abs_diff=diff,
        tolerance=tol,
        top1_agreement=agree,
        onnxruntime=ort.__version__,
    )


def _check_options(
    dtype: str, opset: int | None, features: bool, head: str | None, pool: str | None
) -> tuple[str, int]:
    dtype = dtype_name(dtype, allowed=EXPORT_DTYPES)
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UsageError(
            f"unknown --opset {opset}: a DeiT needs opset {MIN_OPSET} or later (LayerNormalization)",
            f"the default is {DEFAULT_OPSET}",
        )
    try:
        import onnx

        newest = onnx.defs.onnx_opset_version()
    except ImportError:
        newest = None  # require_extra says what to install
    if newest is not None and opset > newest:
        raise UsageError(
            f"unknown --opset {opset}: onnx {onnx.__version__} knows opsets up to {newest}",
            f"the default is {DEFAULT_OPSET}",
        )
    if features and head is not None:
        raise UsageError("--head chooses a classifier; --features exports features (choose one)")
    if pool is not None and not features:
        raise UsageError("--pool needs --features")
    return dtype, opset


def _write_graph(graph: _Graph, x: torch.Tensor, path: Path, opset: int, output: str, meta: dict[str, str]) -> None:
    """torch.onnx.export (dynamo, onnxscript) with a dynamic batch axis. Its chatter (warnings,
    logging, prints) is not the user's business: kept off stdout always, and off stderr
    unless DEIT_DEBUG is set."""
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    quiet = not os.environ.get("DEIT_DEBUG")
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(chatter if quiet else sys.stderr))  # stdout is data only
            if quiet:
                warnings.simplefilter("ignore")
                stack.enter_context(contextlib.redirect_stderr(chatter))
                for lg in loggers:
                    lg.setLevel(logging.ERROR)
            program = torch.onnx.export(
                graph.eval(),
                (x,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output],
                dynamic_shapes={"x": {0: batch}},
                optimize=True,
                verbose=False,
                external_data=False,
            )
            program.model.metadata_props.update(meta)
            program.model.producer_name, program.model.producer_version = "deit", __version__
            program.save(str(path), external_data=False)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; one line says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"torch.onnx.export failed: {type(e).__name__}: {first[:300]}", "set DEIT_DEBUG=1 for the traceback"
        ) from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_graph(onnx, path: Path, opset: int) -> None:
    """Check that the file is valid ONNX at the opset asked for (the exporter falls back to
    its own opset, with a warning only, when it cannot convert)."""
    proto = onnx.load(str(path), load_external_data=False)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise UsageError(
            f"unknown --opset {opset}: torch's exporter cannot write it (it wrote opset {written})",
            f"the default is {DEFAULT_OPSET}",
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise CheckpointError(f"the exported graph is not valid ONNX: {str(e).strip().splitlines()[0]}") from None


def _check(
    ort, path: Path, model: DeiT, x: torch.Tensor, spec: GraphSpec, tolerance: float | None
) -> tuple[float, float, float]:
    """(largest difference, tolerance, top-1 agreement) of the graph in onnxruntime against
    our fp32 model, at each of CHECK_BATCHES. Raises CheckpointError when it fails."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: its warnings are not the user's business
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common public base
        raise _cannot_run("onnxruntime", ort.__version__, e) from None
    return check_session(session, model, x, spec, tolerance, version=ort.__version__)


def _cannot_run(engine: str, version: str, e: Exception) -> CheckpointError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(
        f"{engine} {version} cannot run the exported graph: {first[:300]}", "nothing written; try the default --opset"
    )


def check_input(config) -> torch.Tensor:
    """The fixed input every graph is checked on: (max(CHECK_BATCHES), C, S, S), seeded."""
    g = torch.Generator().manual_seed(0)
    S = config.image_size
    return torch.randn(max(CHECK_BATCHES), config.in_chans, S, S, generator=g)


def check_session(
    session,
    model: DeiT,
    x: torch.Tensor,
    spec: GraphSpec,
    tolerance: float | None = None,
    *,
    version: str = "",
    engine: str = "onnxruntime",
) -> tuple[float, float, float]:
    """(largest difference, tolerance, top-1 agreement) of an onnxruntime session of the graph
    (or anything with its `run(None, feeds)`: engine.ov's compiled graph) against our fp32
    model on `x`, at each of CHECK_BATCHES. Raises CheckpointError when it fails. `deit
    export` runs it before a file is kept; the onnxruntime and openvino backends on every load."""
    try:
        outs = [torch.from_numpy(session.run(None, {INPUT_NAME: x[:b].numpy()})[0]) for b in CHECK_BATCHES]
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common public base
        raise _cannot_run(engine, version, e) from None
    ref = _reference(model, x, spec)
    atol, rtol = TOLERANCES[resolve_dtype(spec.dtype)]
    finite = ref[ref.isfinite()]
    tol = tolerance if tolerance is not None else atol + rtol * (finite.abs().max().item() if finite.numel() else 0.0)
    diff, agree, rows = 0.0, 0, 0
    for b, out in zip(CHECK_BATCHES, outs):
        want = ref[:b]
        if out.shape != want.shape:
            raise CheckpointError(
                f"export check failed: batch {b} gave shape {tuple(out.shape)}, "
                f"expected {tuple(want.shape)}; nothing written"
            )
        d = (out - want).abs().masked_fill((out == want) | (out.isnan() & want.isnan()), 0.0)
        diff = max(diff, d.max().item() if d.numel() else 0.0)  # NaN where ours is finite stays NaN
        if spec.output == "logits":
            rows += b
            agree += _top1_agreement(want, out)
    if diff != diff:
        raise CheckpointError(
            "export check failed: the graph gives NaN or infinite values where our model does "
            f"not (a value out of range for {spec.dtype}?); nothing written"
        )
    if diff > tol:
        raise CheckpointError(
            f"export check failed: outputs differ from deit's by {diff:.3g} (tolerance {tol:.3g}); nothing written"
        )
    agreement = agree / rows if rows else 1.0
    if agreement < 1.0:
        raise CheckpointError(
            f"export check failed: the top-1 class differs from deit's on {rows - agree} of "
            f"{rows} checked rows; nothing written"
        )
    return diff, tol, agreement


def _top1_agreement(ref: torch.Tensor, out: torch.Tensor) -> int:
    """Rows whose top-1 class is ours (strictly: a tie broken the other way counts against)."""
    return int((out.argmax(dim=-1) == ref.argmax(dim=-1)).sum())


def onnx_metadata(model: DeiT, spec: GraphSpec) -> dict[str, str]:
    """The metadata_props that make the file self-contained (all strings)."""
    from ..variants import Preprocessing

    pre = model.preprocessing or Preprocessing(image_size=model.config.image_size)
    pre_d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(pre).items()}
    pre_d["resize_size"] = pre.resize_size
    meta = {
        META["labels"]: json.dumps(list(model.labels) if spec.output == "logits" else [], ensure_ascii=False),
        META["multi_label"]: "true" if getattr(model, "multi_label", False) else "false",  # sigmoid per class
        META["preprocessing"]: json.dumps(pre_d),
        META["output"]: spec.output,
        META["head"]: spec.head or "",
        META["pool"]: spec.pool or "",
        META["dtype"]: spec.dtype,
        META["config"]: json.dumps(model.config.to_dict()),
        META["source"]: str(model.source),
        META["origin"]: str(model.origin or model.source),
        META["version"]: __version__,
    }
    if getattr(model, "multi_label", False):
        meta[META["threshold"]] = repr(float(model.threshold))
    return meta


def read_metadata(path: Path) -> dict[str, Any]:
    """An exported file's metadata, parsed: {"labels": [...], "multi_label": bool,
    "preprocessing": {...}, "config": {...}, ...} (the keys of `META`)."""
    onnx, _ = require_extra()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    out: dict[str, Any] = {}
    for name, key in META.items():
        if key not in props:
            if name == "threshold":  # multi-label models only
                continue
            raise CheckpointError(f"{path}: no {key} metadata; not a file `deit export` wrote")
        value = props[key]
        out[name] = json.loads(value) if name in ("labels", "preprocessing", "config") else value
    out["multi_label"] = out["multi_label"] == "true"
    if "threshold" in out:
        out["threshold"] = float(out["threshold"])
    return out
