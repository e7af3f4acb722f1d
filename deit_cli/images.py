"""Images: find the inputs, decode them safely, apply the evaluation transform, batch them.

This layer knows nothing about checkpoints, models or the terminal. Every failure of
one input is data (an `InputItem.error`, an `ImageError`, an entry in `Batch.failed`),
never a reason to stop the others.
"""

from __future__ import annotations

import glob
import io
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from deit_cli._version import __version__
from deit_cli.errors import EXIT_DATA, EXIT_NO_INPUT, DeiTError, InputNotFound
from deit_cli.variants import Preprocessing

__all__ = [
    "IMAGE_EXTENSIONS",
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "InputItem",
    "Decoded",
    "Batch",
    "ImageError",
    "ImageNotFound",
    "EvalTransform",
    "iter_inputs",
    "decode_image",
    "eval_transform",
    "iter_batches",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow's format names
# Pillow's own default limit (about a quarter GiB of RGB): larger is treated as a bomb.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_URL_TIMEOUT = 10.0  # seconds, for the whole download
DEFAULT_URL_MAX_BYTES = 50 * 1024 * 1024
_GLOB_CHARS = frozenset("*?[")


class ImageError(DeiTError):
    """An input that cannot be decoded: not an allowed image, corrupt, too big, unreachable."""

    exit_code = EXIT_DATA


class ImageNotFound(ImageError, InputNotFound):
    """An input that does not exist or cannot be read (an ImageError with exit code 66)."""

    exit_code = EXIT_NO_INPUT


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class InputItem:
    """One input: `path` as the user wrote it (also the display key), or an error."""

    path: str
    url: bool = False
    error: str | None = None


def _is_url(spec: str) -> bool:
    return spec[:8].lower().startswith(("http://", "https://"))


def _walk_images(top: str) -> Iterator[InputItem]:
    """Image files under `top`, depth first, each directory's entries sorted by name.

    Hidden entries are skipped: `._IMG.jpg` (macOS metadata) and `.git` are never images.
    Symlinked directories are not followed, so a link loop cannot make this endless.
    """
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield InputItem(top, error=f"{top}: cannot list directory: {exc.strerror or exc}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk_images(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            yield InputItem(entry.path)


def _expand(spec: str, *, allow_glob: bool) -> Iterator[InputItem]:
    if _is_url(spec):
        yield InputItem(spec, url=True)
    elif os.path.isdir(spec):
        found = False
        for item in _walk_images(spec):
            found = True
            yield item
        if not found:
            yield InputItem(spec, error=f"no images in {spec}")
    elif os.path.lexists(spec):
        # A named file is taken whatever its extension: the decoder sniffs its bytes.
        yield InputItem(spec)
    elif allow_glob and _GLOB_CHARS & set(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            yield InputItem(spec, error=f"{spec}: no files match")
        for match in matches:
            yield from _expand(match, allow_glob=False)
    else:
        yield InputItem(spec, error=f"{spec}: no such file or directory")


def _read_stdin_paths(stream: TextIO | BinaryIO, null_separated: bool) -> Iterator[str]:
    """Paths from a stream, one per line or NUL-separated, each as soon as it arrives
    (`find | deit classify -` starts before find ends)."""

    def decode(raw: bytes | str) -> str:
        # os.fsdecode keeps undecodable bytes (surrogateescape), so any file name round-trips.
        return os.fsdecode(raw) if isinstance(raw, bytes) else raw

    if not null_separated:
        for line in stream:
            line = line.rstrip("\r\n" if isinstance(line, str) else b"\r\n")  # CRLF lists too
            if line:
                yield decode(line)
        return
    raw = getattr(stream, "buffer", stream)  # a text stream's bytes, where it has them
    read = getattr(raw, "read1", raw.read)  # read1: whatever has arrived, without waiting
    pending = None
    while chunk := read(65536):
        pending = chunk if pending is None else pending + chunk
        *names, pending = pending.split(b"\0" if isinstance(chunk, bytes) else "\0")
        for name in names:
            if name:
                yield decode(name)
    if pending:
        yield decode(pending)


def iter_inputs(
    specs: Iterable[str],
    *,
    stdin: TextIO | BinaryIO | None = None,
    null_separated: bool = False,
) -> Iterator[InputItem]:
    """The inputs named by `specs`, in the order given.

    A spec is a file (taken whatever its extension), a directory (its images, recursively,
    sorted), an http(s) URL, a glob pattern (only when no such file exists) or `-`: paths
    from `stdin` (default sys.stdin), one per line or NUL-separated. Paths read from stdin
    are taken literally (never globbed). A spec that names nothing yields an item with an
    `error`, so one bad spec never stops the others.
    """
    for spec in specs:
        if spec == "-":
            stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
            for path in _read_stdin_paths(stream, null_separated):
                yield from _expand(path, allow_glob=False)
        else:
            yield from _expand(spec, allow_glob=True)


# --------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    """A decoded image, always 8-bit RGB, and notes on what was done to get it."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)
    format: str | None = None


# (magic bytes at offset 0, Pillow format). WebP is checked separately (RIFF....WEBP).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
# Formats we recognise only to name them in the refusal.
_KNOWN_OTHERS = (
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
    (b"\x7fELF", "ELF"),
)


def _sniff(head: bytes) -> str:
    """The allowed Pillow format of these leading bytes; ImageError message text otherwise."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    raise ValueError(_describe_refused(head))


def _describe_refused(head: bytes) -> str:
    if not head:
        return "empty file"
    for magic, name in _KNOWN_OTHERS:
        if head.startswith(magic):
            return f"not an allowed image format ({name})"
    if head[4:12] == b"ftypheic" or head[4:12] == b"ftypavif" or head[4:8] == b"ftyp":
        return "not an allowed image format (HEIF/AVIF/MP4 container)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "not an image (looks like text)"
    return "not an allowed image format (unrecognised)"


# Pillow's decompression-bomb check and its truncated-image switch are process-wide
# globals; these two guards scope them without changing them for anyone else for longer
# than one decode.
_open_lock = threading.Lock()


class _TruncatedSwitch:
    """Scopes ImageFile.LOAD_TRUNCATED_IMAGES to the decodes that asked for a value.

    Decodes wanting the same value run together; the two kinds take turns, so a strict
    decode never runs while the switch is on for a lenient one, and vice versa.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value: bool | None = None
        self._active = 0
        self._saved = False

    @contextmanager
    def set(self, value: bool) -> Iterator[None]:
        with self._cond:
            while self._active and self._value != value:
                self._cond.wait()
            if not self._active:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = value
                self._value = value
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self._saved
                    self._value = None
                    self._cond.notify_all()


_truncated = _TruncatedSwitch()


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of an http(s) URL, within `timeout` seconds in all and `max_bytes`."""
    request = urllib.request.Request(url, headers={"User-Agent": f"deit-cli/{__version__}"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"{url}: too large ({int(length)} bytes; limit {max_bytes})")
            chunks, total = [], 0
            while True:
                # urlopen's timeout is per socket read; the deadline bounds a slow trickle.
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = resp.read(min(65536, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"{url}: too large (over {max_bytes} bytes)")
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise ImageNotFound(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (TimeoutError, socket.timeout):
        raise ImageError(f"{url}: timed out after {timeout:g} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise ImageError(f"{url}: timed out after {timeout:g} s") from None
        raise ImageError(f"{url}: cannot fetch ({exc.reason})") from None
    except (OSError, ValueError) as exc:  # connection reset, bad URL, http.client errors
        raise ImageError(f"{url}: cannot fetch ({exc})") from None


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency on white, 16-bit scaled, not clipped."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I") or mode == "F":
        # Pillow's own convert clips 16-bit values at 255; scale them instead.
        a = np.asarray(im)
        if a.size and a.min() >= 0 and a.max() <= 65535 and mode != "F":
            a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        elif mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a8 = np.rint(a * 255.0).astype(np.uint8)
        else:
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            span = (hi - lo) or 1.0
            a8 = np.rint((a.astype(np.float64) - lo) * (255.0 / span)).astype(np.uint8)
            notes.append(f"{mode} values {lo:g}..{hi:g} scaled to 0..255")
        return Image.fromarray(np.ascontiguousarray(a8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        # Transparent pixels become white, as a viewer on a white page shows them.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _decode_stream(
    fp: BinaryIO, name: str, *, exif_transpose: bool, allow_truncated: bool, max_pixels: int
) -> Decoded:
    head = fp.read(16)
    try:
        fmt = _sniff(head)
    except ValueError as exc:
        raise ImageError(
            f"{name}: {exc}", hint="allowed: JPEG, PNG, WebP, GIF, BMP, TIFF"
        ) from None
    fp.seek(0)
    notes: list[str] = []
    with _truncated.set(allow_truncated):
        try:
            with _open_lock, warnings.catch_warnings():
                # Our own limit below decides; Pillow's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=[fmt])
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels} "
                    "(possible decompression bomb)"
                )
            frames = getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1
            if frames > 1:
                im.seek(0)
                notes.append(f"first frame of {frames}")
            im.load()  # inside the try: corrupt data must fail here, not later
            if exif_transpose:
                try:
                    ImageOps.exif_transpose(im, in_place=True)
                except Exception as exc:  # a broken EXIF block should not lose the pixels
                    notes.append(f"EXIF orientation ignored ({exc})")
            image = _to_rgb(im, notes)
            image.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            # Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS), hit while opening.
            detail = str(exc).split(",")[0]
            raise ImageError(f"{name}: possible decompression bomb ({detail})") from None
        except MemoryError:
            raise ImageError(f"{name}: out of memory decoding {fmt}") from None
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "truncated" in msg:
                raise ImageError(
                    f"{name}: truncated {fmt} file ({msg})",
                    hint="it may be incomplete; allow truncated images to decode what is there",
                ) from None
            raise ImageError(f"{name}: cannot decode {fmt} ({msg})") from None
    return Decoded(image=image, notes=notes, format=fmt)


def decode_image(
    source: InputItem | str | os.PathLike,
    *,
    exif_transpose: bool = True,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_URL_TIMEOUT,
    max_bytes: int = DEFAULT_URL_MAX_BYTES,
) -> Decoded:
    """Decode one image safely into 8-bit RGB.

    The leading bytes decide the format before Pillow sees the file; only JPEG, PNG,
    WebP, GIF, BMP and TIFF are opened. Images over `max_pixels` are refused as possible
    decompression bombs; truncated files are refused unless `allow_truncated`. EXIF
    orientation is applied (unless `exif_transpose=False`); transparency is composited on
    white; 16-bit images are scaled to 8 bits; animations give their first frame (noted).
    URLs are fetched with `timeout` seconds and `max_bytes` at most.
    Raises ImageError (or its subclass ImageNotFound) with a one-line message.
    """
    if isinstance(source, InputItem):
        if source.error:
            raise ImageNotFound(source.error)
        name, is_url = source.path, source.url
    else:
        name = os.fspath(source)
        is_url = _is_url(name)
    options = dict(exif_transpose=exif_transpose, allow_truncated=allow_truncated,
                   max_pixels=max_pixels)  # fmt: skip
    if is_url:
        data = _fetch(name, timeout, max_bytes)
        return _decode_stream(io.BytesIO(data), name, **options)
    try:
        fp = open(name, "rb")  # noqa: SIM115 - closed below, after the decode
    except FileNotFoundError:
        raise ImageNotFound(f"{name}: no such file") from None
    except PermissionError:
        raise ImageNotFound(f"{name}: permission denied") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory") from None
    except OSError as exc:
        raise ImageNotFound(f"{name}: cannot open ({exc.strerror or exc})") from None
    with fp:
        try:
            return _decode_stream(fp, name, **options)
        except OSError as exc:  # reading the header itself failed (EIO, a directory...)
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- transform

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


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Up to batch_size consecutive inputs: the decoded ones stacked, the failed listed.

    `positions[i]` is the global input position (0-based) of `items[i]` and tensor row i;
    `failed_positions[j]` that of `failed[j]`. Inputs start..start+count-1 are all here,
    so a caller can emit records in input order with `entries()`.
    """

    index: int
    start: int
    count: int
    items: list[InputItem]
    positions: list[int]
    tensor: torch.Tensor  # (n, 3, H, W) float32; n may be 0
    notes: list[list[str]]
    failed: list[tuple[InputItem, str]]
    failed_positions: list[int]

    def entries(self) -> Iterator[tuple[int, InputItem, int | None, str | None, list[str]]]:
        """(position, item, tensor row or None, error or None, notes) in input order."""
        good = {p: i for i, p in enumerate(self.positions)}
        bad = dict(zip(self.failed_positions, self.failed))
        for pos in range(self.start, self.start + self.count):
            if pos in good:
                i = good[pos]
                yield pos, self.items[i], i, None, self.notes[i]
            else:
                item, err = bad[pos]
                yield pos, item, None, err, []


_Loaded = tuple[InputItem, "torch.Tensor | None", "str | None", list[str]]


def _load(item: InputItem, transform: Callable, options: dict) -> _Loaded:
    if item.error:
        return item, None, item.error, []
    try:
        decoded = decode_image(item, **options)
        return item, transform(decoded.image), None, decoded.notes
    except ImageError as exc:
        return item, None, exc.one_line(), []
    except Exception as exc:  # one odd input must not stop a million others
        return item, None, f"{item.path}: {type(exc).__name__}: {exc}", []


def _assemble(index: int, start: int, loaded: list[_Loaded], transform: Callable) -> Batch:
    items, positions, rows, notes, failed, failed_positions = [], [], [], [], [], []
    for pos, (item, tensor, err, item_notes) in enumerate(loaded, start):
        if tensor is None:
            failed.append((item, err or "failed"))
            failed_positions.append(pos)
        else:
            items.append(item)
            positions.append(pos)
            rows.append(tensor)
            notes.append(item_notes)
    if rows:
        try:
            # numpy's stack is several times faster than torch.stack on CPU here, where
            # torch's intra-op threads compete with the decode threads.
            tensor = torch.from_numpy(np.stack([row.numpy() for row in rows]))
        except (RuntimeError, TypeError):  # a custom transform's tensor numpy cannot view
            tensor = torch.stack(rows)
    else:
        size = getattr(transform, "image_size", 0)
        tensor = torch.empty((0, 3, size, size), dtype=torch.float32)
    return Batch(index, start, len(loaded), items, positions, tensor, notes, failed,
                 failed_positions)  # fmt: skip


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    chunk: list[InputItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_batches(
    items: Iterable[InputItem],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    workers: int | None = None,
    exif_transpose: bool = True,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    url_timeout: float = DEFAULT_URL_TIMEOUT,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Decode and transform `items` in a thread pool; yield batches in input order.

    Each batch covers `batch_size` consecutive inputs (fewer at the end), the failed ones
    included as `Batch.failed`. At most `prefetch` batches beyond the one being consumed
    are in flight, so memory stays flat however many inputs there are. `workers=0`
    decodes in the calling thread (for debugging); None means min(8, CPU count).
    Closing the generator early cancels queued work and joins the threads.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    options = dict(exif_transpose=exif_transpose, allow_truncated=allow_truncated,
                   max_pixels=max_pixels, timeout=url_timeout)  # fmt: skip
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    chunks = _chunks(items, batch_size)
    if workers <= 0:
        start = 0
        for index, chunk in enumerate(chunks):
            loaded = [_load(item, transform, options) for item in chunk]
            yield _assemble(index, start, loaded, transform)
            start += len(chunk)
        return

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deit-decode")
    pending: deque[list[Future]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append([pool.submit(_load, item, transform, options) for item in chunk])

    try:
        for _ in range(prefetch + 1):
            submit_next()
        index = start = 0
        while pending:
            futures = pending.popleft()
            loaded = [f.result() for f in futures]
            submit_next()
            yield _assemble(index, start, loaded, transform)
            index += 1
            start += len(loaded)
    finally:
        # Reached on exhaustion, on an exception and on close() (`deit ... | head -1`):
        # drop queued decodes, wait for the running ones, leave no thread behind.
        pool.shutdown(wait=True, cancel_futures=True)
