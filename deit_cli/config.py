"""Names the whole project shares, torch-free: the CLI imports this module at start-up.

`DeiTConfig` (the architecture as a plain dataclass), the head, pool, score and precision
names, and the label files shipped with the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources

from .errors import UsageError

# Classifiers of a model: "avg" is the mean of the class and distillation heads' logits
# (the paper's, timm's and transformers' inference for distilled models).
HEADS = ("avg", "cls", "dist")
# Features, named as timm names them: "avg" is the mean of the patch tokens (timm's
# global_pool="avg"); "token" is what timm's forward_head(pre_logits=True) returns (the
# class token, or for a distilled model the mean of the class and distillation tokens).
POOLS = ("token", "avg", "cls", "dist", "tokens")
POOL_ALIASES = {"mean": "avg"}
SCORES = ("prob", "logit")
# `deit export`: what an ONNX graph stores, and the opset it is written at by default
# (18: the widest runtime support that still has LayerNormalization, which needs 17).
EXPORT_DTYPES = ("fp32", "fp16")
DEFAULT_OPSET = 18
# Precision names; float32/float16/bfloat16 (and float, half) are accepted as aliases.
DTYPES = ("fp32", "bf16", "fp16")
# DeiT III's LayerScale starts here: the release's models_v2 (init_scale=1e-4); timm's deit3_* say 1e-6.
LAYER_SCALE_INIT = 1e-4
DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}


def dtype_name(name: str, *, allowed: tuple[str, ...] = DTYPES) -> str:
    """The canonical precision name (fp32, bf16, fp16) for a name or alias."""
    key = name.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise UsageError(f"unknown precision {name!r}; use {', '.join(allowed)}")
    return key


def check_threshold(threshold: float | None) -> float | None:
    """A multi-label threshold as given (None: the model's), refused outside [0, 1]."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], not {threshold:g}")
    return threshold


def parse_top(spec: str | Sequence[int], num_classes: int | None = None) -> tuple[int, ...]:
    """The k of top-k accuracies: "1,5" -> (1, 5), sorted, unique, each at least 1 (and at
    most `num_classes`)."""
    if isinstance(spec, str):
        try:
            ks = [int(p) for p in spec.replace(" ", "").split(",") if p]
        except ValueError:
            raise UsageError(f"--topk must be a comma-separated list of integers, not {spec!r}") from None
    else:
        ks = list(spec)
    if not ks or min(ks) < 1:
        raise UsageError(f"--topk needs positive integers, not {spec!r}")
    if num_classes is not None and max(ks) > num_classes:
        raise UsageError(f"--topk {max(ks)} is more than the model's {num_classes} classes")
    return tuple(sorted(set(ks)))


def pool_name(name: str) -> str:
    """The canonical pool name for a name or alias (mean -> avg)."""
    key = POOL_ALIASES.get(name, name)
    if key not in POOLS:
        raise UsageError(f"unknown pool {name!r}; use one of {', '.join(POOLS)}")
    return key


@dataclass(frozen=True)
class DeiTConfig:
    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = True  # a distillation token after the class token
    dist_head: bool = True  # distilled only: False for transformers' DeiTForImageClassification
    num_classes: int = 1000  # 0 = headless: forward() returns pooled features
    layer_norm_eps: float = 1e-6  # timm and the original release; transformers' configs say 1e-12
    in_chans: int = 3
    # DeiT III (models_v2.vit_models, timm's deit3_*): a learned per-channel scale on both residual
    # branches of every block, initialised to this value (the release's 1e-4; timm's deit3_* say 1e-6);
    # None: no LayerScale, as DeiT
    layer_scale_init: float | None = None
    # False (DeiT III): the position embedding covers the patch tokens only and is added before the
    # class token is prepended (timm's no_embed_class=True); True: it covers the prefix tokens too
    pos_embed_prefix: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.layer_scale_init is not None and not self.layer_scale_init > 0:
            raise ValueError(f"layer_scale_init must be positive (or None), not {self.layer_scale_init}")

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a position embedding: all of them, or none (DeiT III)."""
        return self.num_prefix_tokens if self.pos_embed_prefix else 0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def has_dist_head(self) -> bool:
        return self.distilled and self.dist_head and self.num_classes > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DeiTConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DeiTConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def macs_per_image(self) -> int:
        """Multiply-accumulates of one forward pass (what published tables call FLOPs)."""
        n, d, h = self.num_patches + self.num_prefix_tokens, self.embed_dim, self.mlp_dim
        patch = self.num_patches * d * self.in_chans * self.patch_size**2
        per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * h
        heads = d * self.num_classes * (2 if self.has_dist_head else 1)
        return patch + self.depth * per_block + heads


@lru_cache(maxsize=None)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order."""
    return tuple(resources.files("deit_cli").joinpath("data/imagenet_classes.txt").read_text().splitlines())


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids (n01440764, ...), in class-index order."""
    return tuple(resources.files("deit_cli").joinpath("data/imagenet_wnids.txt").read_text().splitlines())


def default_labels(num_classes: int) -> list[str]:
    """ImageNet's names for 1000 classes; class_0, class_1, ... otherwise."""
    if num_classes == 1000:
        return list(imagenet_classes())
    return [f"class_{i}" for i in range(num_classes)]
