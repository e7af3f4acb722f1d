"""Routes: HTTP in, the engine's answer out. Each handler reads and checks the request
(schemas), decodes its images in the decode threads, waits for its batches in the queue,
and shapes the answer; the queue and the model know nothing about HTTP.

    GET  /health                     200 {"status": "ready"} (503 while draining)
    POST /score                      Azure: {"input_data": [...]} -> [[{"label", "score"}, ...], ...]
    POST /embed                      {"input_data": [...], "params": {"pool", "normalize"}} -> [[float, ...], ...]
    GET  /metrics                    Prometheus text
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer     Open Inference Protocol v2

Handlers raise what the queue, the engine and the inputs raise; `http_error` is the one
place that turns those into statuses (and `error_handlers` into answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._version import __version__
from ..errors import UsageError
from ..images.decode import ImageError
from .metrics import CONTENT_TYPE_LATEST
from .queue import BatchQueue, QueueClosed, QueueFull, QueueTimeout
from .schemas import (
    ImageRequest,
    ServeError,
    bad_request,
    embed_params,
    image_bytes,
    parse_json,
    score_request,
    threshold_param,
    top_k_param,
    v2_request,
)
from .service import Service, service_of
from .urls import UrlRefused, fetch_url, is_url

# ----------------------------------------------------------------- errors -> HTTP statuses


def http_error(exc: Exception, service: Service, name: str = "", index: int | None = None) -> ServeError | None:
    """The answer for what a handler raised (`name`, `index`: the image at fault), or None
    for what no request can cause (a bug: 500)."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, QueueFull):
        return ServeError(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, QueueClosed):
        return ServeError(503, "unavailable", "the server is shutting down", headers={"Retry-After": "1"})
    if isinstance(exc, QueueTimeout):
        return ServeError(504, "timeout", f"not answered within {service.settings.timeout:g} s (--timeout)")
    if isinstance(exc, UsageError):  # e.g. a model without a classifier asked to classify, an unknown pool
        return bad_request(exc.one_line())
    if isinstance(exc, UrlRefused):
        return ServeError(400, "url_refused", f"{name}: {exc}", index=index)
    if isinstance(exc, ImageError):
        msg = exc.message if exc.message.startswith(name) else f"{name}: {exc.message}"
        return ServeError(422, "bad_image", msg, index=index)
    return None


def error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _mapped_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(http_error(exc, service_of(request)))


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
    logging.getLogger("deit.serve").error("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error", "error_type": "internal"}, status_code=500)


def error_handlers() -> dict:
    """Starlette's exception handlers: every error a request can cause, by `http_error`;
    unknown routes and methods; anything else is a 500 without details."""
    mapped = (ServeError, QueueFull, QueueClosed, QueueTimeout, UsageError)
    return {**dict.fromkeys(mapped, _mapped_error), HTTPException: _http_error, Exception: _internal_error}


# ----------------------------------------------------------------- the shared path


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes whatever Content-Length says (413 past it)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise bad_request("invalid Content-Length")
        if int(length) > limit:
            raise _too_large(int(length), limit)
    body = bytearray()
    try:
        async for chunk in request.stream():  # chunked bodies are counted as they arrive
            body += chunk
            if len(body) > limit:
                raise _too_large(None, limit)
    except ClientDisconnect:
        raise bad_request("the client went away before sending the whole body") from None
    return bytes(body)


def _too_large(size: int | None, limit: int) -> ServeError:
    what = f"{size} bytes" if size is not None else "the body"
    return ServeError(413, "body_too_large", f"{what} is over this server's limit of {limit} bytes (--max-body-mb)")


def _load_one(service: Service, name: str, index: int, text: str):
    """One input string -> the model's input tensor (runs in a decode thread)."""
    try:
        if is_url(text):
            data = fetch_url(text, service.settings.urls)
        else:
            try:
                data = image_bytes(text)
            except ValueError as exc:
                raise ImageError(str(exc)) from None
        tensor, _notes = service.served.preprocess(data, name)
        return tensor
    except (UrlRefused, ImageError) as exc:  # the answer names the image at fault
        raise http_error(exc, service, name, index) from None


async def run_images(service: Service, queue: BatchQueue, req: ImageRequest, item=lambda x: x):
    """Decode a request's images in the decode threads, then run them through `queue`.
    Returns (results, headers). Bound by the request timeout as a whole."""
    if service.draining:
        raise QueueClosed()
    # Room is held now, before any decoding (503 at once when there is none); meanwhile
    # the batch being formed waits for these images.
    ticket = queue.announce(len(req.images))
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + service.settings.timeout

    async def work():
        jobs = [
            loop.run_in_executor(service.decode_pool, _load_one, service, f"{req.field_name}[{i}]", i, t)
            for i, t in enumerate(req.images)
        ]
        loaded = await asyncio.gather(*jobs, return_exceptions=True)
        for r in loaded:  # the first image at fault fails the request, with its index
            if isinstance(r, BaseException):
                raise r
        return await queue.infer(
            [item(x) for x in loaded], timeout=max(0.001, deadline - time.monotonic()), ticket=ticket
        )

    try:
        done = await asyncio.wait_for(work(), service.settings.timeout)
    except asyncio.TimeoutError:  # decoding or queueing: the one request timeout
        raise QueueTimeout() from None
    finally:
        ticket.release()  # a bad image, a timeout: the room held for this request is free again
    route = "/embed" if queue is service.embed_queue else "classify"
    service.metrics.images.labels(route).inc(len(done))
    headers = {
        "X-Queue-Ms": f"{max(d.queue_s for d in done) * 1000:.3f}",
        "X-Inference-Ms": f"{max(d.inference_s for d in done) * 1000:.3f}",
        "X-Batch-Size": str(max(d.batch_size for d in done)),
    }
    return [d.result for d in done], headers


async def _json_body(request: Request, queue: BatchQueue) -> Any:
    service = service_of(request)
    if service.draining:
        raise QueueClosed()
    queue.check_room(1)  # a full queue refuses before the body is even read
    return parse_json(await read_body(request, service.settings.max_body_bytes))


async def _classify(request: Request, service: Service, parse) -> tuple[ImageRequest, list, dict, int, float | None]:
    """What /score and v2 infer share: the request read by `parse` (its contract's reader),
    its images classified; returns (request, scores, headers, top k, threshold)."""
    if not service.served.has_classifier:
        raise bad_request("this model has no classifier head; use /embed")
    req = parse(await _json_body(request, service.classify_queue), service.settings.max_images)
    k, threshold = _selection(service, req.params)
    probs, headers = await run_images(service, service.classify_queue, req)
    return req, probs, headers, k, threshold


def _top(service: Service, probs, k: int, threshold: float | None = None) -> list[dict[str, Any]]:
    """The k best classes, best first; for a multi-label model only those whose sigmoid
    score is at or above `threshold` (maybe none)."""
    labels = service.served.labels
    order = (-probs).argsort(kind="stable")[:k]
    return [{"label": labels[i], "score": float(probs[i])} for i in order if threshold is None or probs[i] >= threshold]


def _selection(service: Service, params: dict) -> tuple[int, float | None]:
    """(top_k, threshold): a multi-label model answers every label over its threshold
    (params.threshold overrides; params.top_k caps), a single-label one its top 5."""
    served = service.served
    if served.multi_label:
        return top_k_param(params, served.num_classes, served.num_classes), threshold_param(params, served.threshold)
    return top_k_param(params, served.num_classes), None


# ----------------------------------------------------------------- Azure and /embed


async def score(request: Request) -> Response:
    service = service_of(request)
    _, probs, headers, k, threshold = await _classify(request, service, score_request)
    return JSONResponse([_top(service, p, k, threshold) for p in probs], headers=headers)


async def embed(request: Request) -> Response:
    service = service_of(request)
    req = score_request(await _json_body(request, service.embed_queue), service.settings.max_images)
    pool, normalize = embed_params(req.params)
    pool = service.served.check_pool(pool)
    if pool == "tokens":
        raise bad_request("pool 'tokens' is not served (too large for JSON); use token, avg, cls or dist")
    feats, headers = await run_images(service, service.embed_queue, req, item=lambda x: (x, pool, normalize))
    return JSONResponse([f.tolist() for f in feats], headers=headers)


# ----------------------------------------------------------------- probes and metrics


async def health(request: Request) -> Response:
    service = service_of(request)
    if not service.ready:
        return JSONResponse({"status": "draining" if service.draining else "starting"}, status_code=503)
    return JSONResponse({"status": "ready", "model": service.settings.name})


async def metrics(request: Request) -> Response:
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------- Open Inference Protocol v2


def _model(request: Request) -> Service:
    service = service_of(request)
    name = request.path_params["name"]
    if name != service.settings.name:
        raise ServeError(
            404, "not_found", f"no model named {name[:64]!r} here; this server serves {service.settings.name!r}"
        )
    return service


async def v2_server(request: Request) -> Response:
    return JSONResponse({"name": "deit-cli", "version": __version__, "extensions": []})


async def v2_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def v2_ready(request: Request) -> Response:
    ready = service_of(request).ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def v2_model(request: Request) -> Response:
    service = _model(request)
    served = service.served
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, served.num_classes]},
        {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
    ]
    return JSONResponse(
        {
            "name": service.settings.name,
            "versions": [],
            "platform": "pytorch",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs if served.has_classifier else [],
            "parameters": {
                "source": str(served.model.source or ""),
                "image_size": served.image_size,
                "labels": len(served.labels),
            },
        }
    )


async def v2_model_ready(request: Request) -> Response:
    service = _model(request)
    return JSONResponse(
        {"name": service.settings.name, "ready": service.ready}, status_code=200 if service.ready else 503
    )


async def v2_infer(request: Request) -> Response:
    service = _model(request)
    req, probs, headers, k, threshold = await _classify(request, service, v2_request)
    n, c = len(probs), service.served.num_classes
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [n, c], "data": [float(v) for p in probs for v in p]}
    ]
    if threshold is not None:  # multi-label: the sigmoid scores and which are over the threshold
        outputs.append(
            {
                "name": "predicted",
                "datatype": "BOOL",
                "shape": [n, c],
                "data": [bool(v >= threshold) for p in probs for v in p],
            }
        )
    else:
        tops = [_top(service, p, k) for p in probs]
        outputs += [
            {"name": "labels", "datatype": "BYTES", "shape": [n, k], "data": [t["label"] for ts in tops for t in ts]},
            {"name": "scores", "datatype": "FP32", "shape": [n, k], "data": [t["score"] for ts in tops for t in ts]},
        ]
    body: dict[str, Any] = {"model_name": service.settings.name, "outputs": outputs}
    if req.id is not None:
        body["id"] = req.id
    return JSONResponse(body, headers=headers)


def routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/score", score, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2", v2_server, methods=["GET"]),
        Route("/v2/health/live", v2_live, methods=["GET"]),
        Route("/v2/health/ready", v2_ready, methods=["GET"]),
        Route("/v2/models/{name}", v2_model, methods=["GET"]),
        Route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
    ]
