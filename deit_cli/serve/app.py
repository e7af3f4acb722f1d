"""The ASGI app: the routes over one Service, behind the API-key and metrics middleware.

    app = create_app(ServedModel(model), Settings(name="deit", api_key=None))
    uvicorn.run(app, host="127.0.0.1", port=8080)

The model is the one given here: nothing over HTTP loads, changes or unloads a model.
"""

from __future__ import annotations

import re
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette

from .routes import error_handlers, error_response, routes
from .schemas import ServeError
from .service import Service, Settings

if TYPE_CHECKING:
    from ..engine.serve import ServedModel

__all__ = ["OPEN_PATHS", "create_app"]

# What a load balancer or an orchestrator probes without a key.
OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
_OPEN_PATTERN = re.compile(r"^/v2/models/[^/]+/ready$")


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
    """The ASGI app serving `served` under `settings` (the service starts with its lifespan)."""
    service = Service(served, settings)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(routes=routes(), lifespan=lifespan, exception_handlers=error_handlers())
    app.state.service = service
    guarded = _Guard(app, service)
    guarded.service = service  # tests and the CLI reach the service through the app they hold
    return guarded
