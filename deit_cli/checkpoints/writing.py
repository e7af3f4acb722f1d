"""Writing checkpoints: atomically (a temporary beside the target, then a rename), never
over something the user owns without `force`, and checked against the source before the
rename so a failed conversion leaves nothing behind (the atomic part is `deit_cli.files`)."""

from __future__ import annotations

import errno
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import resolve_dtype
from ..errors import CheckpointError, UsageError
from ..files import atomic_path, check_destination, same_path
from ..model import DeiT
from . import layouts
from .loading import (
    HF_MULTI_LABEL,
    HF_THRESHOLD,
    META_CONFIG,
    META_LABELS,
    META_MULTI_LABEL,
    META_PREPROCESSING,
    META_SOURCE,
    META_THRESHOLD,
    DeiTWarning,
    build_model,
    read_checkpoint,
)

TARGETS = ("deit", "timm", "hf")
# (atol, rtol) of the logit check per stored dtype: reduced precision moves logits a little.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 5e-2)}


@dataclass
class ConvertResult:
    source: str
    destination: str
    to: str
    layout_in: str
    dtype: str
    params: int
    bytes: int
    max_abs_diff: float
    tolerance: float
    timm_name: str | None
    hf_architecture: str | None


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as e:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else OSError(errno.EIO, str(e))
        raise cause from None


def canonical_tensors(model: DeiT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def deit_metadata(model: DeiT) -> dict[str, str]:
    """Our safetensors metadata: the config, labels, source, the evaluation transform and,
    for a multi-label model, that it is one and its threshold."""
    meta = {
        "format": "pt",
        META_CONFIG: json.dumps(model.config.to_dict()),
        META_LABELS: json.dumps(model.labels),
        META_SOURCE: str(getattr(model, "origin", None) or model.source),
    }
    pre = getattr(model, "preprocessing", None)
    if pre is not None:
        meta[META_PREPROCESSING] = json.dumps(pre.to_dict())
    if getattr(model, "multi_label", False):
        meta[META_MULTI_LABEL] = "true"
        meta[META_THRESHOLD] = repr(float(model.threshold))
    return meta


def write_hf(path: Path, model: DeiT, dtype: torch.dtype) -> str:
    """A directory that transformers' from_pretrained loads. Returns the architecture."""
    cfg = model.config
    model_type, arch = layouts.hf_architecture(cfg)
    pre = model.preprocessing
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.num_classes:
        config["id2label"] = {str(i): label for i, label in enumerate(model.labels)}
        config["label2id"] = {label: i for i, label in enumerate(model.labels)}
    if getattr(model, "multi_label", False):
        config["problem_type"] = HF_MULTI_LABEL
        config[HF_THRESHOLD] = float(model.threshold)
    # transformers' processor can only squash to a square; the original evaluation keeps
    # the aspect ratio (deit's own transform does that).
    size = pre.resize_size if pre else int(cfg.image_size / 0.875)
    processor = {
        "image_processor_type": "DeiTImageProcessor" if model_type == "deit" else "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean) if pre else [0.485, 0.456, 0.406],
        "image_std": list(pre.std) if pre else [0.229, 0.224, 0.225],
    }
    if model_type == "vit":  # ViTImageProcessor has no crop: resize straight to the model size
        processor.update(size={"height": cfg.image_size, "width": cfg.image_size}, do_center_crop=False)
        processor.pop("crop_size")
    tensors = layouts.to_hf(canonical_tensors(model, dtype), cfg)
    save_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return arch


def convert(
    source: str,
    dst: Path,
    *,
    to: str = "deit",
    dtype: str | None = None,
    force: bool = False,
    tolerance: float | None = None,
) -> ConvertResult:
    """Convert any source to `to` at `dst`, check its logits against the source's, then
    rename it into place. Raises on anything over tolerance; writes nothing then."""
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    store = resolve_dtype(dtype)
    src_path = Path(source).expanduser()
    check_destination(dst, force=force, sources=(src_path,) if src_path.exists() else ())
    ckpt = read_checkpoint(source)
    if same_path(dst, ckpt.path) or (dst.is_dir() and ckpt.path.parent.resolve() == dst.resolve()):
        raise UsageError(f"{dst}: destination is (or holds) the source; choose another path")
    model = build_model(ckpt)
    timm_name = model.variant.name if model.variant else None
    if to == "timm" and model.config.distilled and not model.config.has_dist_head and model.config.num_classes:
        raise UsageError("timm has no distilled model with only a class head; use --to deit or --to hf")
    if to == "hf":
        layouts.check_hf_can_hold(model.config)  # DeiT III: refused before anything is written
    arch = None
    with atomic_path(dst, directory=(to == "hf")) as tmp:
        if to == "hf":
            arch = write_hf(tmp, model, store)
        else:
            save_safetensors(tmp, canonical_tensors(model, store), deit_metadata(model))
        diff, tol = check_logits(model, str(tmp), store, tolerance)
        if diff != diff:  # NaN: non-finite logits where the source's are finite (or the reverse)
            raise CheckpointError(
                f"conversion check failed: the written weights give NaN or infinite logits where the "
                f"source's do not (a value out of range for {dtype or 'fp32'}?); nothing written"
            )
        if diff > tol:
            raise CheckpointError(
                f"conversion check failed: logits differ by {diff:.3g} (tolerance {tol:.3g}); nothing written"
            )
        size = sum(p.stat().st_size for p in tmp.rglob("*")) if tmp.is_dir() else tmp.stat().st_size
    return ConvertResult(
        source=ckpt.source,
        destination=str(dst),
        to=to,
        layout_in=ckpt.layout,
        dtype=str(store).removeprefix("torch."),
        params=sum(p.numel() for p in model.parameters()),
        bytes=size,
        max_abs_diff=diff,
        tolerance=tol,
        timm_name=timm_name,
        hf_architecture=arch,
    )


@torch.inference_mode()
def check_logits(model: DeiT, written: str, store: torch.dtype, tolerance: float | None) -> tuple[float, float]:
    """Largest logit difference between the source model and what was written, on a fixed input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.in_chans, model.config.image_size, model.config.image_size, generator=g)
    with warnings.catch_warnings():  # the source's NaN warning was shown already
        warnings.simplefilter("ignore", DeiTWarning)
        reread = build_model(read_checkpoint(written))
    ref = model(x)
    out = reread(x)
    # NaN or inf where the source has the same is a faithful copy; anywhere else it is a
    # difference of NaN, which fails (e.g. fp16 overflowing a large weight to inf)
    d = (ref - out).abs().masked_fill((ref == out) | (ref.isnan() & out.isnan()), 0.0)
    diff = d.max().item() if ref.numel() else 0.0
    if tolerance is None:
        atol, rtol = TOLERANCES[store]
        finite = ref[ref.isfinite()]
        tolerance = atol + rtol * (finite.abs().max().item() if finite.numel() else 0.0)
    return diff, tolerance
