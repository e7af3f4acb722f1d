"""What the routes share: the server's settings and the service (model, queues, decode
threads, metrics, the API key). Nothing here knows about routes or uvicorn.

    service = Service(ServedModel(model), Settings(name="deit"))
    await service.start()   # warms the model for the queues' batch sizes, starts the queues
    await service.stop()    # queued images still get their answers

The model is the one given here: nothing over HTTP loads, changes or unloads a model.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from .metrics import Metrics
from .queue import BatchQueue
from .urls import UrlPolicy

if TYPE_CHECKING:
    from ..engine.serve import ServedModel

__all__ = ["Service", "Settings", "service_of"]


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
    """What the routes share. Started before the server reports ready (the app's lifespan,
    or earlier by serve.server); drains when it stops."""

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
        """Warm the model up for the batch sizes the queues will run, then start them. Once:
        a second call does nothing."""
        if self.started:
            return
        # In the inference thread, where the model will run: lazy initialisation, CUDA
        # graphs and compilation happen here, not on a first request. Both queues batch up
        # to the same size (one Settings).
        max_batch_size = self.classify_queue.max_batch_size
        await asyncio.get_running_loop().run_in_executor(self._inference, self.served.warm_up, max_batch_size)
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


def service_of(request: Request) -> Service:
    return request.app.state.service
