"""Training recipes as data: one record per recipe, every field a flag that overrides it.

The DeiT recipes (`scratch`, `finetune`, `hires`, `plain`):

| field | scratch | finetune | hires | plain |
| --- | --- | --- | --- | --- |
| epochs | 300 | 30 | 30 | 10 |
| batch_size (global) | 1024 | 64 | 512 | 64 |
| base_lr (per 512 images; `--lr` sets the peak itself) | 5e-4 | 2e-4 | 5e-6 | 2e-4 |
| min_lr | 1e-5 | 1e-6 | 5e-6 | 1e-6 |
| warmup_epochs / warmup_lr | 5 / 1e-6 | 2 / 1e-6 | 5 / 1e-6 | 0 / 1e-6 |
| weight_decay | 0.05 | 1e-8 | 1e-8 | 0.05 |
| smoothing | 0.1 | 0.1 | 0.1 | 0 |
| train transform | random resized crop, flip, RandAugment m9 mstd 0.5 | the same | the same | the eval transform |
| mixup / cutmix (switch 0.5) | 0.8 / 1.0 | 0 / 0 | 0.8 / 1.0 | 0 / 0 |
| reprob (random erasing) | 0.25 | 0.25 | 0.25 | 0 |
| drop_path | 0.1 | 0.1 | 0 (eval mode) | 0 |
| repeated_aug | 3 | 1 | 3 | 1 |
| model_ema (decay) | on (0.99996) | off | on (0.99996) | off |
| clip_grad | none | none | none | none |
| image_size | the model's | the model's | 384 | the model's |

All use AdamW (betas 0.9, 0.999; eps 1e-8), a per-step cosine schedule after a linear
warm-up, and weight decay on parameters with two or more dimensions only.
`scratch` is the paper's Table 9 and the original `main.py`; `hires` is the original README's
fine-tuning of trained weights at 384 pixels (`--input-size 384 --lr 5e-6 --weight-decay 1e-8
--epochs 30 --min-lr 5e-6`, 2 nodes of 8 GPUs at 32 images each: 512, with main.py's other
defaults, the scratch augmentation among them). That main.py fine-tuned in eval mode
(`set_training_mode=args.finetune == ''`), which for these models (no dropout, no batch
norm) only turns drop path off: `hires` sets it to 0, the same maths; `plain` exists so a run can be
checked exactly (nothing random but the data order); `finetune` is argued in the README.

The DeiT III recipes (README_revenge.md's ImageNet-1k commands; `deit3` pre-trains from
scratch, `deit3-finetune` fine-tunes B, L and H to 224 after their low-resolution
pre-training, and S to 384):

| field | deit3 | deit3-finetune |
| --- | --- | --- |
| epochs | 800 | 20 |
| batch_size (global) | 2048 | 512 |
| lr (not scaled by batch: unscale_lr) | by size | 1e-5 |
| min_lr | 1e-5 | 1e-5 (main.py's default: flat after the warm-up) |
| warmup_epochs / warmup_lr | 5 / 1e-6 | 5 / 1e-6 |
| optimizer | lamb (apex FusedLAMB's: eps 1e-8, global norm clipped to 1) | adamw |
| weight_decay | 0.05 | 0.1 |
| smoothing | 0 | 0.1 |
| train transform | 3-Augment, colour jitter 0.3 | random resized crop, flip, RandAugment m9 mstd 0.5 |
| loss | BCE on binarized mixup targets (`targets.gt(0)`) | soft-target CE |
| mixup / cutmix (switch 0.5) | 0.8 / 1.0 | 0.8 / 1.0 |
| reprob | 0 | 0 |
| drop_path (the same in every block) | by size | by size |
| repeated_aug | 3 | 1 |
| model_ema | on (main.py's default; saved beside, never reported) | off |
| image_size | by size (--scratch from a 224 model) | the model's |
| eval_crop_pct (validation) | 1.0 | 1.0 |

By size, from the model's width (embed_dim): S and M (up to 512): lr 4e-3, drop path 0.05
at 224; B (768): 3e-3, 0.2 at 192; L (1024): 3e-3, 0.45 at 192; H (wider): 3e-3, 0.6 at
160. Fine-tuning: drop path 0 for S (its 384 fine-tune), 0.2 B, 0.45 L, 0.55 H. A flag given
(`--lr`, `--drop-path`, `--image-size`) wins over the size's value. Validation uses crop
ratio 1.0, as every evaluation command of the release does (`--eval-crop-ratio 1.0`).

Fine-tuning keeps the model in train mode, as the release's `--train-mode` default does for
training and DeiT III fine-tuning: for these models (no dropout, no batch norm) that means
the recipe's drop path is active during fine-tuning. The original DeiT's 384 fine-tune
(`hires`) ran in eval mode instead (drop path off), which that recipe's drop path of 0 is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ...errors import UsageError


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int  # global: split across processes
    base_lr: float | None  # scaled by batch_size / 512 unless lr is given or unscale_lr; None: by size
    min_lr: float
    warmup_epochs: float
    warmup_lr: float
    weight_decay: float
    smoothing: float
    augment: bool  # False: the training transform is the model's eval transform
    rand_augment: str | None  # timm's spelling: "rand-m9-mstd0.5-inc1"
    mixup: float
    cutmix: float
    mixup_switch_prob: float
    reprob: float
    drop_path: float | None  # None: by the model's size (`sizes`)
    repeated_aug: int
    model_ema: bool
    ema_decay: float
    clip_grad: float | None
    lr: float | None = None  # the actual peak learning rate; None: base_lr scaled
    image_size: int | None = None  # train at this size (None: the model's; --image-size overrides)
    opt_eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # or "lamb"
    unscale_lr: bool = False  # True: base_lr is the peak whatever the batch (the release's --unscale-lr)
    three_augment: bool = False  # DeiT III's 3-Augment instead of RandAugment
    simple_crop: bool = False  # 3-Augment's --src: resize and a padded random crop, not a random resized crop
    color_jitter: float = 0.3  # with 3-Augment: brightness, contrast and saturation jitter (main.py's default)
    bce: bool = False  # binary cross-entropy on binarized targets (the release's --bce-loss)
    drop_path_schedule: str = "linear"  # or "uniform": the same rate in every block (DeiT III)
    sizes: str | None = None  # a key of SIZES: base_lr, drop_path and image_size by the model's width
    eval_crop_pct: float | None = None  # validate at this crop ratio (kept in checkpoint.pt); None: the model's

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr if self.unscale_lr else self.base_lr * self.batch_size / 512

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


SCRATCH = Recipe(
    name="scratch", epochs=300, batch_size=1024, base_lr=5e-4, min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6,
    weight_decay=0.05, smoothing=0.1, augment=True, rand_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
    mixup_switch_prob=0.5, reprob=0.25, drop_path=0.1, repeated_aug=3, model_ema=True, ema_decay=0.99996,
    clip_grad=None,
)  # fmt: skip
FINETUNE = replace(
    SCRATCH, name="finetune", epochs=30, batch_size=64, base_lr=2e-4, min_lr=1e-6, warmup_epochs=2,
    weight_decay=1e-8, mixup=0.0, cutmix=0.0, repeated_aug=1, model_ema=False,
)  # fmt: skip
PLAIN = replace(
    SCRATCH, name="plain", epochs=10, batch_size=64, base_lr=2e-4, min_lr=1e-6, warmup_epochs=0, smoothing=0.0,
    augment=False, rand_augment=None, mixup=0.0, cutmix=0.0, reprob=0.0, drop_path=0.0, repeated_aug=1,
    model_ema=False,
)  # fmt: skip
HIRES = replace(
    SCRATCH, name="hires", epochs=30, batch_size=512, base_lr=5e-6, min_lr=5e-6, weight_decay=1e-8, image_size=384,
    drop_path=0.0,
)  # fmt: skip
DEIT3 = replace(
    SCRATCH, name="deit3", epochs=800, batch_size=2048, base_lr=None, unscale_lr=True, smoothing=0.0,
    rand_augment=None, three_augment=True, reprob=0.0, drop_path=None,
    drop_path_schedule="uniform", optimizer="lamb", bce=True, sizes="deit3", eval_crop_pct=1.0,
)  # fmt: skip
DEIT3_FINETUNE = replace(
    SCRATCH, name="deit3-finetune", epochs=20, batch_size=512, base_lr=1e-5, unscale_lr=True, weight_decay=0.1,
    reprob=0.0, drop_path=None, drop_path_schedule="uniform", repeated_aug=1, model_ema=False,
    sizes="deit3-finetune", eval_crop_pct=1.0,
)  # fmt: skip
RECIPES = {r.name: r for r in (SCRATCH, FINETUNE, HIRES, PLAIN, DEIT3, DEIT3_FINETUNE)}

# By the model's width: (widest embed_dim, base_lr, drop_path, image_size for a 224 model
# trained from scratch or None), from README_revenge.md's commands.
SIZES = {
    "deit3": ((512, 4e-3, 0.05, None), (768, 3e-3, 0.2, 192), (1024, 3e-3, 0.45, 192), (math.inf, 3e-3, 0.6, 160)),
    "deit3-finetune": ((512, 1e-5, 0.0, None), (768, 1e-5, 0.2, None), (1024, 1e-5, 0.45, None),
                       (math.inf, 1e-5, 0.55, None)),
}  # fmt: skip


def for_model(recipe: Recipe, config, *, scratch: bool) -> Recipe:
    """The recipe with its by-size values (those still None) filled from the model's
    `config`; a recipe without sizes as it is."""
    if recipe.sizes is None:
        return recipe
    _, base_lr, drop_path, image_size = next(row for row in SIZES[recipe.sizes] if config.embed_dim <= row[0])
    changes = {}
    if recipe.base_lr is None:
        changes["base_lr"] = base_lr
    if recipe.drop_path is None:
        changes["drop_path"] = drop_path
    if recipe.image_size is None and image_size and scratch and config.image_size == 224:
        changes["image_size"] = image_size
    out = replace(recipe, **changes)
    _check(out)
    return out


def resolve_recipe(name: str, overrides: dict) -> Recipe:
    """The recipe `name` with every non-None override applied (flag names as fields)."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    known = {f.name for f in fields(Recipe)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"not recipe fields: {', '.join(sorted(unknown))}")
    recipe = replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UsageError(what)

    need(r.epochs >= 1, f"--epochs must be at least 1, not {r.epochs}")
    need(r.batch_size >= 1, f"--batch-size must be at least 1, not {r.batch_size}")
    need(r.optimizer in ("adamw", "lamb"), f"--optimizer must be adamw or lamb, not {r.optimizer!r}")
    need(r.lr is None or r.lr > 0, "--lr must be positive")
    need(r.base_lr is None or r.lr is not None or r.peak_lr() > 0, "--lr must be positive")
    need(r.min_lr >= 0 and r.warmup_lr >= 0, "--min-lr and --warmup-lr must not be negative")
    need(r.warmup_epochs >= 0, "--warmup-epochs must not be negative")
    need(r.weight_decay >= 0, "--weight-decay must not be negative")
    need(0 <= r.smoothing < 1, "--smoothing must be in [0, 1)")
    need(r.mixup >= 0 and r.cutmix >= 0, "--mixup and --cutmix must not be negative")
    need(0 <= r.reprob <= 1, "--reprob must be in [0, 1]")
    if r.rand_augment:
        from .augment import parse_rand_augment  # a UsageError for a bad spec, before any data is read

        parse_rand_augment(r.rand_augment)
    need(r.drop_path is None or 0 <= r.drop_path < 1, "--drop-path must be in [0, 1)")
    need(r.drop_path_schedule in ("linear", "uniform"), "--drop-path-schedule must be linear or uniform")
    need(not r.simple_crop or r.three_augment, "--simple-crop is 3-Augment's crop; give it with --three-augment")
    need(r.eval_crop_pct is None or 0 < r.eval_crop_pct <= 1, "--eval-crop-ratio must be in (0, 1]")
    need(r.color_jitter >= 0, "--color-jitter must not be negative")
    need(
        not (r.bce and r.smoothing),
        f"--bce-loss needs --smoothing 0, not {r.smoothing:g} (smoothed, every mixed target is above 0, so the "
        "binarized targets would all be 1)",
    )
    need(r.repeated_aug >= 1, "--repeated-aug must be at least 1")
    need(0 < r.ema_decay < 1, "--model-ema-decay must be in (0, 1)")
    need(r.clip_grad is None or r.clip_grad > 0, "--clip-grad must be positive")
