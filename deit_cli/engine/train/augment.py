"""Training transforms and batch mixing, each driven by an explicit random generator.

`TrainTransform` is the original release's `build_transform(is_train=True)`, timm's
`create_transform(..., auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")`:
random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic), horizontal flip, RandAugment
(two of fifteen operations drawn with replacement, each applied with probability 0.5 at
magnitude 9 with noise 0.5; affine operations bicubic, filled with the mean colour),
normalisation, then random erasing (per-pixel noise). Every random choice comes from the
sample's own `random.Random`, never a global generator, so augmentation is reproducible
whatever the number of decoding threads or processes; given the same draws, each step
computes what timm's does (tests/test_augment_parity.py).

The transforms stop at the augmented image: they return it as uint8 (3, size, size), so
batches travel to the device at a quarter of float32's bytes. There `normalize` makes the
float32 values the eval transform's lookup table gives (the same float32 operations in the
same order), and `erase_batch` applies random erasing, whose decision, box and noise seed
the sample's generator drew in the transform (`erase_params`), where timm draws them.

`ThreeAugment` is DeiT III's (the release's augment.py, `--ThreeAugment`): random resized
crop (or, with `simple_crop`, resize and a reflect-padded 4-pixel random crop) and flip, then
one of grayscale, solarization or Gaussian blur chosen uniformly, then colour jitter;
each op calls the library op the release calls, on draws from the sample's generator
(tests/test_deit3_train.py).

The cropping transforms work in two steps, so that a large JPEG need not be decoded at
full size: `draw(width, height, rng)` makes the crop's draws from the image's size alone
(the first draws of the sample, as timm makes them), `reduction` says by how much the image
may be decoded reduced with the crop still covering the output size, and `finish(image,
drawn, rng, reduced)` does the rest on the pixels, where `reduced` maps full-size boxes to
an image decoded at reduced scale (`Decoded.region`). Called as `transform(image, rng)`,
they do both steps on a full-size image: timm's pixels.

`Mixup` is timm's batch-wise mixup/cutmix (switch probability 0.5, label smoothing folded
into the soft targets), driven by a generator seeded per step.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ...errors import UsageError
from ...images.transform import eval_transform
from ...variants import Preprocessing

_BICUBIC = Image.Resampling.BICUBIC

Box = tuple[int, int, int, int]  # (left, top, right, bottom)
Reduced = Callable[[Box], tuple[float, float, float, float]]  # full-size box -> a reduced image's (Decoded.region)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image's pixels as a uint8 (3, H, W) tensor (RGB)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 (x / 255 - mean) / std, on x's device: the
    float32 operations of ToTensor + Normalize in their order (true divisions by tensors,
    never a multiplication by a reciprocal), so the values of the eval transform's lookup
    table bit for bit. `mean` and `std` are float32 tensors of shape (3, 1, 1)."""
    x = x.to(torch.float32)
    x.div_(torch.full((), 255.0, dtype=torch.float32, device=x.device).expand(3, 1, 1))
    return x.sub_(mean).div_(std)


def norm_tensors(pre: Preprocessing, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of `pre` as float32 (3, 1, 1) tensors for `normalize`."""
    shape = (3, 1, 1)
    return (
        torch.tensor(pre.mean, dtype=torch.float32, device=device).reshape(shape),
        torch.tensor(pre.std, dtype=torch.float32, device=device).reshape(shape),
    )


class PlainTransform:
    """The model's eval transform (resize, center crop), taking (and ignoring) the
    sample's generator: uint8 (3, size, size), to be normalised on the device."""

    def __init__(self, pre: Preprocessing):
        self.eval = eval_transform(pre)
        self.image_size = pre.image_size

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return to_uint8(self.eval.crop_image(image))


def rrc_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """timm's RandomResizedCropAndInterpolation.get_params (the same draws in the same
    order) as a (left, top, right, bottom) box."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        # timm has no 0 < check: an empty crop of a tiny image would fail in its resize
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


def reduction(box: Box, size: int) -> int:
    """The largest n such that `box`, 1/n as large, still covers `size` pixels each way: the
    image may be decoded at 1/n and the crop's resize to `size` is still no upscale."""
    left, top, right, bottom = box
    return min(right - left, bottom - top) // size


def resized_crop(image: Image.Image, box: Box, size: int, reduced: Reduced | None = None) -> Image.Image:
    """`box` of `image` resized to `size` x `size` (bicubic). On a full-size image: crop,
    then resize, as torchvision's resized_crop (a resize with box= would read pixels beyond
    the box's edges). On an image decoded at reduced scale (`reduced` maps the box to it):
    one resize of the box's fractional region, the pixels no longer timm's anyway."""
    if reduced is None:
        return image.crop(box).resize((size, size), _BICUBIC)
    return image.resize((size, size), _BICUBIC, box=reduced(box))


# RandAugment. Magnitudes are on timm's 0-10 scale; each `_level_*` is timm's level_to_arg
# (the same arithmetic, so the same arguments), drawing its sign from our generator.
_LEVEL_DENOM = 10.0


def _negate(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _level_rotate(m, rng):
    return (_negate((m / _LEVEL_DENOM) * 30.0, rng),)


def _level_shear(m, rng):
    return (_negate((m / _LEVEL_DENOM) * 0.3, rng),)


def _level_translate_rel(m, rng):
    return (_negate((m / _LEVEL_DENOM) * 0.45, rng),)


def _level_enhance(m, rng):
    return ((m / _LEVEL_DENOM) * 1.8 + 0.1,)


def _level_enhance_increasing(m, rng):
    return (max(0.1, 1.0 + _negate((m / _LEVEL_DENOM) * 0.9, rng)),)


def _level_posterize(m, rng):
    return (int((m / _LEVEL_DENOM) * 4),)


def _level_posterize_increasing(m, rng):
    return (4 - _level_posterize(m, rng)[0],)


def _level_solarize(m, rng):
    return (min(256, int((m / _LEVEL_DENOM) * 256)),)


def _level_solarize_increasing(m, rng):
    return (256 - _level_solarize(m, rng)[0],)


def _level_solarize_add(m, rng):
    return (min(128, int((m / _LEVEL_DENOM) * 110)),)


def _posterize(img, bits, **_):
    if bits >= 8:
        return img
    if bits <= 0:
        # no bits kept: black, what Pillow gave timm when DeiT was trained (today's Pillow
        # refuses 0 bits, so timm itself now fails on PosterizeIncreasing at magnitude 10)
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def _solarize_add(img, add, threshold=128, **_):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * 3)


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


# name: (level_to_arg or None, op(img, *args, fill=, resample=))
_OPS = {
    "AutoContrast": (None, lambda img, **_: ImageOps.autocontrast(img)),
    "Equalize": (None, lambda img, **_: ImageOps.equalize(img)),
    "Invert": (None, lambda img, **_: ImageOps.invert(img)),
    "Rotate": (_level_rotate, lambda img, d, fill, resample: img.rotate(d, resample=resample, fillcolor=fill)),
    "Posterize": (_level_posterize, _posterize),
    "PosterizeIncreasing": (_level_posterize_increasing, _posterize),
    "Solarize": (_level_solarize, lambda img, t, **_: ImageOps.solarize(img, t)),
    "SolarizeIncreasing": (_level_solarize_increasing, lambda img, t, **_: ImageOps.solarize(img, t)),
    "SolarizeAdd": (_level_solarize_add, _solarize_add),
    "Color": (_level_enhance, lambda img, f, **_: ImageEnhance.Color(img).enhance(f)),
    "ColorIncreasing": (_level_enhance_increasing, lambda img, f, **_: ImageEnhance.Color(img).enhance(f)),
    "Contrast": (_level_enhance, lambda img, f, **_: ImageEnhance.Contrast(img).enhance(f)),
    "ContrastIncreasing": (_level_enhance_increasing, lambda img, f, **_: ImageEnhance.Contrast(img).enhance(f)),
    "Brightness": (_level_enhance, lambda img, f, **_: ImageEnhance.Brightness(img).enhance(f)),
    "BrightnessIncreasing": (_level_enhance_increasing, lambda img, f, **_: ImageEnhance.Brightness(img).enhance(f)),
    "Sharpness": (_level_enhance, lambda img, f, **_: ImageEnhance.Sharpness(img).enhance(f)),
    "SharpnessIncreasing": (_level_enhance_increasing, lambda img, f, **_: ImageEnhance.Sharpness(img).enhance(f)),
    "ShearX": (_level_shear, lambda img, s, **kw: _affine(img, (1, s, 0, 0, 1, 0), **kw)),
    "ShearY": (_level_shear, lambda img, s, **kw: _affine(img, (1, 0, 0, s, 1, 0), **kw)),
    "TranslateXRel": (_level_translate_rel, lambda img, p, **kw: _affine(img, (1, 0, p * img.size[0], 0, 1, 0), **kw)),
    "TranslateYRel": (_level_translate_rel, lambda img, p, **kw: _affine(img, (1, 0, 0, 0, 1, p * img.size[1]), **kw)),
}
# timm's two sets, in its order (_OPS's, less the increasing ones); "inc1" picks the second
RAND_OPS = tuple(name for name in _OPS if not name.endswith("Increasing"))
RAND_INCREASING_OPS = tuple(f"{name}Increasing" if f"{name}Increasing" in _OPS else name for name in RAND_OPS)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment fields, with its defaults: ops per image `n`, magnitude `m`
    (0-10), magnitude noise `mstd` (a normal's std; inf: uniform in [0, m]), magnitude
    ceiling `mmax` (None: 10), `inc` (the increasing set), probability `p` of each op."""

    n: int = 2
    m: int = 10
    mstd: float = 0.0
    mmax: int | None = None
    inc: bool = False
    p: float = 0.5


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """A timm spelling such as "rand-m9-mstd0.5-inc1", read as timm's rand_augment_transform
    reads it; an unknown or malformed field is a UsageError."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise UsageError(f"not a RandAugment spec: {spec!r} (it starts with 'rand', e.g. 'rand-m9-mstd0.5-inc1')")
    fields = {}
    for part in parts[1:]:
        # timm splits at the first digit ("mstd0.5" -> "mstd", "0.5")
        match = re.fullmatch(r"([a-z]*)(\d.*)", part)
        key, value = match.groups() if match else (part, "")
        try:
            if key == "mstd":
                fields["mstd"] = math.inf if float(value) > 100 else float(value)  # > 100: uniform, as timm
            elif key in ("m", "n", "mmax"):
                fields[key] = int(value)
            elif key == "inc":
                fields["inc"] = bool(int(value))
            elif key == "p":
                fields["p"] = float(value)
            else:
                raise ValueError(key)
        except ValueError:
            raise UsageError(
                f"RandAugment spec {spec!r}: unknown or malformed field {part!r} (known: m, n, mstd, mmax, inc, p)"
            ) from None
    return RandAugmentSpec(**fields)


class AugmentOp:
    """One RandAugment operation as timm's AugmentOp: applied with probability `p`, at a
    magnitude with optional noise, clipped to [0, mmax or 10]; the same draws in the same
    order (apply?, noise, sign) from the sample's generator."""

    def __init__(self, name: str, spec: RandAugmentSpec, fill: tuple[int, int, int], resample=_BICUBIC):
        self.name = name
        self.level, self.op = _OPS[name]
        self.p, self.magnitude, self.mstd = spec.p, spec.m, spec.mstd
        self.upper = spec.mmax or _LEVEL_DENOM  # timm's `magnitude_max or 10`: mmax0 means 10
        self.kwargs = {"fill": fill, "resample": resample}

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        if self.p < 1.0 and rng.random() > self.p:
            return img
        m = self.magnitude
        if self.mstd == math.inf:
            m = rng.uniform(0, m)
        elif self.mstd > 0:
            m = rng.gauss(m, self.mstd)
        m = max(0.0, min(m, self.upper))
        args = self.level(m, rng) if self.level is not None else ()
        return self.op(img, *args, **self.kwargs)


class RandAugment:
    """timm's RandAugment: `n` operations drawn uniformly with replacement (timm's
    `np.random.choice(ops, n)`), each applied in turn."""

    def __init__(self, spec: str, *, fill: tuple[int, int, int] = (128, 128, 128), resample=_BICUBIC):
        self.spec = parse_rand_augment(spec)
        names = RAND_INCREASING_OPS if self.spec.inc else RAND_OPS
        self.ops = [AugmentOp(name, self.spec, fill, resample) for name in names]

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for i in [rng.randrange(len(self.ops)) for _ in range(self.spec.n)]:
            img = self.ops[i](img, rng)
        return img


def fill_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """The affine operations' fill: the normalisation mean in 0-255 (timm's `img_mean`)."""
    return tuple(round(255 * x) for x in mean)


class TrainTransform:
    """The augmented training transform: (image, generator) -> (uint8 (3, size, size),
    random erasing's draws: `erase_params`'s (top, left, height, width, noise seed) or
    None), the erasing itself left to `erase_batch` after normalisation on the device."""

    def __init__(self, pre: Preprocessing, *, rand_augment: str | None, reprob: float):
        self.image_size = pre.image_size
        self.rand_augment = RandAugment(rand_augment, fill=fill_colour(pre.mean)) if rand_augment else None
        self.reprob = reprob

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, tuple | None]:
        return self.finish(image, self.draw(*image.size, rng), rng)

    def draw(self, width: int, height: int, rng: random.Random) -> Box:
        """The random resized crop's box, from the image's size alone (its first draws)."""
        return rrc_box(width, height, rng)

    def reduction(self, box: Box) -> int:
        return reduction(box, self.image_size)

    def finish(
        self, image: Image.Image, box: Box, rng: random.Random, reduced: Reduced | None = None
    ) -> tuple[torch.Tensor, tuple | None]:
        """The transform after `draw`: the crop, then the flip, RandAugment and erasing's draws."""
        s = self.image_size
        img = resized_crop(image, box, s, reduced)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        erase = erase_params(s, s, rng, self.reprob) if self.reprob else None
        return to_uint8(img), erase


_ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def erase_box(h: int, w: int, rng: random.Random, scale=(0.02, 1 / 3), log_ratio=_ERASE_LOG_RATIO):
    """timm's RandomErasing box (one region; the same draws in the same order):
    (top, left, height, width), or None when ten tries found none."""
    for _ in range(10):
        target = rng.uniform(*scale) * (h * w)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if ew < w and eh < h:
            return rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew
    return None


def erase_params(h: int, w: int, rng: random.Random, prob: float) -> tuple[int, int, int, int, int] | None:
    """timm's RandomErasing (mode "pixel", one region)'s draws for an (h, w) image, in its
    order: with probability `prob` a box, then the seed of its noise (timm draws the noise
    from torch's global generator; we from one seeded here): (top, left, height, width,
    seed), or None for no erasing."""
    if rng.random() > prob:
        return None
    box = erase_box(h, w, rng)
    if box is None:
        return None
    return (*box, rng.getrandbits(63))


def erase_batch(x: torch.Tensor, erase: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Random erasing in place on normalised images (n, C, H, W), on their device: for each
    row of `erase` (n, 5) int64 (top, left, height, width, seed; -1 for none), its box
    filled with standard normal noise from `generator` (one on x's device if None) seeded
    by the row's seed."""
    if generator is None:
        generator = torch.Generator(device=x.device)
    for i, (top, left, eh, ew, seed) in enumerate(erase.tolist()):
        if seed < 0:
            continue
        generator.manual_seed(seed)
        noise = torch.randn((x.shape[1], eh, ew), generator=generator, device=x.device, dtype=x.dtype)
        x[i, :, top : top + eh, left : left + ew] = noise


def simple_crop(
    img: Image.Image, size: int, top: int, left: int, *, reduced: Reduced | None = None, full_size=None
) -> Image.Image:
    """3-Augment's simple crop given its offsets into the padded image: torchvision's
    Resize(size, bicubic) (the shorter side to `size`), then RandomCrop(size, padding=4,
    padding_mode="reflect"). For an image decoded at reduced scale, `full_size` is its
    full (width, height) and `reduced` maps full-size boxes to it."""
    w, h = full_size or img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    region = reduced((0, 0, w, h)) if reduced is not None else None
    img = img.resize((size, new_long) if w <= h else (new_long, size), _BICUBIC, box=region)
    padded = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode="reflect")
    return Image.fromarray(padded[top : top + size, left : left + size])


def simple_crop_offsets(img_size: tuple[int, int], size: int, rng: random.Random) -> tuple[int, int]:
    """The (top, left) of RandomCrop in the padded, resized image (torchvision's uniform draws)."""
    w, h = img_size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)  # (w, h) after the resize
    return rng.randint(0, new[1] + 8 - size), rng.randint(0, new[0] + 8 - size)


def grayscale(img: Image.Image) -> Image.Image:
    """torchvision's Grayscale(num_output_channels=3): the luma, in three equal channels."""
    return img.convert("L").convert("RGB")


def solarize(img: Image.Image) -> Image.Image:
    """PIL's ImageOps.solarize at its default threshold, 128 (the release's Solarization)."""
    return ImageOps.solarize(img, 128)


def gaussian_blur(img: Image.Image, radius: float) -> Image.Image:
    """PIL's GaussianBlur (the release draws the radius uniformly in [0.1, 2])."""
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def color_jitter(img: Image.Image, order, brightness: float, contrast: float, saturation: float) -> Image.Image:
    """torchvision's ColorJitter on a PIL image given its draws: the four adjustments in
    `order` (a permutation of 0-3: brightness, contrast, saturation, hue; hue is off), each by
    its factor, through PIL's ImageEnhance as torchvision's PIL path does."""
    for i in order:
        if i == 0:
            img = ImageEnhance.Brightness(img).enhance(brightness)
        elif i == 1:
            img = ImageEnhance.Contrast(img).enhance(contrast)
        elif i == 2:
            img = ImageEnhance.Color(img).enhance(saturation)
    return img


class ThreeAugment:
    """DeiT III's 3-Augment: (image, generator) -> uint8 (3, size, size).

    The draws follow the release's order: the crop, the flip, the choice of op
    (RandomChoice: one `random()`), the op's own `random()` against its p=1.0, the blur's
    radius; then the jitter's order and factors, which the release draws from torch's
    generator and we from the sample's."""

    def __init__(self, pre: Preprocessing, *, color_jitter: float = 0.3, simple: bool = False):
        self.image_size, self.jitter, self.simple = pre.image_size, color_jitter, simple

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.finish(image, self.draw(*image.size, rng), rng)

    def draw(self, width: int, height: int, rng: random.Random) -> tuple[Box, tuple[int, int] | None]:
        """The crop's draws from the image's size alone: (the box that is resized, the
        simple crop's offsets or None). The simple crop resizes the whole image."""
        if self.simple:
            return (0, 0, width, height), simple_crop_offsets((width, height), self.image_size, rng)
        return rrc_box(width, height, rng), None

    def reduction(self, drawn: tuple[Box, tuple[int, int] | None]) -> int:
        return reduction(drawn[0], self.image_size)

    def finish(
        self,
        image: Image.Image,
        drawn: tuple[Box, tuple[int, int] | None],
        rng: random.Random,
        reduced: Reduced | None = None,
    ) -> torch.Tensor:
        """The transform after `draw`: the crop, then the flip, the secondary op and the jitter."""
        s = self.image_size
        box, offsets = drawn
        if offsets is not None:
            img = simple_crop(image, s, *offsets, reduced=reduced, full_size=box[2:])
        else:
            img = resized_crop(image, box, s, reduced)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = self.secondary(img, rng)
        if self.jitter:
            lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
            order = rng.sample(range(4), 4)
            img = color_jitter(img, order, rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(lo, hi))
        return to_uint8(img)

    @staticmethod
    def secondary(img: Image.Image, rng: random.Random) -> Image.Image:
        """One of grayscale, solarization or blur, with the release's draws in its order."""
        op = int(rng.random() * 3)  # random.choices' draw, as the release's RandomChoice
        rng.random()  # the op's own "apply?" draw (p=1.0: always)
        if op == 0:
            return grayscale(img)
        if op == 1:
            return solarize(img)
        return gaussian_blur(img, rng.uniform(0.1, 2.0))


def build_transform(pre: Preprocessing, recipe) -> PlainTransform | TrainTransform | ThreeAugment:
    if not recipe.augment:
        return PlainTransform(pre)
    if recipe.three_augment:
        return ThreeAugment(pre, color_jitter=recipe.color_jitter, simple=recipe.simple_crop)
    return TrainTransform(pre, rand_augment=recipe.rand_augment, reprob=recipe.reprob)


def cutmix_box(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[tuple[int, int, int, int], float]:
    """timm's rand_bbox + cutmix_bbox_and_lam(correct_lam=True) given the drawn centre:
    the box (y0, y1, x0, x1) of side sqrt(1 - lam) clipped to the image, and lam corrected
    to the share of the image outside it."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + (ch + 1) // 2, 0), h)
    x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + (cw + 1) // 2, 0), w)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


class Mixup:
    """timm's Mixup (mode "batch"): mixup with Beta(mixup, mixup), or cutmix with
    Beta(cutmix, cutmix) and a box, switching with probability `switch_prob`; the batch
    mixed with itself reversed; targets one-hot, smoothed, mixed by the same weight.
    Multi-hot targets ((B, classes) float, multi-label) are mixed by the same weight as
    they are (no smoothing). A batch of one mixes with itself: images and targets as they
    were (timm needs an even batch)."""

    def __init__(self, mixup: float, cutmix: float, switch_prob: float, smoothing: float, num_classes: int):
        self.mixup, self.cutmix, self.switch_prob = mixup, cutmix, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, x: torch.Tensor, target: torch.Tensor, rng: np.random.Generator):
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
        centre = (int(rng.integers(0, x.shape[2])), int(rng.integers(0, x.shape[3]))) if use_cutmix else None
        return self.mix(x, target, lam, centre)

    def mix(self, x: torch.Tensor, target: torch.Tensor, lam: float, centre: tuple[int, int] | None):
        """The mixing itself, given the draws: weight `lam`, and the cutmix box's centre
        (cy, cx) or None for mixup."""
        if lam != 1.0:  # timm leaves the batch alone at 1
            if centre is not None:
                (y0, y1, x0, x1), lam = cutmix_box(x.shape[2], x.shape[3], lam, *centre)
                x = x.clone()
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
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
