"""The request and response shapes of the contracts the server speaks, and its errors.

Azure (the model catalog's online endpoint):
    POST /score  {"input_data": ["<base64 or URL>", ...], "params": {"top_k": 5}}
                 or {"input_data": {"columns": ["image"], "index": [0, ...], "data": [[...], ...]}}
    ->           [[{"label": "tabby", "score": 0.91}, ...], ...]   one list per image, best first

Open Inference Protocol v2 (KServe):
    POST /v2/models/{name}/infer
        {"id": "...", "inputs": [{"name": "image", "shape": [N], "datatype": "BYTES",
                                  "data": ["<base64>", ...]}], "parameters": {"top_k": 5}}
    ->  {"model_name", "id", "outputs": [probabilities FP32 [N, C], labels BYTES [N, k],
                                         scores FP32 [N, k]]}

Errors: {"error": "<one line>", "error_type": "<kind>"} (+ "index" of the image at fault).
Nothing here echoes the input back.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ServeError",
    "ImageRequest",
    "parse_json",
    "score_request",
    "v2_request",
    "image_bytes",
    "top_k_param",
    "threshold_param",
    "embed_params",
    "DEFAULT_TOP_K",
]

DEFAULT_TOP_K = 5


class ServeError(Exception):
    """An error answer: HTTP status, a kind, one line, and the image index when one is at fault."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        index: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.index = index
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "error_type": self.error_type}
        if self.index is not None:
            out["index"] = self.index
        return out


def bad_request(message: str) -> ServeError:
    return ServeError(400, "bad_request", message)


@dataclass
class ImageRequest:
    images: list[str]  # base64 (optionally data: URLs) or http(s) URLs, as sent
    params: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # v2's request id, echoed in the answer
    field_name: str = "input_data"  # how error messages name an image: input_data[3]


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except RecursionError:
        raise bad_request("the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None


def _check_count(n: int, max_images: int, what: str) -> None:
    if n == 0:
        raise bad_request(f"{what} is empty; send at least one image")
    if n > max_images:
        raise ServeError(413, "too_many_images", f"{n} images in one request; this server takes at most {max_images}")


def _strings(values: list, what: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ServeError(
                400, "bad_request", f"{what}[{i}] must be a string (base64 image or URL), not {_json_type(v)}", index=i
            )
    return values


def _json_type(v: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _params(doc: dict, key: str) -> dict:
    params = doc.get(key, {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f'"{key}" must be an object, not {_json_type(params)}')
    return params


def score_request(doc: Any, max_images: int) -> ImageRequest:
    """An Azure /score (or /embed) body: input_data as a list, or pandas' split form."""
    if not isinstance(doc, dict):
        raise bad_request(f'the body must be a JSON object with "input_data", not {_json_type(doc)}')
    if "input_data" not in doc:
        raise bad_request('missing "input_data" (a list of base64 images)')
    data = doc["input_data"]
    if isinstance(data, dict):  # {"columns": ["image"], "index": [...], "data": [[...], ...]}
        columns, rows = data.get("columns", ["image"]), data.get("data")
        if not isinstance(columns, list) or not isinstance(rows, list):
            raise bad_request('input_data in split form needs "columns" and "data" lists')
        col = columns.index("image") if "image" in columns else 0
        images = []
        for i, row in enumerate(rows):
            if isinstance(row, list):
                if len(row) <= col:
                    raise ServeError(400, "bad_request", f"input_data.data[{i}] has no image column", index=i)
                row = row[col]
            images.append(row)
    elif isinstance(data, list):
        images = data
    else:
        raise bad_request(f"input_data must be a list of base64 images, not {_json_type(data)}")
    _check_count(len(images), max_images, "input_data")
    return ImageRequest(_strings(images, "input_data"), _params(doc, "params"))


def v2_request(doc: Any, max_images: int) -> ImageRequest:
    """An Open Inference Protocol v2 infer body with one BYTES input of base64 images."""
    if not isinstance(doc, dict):
        raise bad_request(f'the body must be a JSON object with "inputs", not {_json_type(doc)}')
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request('"inputs" must be a non-empty list of tensors')
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request('"inputs" must hold exactly one tensor: the BYTES tensor of base64 images')
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise bad_request(
            f'the input tensor\'s datatype must be "BYTES" (base64 images), not {tensor.get("datatype")!r}'
        )
    data, shape = tensor.get("data"), tensor.get("shape")
    if not isinstance(data, list):
        raise bad_request('the input tensor needs "data": a list of base64 images')
    flat = _flatten(data)
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise bad_request('the input tensor needs "shape": a list of integers, e.g. [N]')
    n = 1
    for s in shape:
        n *= s
    if n != len(flat):
        raise bad_request(f"the input tensor's shape {shape} does not match its {len(flat)} elements")
    _check_count(len(flat), max_images, "the input tensor")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad_request('"id" must be a string')
    return ImageRequest(_strings(flat, "inputs[0].data"), _params(doc, "parameters"), rid, "inputs[0].data")


def _flatten(data: list, depth: int = 0) -> list:
    if depth > 4:
        raise bad_request("the input tensor's data is nested too deeply")
    out = []
    for v in data:
        out.extend(_flatten(v, depth + 1) if isinstance(v, list) else [v])
    return out


def threshold_param(params: dict, default: float) -> float:
    """params.threshold (multi-label models; default the model's), a number in [0, 1]."""
    t = params.get("threshold", default)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise bad_request(f"threshold must be a number in [0, 1], not {t!r}"[:200])
    return float(t)


def top_k_param(params: dict, num_classes: int, default: int = DEFAULT_TOP_K) -> int:
    """params.top_k (default 5), at most the number of classes."""
    k = params.get("top_k", default)
    if isinstance(k, bool) or not isinstance(k, int):
        raise bad_request(f"top_k must be a positive integer, not {_json_type(k)}")
    if k < 1:
        raise bad_request(f"top_k must be at least 1, not {k}")
    return min(k, num_classes)


def embed_params(params: dict) -> tuple[str, bool]:
    pool, normalize = params.get("pool", "token"), params.get("normalize", False)
    if not isinstance(pool, str):
        raise bad_request(f"pool must be a string, not {_json_type(pool)}")
    if not isinstance(normalize, bool):
        raise bad_request(f"normalize must be true or false, not {_json_type(normalize)}")
    return pool, normalize


def image_bytes(text: str) -> bytes:
    """Base64 (standard or URL-safe, padded or not, with the newlines base64.encodebytes
    inserts, or as a data: URL) -> bytes. ValueError with a one-line reason."""
    s = text.strip()
    if s[:5].lower() == "data:":
        head, sep, rest = s.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
        s = rest
    s = "".join(s.split())  # newlines every 76 characters, stray spaces
    altchars = b"-_" if ("-" in s or "_" in s) else None
    s = s.rstrip("=")
    if len(s) % 4 == 1:
        raise ValueError("invalid base64 (wrong length)")
    s += "=" * (-len(s) % 4)
    try:
        data = base64.b64decode(s, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None
    if not data:
        raise ValueError("empty image (zero bytes)")
    return data
