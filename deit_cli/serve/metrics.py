"""Prometheus metrics (GET /metrics), one registry per app. Every name is documented here
and in the README:

    deit_requests_total{route,status}     HTTP requests answered, by route template and status
    deit_request_seconds{route}           time from request to response (histogram)
    deit_images_total{route}              images that ran through the model
    deit_queue_depth                      images waiting in the batching queues now
    deit_batch_size                       images per model call (histogram)
    deit_queue_seconds                    each image's wait from queue to its batch's start (histogram)
    deit_inference_seconds                model time per batch (histogram)
    deit_ready                            1 when the server takes requests, 0 while draining
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "route_template", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROUTES = (
    (re.compile(r"^/v2/models/[^/]+/infer$"), "/v2/models/{name}/infer"),
    (re.compile(r"^/v2/models/[^/]+/ready$"), "/v2/models/{name}/ready"),
    (re.compile(r"^/v2/models/[^/]+$"), "/v2/models/{name}"),
)
_FIXED = {"/score", "/embed", "/health", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"}


def route_template(path: str) -> str:
    """The route a path belongs to (a bounded label set: unknown paths are "other")."""
    if path in _FIXED:
        return path
    for pattern, name in _ROUTES:
        if pattern.match(path):
            return name
    return "other"


class Metrics:
    def __init__(self, depth: Callable[[], float], ready: Callable[[], bool]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "deit_requests", "HTTP requests answered, by route and status code.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "deit_request_seconds", "Time from request to response, by route.", ["route"], buckets=_LATENCY, registry=r
        )
        self.images = Counter("deit_images", "Images that ran through the model, by route.", ["route"], registry=r)
        self.queue_depth = Gauge("deit_queue_depth", "Images waiting in the batching queues.", registry=r)
        self.queue_depth.set_function(depth)
        self.ready = Gauge("deit_ready", "1 when the server takes requests, 0 while it drains.", registry=r)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
        self.batch_size = Histogram(
            "deit_batch_size", "Images per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r
        )
        self.queue_seconds = Histogram(
            "deit_queue_seconds",
            "Each image's wait in the queue before its batch started.",
            buckets=_LATENCY,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "deit_inference_seconds", "Model time per batch.", buckets=_LATENCY, registry=r
        )

    def on_batch(self, size: int, waits: list[float], inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(inference_s)
        for w in waits:
            self.queue_seconds.observe(w)

    def observe_request(self, path: str, status: int, started: float) -> None:
        route = route_template(path)
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(time.monotonic() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
