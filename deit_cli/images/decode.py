"""Safe decoding: the leading bytes decide the format, Pillow's guards are scoped, URLs are
fetched with a deadline and a size cap. The security-sensitive part of the images layer,
in one place.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from .._version import __version__
from ..errors import EXIT_DATA, EXIT_NO_INPUT, DeiTError, InputNotFound
from ..files import input_error
from .inputs import InputItem, is_url

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow's format names
# Pillow's own default limit (about a quarter GiB of RGB): larger is treated as a bomb.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_URL_TIMEOUT = 10.0  # seconds, for the whole download
DEFAULT_URL_MAX_BYTES = 50 * 1024 * 1024


class ImageError(DeiTError):
    """An input that cannot be decoded: not an allowed image, corrupt, too big, unreachable."""

    exit_code = EXIT_DATA


class ImageNotFound(ImageError, InputNotFound):
    """An input that does not exist or cannot be read (an ImageError with exit code 66)."""

    exit_code = EXIT_NO_INPUT


@dataclass
class Decoded:
    """A decoded image, always 8-bit RGB, and notes on what was done to get it.

    `scale` is 1, or for a JPEG decoded at reduced scale (`decode_image`'s `reduce`) the
    DCT scale 2, 4 or 8: `image` is then 1/scale of the full size, rounded up, and
    `region` maps a box of the full-size image to it."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)
    format: str | None = None
    scale: int = 1
    # full-size pixels by which the reduced pixel grid starts before the left and top
    # edges: an axis that the orientation reverses, and whose size is not a multiple of
    # `scale`, has the partial block of its far edge first
    shift: tuple[int, int] = (0, 0)

    def region(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box (left, top, right, bottom) of the full-size (oriented) image, in `image`'s
        coordinates: the same part of the picture (floats where the image is reduced)."""
        if self.scale == 1:
            return box
        (dx, dy), s = self.shift, self.scale
        left, top, right, bottom = box
        return (left + dx) / s, (top + dy) / s, (right + dx) / s, (bottom + dy) / s


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


# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
# whether the upright image's x and y axes run against the stored axes they come from
_REVERSED = {1: (False, False), 2: (True, False), 3: (True, True), 4: (False, True)}
_REVERSED.update({o + 4: r for o, r in _REVERSED.items()})


def _orientation(im: Image.Image, notes: list[str]) -> int:
    """The EXIF orientation (1: upright, or unknown), as ImageOps.exif_transpose reads it
    (a JPEG's before its pixels are decoded)."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        return orientation if orientation in _TRANSPOSE else 1
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block should not lose the pixels
        notes.append(f"EXIF orientation ignored ({exc})")
        return 1


@contextmanager
def _decode_errors(name: str, fmt: str) -> Iterator[None]:
    """Whatever Pillow raises while opening or decoding, as one ImageError line."""
    try:
        yield
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


Reduce = Callable[[int, int], int]


def _decode_stream(
    fp: BinaryIO,
    name: str,
    *,
    exif_transpose: bool,
    allow_truncated: bool,
    max_pixels: int,
    reduce: Reduce | None = None,
) -> Decoded:
    head = fp.read(16)
    try:
        fmt = _sniff(head)
    except ValueError as exc:
        raise ImageError(f"{name}: {exc}", hint="allowed: JPEG, PNG, WebP, GIF, BMP, TIFF") from None
    fp.seek(0)
    notes: list[str] = []
    orientation, scale, shift = None, 1, (0, 0)
    with _truncated.set(allow_truncated):
        with _decode_errors(name, fmt):
            with _open_lock, warnings.catch_warnings():
                # Our own limit below decides; Pillow's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=[fmt])
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels} (possible decompression bomb)"
                )
            frames = getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1
            if frames > 1:
                im.seek(0)
                notes.append(f"first frame of {frames}")
            if reduce is not None and fmt == "JPEG":
                # a JPEG's EXIF block is read with its header: the upright size is known here
                orientation = _orientation(im, notes) if exif_transpose else 1
        if orientation is not None:  # outside the error mapping: the caller's exceptions are its own
            n = reduce(*((h, w) if orientation in _SWAPS_AXES else (w, h)))
        with _decode_errors(name, fmt):
            if orientation is not None and n >= 2:
                # Pillow's draft picks the largest DCT scale (8, 4, 2) that keeps each side
                # at least the size asked: these sizes give the largest one up to n
                a = 8 if n >= 8 else 4 if n >= 4 else 2
                drafted = im.draft("RGB", (max(1, w // a), max(1, h // a)))
                if drafted is not None:  # None: a JPEG Pillow decodes only at full size
                    scale = round(w / drafted[1][2])
                    pads = ((-w) % scale, (-h) % scale)
                    if orientation in _SWAPS_AXES:
                        pads = pads[::-1]
                    shift = tuple(pad if rev else 0 for pad, rev in zip(pads, _REVERSED[orientation], strict=True))
            im.load()  # inside the try: corrupt data must fail here, not later
            if orientation in _TRANSPOSE:  # read before the draft: the transpose the caller was told of
                im = im.transpose(_TRANSPOSE[orientation])
            elif orientation is None and exif_transpose:
                try:
                    ImageOps.exif_transpose(im, in_place=True)
                except Exception as exc:  # a broken EXIF block should not lose the pixels
                    notes.append(f"EXIF orientation ignored ({exc})")
            image = _to_rgb(im, notes)
            image.load()
    return Decoded(image=image, notes=notes, format=fmt, scale=scale, shift=shift)


def decode_bytes(
    data: bytes,
    name: str = "<bytes>",
    *,
    exif_transpose: bool = True,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Decode an image held in memory (an upload, a request body) with the same checks
    as `decode_image`: format from the leading bytes, pixel count from the header before
    any pixel is decoded. `name` only appears in error messages."""
    return _decode_stream(
        io.BytesIO(data), name, exif_transpose=exif_transpose, allow_truncated=allow_truncated, max_pixels=max_pixels
    )


def decode_image(
    source: InputItem | str | os.PathLike,
    *,
    exif_transpose: bool = True,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_URL_TIMEOUT,
    max_bytes: int = DEFAULT_URL_MAX_BYTES,
    reduce: Reduce | None = None,
) -> Decoded:
    """Decode one image safely into 8-bit RGB.

    The leading bytes decide the format before Pillow sees the file; only JPEG, PNG,
    WebP, GIF, BMP and TIFF are opened. Images over `max_pixels` are refused as possible
    decompression bombs; truncated files are refused unless `allow_truncated`. EXIF
    orientation is applied (unless `exif_transpose=False`); transparency is composited on
    white; 16-bit images are scaled to 8 bits; animations give their first frame (noted).
    URLs are fetched with `timeout` seconds and `max_bytes` at most.

    `reduce(width, height)`, if given, is called with a JPEG's upright size (after its
    EXIF orientation, unless `exif_transpose=False`) once the header is read and checked,
    before any pixel is decoded; it returns the largest n by which the caller can use the
    image reduced, and the JPEG is decoded at the largest DCT scale 1/2, 1/4 or 1/8 not
    beyond 1/n (Pillow's `Image.draft`: libjpeg's scaled decoding, far cheaper than a full
    decode). `Decoded.scale` says which, and `Decoded.region` maps full-size boxes to it.
    Other formats decode at full size without a call.
    Raises ImageError (or its subclass ImageNotFound) with a one-line message.
    """
    if isinstance(source, InputItem):
        if source.error:
            raise ImageNotFound(source.error)
        name, url = source.path, source.url
    else:
        name = os.fspath(source)
        url = is_url(name)
    options = dict(exif_transpose=exif_transpose, allow_truncated=allow_truncated, max_pixels=max_pixels, reduce=reduce)
    if url:
        data = _fetch(name, timeout, max_bytes)
        return _decode_stream(io.BytesIO(data), name, **options)
    try:
        fp = open(name, "rb")  # noqa: SIM115 - closed below, after the decode
    except OSError as exc:
        raise input_error(name, exc, ImageNotFound) from None
    with fp:
        try:
            return _decode_stream(fp, name, **options)
        except OSError as exc:  # reading the header itself failed (EIO, a directory...)
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
