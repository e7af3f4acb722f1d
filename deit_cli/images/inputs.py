"""Input discovery: files, directories, globs, URLs and paths on stdin, in order.

No torch and no Pillow here: the CLI checks its inputs before it loads anything heavy.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputItem:
    """One input: `path` as the user wrote it (also the display key), or an error."""

    path: str
    url: bool = False
    error: str | None = None


def is_url(spec: str) -> bool:
    """True for an http(s) URL (fetched, never opened as a file)."""
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
    if is_url(spec):
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
