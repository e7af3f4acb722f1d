"""The released DeiT and DeiT III models as data: architecture numbers, where the weights
live, the evaluation transform they were published with, and their published accuracy.

No torch here, so `deit models` and completion stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import LAYER_SCALE_INIT, DeiTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # the original release: shorter side to int(size / 0.875), then crop
# DeiT III is evaluated uncropped: every command of the release's README_revenge.md passes
# `--eval-crop-ratio 1.0`, which is how its published top-1 were measured. timm's pretrained_cfg
# says 0.9 for the ImageNet-1k weights at 224 (1.0 for the others); the release's numbers win here.
DEIT3_CROP_PCT = 1.0
DEIT3_CROP_SOURCE = "crop 1.0: README_revenge.md's --eval-crop-ratio 1.0 (timm's cfg: 0.9 for in1k at 224)"


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform of a model.

    resize_mode "shorter": the shorter side to int(image_size / crop_pct), aspect kept,
    then a center crop (the original DeiT evaluation). "squash": both sides to
    int(image_size / crop_pct), then a center crop (transformers' DeiTImageProcessor).
    """

    image_size: int = 224
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shorter"

    @property
    def resize_size(self) -> int:
        return int(self.image_size / self.crop_pct)

    def to_dict(self) -> dict:
        """Plain data (JSON, a checkpoint's weights-only pickle)."""
        return {
            "image_size": self.image_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The inverse of `to_dict`; raises ValueError, TypeError or KeyError on bad data."""
        return cls(
            image_size=int(d["image_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize_mode=str(d.get("resize_mode", "shorter")),
        )


@dataclass(frozen=True)
class Variant:
    """A released model: its architecture, where its weights live, how it was evaluated,
    and what it scored."""

    name: str  # the timm / original-release name
    hub_repo: str
    config: DeiTConfig
    params_m: float  # published parameter count, millions
    gmacs: float  # published "GFLOPs" (multiply-accumulates), per image
    top1: float  # published ImageNet-1k top-1 / top-5, percent
    top5: float | None  # None: not published (DeiT III's README gives top-1 only)
    aliases: tuple[str, ...] = ()
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    family: str = "DeiT"  # "DeiT" or "DeiT III"
    pretrain: str = "in1k"  # the weights: "in1k", or "in22k-ft-in1k" (ImageNet-21k, fine-tuned on 1k)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def distilled(self) -> bool:
        return self.config.distilled


def _v(name, repo, dim, heads, distilled, size, params, gmacs, top1, top5, aliases):
    config = DeiTConfig(
        image_size=size, patch_size=16, embed_dim=dim, depth=12, num_heads=heads, distilled=distilled, num_classes=1000
    )
    return Variant(
        name=name,
        hub_repo=repo,
        config=config,
        params_m=params,
        gmacs=gmacs,
        top1=top1,
        top5=top5,
        aliases=aliases,
        preprocessing=Preprocessing(image_size=size),
    )


def _v3(name, size, patch, dim, depth, heads, params, gmacs, top1_1k, top1_21k, alias):
    """Both weight sets of a DeiT III architecture: ImageNet-1k (timm's default tag, so the bare
    timm name is its) and ImageNet-21k fine-tuned on 1k."""
    config = DeiTConfig(
        image_size=size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        distilled=False,
        num_classes=1000,
        layer_scale_init=LAYER_SCALE_INIT,
        pos_embed_prefix=False,
    )
    pre = Preprocessing(image_size=size, crop_pct=DEIT3_CROP_PCT)
    common = dict(config=config, params_m=params, gmacs=gmacs, top5=None, preprocessing=pre, family="DeiT III")
    return (
        Variant(
            name=name,
            hub_repo=f"timm/{name}.fb_in1k",
            top1=top1_1k,
            aliases=(f"{name}.fb_in1k", alias),
            pretrain="in1k",
            **common,
        ),
        Variant(
            name=f"{name}.fb_in22k_ft_in1k",
            hub_repo=f"timm/{name}.fb_in22k_ft_in1k",
            top1=top1_21k,
            # timm's deprecated name for the same weights, then ours
            aliases=(f"{name}_in21ft1k", f"{alias}-21k"),
            pretrain="in22k-ft-in1k",
            **common,
        ),
    )


# Published numbers: the DeiT paper / model cards (accuracy); mmpretrain's table (params, MACs).
# DeiT III: the release's README_revenge.md (facebookresearch/deit), both tables ("ImageNet-1k
# pre-training", "ImageNet-21k pre-training": #params, GFLOPs, acc@1 on ImageNet-1k); no top-5 there.
VARIANTS: tuple[Variant, ...] = (
    _v("deit_tiny_patch16_224", "facebook/deit-tiny-patch16-224", 192, 3, False, 224,
       5.72, 1.26, 72.2, 91.1, ("deit-tiny",)),
    _v("deit_small_patch16_224", "facebook/deit-small-patch16-224", 384, 6, False, 224,
       22.05, 4.61, 79.9, 95.0, ("deit-small",)),
    _v("deit_base_patch16_224", "facebook/deit-base-patch16-224", 768, 12, False, 224,
       86.57, 17.58, 81.8, 95.6, ("deit-base",)),
    _v("deit_tiny_distilled_patch16_224", "facebook/deit-tiny-distilled-patch16-224", 192, 3,
       True, 224, 5.91, 1.27, 74.5, 91.9, ("deit-tiny-distilled",)),
    _v("deit_small_distilled_patch16_224", "facebook/deit-small-distilled-patch16-224", 384, 6,
       True, 224, 22.44, 4.63, 81.2, 95.4, ("deit-small-distilled",)),
    _v("deit_base_distilled_patch16_224", "facebook/deit-base-distilled-patch16-224", 768, 12,
       True, 224, 87.34, 17.67, 83.4, 96.5, ("deit-base-distilled",)),
    _v("deit_base_patch16_384", "facebook/deit-base-patch16-384", 768, 12, False, 384,
       86.86, 55.54, 82.9, 96.2, ("deit-base-384",)),
    _v("deit_base_distilled_patch16_384", "facebook/deit-base-distilled-patch16-384", 768, 12,
       True, 384, 87.63, 55.65, 85.2, 97.2, ("deit-base-distilled-384",)),
    #    timm name                  size patch  dim depth heads params  GFLOPs 1k    21k   alias
    *_v3("deit3_small_patch16_224",  224, 16,  384, 12,  6,    22.0,   4.6,  81.4, 83.1, "deit3-small"),
    *_v3("deit3_small_patch16_384",  384, 16,  384, 12,  6,    22.0,  15.5,  83.4, 84.8, "deit3-small-384"),
    *_v3("deit3_medium_patch16_224", 224, 16,  512, 12,  8,    38.8,   8.0,  83.0, 84.5, "deit3-medium"),
    *_v3("deit3_base_patch16_224",   224, 16,  768, 12, 12,    86.6,  17.5,  83.8, 85.7, "deit3-base"),
    *_v3("deit3_base_patch16_384",   384, 16,  768, 12, 12,    86.9,  55.5,  85.0, 86.7, "deit3-base-384"),
    *_v3("deit3_large_patch16_224",  224, 16, 1024, 24, 16,   304.4,  61.6,  84.9, 87.0, "deit3-large"),
    *_v3("deit3_large_patch16_384",  384, 16, 1024, 24, 16,   304.8, 191.2,  85.8, 87.7, "deit3-large-384"),
    *_v3("deit3_huge_patch14_224",   224, 14, 1280, 32, 16,   632.1, 167.4,  85.2, 87.2, "deit3-huge"),
)  # fmt: skip

DEFAULT_MODEL = "facebook/deit-tiny-distilled-patch16-224"


def _index() -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for v in VARIANTS:
        for key in (v.name, v.hub_repo, *v.aliases):
            out[key.lower()] = v
    return out


_BY_NAME = _index()


def find_variant(name: str) -> Variant | None:
    """The variant for a registry name, alias or hub repo id (case-insensitive), or None."""
    return _BY_NAME.get(name.split("@", 1)[0].strip().lower())


def variant_for_config(config: DeiTConfig) -> Variant | None:
    """The released variant with this architecture (whatever its head), if there is one; for
    DeiT III, whose two weight sets share one, the ImageNet-1k one."""

    def key(c: DeiTConfig) -> tuple:
        arch = (c.embed_dim, c.depth, c.num_heads, c.distilled, c.image_size, c.patch_size, c.mlp_ratio)
        return (*arch, c.layer_scale_init is not None, c.pos_embed_prefix)

    return next((v for v in VARIANTS if key(v.config) == key(config)), None)


def all_names() -> list[str]:
    """Every name a user may type: registry names and aliases (for completion and help)."""
    return [n for v in VARIANTS for n in (v.name, *v.aliases)]
