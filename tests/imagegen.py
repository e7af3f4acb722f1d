"""Small image fixtures that the tests make themselves: no files are checked in."""

from __future__ import annotations

import functools
import http.server
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

# Leading bytes of formats that must be refused before Pillow parses them.
PDF_BYTES = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
# A PSD header (Pillow can open PSD, which is exactly why we must not let it try).
PSD_BYTES = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 64, 64, 8, 3) + b"\x00" * 64


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: the hardest case for comparing two resamplers."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth(w: int, h: int) -> Image.Image:
    """A smooth colour gradient, like a photo rather than noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin((x + y) / 17.0)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth colour waves of a few tens of pixels, plus grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy, phase = rng.uniform(8, 40, 3)
    base = np.stack([127 + 100 * np.sin(x / fx + phase), 127 + 100 * np.cos(y / fy), 127 + 60 * np.sin((x + y) / 23)])
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(base.transpose(1, 2, 0) + grain, 0, 255).astype(np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for stored pixels `a` (H, W, C) with this EXIF orientation
    (the EXIF 2.3 definitions, written independently of Pillow)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1, :],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # transposed (about the main diagonal)
        6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to display
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed (anti-diagonal)
        8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to display
    }[orientation](a)


def save_with_orientation(img: Image.Image, path: Path, orientation: int, **kwargs) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **kwargs)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` (valid signature and IHDR, no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated_jpeg(path: Path, keep: float = 0.6) -> Path:
    """A JPEG cut short, as a half-finished download leaves it."""
    noise(128, 128, seed=3).save(path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `directory`; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def silent_server() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog does) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
