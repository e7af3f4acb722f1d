"""Errors that the library raises and the CLI turns into one line and an exit code.

No torch here: the CLI imports this module at start-up.
"""

from __future__ import annotations

# Exit codes, the same for every command (DESIGN.md).
EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_UNAVAILABLE = 69
EXIT_INTERNAL = 70  # a bug: an exception nobody anticipated
EXIT_CANT_CREATE = 73
EXIT_IO = 74
EXIT_OUT_OF_MEMORY = 75  # EX_TEMPFAIL: it may work again with a smaller batch
EXIT_DENIED = 77
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by a cluster (preemption), checkpoint saved


def first_line(e: BaseException | str, default: str = "") -> str:
    """The first non-blank line of an exception's message (at most 200 characters), for a
    one-line error; `default` when it has none."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else default


class DeiTError(Exception):
    """Base class: a message (what failed and why), an optional hint (what to do)."""

    exit_code = EXIT_PARTIAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(DeiTError):
    exit_code = EXIT_USAGE


class CheckpointError(DeiTError):
    """A bad, unsafe or unrecognised checkpoint or data file."""

    exit_code = EXIT_DATA


class InputNotFound(DeiTError):
    exit_code = EXIT_NO_INPUT


class HubUnavailable(DeiTError):
    """The hub cannot be reached, or the file is not cached while offline."""

    exit_code = EXIT_UNAVAILABLE


class ServeUnavailable(DeiTError):
    """The server cannot run here: the serve extra is missing, or the address cannot be listened on."""

    exit_code = EXIT_UNAVAILABLE


class OutputExists(DeiTError):
    """The output exists (and --force was not given) or cannot be created."""

    exit_code = EXIT_CANT_CREATE


class WriteError(DeiTError):
    exit_code = EXIT_IO


class AccessDenied(DeiTError):
    exit_code = EXIT_DENIED


class OutOfMemory(DeiTError):
    """CPU or accelerator memory ran out; `batch_size` is the batch that was running."""

    exit_code = EXIT_OUT_OF_MEMORY

    def __init__(self, message: str, hint: str | None = None, *, batch_size: int | None = None):
        super().__init__(message, hint)
        self.batch_size = batch_size


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, or torch's (CUDA/MPS) out-of-memory error, without importing torch."""
    if isinstance(e, MemoryError):
        return True
    import sys

    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
