"""Files we write, and files we read that fail: one place for both.

Every output is written to a temporary beside its target and renamed into place when
complete, with the mode any other tool would give it (0666 & ~umask for files, 0777 &
~umask for directories), never over something the user owns without `--force`. An
OSError on an input becomes one message and one exit code, the same for every command.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DeiTError, InputNotFound, OutputExists, UsageError, WriteError

__all__ = ["check_destination", "atomic_path", "user_mode", "same_path", "input_error", "write_error"]


def check_destination(dst: Path, *, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse a destination that exists (without force), is a source, or is not a plain path."""
    for src in sources:
        if same_path(dst, src):
            raise UsageError(f"{dst}: destination is the source; choose another path")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise OutputExists(f"{dst}: already exists", "pass --force to replace it")
        if not (dst.is_file() or dst.is_dir()) or dst.is_symlink():
            raise OutputExists(f"{dst}: not a regular file or directory; refusing to replace it")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputExists(f"{dst}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputExists(f"{dst}: directory {parent} is not writable")


def same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@contextmanager
def atomic_path(dst: Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside `dst`; renamed over `dst` when the block succeeds, removed
    whatever else happens (errors, Ctrl-C)."""
    parent = dst.parent if str(dst.parent) else Path(".")
    prefix = f".{dst.name}.tmp-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)) if directory else None
        if tmp is None:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=dst.suffix, dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise OutputExists(f"{dst}: cannot create a file in {parent} ({e.strerror})") from None
    try:
        yield tmp
        user_mode(tmp)
        if directory and dst.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except OSError as e:
        _remove(tmp)
        raise write_error(dst, e) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_error(dst: Path, e: OSError) -> WriteError:
    """One message (exit code 74) for an output that could not be written."""
    why = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large", errno.EDQUOT: "disk quota exceeded"}
    return WriteError(f"{dst}: write failed: {why.get(e.errno, e.strerror or str(e))}", "nothing was written")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def user_mode(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the permissions a new file gets
    from the umask: temporary files and directories are created private (0600/0700)."""
    mask = _umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += list(path.rglob("*"))
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def input_error(path: str | os.PathLike, e: OSError, cls: type[DeiTError] = InputNotFound) -> DeiTError:
    """One message (and `cls`'s exit code, 66 by default) for an input that cannot be read."""
    if isinstance(e, FileNotFoundError):
        why = "no such file"
    elif isinstance(e, PermissionError):
        why = "permission denied"
    elif isinstance(e, IsADirectoryError):
        why = "is a directory, not a file"
    else:
        why = f"cannot read ({e.strerror or e})"
    return cls(f"{os.fspath(path)}: {why}")
