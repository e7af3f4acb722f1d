"""Training transforms and batch mixing, each driven by an explicit random generator.

`train_transform` is the original release's `build_transform(is_train=True)`: random
resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic), horizontal flip, RandAugment
(timm's "rand-m9-mstd0.5-inc1": two of fifteen operations, each with probability 0.5,
magnitude 9 with noise 0.5), normalisation, then random erasing (per-pixel noise). Every
random choice comes from the sample's own `random.Random`, never a global generator, so
augmentation is reproducible whatever the number of decoding threads or processes.

`Mixup` is timm's batch-wise mixup/cutmix (switch probability 0.5, label smoothing folded
into the soft targets), driven by a generator seeded per step.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ...images.transform import EvalTransform, eval_transform
from ...variants import Preprocessing

_FILL = (128, 128, 128)
_BICUBIC = Image.Resampling.BICUBIC


class PlainTransform:
    """The model's eval transform, taking (and ignoring) the sample's generator."""

    def __init__(self, pre: Preprocessing):
        self.eval = eval_transform(pre)
        self.image_size = pre.image_size

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.eval(image)


def _rrc_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, with our generator."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


# RandAugment's operations, timm's "increasing" set: (name, op(img, level in [0, 1], sign)).
def _affine(img, matrix):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)


_OPS = {
    "AutoContrast": lambda img, v, s: ImageOps.autocontrast(img),
    "Equalize": lambda img, v, s: ImageOps.equalize(img),
    "Invert": lambda img, v, s: ImageOps.invert(img),
    "Rotate": lambda img, v, s: img.rotate(s * 30 * v, resample=Image.Resampling.BILINEAR, fillcolor=_FILL),
    "PosterizeIncreasing": lambda img, v, s: ImageOps.posterize(img, max(1, 4 - int(4 * v))),
    "SolarizeIncreasing": lambda img, v, s: ImageOps.solarize(img, 256 - int(256 * v)),
    "SolarizeAdd": lambda img, v, s: _solarize_add(img, int(110 * v)),
    "ColorIncreasing": lambda img, v, s: ImageEnhance.Color(img).enhance(1 + s * 0.9 * v),
    "ContrastIncreasing": lambda img, v, s: ImageEnhance.Contrast(img).enhance(1 + s * 0.9 * v),
    "BrightnessIncreasing": lambda img, v, s: ImageEnhance.Brightness(img).enhance(1 + s * 0.9 * v),
    "SharpnessIncreasing": lambda img, v, s: ImageEnhance.Sharpness(img).enhance(1 + s * 0.9 * v),
    "ShearX": lambda img, v, s: _affine(img, (1, s * 0.3 * v, 0, 0, 1, 0)),
    "ShearY": lambda img, v, s: _affine(img, (1, 0, 0, s * 0.3 * v, 1, 0)),
    "TranslateXRel": lambda img, v, s: _affine(img, (1, 0, s * 0.45 * v * img.size[0], 0, 1, 0)),
    "TranslateYRel": lambda img, v, s: _affine(img, (1, 0, 0, 0, 1, s * 0.45 * v * img.size[1])),
}


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * 3)


def parse_rand_augment(spec: str) -> tuple[int, float, float]:
    """(ops per image, magnitude, magnitude noise) of a timm spelling "rand-m9-mstd0.5-inc1"."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"not a RandAugment spec: {spec!r}")
    n, m, mstd = 2, 9.0, 0.0
    for part in parts[1:]:
        if part.startswith("mstd"):
            mstd = float(part[4:])
        elif part.startswith("m"):
            m = float(part[1:])
        elif part.startswith("n"):
            n = int(part[1:])
    return n, m, mstd


class RandAugment:
    def __init__(self, spec: str):
        self.num_ops, self.magnitude, self.mstd = parse_rand_augment(spec)
        self.names = list(_OPS)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for name in rng.sample(self.names, self.num_ops):
            if rng.random() > 0.5:
                continue
            m = self.magnitude if self.mstd <= 0 else rng.gauss(self.magnitude, self.mstd)
            level = min(10.0, max(0.0, m)) / 10.0
            sign = -1 if rng.random() < 0.5 else 1
            img = _OPS[name](img, level, sign)
        return img


class TrainTransform:
    """The augmented training transform: (image, generator) -> float32 (3, size, size)."""

    def __init__(self, pre: Preprocessing, *, rand_augment: str | None, reprob: float):
        self.image_size = pre.image_size
        self.rand_augment = RandAugment(rand_augment) if rand_augment else None
        self.reprob = reprob
        # normalisation through the eval transform's lookup table (identical arithmetic)
        self._norm = EvalTransform(pre.image_size, pre.image_size, mean=pre.mean, std=pre.std)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        s = self.image_size
        box = _rrc_box(*image.size, rng)
        img = image.resize((s, s), _BICUBIC, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        x = self._norm(img)
        if self.reprob and rng.random() < self.reprob:
            _erase(x, rng)
        return x


_ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def _erase(x: torch.Tensor, rng: random.Random, scale=(0.02, 1 / 3), log_ratio=_ERASE_LOG_RATIO):
    """timm's RandomErasing (mode "pixel", one region): a box of normal noise."""
    _, h, w = x.shape
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if ew < w and eh < h:
            top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
            noise = np.random.default_rng(rng.getrandbits(63)).standard_normal((x.shape[0], eh, ew), dtype=np.float32)
            x[:, top : top + eh, left : left + ew] = torch.from_numpy(noise)
            return


def build_transform(pre: Preprocessing, recipe) -> PlainTransform | TrainTransform:
    if not recipe.augment:
        return PlainTransform(pre)
    return TrainTransform(pre, rand_augment=recipe.rand_augment, reprob=recipe.reprob)


class Mixup:
    """timm's Mixup (mode "batch"): mixup with Beta(mixup, mixup), or cutmix with
    Beta(cutmix, cutmix) and a box, switching with probability `switch_prob`; the batch
    mixed with itself reversed; targets one-hot, smoothed, mixed by the same weight.
    Multi-hot targets ((B, classes) float, multi-label) are mixed by the same weight as
    they are (no smoothing)."""

    def __init__(self, mixup: float, cutmix: float, switch_prob: float, smoothing: float, num_classes: int):
        self.mixup, self.cutmix, self.switch_prob = mixup, cutmix, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, x: torch.Tensor, target: torch.Tensor, rng: np.random.Generator):
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        if use_cutmix:
            _, _, h, w = x.shape
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
        if target.ndim == 2:  # multi-hot (multi-label)
            y = target.float()
        else:
            off = self.smoothing / self.num_classes
            on = 1 - self.smoothing + off
            y = torch.full((target.shape[0], self.num_classes), off, device=target.device)
            y.scatter_(1, target.unsqueeze(1), on)
        return x, y * lam + y.flip(0) * (1 - lam)
