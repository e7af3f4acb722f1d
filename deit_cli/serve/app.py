"""The ASGI app: settings, the service the routes share (model, queues, decode threads,
URL policy, metrics), the API-key and metrics middleware, and the error handlers.

    app = create_app(ServedModel(model), Settings(name="deit", api_key=None))
    uvicorn.run(app, host="127.0.0.1", port=8080)

The model is the one given here: nothing over HTTP loads, changes or unloads a model.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from .metrics import Metrics
from .queue import BatchQueue
from .schemas import ServeError
from .urls import UrlPolicy

if TYPE_CHECKING:
    from ..engine.serve import ServedModel

__all__ = ["OPEN_PATHS", "Service", "Settings", "create_app"]

# What a load balancer or an orchestrator probes without a key.
OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
_OPEN_PATTERN = re.compile(r"^/v2/models/[^/]+/ready$")


@dataclass(frozen=True)
class Settings:
    """The server's limits and switches (each is a `deit serve` flag)."""

    name: str = "deit"  # the model's name in /v2/models/{name}
    max_batch_size: int = 32  # images per model call
    max_delay_ms: float = 5.0  # the longest an image waits for others to join its batch
    max_queue: int = 256  # images waiting, per queue; past it: 503 + Retry-After
    timeout: float = 30.0  # seconds per request, decode to answer; past it: 504
    max_body_bytes: int = 8 * 1024 * 1024  # past it: 413
    max_images: int = 32  # per request; past it: 413
    api_key: str | None = None  # when set: Authorization: Bearer <key> on all but the probes
    urls: UrlPolicy = field(default_factory=UrlPolicy)  # URL inputs: off unless hosts are listed
    decode_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))


class Service:
    """What the routes share. Queues start with the app (lifespan) and drain when it stops."""

    def __init__(self, served: ServedModel, settings: Settings) -> None:
        self.served = served
        self.settings = settings
        self.draining = False
        self.started = False
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="deit-decode")
        inference = ThreadPoolExecutor(1, thread_name_prefix="deit-inference")  # one model call at a time
        self._inference = inference
        self.metrics = Metrics(depth=lambda: sum(q.depth for q in self.queues), ready=lambda: self.ready)
        limits = dict(
            max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms,
            max_queue=settings.max_queue,
            on_batch=self.metrics.on_batch,
            executor=inference,
        )
        self.classify_queue = BatchQueue(lambda xs: list(served.probabilities(xs)), **limits)
        self.embed_queue = BatchQueue(
            lambda items: served.embeddings(
                [x for x, _, _ in items], [p for _, p, _ in items], [n for _, _, n in items]
            ),
            **limits,
        )
        self.queues = (self.classify_queue, self.embed_queue)

    @property
    def ready(self) -> bool:
        return self.started and not self.draining

    async def start(self) -> None:
        for q in self.queues:
            await q.start()
        self.started = True

    async def stop(self) -> None:
        self.draining = True
        for q in self.queues:
            await q.stop()  # queued images still get their answers
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self._inference.shutdown(wait=True)

    def check_key(self, header: str | None) -> bool:
        key = self.settings.api_key
        if key is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    return error_response(exc)


_HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(
        {"error": message, "error_type": _HTTP_KINDS.get(exc.status_code, "error")},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Never a traceback or the input in the answer; the server's log has the traceback.
    import logging

    logging.getLogger("deit.serve").error("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error", "error_type": "internal"}, status_code=500)


class _Guard:
    """Outermost middleware: counts every answer by route and status, and checks the API key
    on every route but the health and readiness probes (401 before anything is read)."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500
        path = scope.get("path", "")

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not (path in OPEN_PATHS or _OPEN_PATTERN.match(path)):
                header = None
                for k, v in scope.get("headers", ()):
                    if k == b"authorization":
                        header = v.decode("latin-1")
                if not self.service.check_key(header):
                    err = ServeError(
                        401,
                        "unauthorized",
                        "missing or wrong API key (send Authorization: Bearer <key>)",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                    return await error_response(err)(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.service.metrics.observe_request(path, status, started)


def create_app(served: ServedModel, settings: Settings = Settings()) -> Any:
    """The ASGI app serving `served` under `settings` (queues start with its lifespan)."""
    from .routes import routes

    service = Service(served, settings)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=routes(),
        lifespan=lifespan,
        exception_handlers={ServeError: _serve_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.service = service
    guarded = _Guard(app, service)
    guarded.service = service  # tests and the CLI reach the service through the app they hold
    return guarded


def service_of(request: Request) -> Service:
    return request.app.state.service


async def run_in(pool: ThreadPoolExecutor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
