"""The released DeiT models as data: architecture numbers, where the weights live,
the evaluation transform they were published with, and their published accuracy.

No torch here, so `deit models` and completion stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DeiTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # the original release: shorter side to int(size / 0.875), then crop


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
    top5: float
    aliases: tuple[str, ...] = ()
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

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


# Published numbers: the DeiT paper / model cards (accuracy); mmpretrain's table (params, MACs).
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
    """The released variant with this architecture (whatever its head), if there is one."""
    for v in VARIANTS:
        c = v.config
        if (c.embed_dim, c.depth, c.num_heads, c.distilled, c.image_size, c.patch_size, c.mlp_ratio) == (
            config.embed_dim,
            config.depth,
            config.num_heads,
            config.distilled,
            config.image_size,
            config.patch_size,
            config.mlp_ratio,
        ):
            return v
    return None


def all_names() -> list[str]:
    """Every name a user may type: registry names and aliases (for completion and help)."""
    return [n for v in VARIANTS for n in (v.name, *v.aliases)]
