"""The published evaluation transform, pixel-identical to torchvision's (and transformers'
squash variant): PIL RGB image -> normalised float32 tensor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..variants import Preprocessing

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Above this many resized pixels (a 1x10000 strip would be 256x2,560,000) only the crop
# window is resampled (PIL's resize box). That path is not bit-identical to a full resize
# (within a few levels), so normal aspect ratios, far below it, never take it.
_FULL_RESIZE_MAX_PIXELS = 16 * 1024 * 1024


class EvalTransform:
    """PIL RGB image -> normalised float32 tensor (3, size, size): the evaluation transform.

    "shorter" is, pixel for pixel, torchvision's Resize(int(size / crop_pct), bicubic) +
    CenterCrop(size) + ToTensor() + Normalize(mean, std). "squash" is transformers'
    DeiTImageProcessor (PIL backend): both sides to int(size / crop_pct), center crop.
    """

    def __init__(
        self,
        image_size: int,
        resize_size: int,
        *,
        resize_mode: str = "shorter",
        interpolation: str = "bicubic",
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        if resize_mode not in ("shorter", "squash"):
            raise ValueError(f"resize_mode must be 'shorter' or 'squash', not {resize_mode!r}")
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"unknown interpolation {interpolation!r}")
        self.image_size = image_size
        self.resize_size = resize_size
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self._filter = _PIL_FILTERS[interpolation]
        # One float32 value per (channel, byte), computed with the same float32 operations
        # in the same order as ToTensor + Normalize, so a lookup gives identical bits.
        v = np.arange(256, dtype=np.float32) / np.float32(255)
        m = np.asarray(mean, dtype=np.float32)[:, None]
        s = np.asarray(std, dtype=np.float32)[:, None]
        self._lut = (v[None, :] - m) / s  # (3, 256)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(size={self.image_size}, resize={self.resize_size}, "
            f"mode={self.resize_mode!r}, interpolation={self.interpolation!r})"
        )

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        s = self.image_size
        if self.resize_mode == "squash":
            top, left = (h - s) // 2, (w - s) // 2  # transformers' center_crop
        else:
            # torchvision's center_crop: pads with zeros (split floor/ceil) when too small.
            top = -((s - h) // 2) if s > h else int(round((h - s) / 2.0))
            left = -((s - w) // 2) if s > w else int(round((w - s) / 2.0))
        return left, top, left + s, top + s  # PIL's crop fills outside pixels with 0

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize step, before the crop."""
        r = self.resize_size
        if self.resize_mode == "squash":
            return r, r
        # torchvision's _compute_resized_output_size for an int size.
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = r, int(r * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def crop_image(self, img: Image.Image) -> Image.Image:
        """The resized and center-cropped PIL image (before tensor conversion)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        nw, nh = self.resized_size(w, h)
        box = self._crop_box(nw, nh)
        s = self.image_size
        if nw * nh > _FULL_RESIZE_MAX_PIXELS and box[0] >= 0 and box[1] >= 0:
            sx, sy = w / nw, h / nh
            src = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            return img.resize((s, s), self._filter, box=src)
        if (nw, nh) != (w, h):  # torchvision returns the image untouched when sizes match
            img = img.resize((nw, nh), self._filter)
        return img.crop(box)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(self.crop_image(img))  # (H, W, 3) uint8
        out = np.empty((3, *a.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], a[:, :, c], out=out[c])
        return torch.from_numpy(out)


def eval_transform(
    pre: Preprocessing, *, crop_pct: float | None = None, resize_mode: str | None = None
) -> EvalTransform:
    """The evaluation transform for a model's preprocessing (optionally overriding
    crop_pct or resize_mode): PIL RGB image -> float32 tensor (3, size, size)."""
    pct = pre.crop_pct if crop_pct is None else crop_pct
    if not 0.0 < pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], not {pct}")
    return EvalTransform(
        pre.image_size,
        int(pre.image_size / pct),
        resize_mode=resize_mode or pre.resize_mode,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
    )
