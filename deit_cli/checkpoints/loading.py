"""From a source (registry name, hub repo id, directory or file) to a loaded DeiT."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import default_labels, imagenet_classes, imagenet_wnids  # noqa: F401 - re-exported
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, InputNotFound, UsageError
from ..model import DeiT, DeiTConfig, resample_pos_embed
from ..variants import DEFAULT_MODEL, Preprocessing, Variant, find_variant, variant_for_config
from . import layouts
from .formats import SAFETENSORS, check_tensors, detect_format, find_state_dict, read_safetensors, read_torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

# Keys of our own safetensors metadata (`deit convert --to deit`).
META_CONFIG, META_LABELS, META_SOURCE = "deit.config", "deit.labels", "deit.source"
# A multi-label model ("true") and the score at or above which a label is predicted.
META_MULTI_LABEL, META_THRESHOLD = "deit.multi_label", "deit.threshold"
META_PREPROCESSING = "deit.preprocessing"  # the evaluation transform the model was trained and validated with
HF_MULTI_LABEL = "multi_label_classification"  # transformers' config.json `problem_type`
HF_THRESHOLD = "deit_threshold"  # our key in a transformers config.json (transformers keeps it)
DEFAULT_THRESHOLD = 0.5


class DeiTWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it)."""


@dataclass
class Checkpoint:
    """A checkpoint read into the canonical layout, before a model is built from it."""

    state_dict: dict[str, torch.Tensor]
    config: DeiTConfig
    labels: list[str]
    layout: str
    source: str  # what the user named
    path: Path
    variant: Variant | None
    origin: str = ""  # where the weights first came from (recorded by `deit convert`), else `source`
    multi_label: bool = False  # sigmoid scores, any number of labels per image
    threshold: float = DEFAULT_THRESHOLD  # multi-label: the score at or above which a label is predicted
    preprocessing: Preprocessing | None = None  # a timm config.json's pretrained_cfg (a named variant's wins)


def resolve_source(source: str) -> tuple[Path, Path | None, Variant | None]:
    """(weights file, config.json or None, registry variant or None) for a source."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (*_files_in_dir(path), None)
    if path.exists() or path.suffix.lower() in CHECKPOINT_SUFFIXES or source.startswith((".", "/", "~")):
        if not path.exists():
            raise InputNotFound(f"{source}: no such file")
        return path, None, None
    from . import hub

    variant = find_variant(source)
    if variant is not None:
        revision = source.split("@", 1)[1] if "@" in source else None
        files = hub.fetch_model_files(variant.hub_repo, revision)
        return files.weights, files.config, variant
    parsed = hub.parse_repo_id(source)
    if parsed is None:
        raise InputNotFound(
            f"{source}: not a file, a directory, a registry name or a hub repo id",
            "`deit models` lists the registry names",
        )
    files = hub.fetch_model_files(*parsed)
    return files.weights, files.config, find_variant(parsed[0])


def _files_in_dir(path: Path) -> tuple[Path, Path | None]:
    config = path / "config.json"
    config = config if config.is_file() else None
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name, config
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
    if len(found) == 1:
        return found[0], config
    if not found:
        raise InputNotFound(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    raise UsageError(f"{path}: several checkpoints in this directory; name one of them")


def read_checkpoint(source: str = DEFAULT_MODEL) -> Checkpoint:
    """Read any source into the canonical layout, with its config and labels."""
    weights, config_path, variant = resolve_source(source)
    metadata: dict[str, str] = {}
    if detect_format(weights) == SAFETENSORS:
        sd, metadata = read_safetensors(weights)
    else:
        sd = find_state_dict(read_torch(weights), weights)
    check_tensors(sd, weights)
    try:
        sd, layout = layouts.to_canonical(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e.message}", e.hint) from None

    hf_cfg = _read_json(config_path) if config_path else {}
    if hf_cfg and hf_cfg.get("model_type") not in (None, "deit", "vit"):
        raise CheckpointError(f"{config_path}: model_type {hf_cfg.get('model_type')!r} is not a DeiT or ViT")
    timm_cfg = hf_cfg if isinstance(hf_cfg.get("architecture"), str) else {}  # timm's hub config.json
    if META_CONFIG in metadata:
        try:
            config = DeiTConfig.from_dict(json.loads(metadata[META_CONFIG]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{weights}: bad deit.config metadata ({e})") from None
    else:
        try:
            hints = layouts.config_hints_from_timm(timm_cfg) if timm_cfg else layouts.config_hints_from_hf(hf_cfg)
            config = layouts.infer_config(sd, hints)
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e.message}", e.hint) from None

    labels = None
    if META_LABELS in metadata:
        labels = json.loads(metadata[META_LABELS])
    labels = (
        labels
        or (layouts.timm_labels(timm_cfg, config.num_classes) if timm_cfg else None)
        or layouts.hf_labels(hf_cfg, config.num_classes)
        or default_labels(config.num_classes)
    )
    if len(labels) != config.num_classes:
        raise CheckpointError(f"{weights}: {len(labels)} labels for {config.num_classes} classes")
    preprocessing = _saved_preprocessing(metadata, weights) or (
        None if variant else _timm_preprocessing(timm_cfg, config_path)
    )
    variant = variant or variant_for_config(config)
    origin = metadata.get(META_SOURCE) or source
    multi_label, threshold = _multi_label(metadata, hf_cfg, weights)
    return Checkpoint(
        sd, config, labels, layout, source, weights, variant, origin, multi_label, threshold, preprocessing
    )


def _saved_preprocessing(metadata: dict[str, str], weights: Path) -> Preprocessing | None:
    """The evaluation transform our own metadata states (what `deit train` validated with)."""
    if META_PREPROCESSING not in metadata:
        return None
    try:
        return Preprocessing.from_dict(json.loads(metadata[META_PREPROCESSING]))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{weights}: bad deit.preprocessing metadata ({e})") from None


def _timm_preprocessing(cfg: dict, path: Path | None) -> Preprocessing | None:
    """The evaluation transform a timm config.json's pretrained_cfg states, if it states one."""
    pre = cfg.get("pretrained_cfg")
    if not isinstance(pre, dict) or not pre.get("input_size"):
        return None
    try:
        default = Preprocessing()
        mode = pre.get("crop_mode", "center")
        return Preprocessing(
            image_size=int(pre["input_size"][-1]),
            crop_pct=float(pre.get("crop_pct") or default.crop_pct),
            interpolation=str(pre.get("interpolation") or default.interpolation),
            mean=tuple(float(v) for v in pre.get("mean", default.mean)),
            std=tuple(float(v) for v in pre.get("std", default.std)),
            resize_mode="squash" if mode == "squash" else "shorter",  # timm's "center" is our "shorter"
        )
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable pretrained_cfg ({e})") from None


def _multi_label(metadata: dict[str, str], hf_cfg: dict, weights: Path) -> tuple[bool, float]:
    """(multi-label?, threshold) from our metadata, else a transformers config."""
    if META_MULTI_LABEL in metadata:
        multi, raw = metadata[META_MULTI_LABEL] == "true", metadata.get(META_THRESHOLD, DEFAULT_THRESHOLD)
    else:
        multi, raw = hf_cfg.get("problem_type") == HF_MULTI_LABEL, hf_cfg.get(HF_THRESHOLD, DEFAULT_THRESHOLD)
    try:
        threshold = float(raw)
    except (TypeError, ValueError):
        threshold = -1.0
    if not 0.0 <= threshold <= 1.0:
        raise CheckpointError(f"{weights}: the multi-label threshold {raw!r} is not a number in [0, 1]")
    return multi, threshold


def build_model(ckpt: Checkpoint, *, image_size: int | None = None) -> DeiT:
    """A DeiT holding the checkpoint's weights, loaded strictly."""
    config, sd = ckpt.config, dict(ckpt.state_dict)
    if image_size and image_size != config.image_size:
        if image_size % config.patch_size:
            raise UsageError(f"image size {image_size} is not a multiple of the patch size {config.patch_size}")
        config = replace(config, image_size=image_size)
        if "pos_embed" in sd:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], config.grid_size, config.num_pos_prefix_tokens)
    with torch.device("meta"):
        model = DeiT(config)
    check_state_dict(model, sd, ckpt.path)
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            warnings.warn(f"{ckpt.path}: {k} contains NaN or infinite values", DeiTWarning, stacklevel=2)
    model.load_state_dict({k: v.float() if v.dtype != torch.float32 else v for k, v in sd.items()}, assign=True)
    model.eval().requires_grad_(False)
    model.labels = list(ckpt.labels)
    pre = ckpt.preprocessing or (ckpt.variant.preprocessing if ckpt.variant else None)
    pre = pre or Preprocessing(image_size=config.image_size)
    model.preprocessing = replace(pre, image_size=config.image_size) if pre.image_size != config.image_size else pre
    model.source = ckpt.source
    model.origin = ckpt.origin or ckpt.source
    model.multi_label, model.threshold = ckpt.multi_label, ckpt.threshold
    model.variant = ckpt.variant
    model.layout = ckpt.layout
    return model


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> DeiT:
    """Load a DeiT from a registry name or alias, a hub repo id (`org/name[@revision]`),
    a local model directory, or a checkpoint file. Returns the model in eval mode with
    `.config`, `.labels` and `.preprocessing` set."""
    model = build_model(read_checkpoint(str(source)), image_size=image_size)
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))


def random_model(source: str, *, image_size: int | None = None, seed: int = 0) -> DeiT:
    """The architecture of a registry variant with seeded random weights (for bench)."""
    variant = find_variant(source)
    if variant is None:
        raise InputNotFound(f"{source}: not a registry name; --random-init needs one", "`deit models` lists them")
    config = replace(variant.config, image_size=image_size) if image_size else variant.config
    with torch.device("meta"):  # no init here: init_weights below is the only one
        model = DeiT(config)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    model.eval().requires_grad_(False)
    model.labels = default_labels(1000)
    model.preprocessing = replace(variant.preprocessing, image_size=model.config.image_size)
    model.source, model.variant, model.layout = f"{variant.name} (random init)", variant, layouts.CANONICAL
    model.origin = model.source
    return model


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str | Path) -> None:
    """`sd` holds exactly `model`'s tensors, shape for shape; else one CheckpointError naming
    what is missing, unexpected or mis-shaped (strict loading, as timm's)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shaped = [
        f"{k} {tuple(sd[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + _few(missing))
    if unexpected:
        problems.append("unexpected tensors: " + _few(unexpected))
    if shaped:
        problems.append("mis-shaped tensors: " + _few(shaped))
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: config is not a JSON object")
    return data
