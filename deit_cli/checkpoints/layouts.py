"""Checkpoint layouts, each a mapping to and from the canonical (timm / original) keys.

Layouts are recognised from the keys, never from a file name. Every mapping here is
proved in the tests by comparing logits with the implementation that wrote the layout.
"""

from __future__ import annotations

import math
import re

import torch

from ..config import LAYER_SCALE_INIT
from ..errors import CheckpointError, UsageError
from ..model import DeiTConfig

CANONICAL = "timm"
DEIT3_RELEASE = "deit3-release"  # the DeiT III release's checkpoints: `gamma_1`/`gamma_2`, else timm's keys
HF_DEIT = "transformers-deit"
HF_VIT = "transformers-vit"
MMPRETRAIN = "mmpretrain"

# Wrappers that training code adds around the model: DDP, torch.compile, some scripts.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# transformers' pooler (a dense+tanh on the class token) is never used by a classifier.
_HF_UNUSED = re.compile(r"^(deit\.|vit\.)?pooler\.")
# mmpretrain keeps its normalisation constants in the state dict; they are not weights.
_MM_UNUSED = re.compile(r"^data_preprocessor\.")


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


# The DeiT III release's LayerScale (models_v2.Layer_scale_init_Block) -> timm's, the canonical name.
_RELEASE_GAMMA = re.compile(r"^blocks\.(\d+)\.gamma_([12])$")


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if "patch_embed.proj.weight" in keys:
        return DEIT3_RELEASE if any(_RELEASE_GAMMA.match(k) for k in keys) else CANONICAL
    if "backbone.patch_embed.projection.weight" in keys:
        return MMPRETRAIN
    for prefix in ("deit.", "vit.", ""):
        if f"{prefix}embeddings.patch_embeddings.projection.weight" in keys:
            if prefix == "vit.":
                return HF_VIT
            if prefix == "deit." or f"{prefix}embeddings.distillation_token" in keys:
                return HF_DEIT
            return HF_VIT
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {sample})",
        "deit reads the timm/original, transformers DeiT/ViT and mmpretrain layouts",
    )


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The canonical state dict and the name of the layout it came from."""
    sd = strip_wrappers(sd)
    layout = detect_layout(sd)
    if layout == CANONICAL:
        return dict(sd), layout
    if layout == DEIT3_RELEASE:
        return {_RELEASE_GAMMA.sub(r"blocks.\1.ls\2.gamma", k): v for k, v in sd.items()}, layout
    if layout == MMPRETRAIN:
        return _from_mmpretrain(sd), layout
    return _from_hf(sd), layout


def _rename(sd, rules, layout) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            new, n = pattern.subn(repl, k)
            if n:
                out[new] = v
                break
        else:
            out[k] = v  # left as is: strict loading names it as unexpected
    return out


_MM_RULES = [
    (re.compile(p), r)
    for p, r in [
        (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
        (r"^backbone\.layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
        (r"^backbone\.layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
        (r"^backbone\.layers\.(\d+)\.attn\.(qkv|proj)\.", r"blocks.\1.attn.\2."),
        (r"^backbone\.layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),  # DeiT3's LayerScale
        (r"^backbone\.layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
        (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
        (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
        (r"^backbone\.ln1\.", "norm."),
        (r"^backbone\.(cls_token|dist_token|pos_embed)$", r"\1"),
        (r"^head\.layers\.(head|head_dist)\.", r"\1."),
    ]
]


def _from_mmpretrain(sd):
    return _rename({k: v for k, v in sd.items() if not _MM_UNUSED.match(k)}, _MM_RULES, MMPRETRAIN)


_HF_RULES = [
    (re.compile(p), r)
    for p, r in [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.distillation_token$", "dist_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^layernorm\.", "norm."),
        (r"^(cls_)?classifier\.", "head."),
        (r"^distillation_classifier\.", "head_dist."),
    ]
]
# transformers >= 5 names the same tensors differently in memory (its files keep the
# names above); a state_dict() saved from such a model is read through this first.
_HF5_TO_HF = [
    (re.compile(p), r)
    for p, r in [
        (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
        (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
        (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
        (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
        (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
        (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
        (r"^layers\.(\d+)\.(layernorm_before|layernorm_after)\.", r"encoder.layer.\1.\2."),
    ]
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _from_hf(sd):
    flat, qkv = {}, {}
    for k, v in sd.items():
        if _HF_UNUSED.match(k):
            continue
        k = re.sub(r"^(deit|vit)\.", "", k)
        for pattern, repl in _HF5_TO_HF:
            k, n = pattern.subn(repl, k)
            if n:
                break
        m = _HF_QKV.match(k)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = v
        else:
            flat[k] = v
    out = _rename(flat, _HF_RULES, HF_DEIT)
    for (i, kind), parts in sorted(qkv.items()):
        missing = {"query", "key", "value"} - set(parts)
        if missing:
            raise CheckpointError(f"missing tensors: encoder.layer.{i}.attention.attention.{sorted(missing)[0]}.{kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def check_hf_can_hold(config: DeiTConfig) -> None:
    """transformers has no class with LayerScale or a patch-only position embedding (DeiT III):
    UsageError naming the layouts that can hold such a model."""
    if config.layer_scale_init is not None or not config.pos_embed_prefix:
        raise UsageError(
            "transformers has no class for DeiT III (LayerScale, patch-only position embedding); "
            "use --to deit or --to timm (timm's deit3_* layout)"
        )


def to_hf(sd: dict[str, torch.Tensor], config: DeiTConfig) -> dict[str, torch.Tensor]:
    """Canonical -> the transformers layout that `hf_architecture` names."""
    check_hf_can_hold(config)
    base = "deit" if config.distilled else "vit"
    headless = config.num_classes == 0
    prefix = "" if headless else f"{base}."
    out = {}
    for k, v in sd.items():
        if k == "head.weight" or k == "head.bias":
            name = "cls_classifier" if config.has_dist_head else "classifier"
            out[f"{name}.{k.split('.')[1]}"] = v
            continue
        if k.startswith("head_dist."):
            out[f"distillation_classifier.{k.split('.')[1]}"] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            layer = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("query", "key", "value"), v.chunk(3, 0)):
                    out[f"{prefix}{layer}attention.attention.{name}.{kind}"] = part.contiguous()
                continue
            rest = (
                rest.replace("norm1.", "layernorm_before.")
                .replace("norm2.", "layernorm_after.")
                .replace("attn.proj.", "attention.output.dense.")
                .replace("mlp.fc1.", "intermediate.dense.")
                .replace("mlp.fc2.", "output.dense.")
            )
            out[f"{prefix}{layer}{rest}"] = v
            continue
        name = {
            "cls_token": "embeddings.cls_token",
            "dist_token": "embeddings.distillation_token",
            "pos_embed": "embeddings.position_embeddings",
            "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
            "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
            "norm.weight": "layernorm.weight",
            "norm.bias": "layernorm.bias",
        }[k]
        out[prefix + name] = v
    return out


def hf_architecture(config: DeiTConfig) -> tuple[str, str]:
    """(model_type, architecture class) for a config in transformers."""
    check_hf_can_hold(config)
    if config.distilled:
        if config.num_classes == 0:
            return "deit", "DeiTModel"
        return "deit", "DeiTForImageClassificationWithTeacher" if config.has_dist_head else "DeiTForImageClassification"
    return "vit", "ViTModel" if config.num_classes == 0 else "ViTForImageClassification"


def infer_config(sd: dict[str, torch.Tensor], hints: dict | None = None) -> DeiTConfig:
    """A config from canonical tensor shapes; `hints` (from config.json or metadata) win for
    what shapes cannot tell: heads, layer-norm eps."""
    hints = dict(hints or {})
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if k not in sd:
            raise CheckpointError(f"missing tensors: {k}")
    d = sd["cls_token"].shape[-1]
    proj = sd["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[0] != d or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}, expected ({d}, C, P, P)")
    distilled = "dist_token" in sd
    prefix = 2 if distilled else 1
    rows = sd["pos_embed"].shape[1]
    # A slot per prefix token (DeiT), or none (DeiT III): two squares never differ by 1 or 2 (but 0 and 1)
    pos_embed_prefix = _is_square(rows - prefix) or not _is_square(rows)
    n = rows - prefix if pos_embed_prefix else rows
    grid = math.isqrt(max(n, 0))
    if grid * grid != n or n <= 0:
        raise CheckpointError(f"pos_embed has shape {tuple(sd['pos_embed'].shape)}: not a square grid of patches")
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    head = sd.get("head.weight")
    cfg = dict(
        image_size=grid * proj.shape[-1],
        patch_size=proj.shape[-1],
        in_chans=proj.shape[1],
        embed_dim=d,
        depth=depth,
        num_heads=max(d // 64, 1),
        mlp_ratio=(fc1.shape[0] / d) if fc1 is not None else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        distilled=distilled,
        dist_head="head_dist.weight" in sd if distilled else True,
        num_classes=head.shape[0] if head is not None else 0,
        pos_embed_prefix=pos_embed_prefix,
        # the value only matters to training from here; the release's (timm's deit3_* say 1e-6)
        layer_scale_init=LAYER_SCALE_INIT if "blocks.0.ls1.gamma" in sd else None,
    )
    cfg.update({k: v for k, v in hints.items() if v is not None})
    try:
        return DeiTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"inconsistent model config: {e}") from None


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def config_hints_from_hf(cfg: dict) -> dict:
    """What a transformers config.json says that tensor shapes cannot."""
    hints = {}
    if "num_attention_heads" in cfg:
        hints["num_heads"] = int(cfg["num_attention_heads"])
    if "layer_norm_eps" in cfg:
        hints["layer_norm_eps"] = float(cfg["layer_norm_eps"])
    if "qkv_bias" in cfg:
        hints["qkv_bias"] = bool(cfg["qkv_bias"])
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (DeiT uses exact gelu)")
    return hints


def config_hints_from_timm(cfg: dict) -> dict:
    """What a timm hub config.json (`architecture`, `model_args`) says that tensor shapes cannot:
    the heads and LayerScale init of a released architecture, or the model_args timm was given."""
    from ..variants import find_variant

    pool = cfg.get("global_pool", "token")
    if pool not in ("token", None):  # "avg" pools the patch tokens through fc_norm: not a DeiT head
        raise CheckpointError(f"config.json: timm global_pool {pool!r} is not supported (DeiT reads the class token)")
    hints = {}
    variant = find_variant(str(cfg.get("architecture", "")))
    if variant is not None:
        c = variant.config
        hints.update(num_heads=c.num_heads, layer_norm_eps=c.layer_norm_eps)
        if c.layer_scale_init is not None:
            hints["layer_scale_init"] = c.layer_scale_init
    args = cfg.get("model_args")
    if isinstance(args, dict):
        if isinstance(args.get("num_heads"), int):
            hints["num_heads"] = args["num_heads"]
        if isinstance(args.get("qkv_bias"), bool):
            hints["qkv_bias"] = args["qkv_bias"]
    return hints


def timm_labels(cfg: dict, num_classes: int) -> list[str] | None:
    """The class names of a timm hub config.json (`label_names`), when there is one per class."""
    names = cfg.get("label_names")
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def hf_labels(cfg: dict, num_classes: int) -> list[str] | None:
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) != num_classes:
        return None
    labels = []
    for i in range(num_classes):
        label = id2label.get(str(i), id2label.get(i))
        if label is None:
            return None
        labels.append(str(label))
    # transformers' placeholders say nothing about the classes
    return None if labels == [f"LABEL_{i}" for i in range(num_classes)] else labels
