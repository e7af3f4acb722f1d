"""Running the app under uvicorn: the listening socket, start-up, graceful draining.

    sock = listen("127.0.0.1", 8080)   # ServeUnavailable at once, before a model loads
    run(create_app(served, settings), sock, on_ready=lambda: print("ready"))

SIGTERM or Ctrl-C: readiness goes to 503 at once, uvicorn stops accepting and lets the
requests in flight finish, the queues answer what they hold, and `run` returns.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from ..errors import ServeUnavailable
from .service import Service

__all__ = ["is_loopback", "listen", "run"]


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (a name other than localhost may resolve to anything)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one); ServeUnavailable if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeUnavailable(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, on_ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.service, self.on_ready = service, on_ready

    async def startup(self, sockets=None) -> None:
        # The service starts here, before uvicorn's lifespan (which then finds it started):
        # a warm-up that fails is the command's error, not a logged traceback and exit 3.
        await self.service.start()
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    def handle_exit(self, sig, frame) -> None:
        if not self.service.started:  # still warming up: nothing to drain, stop as Ctrl-C does
            raise KeyboardInterrupt
        # Readiness goes to 503 at once; uvicorn stops accepting, lets in-flight requests
        # finish, then the app's shutdown answers what is still queued. Not re-raised
        # afterwards (uvicorn would), so a SIGTERM ends with exit code 0.
        self.service.draining = True
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop now
            self.force_exit = True
        self.should_exit = True


def run(
    app: Any,
    sock: socket.socket,
    *,
    max_connections: int = 512,
    access_log: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve `app` (from create_app) on `sock` until SIGTERM or Ctrl-C, then drain.
    `on_ready` is called once the model is warm and the socket accepts."""
    service = app.service
    config = uvicorn.Config(
        app,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=int(service.settings.timeout) + 5,
        lifespan="on",
        server_header=False,
        limit_concurrency=max_connections,
    )
    _Server(config, service, on_ready).run(sockets=[sock])
