"""Fetching image URLs for the server without becoming an SSRF proxy.

URL inputs are off unless the server was started with an allow-list of host names. When
on: http(s) only; the host must be on the list; its name is resolved once and every
address checked (loopback, private, link-local, reserved, multicast, unspecified, and the
IPv4 forms hidden in IPv6 are refused, unless a network was explicitly allowed); the
connection goes to the address that was checked (no second lookup a DNS rebinding could
answer differently); at most 3 redirects, each checked the same way; the images layer's
total time and size limits.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from .._version import __version__
from ..images.decode import DEFAULT_URL_MAX_BYTES, DEFAULT_URL_TIMEOUT, ImageError

__all__ = ["UrlPolicy", "UrlRefused", "address_refusal", "fetch_url", "is_url"]

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(Exception):
    """A URL the policy does not allow (nothing was fetched from it)."""


def is_url(text: str) -> bool:
    """Whether an input string is meant as a URL rather than base64 (which has no ':')."""
    head = text[:16].lower()
    return "://" in head or head.startswith(("http:", "https:", "file:", "ftp:"))


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs the server may fetch. An empty `hosts` means URL inputs are off."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()  # addresses allowed although not public (explicit)
    timeout: float = DEFAULT_URL_TIMEOUT
    max_bytes: int = DEFAULT_URL_MAX_BYTES
    resolve: Callable[[str, int], list[str]] | None = field(default=None, compare=False)

    @classmethod
    def from_flags(cls, hosts: Iterable[str], networks: Iterable[str] = (), **kw) -> UrlPolicy:
        names = frozenset(h.strip().lower().rstrip(".") for h in hosts if h.strip())
        nets = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip())
        return cls(names, nets, **kw)

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)


def address_refusal(addr: Address, allowed: tuple[Network, ...] = ()) -> str | None:
    """Why `addr` may not be fetched from, or None when it may (a public address)."""
    if isinstance(addr, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1, 2002:7f00:1::/48 (6to4), Teredo, NAT64 carry IPv4 addresses.
        inner = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if inner is None and addr in ipaddress.ip_network("64:ff9b::/96"):
            inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if inner is not None:
            why = address_refusal(inner, allowed)
            if why:
                return why
    if any(addr in net for net in allowed):
        return None
    for test, what in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(addr, test):
            return f"{what} address {addr}"
    if not addr.is_global:
        return f"non-public address {addr}"
    return None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address decided in advance (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address decided in advance; the certificate is checked against the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _checked_address(host: str, port: int, policy: UrlPolicy) -> str:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = (policy.resolve or _resolve)(host, port)
        except (OSError, UnicodeError) as exc:
            raise ImageError(f"cannot resolve {host} ({exc})") from None
    if not addresses:
        raise ImageError(f"cannot resolve {host}")
    for a in addresses:  # every address must pass: the name must not reach inside at all
        why = address_refusal(ipaddress.ip_address(a.split("%")[0]), policy.networks)
        if why:
            raise UrlRefused(f"{host} resolves to a {why}")
    return addresses[0]


def _check(url: str, policy: UrlPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an allowed URL; UrlRefused otherwise."""
    if not policy.enabled:
        raise UrlRefused("URL inputs are off on this server (send the image as base64)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("malformed URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused(f"{scheme or 'this'} URLs are not fetched (http and https only)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("URL without a host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("URLs with credentials are not fetched")
    if host not in policy.hosts:
        raise UrlRefused(f"host {host} is not on this server's --allow-url-hosts list")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def fetch_url(url: str, policy: UrlPolicy) -> bytes:
    """The body of `url`, if `policy` allows it and every redirect. Raises UrlRefused
    (not allowed: nothing fetched from it) or ImageError (the download failed)."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path = _check(url, policy)
        address = _checked_address(host, port, policy)
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageError(f"timed out after {policy.timeout:g} s")
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(host, port, address, timeout=left)
        try:
            conn.request("GET", path, headers={"User-Agent": f"deit-cli/{__version__}", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise ImageError(f"HTTP {resp.status} without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise ImageError(f"HTTP {resp.status} {resp.reason}")
            return _read_limited(resp, conn, deadline, policy)
        except TimeoutError:
            raise ImageError(f"timed out after {policy.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ImageError(f"cannot fetch ({type(exc).__name__}: {exc})") from None
        finally:
            conn.close()
    raise UrlRefused(f"more than {MAX_REDIRECTS} redirects")


def _read_limited(resp: http.client.HTTPResponse, conn, deadline: float, policy: UrlPolicy) -> bytes:
    # With "Connection: close" http.client hands the socket to the response.
    sock = conn.sock or getattr(getattr(resp.fp, "raw", None), "_sock", None)
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise ImageError(f"too large ({int(length)} bytes; limit {policy.max_bytes})")
    chunks, total = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if sock is not None:
            sock.settimeout(left)  # a server that drips bytes still meets the deadline
        chunk = resp.read1(min(65536, policy.max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > policy.max_bytes:
            raise ImageError(f"too large (over {policy.max_bytes} bytes)")
