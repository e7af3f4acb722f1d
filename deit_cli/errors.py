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
EXIT_CANT_CREATE = 73
EXIT_IO = 74
EXIT_DENIED = 77
EXIT_INTERRUPTED = 130


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


class OutputExists(DeiTError):
    """The output exists (and --force was not given) or cannot be created."""

    exit_code = EXIT_CANT_CREATE


class WriteError(DeiTError):
    exit_code = EXIT_IO


class AccessDenied(DeiTError):
    exit_code = EXIT_DENIED
