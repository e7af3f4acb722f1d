"""Hugging Face Hub access: repo ids, downloads into the standard cache, errors.

Everything goes through `huggingface_hub.hf_hub_download`, so the usual environment
applies: HF_HOME / HF_HUB_CACHE (where), HF_ENDPOINT (which hub), HF_HUB_OFFLINE
(cache only), HF_TOKEN (private and gated repos). Failures become the project's
errors (deit_cli.errors) with a hint, never a huggingface_hub traceback.

huggingface_hub is imported lazily: `parse_repo_id` is cheap and the CLI's start-up
does not pay for the hub client.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import AccessDenied, CheckpointError, HubUnavailable, InputNotFound, WriteError, first_line

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
CONFIG_FILE = "config.json"

# One part of a repo id, as the hub accepts it: letters, digits, '-', '_', '.',
# not starting or ending with '-' or '.', no '--' or '..', at most 96 characters.
_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?")
# Names that look like a file rather than a repo.
_FILE_SUFFIXES = (
    ".safetensors",
    ".pth",
    ".pt",
    ".bin",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".npz",
    ".npy",
    ".h5",
    ".onnx",
    ".tar",
    ".zip",
    ".gz",
    ".json",
    ".yaml",
    ".yml",
    ".txt",
)

_TOKEN_HINT = "check the spelling; a private repo needs HF_TOKEN set to a token with access"
_OFFLINE_HINT = "run once with network access to fill the cache, or unset HF_HUB_OFFLINE"
_UNREACHABLE_HINT = "check the network connection, a proxy, or HF_ENDPOINT; set HF_HUB_OFFLINE=1 to use the cache only"


@dataclass(frozen=True)
class HubFiles:
    """The files of a model repo, in the local hub cache."""

    repo_id: str
    weights: Path  # model.safetensors or pytorch_model.bin
    config: Path | None  # config.json, when the repo has one
    revision: str  # as asked for ("main" when none was given)
    commit: str | None  # the commit the files come from (snapshot folder name), when known


def parse_repo_id(source: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) for "org/name" or "org/name@revision"; None when
    `source` is not shaped like a hub repo id (a path, a file name, a bare name...).

    Purely syntactic: a caller that also accepts local paths checks those first.
    """
    if not isinstance(source, str) or not source or source != source.strip():
        return None
    repo, sep, revision = source.partition("@")
    if sep and (not revision or any(c.isspace() for c in revision) or "@" in revision):
        return None
    parts = repo.split("/")
    if len(parts) != 2:
        return None
    org, name = parts
    for part in parts:
        if not _PART.fullmatch(part) or "--" in part or ".." in part:
            return None
    if name.lower().endswith(_FILE_SUFFIXES) or org in (".", ".."):
        return None
    return repo, (revision if sep else None)


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether the weights of `repo_id` (at `revision`, default "main") are in the local
    hub cache. Looks at the file system only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in WEIGHT_FILES:
        try:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
        except (ValueError, OSError):  # an invalid repo id or revision: not cached
            return False
        if isinstance(found, str):
            return True
    return False


def fetch_model_files(repo_id: str, revision: str | None = None) -> HubFiles:
    """Download (or find in the cache) the weights and config.json of a model repo.

    Prefers model.safetensors and falls back to pytorch_model.bin. When the hub cannot
    be reached (or HF_HUB_OFFLINE is set), cached files are used.
    """
    shown = f"{repo_id}@{revision}" if revision else repo_id
    # A hub whose name does not resolve, or that refuses the connection, will not answer
    # huggingface_hub's retries either (about 24 s of them): go to the cache at once.
    unreachable: BaseException | None = None if offline() else _endpoint_down()
    weights: Path | None = None
    for filename in WEIGHT_FILES:
        path, error = _download(repo_id, filename, revision, shown, cache_only=unreachable is not None)
        if path is not None:
            weights = path
            break
        unreachable = unreachable or error
    if weights is None:
        if unreachable is not None:
            raise unavailable(shown, unreachable)
        raise CheckpointError(
            f"{shown}: the repo has neither {' nor '.join(WEIGHT_FILES)}",
            "is this a model repo with weights in one of those files? a local copy can be given as a file",
        )
    # The config follows the weights: from the hub if they came from it, else from the cache.
    config, error = _download(repo_id, CONFIG_FILE, revision, shown, cache_only=unreachable is not None)
    commit = weights.parent.name if re.fullmatch(r"[0-9a-f]{40}", weights.parent.name) else None
    return HubFiles(repo_id=repo_id, weights=weights, config=config, revision=revision or "main", commit=commit)


def _download(
    repo_id: str, filename: str, revision: str | None, shown: str, *, cache_only: bool
) -> tuple[Path | None, BaseException | None]:
    """(path, None) when found; (None, None) when the repo has no such file;
    (None, error) when the hub could not be reached and the file is not cached.
    Everything else is raised as one of the project's errors."""
    import huggingface_hub
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    E = hub_errors()
    try:
        with quiet_hub_logger():
            path = hf_hub_download(repo_id, filename, revision=revision, local_files_only=cache_only)
        return Path(path), None
    except E.LocalEntryNotFound as e:  # before EntryNotFound: in recent releases it subclasses it
        # Not cached and no answer from the hub. Perhaps the cache knows the file does not exist.
        try:
            known = try_to_load_from_cache(repo_id, filename, revision=revision)
        except (ValueError, OSError):
            known = None
        if known is not None and not isinstance(known, str):  # huggingface_hub's _CACHED_NO_EXIST
            return None, None
        return None, e.__cause__ or e
    except E.RemoteEntryNotFound:
        return None, None
    except E.GatedRepo:  # before RepositoryNotFound: it subclasses it
        raise AccessDenied(
            f"{shown}: this repo is gated and the hub refused access",
            "accept the model's terms on its hub page, then set HF_TOKEN to a token of that account",
        ) from None
    except E.RepositoryNotFound:
        raise InputNotFound(f"{shown}: no such repo on the hub (or it is private)", _TOKEN_HINT) from None
    except E.RevisionNotFound:
        raise InputNotFound(
            f"{repo_id}: no revision {revision!r} in this repo",
            "use a branch, a tag or a commit hash of the repo; leave out @revision for main",
        ) from None
    except E.Disabled:
        raise AccessDenied(f"{shown}: access to this repo is disabled on the hub") from None
    except E.Validation as e:
        raise InputNotFound(f"{shown}: not a valid hub repo id or revision ({first_line(e)})") from None
    except E.HTTP as e:
        raise from_http_error(shown, e) from None
    except E.Offline as e:
        raise unavailable(shown, e) from None
    except E.Transport as e:
        raise unavailable(shown, e) from None
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
            raise WriteError(
                f"{shown}: cannot write to the hub cache ({e.strerror or e})",
                f"free some space, or point HF_HUB_CACHE elsewhere (now {huggingface_hub.constants.HF_HUB_CACHE})",
            ) from None
        raise HubUnavailable(f"{shown}: download of {filename} failed ({first_line(e)})", "try again") from None


def unavailable(shown: str, error: BaseException) -> HubUnavailable:
    """The error for 'not cached, and the hub gave no answer' (offline, network, 5xx...)."""
    E = hub_errors()
    if offline() or isinstance(error, E.Offline):
        return HubUnavailable(f"{shown}: not in the cache while offline (HF_HUB_OFFLINE is set)", _OFFLINE_HINT)
    if isinstance(error, E.HTTP):
        return from_http_error(shown, error)
    if isinstance(error, E.Metadata):
        return HubUnavailable(
            f"{shown}: the hub endpoint's answer is not a Hugging Face hub's ({first_line(error)})",
            "check HF_ENDPOINT and any proxy",
        )
    return HubUnavailable(
        f"{shown}: hub unreachable ({first_line(error) or type(error).__name__})",
        _UNREACHABLE_HINT,
    )


def from_http_error(shown: str, error: BaseException) -> HubUnavailable | AccessDenied | InputNotFound:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return AccessDenied(
            f"{shown}: the hub refused access (HTTP {status})",
            "check that HF_TOKEN is set to a valid token with access to this repo",
        )
    if status == 404:
        return InputNotFound(f"{shown}: not found on the hub (HTTP 404)", _TOKEN_HINT)
    if status == 429:
        return HubUnavailable(f"{shown}: the hub is rate-limiting requests (HTTP 429)", "wait a little and try again")
    if status is not None and status >= 500:
        return HubUnavailable(f"{shown}: hub unreachable (HTTP {status})", "the hub has a problem; try again later")
    return HubUnavailable(f"{shown}: hub request failed (HTTP {status})", _UNREACHABLE_HINT)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_PROBE_TIMEOUT = 3.0  # seconds for one TCP connection to the endpoint


def _endpoint_down() -> ConnectionError | None:
    """The error of a hub endpoint that cannot answer at all: its name does not resolve,
    it refuses connections, or there is no route to it. None when it accepts a TCP
    connection, when it is slow (a timeout may be transient: huggingface_hub retries it),
    or when a proxy is configured (the proxy decides what is reachable)."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT).close()
    except socket.gaierror as e:
        return ConnectionError(f"cannot resolve {url.hostname}: {e.strerror}")
    except (ConnectionRefusedError, ConnectionResetError):
        return ConnectionError(f"{url.hostname}:{port} refused the connection")
    except TimeoutError:
        return None
    except OSError as e:  # no route to host, network unreachable
        return ConnectionError(f"cannot connect to {url.hostname}:{port}: {e.strerror or e}")
    return None


@contextmanager
def quiet_hub_logger() -> Iterator[None]:
    """huggingface_hub's own warnings ("Retrying in 8s [Retry 4/5]") are not for our stderr:
    what went wrong reaches the user as one of our errors."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


class _HubErrors:
    """huggingface_hub's exception classes, across its releases (0.24 ... 2.x)."""

    def __init__(self) -> None:
        from huggingface_hub import errors as e

        self.LocalEntryNotFound = e.LocalEntryNotFoundError
        # >= 1.0 has RemoteEntryNotFoundError; before, EntryNotFoundError meant the remote one.
        self.RemoteEntryNotFound = getattr(e, "RemoteEntryNotFoundError", e.EntryNotFoundError)
        self.GatedRepo = e.GatedRepoError
        self.RepositoryNotFound = e.RepositoryNotFoundError
        self.RevisionNotFound = e.RevisionNotFoundError
        self.Disabled = getattr(e, "DisabledRepoError", ())
        self.Validation = e.HFValidationError
        self.HTTP = e.HfHubHTTPError
        self.Offline = e.OfflineModeIsEnabled
        self.Metadata = getattr(e, "FileMetadataError", ())
        # Network errors of whichever HTTP client this release uses (a module that is not
        # imported cannot have raised anything).
        transport: list[type[BaseException]] = []
        for module, name in (
            ("httpx2", "TransportError"),
            ("httpx", "TransportError"),
            ("requests", "ConnectionError"),
            ("requests", "Timeout"),
        ):
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                transport.append(cls)
        self.Transport = tuple(transport)


_ERRORS: _HubErrors | None = None


def hub_errors() -> _HubErrors:
    global _ERRORS
    if _ERRORS is None:
        _ERRORS = _HubErrors()
    return _ERRORS
