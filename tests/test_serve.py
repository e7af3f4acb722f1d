"""`deit serve`: the batching queue on its own, the routes in-process (Starlette's test
client, the real app over the tiny colour model), the URL policy against real local HTTP
servers, and one real server started as `python -m deit_cli serve` and spoken to over
loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from colours import COLOURS, LABELS, colour_files, expected_scores
from imagegen import PDF_BYTES, png_header, truncated_jpeg
from PIL import Image

from deit_cli.serve.queue import BatchQueue, QueueFull, QueueTimeout

ROOT = Path(__file__).resolve().parents[1]


def png(rgb=(255, 0, 0), size=(40, 30), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, rgb).save(buf, "PNG", **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- the queue, no HTTP


class Recorder:
    """A `run` for the queue: doubles each item, records batch sizes, can be held."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items):
        self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append(list(items))
        return [2 * i for i in items]


def run_async(coro, timeout: float = 20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_queue_groups_concurrent_submits_up_to_the_batch_size():
    rec = Recorder(delay=0.02)

    async def main():
        q = BatchQueue(rec, max_batch_size=4, max_delay_ms=50, max_queue=100)
        await q.start()
        done = await asyncio.gather(*(q.infer([i]) for i in range(20)))
        await q.stop()
        return done

    done = run_async(main())
    assert [d[0].result for d in done] == [2 * i for i in range(20)]  # each its own answer
    sizes = [len(b) for b in rec.batches]
    assert sum(sizes) == 20 and max(sizes) == 4 and len(sizes) <= 6
    assert all(d[0].batch_size == len(b) for b in rec.batches for d in done if d[0].result // 2 in b)


def test_queue_runs_a_lone_request_at_once_on_an_idle_server():
    rec = Recorder()

    async def main():
        q = BatchQueue(rec, max_batch_size=32, max_delay_ms=2000, max_queue=10)
        await q.start()
        t = time.monotonic()
        (d,) = await q.infer([7])
        took = time.monotonic() - t
        await q.stop()
        return d, took

    d, took = run_async(main())
    assert d.result == 14 and d.batch_size == 1
    assert took < 1.0 and d.queue_s < 0.5  # nowhere near the 2 s max delay


def test_queue_waits_for_announced_items_at_most_max_delay():
    rec = Recorder()

    async def main():
        q = BatchQueue(rec, max_batch_size=32, max_delay_ms=300, max_queue=64)
        await q.start()
        ticket = q.announce(2)  # two items on their way (a request still decoding)
        first = asyncio.ensure_future(q.infer([1]))
        await asyncio.sleep(0.05)
        both = await asyncio.gather(first, q.infer([2, 3], ticket=ticket))
        # Announced items that never come: the batch waits max_delay, no longer.
        lost = q.announce(1)
        t = time.monotonic()
        (alone,) = await q.infer([4])
        waited = time.monotonic() - t
        lost.release()
        gone = q.announce(1)
        gone.release()  # released: nothing is on its way, so the next item runs at once
        (fast,) = await q.infer([5])
        await q.stop()
        return both, alone, waited, fast

    (a, b), alone, waited, fast = run_async(main())
    assert a[0].batch_size == 3 and [x.result for x in b] == [4, 6]  # 1, 2 and 3 ran together
    assert 0.03 < a[0].queue_s < 0.3  # it waited for its company, not the whole delay
    assert alone.result == 8 and 0.25 < waited < 1.0  # bounded by max_delay_ms
    assert fast.batch_size == 1 and fast.queue_s < 0.1


def test_queue_is_bounded_and_refuses_at_once():
    rec = Recorder()
    rec.gate.clear()  # the first batch blocks, so later items wait in the queue

    async def main():
        q = BatchQueue(rec, max_batch_size=2, max_delay_ms=0, max_queue=3)
        await q.start()
        running = asyncio.ensure_future(q.infer([0]))
        await asyncio.sleep(0.05)  # item 0 is in the (held) batch, not waiting
        waiting = asyncio.ensure_future(q.infer([1, 2, 3]))
        await asyncio.sleep(0.01)
        assert q.depth == 3
        t = time.monotonic()
        with pytest.raises(QueueFull) as info:
            q.submit([4])
        assert time.monotonic() - t < 0.1 and info.value.retry_after >= 1
        rec.gate.set()
        out = await asyncio.gather(running, waiting)
        await q.stop()
        return out

    out = run_async(main())
    assert [d.result for d in out[1]] == [2, 4, 6]
    assert all(4 not in b for b in rec.batches)


def test_queue_timeout_drops_the_items_still_waiting():
    rec = Recorder()
    rec.gate.clear()

    async def main():
        q = BatchQueue(rec, max_batch_size=1, max_delay_ms=0, max_queue=10)
        await q.start()
        held = asyncio.ensure_future(q.infer([0]))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueTimeout):
            await q.infer([5], timeout=0.1)
        assert q.depth == 0  # the timed-out item no longer counts against the bound
        rec.gate.set()
        await held
        await q.stop()

    run_async(main())
    assert [b for b in rec.batches] == [[0]]  # item 5 was never run


def test_queue_stop_answers_what_is_queued_and_errors_reach_their_requests():
    def run(items):
        if 13 in items:
            raise RuntimeError("unlucky")
        time.sleep(0.01)
        return items

    async def main():
        q = BatchQueue(run, max_batch_size=1, max_delay_ms=0, max_queue=10)
        await q.start()
        futures = [f for i in range(5) for f in q.submit([i])]
        (bad,) = q.submit([13])
        await q.stop()  # nothing new, but everything queued is answered
        with pytest.raises(RuntimeError, match="unlucky"):
            bad.result()
        return [f.result().result for f in futures]

    assert run_async(main()) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- routes, in-process


@pytest.fixture(scope="module")
def served(model_path):
    from deit_cli.checkpoints import load_model
    from deit_cli.engine.serve import ServedModel

    return ServedModel(load_model(str(model_path)), device="cpu")


@contextmanager
def client_for(served, **settings):
    from starlette.testclient import TestClient

    from deit_cli.serve.app import create_app
    from deit_cli.serve.service import Settings

    with TestClient(create_app(served, Settings(**settings))) as c:
        yield c


@pytest.fixture
def client(served):
    with client_for(served, max_images=8, max_body_bytes=256 * 1024) as c:
        yield c


def classify_records(run_cpu, model_path, paths, top=6) -> list[dict]:
    rc, out, err = run_cpu("classify", *map(str, paths), "-m", str(model_path), "--format", "json", "--top", str(top))
    assert rc == 0, err
    return json.loads(out)


def assert_same(answer: list[dict], record: dict) -> None:
    assert [p["label"] for p in answer] == [p["label"] for p in record["predictions"]]
    np.testing.assert_allclose([p["score"] for p in answer], [p["score"] for p in record["predictions"]], atol=1e-5)


def test_score_equals_deit_classify(client, run_cpu, model_path, colour_dir):
    files = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    body = {"input_data": [b64(f.read_bytes()) for f in files], "params": {"top_k": 6}}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    answers = r.json()
    records = classify_records(run_cpu, model_path, files)
    assert len(answers) == len(files)
    for a, rec in zip(answers, records):
        assert_same(a, rec)
    assert [a[0]["label"] for a in answers[:6]] == LABELS
    for h in ("x-queue-ms", "x-inference-ms", "x-batch-size"):
        assert float(r.headers[h]) >= 0
    assert int(r.headers["x-batch-size"]) == len(files)  # one request's images run as one batch


def test_score_default_top_5_and_split_form(client, colour_dir):
    files = colour_files(colour_dir)[:2]
    plain = client.post("/score", json={"input_data": [b64(f.read_bytes()) for f in files]}).json()
    assert [len(a) for a in plain] == [5, 5]
    split = {"input_data": {"columns": ["image"], "index": [0, 1], "data": [[b64(f.read_bytes())] for f in files]}}
    assert client.post("/score", json=split).json() == plain


def test_v2_infer_and_metadata(client, model_path, colour_dir):
    files = colour_files(colour_dir)
    body = {
        "id": "r1",
        "inputs": [
            {"name": "image", "shape": [len(files)], "datatype": "BYTES", "data": [b64(f.read_bytes()) for f in files]}
        ],
        "parameters": {"top_k": 2},
    }
    r = client.post("/v2/models/deit/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["model_name"] == "deit" and r.json()["id"] == "r1"
    probs = out["probabilities"]
    assert probs["datatype"] == "FP32" and probs["shape"] == [len(files), len(LABELS)]
    want = expected_scores(model_path, files)
    np.testing.assert_allclose(np.array(probs["data"]).reshape(probs["shape"]), want, atol=1e-5)
    assert out["labels"]["shape"] == [len(files), 2] and out["labels"]["data"][::2] == LABELS
    assert "x-batch-size" in r.headers
    meta = client.get("/v2/models/deit").json()
    assert meta["name"] == "deit" and meta["inputs"][0]["datatype"] == "BYTES"
    assert client.get("/v2/models/deit/ready").json()["ready"] is True
    assert client.get("/v2/health/live").status_code == client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "deit-cli"
    assert client.get("/v2/models/other").status_code == 404
    assert client.post("/v2/models/other/infer", json=body).status_code == 404


def test_embed_equals_extract_features(client, model_path, colour_dir):
    from colours import expected_features

    files = colour_files(colour_dir)[:3]
    for pool, norm in (("token", False), ("avg", True)):
        r = client.post(
            "/embed",
            json={"input_data": [b64(f.read_bytes()) for f in files], "params": {"pool": pool, "normalize": norm}},
        )
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()), expected_features(model_path, files, pool, norm), atol=1e-5)
    assert client.post("/embed", json={"input_data": [b64(png())], "params": {"pool": "nope"}}).status_code == 400


def test_base64_variants_give_the_same_answer(client):
    data = png((0, 255, 255), (33, 47))
    plain = b64(data)
    variants = [
        "data:image/png;base64," + plain,
        base64.encodebytes(data).decode(),  # a newline every 76 characters
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        "  " + plain + "\n",
    ]
    want = client.post("/score", json={"input_data": [plain]}).json()[0]
    got = client.post("/score", json={"input_data": variants}).json()
    assert want[0]["label"] == "cyan" and len(got) == len(variants)
    for answer in got:  # the same up to float rounding (a batch of 4, not of 1)
        assert [p["label"] for p in answer] == [p["label"] for p in want]
        np.testing.assert_allclose([p["score"] for p in answer], [p["score"] for p in want], atol=1e-6)


def test_awkward_images_are_served_like_classify(client, run_cpu, model_path, tmp_path):
    from imagegen import save_with_orientation

    paths = []
    a = np.zeros((30, 50), np.uint16)
    a[:, :25] = 65535
    paths.append(tmp_path / "grey16.png")
    Image.fromarray(a).save(paths[-1])
    paths.append(tmp_path / "cmyk.jpg")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(paths[-1])
    paths.append(tmp_path / "palette.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).convert("P").save(paths[-1])
    rgb = np.zeros((20, 60, 3), np.uint8)
    rgb[:, :30] = (255, 255, 0)
    rgb[:, 30:] = (0, 0, 255)
    paths.append(save_with_orientation(Image.fromarray(rgb), tmp_path / "exif.jpg", 6))
    paths.append(tmp_path / "strip.png")
    Image.new("RGB", (1, 100_000), (0, 255, 0)).save(paths[-1])
    r = client.post("/score", json={"input_data": [b64(p.read_bytes()) for p in paths], "params": {"top_k": 6}})
    assert r.status_code == 200, r.text
    for answer, rec in zip(r.json(), classify_records(run_cpu, model_path, paths)):
        assert_same(answer, rec)


def _bad_bodies() -> dict:
    bomb = png_header(20_000, 20_000)
    truncated = truncated_jpeg(Path(os.environ.get("TMPDIR", "/tmp")) / f"deit-serve-trunc-{os.getpid()}.jpg")
    return {
        "empty body": (b"", 400, "bad_request"),
        "not JSON": (b"{input_data:", 400, "bad_request"),
        "deeply nested": (b"[" * 200_000 + b"]" * 200_000, 413, "body_too_large"),  # over 256 KiB here
        "nested, small": (b'{"input_data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "bad_request"),
        "not an object": (b"[1, 2]", 400, "bad_request"),
        "input_data a number": (json.dumps({"input_data": 3}).encode(), 400, "bad_request"),
        "an image a number": (json.dumps({"input_data": [b64(png()), 5]}).encode(), 400, "bad_request"),
        "missing input_data": (json.dumps({"data": [b64(png())]}).encode(), 400, "bad_request"),
        "empty input_data": (json.dumps({"input_data": []}).encode(), 400, "bad_request"),
        "too many images": (json.dumps({"input_data": [b64(png())] * 9}).encode(), 413, "too_many_images"),
        "invalid base64": (json.dumps({"input_data": [b64(png()), "not base64!"]}).encode(), 422, "bad_image"),
        "zero bytes": (json.dumps({"input_data": [""]}).encode(), 422, "bad_image"),
        "text": (json.dumps({"input_data": [b64(b"hello, this is text\n" * 5)]}).encode(), 422, "bad_image"),
        "PDF": (json.dumps({"input_data": [b64(PDF_BYTES)]}).encode(), 422, "bad_image"),
        "zip": (json.dumps({"input_data": [b64(b"PK\x03\x04" + b"\x00" * 40)]}).encode(), 422, "bad_image"),
        "truncated JPEG": (json.dumps({"input_data": [b64(truncated.read_bytes())]}).encode(), 422, "bad_image"),
        "20000 x 20000 PNG": (json.dumps({"input_data": [b64(bomb)]}).encode(), 422, "bad_image"),
        "top_k 0": (json.dumps({"input_data": [b64(png())], "params": {"top_k": 0}}).encode(), 400, "bad_request"),
        "top_k -1": (json.dumps({"input_data": [b64(png())], "params": {"top_k": -1}}).encode(), 400, "bad_request"),
        "top_k string": (
            json.dumps({"input_data": [b64(png())], "params": {"top_k": "3"}}).encode(),
            400,
            "bad_request",
        ),
        "params a list": (json.dumps({"input_data": [b64(png())], "params": [1]}).encode(), 400, "bad_request"),
        "URL with URLs off": (json.dumps({"input_data": ["http://example.com/cat.jpg"]}).encode(), 400, "url_refused"),
        "file URL": (json.dumps({"input_data": ["file:///etc/passwd"]}).encode(), 400, "url_refused"),
    }


BAD = _bad_bodies()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_their_status_and_the_server_stays_healthy(client, case):
    body, status, kind = BAD[case]
    r = client.post("/score", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (case, r.text)
    err = r.json()
    assert err["error_type"] == kind and "\n" not in err["error"] and "Traceback" not in err["error"]
    assert len(r.text) < 600  # never the input echoed back
    if status == 422:
        assert err["index"] == (1 if case == "invalid base64" else 0)
        assert err["error"].startswith(f"input_data[{err['index']}]")
    assert client.get("/health").status_code == 200
    ok = client.post("/score", json={"input_data": [b64(png((0, 0, 255)))]})
    assert ok.status_code == 200 and ok.json()[0][0]["label"] == "blue"


def test_huge_top_k_gives_every_class(client):
    r = client.post("/score", json={"input_data": [b64(png())], "params": {"top_k": 10**30}})
    assert r.status_code == 200 and len(r.json()[0]) == len(LABELS)


def test_body_limit_holds_for_chunked_bodies_and_lying_lengths(client):
    big = json.dumps({"input_data": [b64(os.urandom(300 * 1024))]}).encode()

    def chunks():
        for i in range(0, len(big), 16384):
            yield big[i : i + 16384]

    r = client.post("/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "body_too_large"
    r = client.post("/score", content=b"{}", headers={"Content-Length": str(10**9)})
    assert r.status_code == 413
    assert client.get("/health").status_code == 200


def test_api_key_guards_every_route_but_the_probes(served):
    image = {"input_data": [b64(png())]}
    with client_for(served, api_key="s3cret-key") as c:
        assert c.post("/score", json=image).status_code == 401
        r = c.post("/score", json=image, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/score", json=image, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/v2/models/deit").status_code == 401
        for probe in ("/health", "/v2/health/live", "/v2/health/ready", "/v2/models/deit/ready"):
            assert c.get(probe).status_code == 200, probe


def test_metrics_count_requests_and_batches(client):
    client.post("/score", json={"input_data": [b64(png())] * 3})
    client.post("/score", content=b"nope")
    text = client.get("/metrics").text
    assert re.search(r'deit_requests_total\{route="/score",status="200"\} 1\.0', text)
    assert re.search(r'deit_requests_total\{route="/score",status="400"\} 1\.0', text)
    assert re.search(r'deit_batch_size_bucket\{le="4\.0"\} 1\.0', text)
    assert re.search(r"deit_images_total\{route=\"classify\"\} 3\.0", text)
    for name in (
        "deit_queue_depth",
        "deit_queue_seconds",
        "deit_inference_seconds",
        "deit_request_seconds",
        "deit_ready",
    ):
        assert f"# HELP {name}" in text


def test_overload_gets_503_with_retry_after(served):
    with client_for(served, max_queue=2, max_images=2) as c:
        q = c.app.service.classify_queue
        entered, gate = threading.Event(), threading.Event()
        real = q.run

        def held(xs):
            entered.set()
            gate.wait(10)
            return real(xs)

        q.run = held
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(c.post, "/score", json={"input_data": [b64(png())]})
            assert entered.wait(10)  # the first image is in the held batch: fill the queue behind it
            second = pool.submit(c.post, "/score", json={"input_data": [b64(png())] * 2})
            deadline = time.monotonic() + 10
            while q.depth < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = c.post("/score", json={"input_data": [b64(png())]})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error_type"] == "overloaded"
            gate.set()
            assert first.result(10).status_code == second.result(10).status_code == 200
        assert c.get("/health").status_code == 200


def test_timeout_gets_504(served):
    with client_for(served, timeout=0.2) as c:
        gate = threading.Event()
        q = c.app.service.classify_queue
        real = q.run
        q.run = lambda xs: (gate.wait(5), real(xs))[1]
        r = c.post("/score", json={"input_data": [b64(png())]})
        gate.set()
        assert r.status_code == 504 and r.json()["error_type"] == "timeout"


def test_padded_batches_give_the_same_answers(model_path, colour_dir):
    from deit_cli.checkpoints import load_model
    from deit_cli.engine.serve import ServedModel

    plain = ServedModel(load_model(str(model_path)), device="cpu")
    padded = ServedModel(load_model(str(model_path)), device="cpu")
    padded.pad_batches = True  # what the CUDA-graph and compiled paths do
    padded.warm_up(8)
    assert padded.buckets == (1, 4, 8)
    xs = [plain.preprocess(f.read_bytes(), f.name)[0] for f in colour_files(colour_dir)[:3]]
    np.testing.assert_allclose(padded.probabilities(xs), plain.probabilities(xs), atol=1e-6)
    feats = padded.embeddings(xs, ["token", "avg", "cls"], [False, True, False])
    for a, b in zip(feats, plain.embeddings(xs, ["token", "avg", "cls"], [False, True, False])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_service_warms_the_model_up_for_its_batch_size(model_path):
    from deit_cli.checkpoints import load_model
    from deit_cli.engine.serve import ServedModel

    served = ServedModel(load_model(str(model_path)), device="cpu")
    served.pad_batches = True
    with client_for(served, max_batch_size=8) as c:
        assert served.buckets == (1, 4, 8)  # warmed before the first request
        assert c.post("/score", json={"input_data": [b64(png())]}).status_code == 200


def test_a_failed_warm_up_is_the_servers_error_not_a_traceback(served, monkeypatch):
    from deit_cli.errors import OutOfMemory
    from deit_cli.serve.app import create_app
    from deit_cli.serve.server import listen, run
    from deit_cli.serve.service import Settings

    def oom(max_batch_size):
        raise OutOfMemory("out of memory", batch_size=max_batch_size)

    monkeypatch.setattr(served, "warm_up", oom)
    sock = listen("127.0.0.1", 0)
    try:
        with pytest.raises(OutOfMemory) as caught:
            run(create_app(served, Settings(max_batch_size=4)), sock)
        assert caught.value.batch_size == 4
    finally:
        sock.close()


# --------------------------------------------------------------------------- URLs (SSRF)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    image = png((255, 0, 255))
    hits: list[str] = []

    def do_GET(self):
        type(self).hits.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self._send(200, self.image)
        elif self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect/") :].replace("PORT", str(port)))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(40):
                try:
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
        elif self.path == "/big":
            self.send_response(200)  # no Content-Length: only counting stops it
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\xff" * 65536)
            except OSError:
                pass
        else:
            self._send(404, b"")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ImageHandler.hits = []
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def listener():
    """A loopback socket that counts the connections made to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    seen = []

    def accept():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                seen.append(1)
                conn.close()
            except OSError:
                pass

    stop = threading.Event()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1], seen
    finally:
        stop.set()
        t.join(2)
        sock.close()


def test_urls_to_inside_addresses_are_refused_without_a_connection(served):
    from deit_cli.serve.urls import UrlPolicy

    with listener() as (port, seen):
        urls = [
            f"http://127.0.0.1:{port}/a.png",
            f"http://[::1]:{port}/a.png",
            f"http://2130706433:{port}/",
            f"http://0x7f000001:{port}/",
            f"http://localhost:{port}/",
            "http://169.254.169.254/latest/meta-data/",
            f"http://[::ffff:127.0.0.1]:{port}/",
            f"ftp://127.0.0.1:{port}/",
            "file:///etc/passwd",
            f"http://user:pw@127.0.0.1:{port}/",
        ]
        with client_for(served) as off:
            for u in urls:
                r = off.post("/score", json={"input_data": [u]})
                assert r.status_code == 400 and r.json()["error_type"] == "url_refused", u
        hosts = ["127.0.0.1", "::1", "2130706433", "0x7f000001", "localhost", "169.254.169.254", "::ffff:127.0.0.1"]
        with client_for(served, urls=UrlPolicy.from_flags(hosts)) as on:
            for u in urls:
                r = on.post("/score", json={"input_data": [u]})
                assert r.status_code == 400 and r.json()["error_type"] == "url_refused", (u, r.text)
                assert (
                    "address" in r.json()["error"] or "URL" in r.json()["error"] or "credentials" in r.json()["error"]
                )
        time.sleep(0.3)
        assert seen == []  # nothing ever connected


def test_allowed_urls_are_fetched_and_redirects_slow_and_big_bodies_checked(served):
    from deit_cli.serve.urls import UrlPolicy

    with image_server() as port:
        policy = UrlPolicy.from_flags(["127.0.0.1"], ["127.0.0.1/32"], timeout=1.0, max_bytes=1024 * 1024)
        with client_for(served, urls=policy) as c:
            base = f"http://127.0.0.1:{port}"
            r = c.post("/score", json={"input_data": [f"{base}/img.png", b64(_ImageHandler.image)]})
            assert r.status_code == 200, r.text
            assert r.json()[0] == r.json()[1] and r.json()[0][0]["label"] == "magenta"
            ok = c.post("/score", json={"input_data": [f"{base}/redirect/http://127.0.0.1:PORT/img.png"]})
            assert ok.status_code == 200  # a redirect inside the allowed host is followed
            cases = {
                "/redirect/http://[::1]:PORT/img.png": 400,  # to a host not on the list
                "/redirect/http://0x7f000001:PORT/img.png": 400,
                "/redirect/file:///etc/passwd": 400,
                "/redirect/http://127.0.0.1:PORT/redirect/http://127.0.0.1:PORT/redirect/"
                "http://127.0.0.1:PORT/redirect/http://127.0.0.1:PORT/img.png": 400,  # too many hops
                "/slow": 422,
                "/big": 422,
                "/missing": 422,
            }
            for path, status in cases.items():
                t = time.monotonic()
                r = c.post("/score", json={"input_data": [base + path]})
                assert r.status_code == status, (path, r.text)
                assert time.monotonic() - t < 5
            assert "timed out" in c.post("/score", json={"input_data": [base + "/slow"]}).json()["error"]


def test_each_redirect_hop_is_resolved_and_checked():
    from deit_cli.images.decode import ImageError
    from deit_cli.serve.urls import UrlPolicy, UrlRefused, fetch_url

    with image_server() as port:
        resolved = {
            "images.example": ["127.0.0.1"],
            "evil.example": ["10.0.0.7"],
            "loop.example": ["127.0.0.2"],
            "both.example": ["93.184.215.14", "::1"],
        }
        policy = UrlPolicy(
            frozenset(resolved),
            (__import__("ipaddress").ip_network("127.0.0.1/32"),),
            timeout=2.0,
            resolve=lambda host, port: resolved[host],
        )
        assert fetch_url(f"http://images.example:{port}/img.png", policy) == _ImageHandler.image
        with pytest.raises(UrlRefused, match="private address 10.0.0.7"):
            fetch_url(f"http://images.example:{port}/redirect/http://evil.example:PORT/img.png", policy)
        with pytest.raises(UrlRefused, match="loopback address 127.0.0.2"):  # only 127.0.0.1 was allowed
            fetch_url(f"http://images.example:{port}/redirect/http://loop.example:PORT/img.png", policy)
        with pytest.raises(UrlRefused, match="loopback address ::1"):  # every address must pass
            fetch_url(f"http://both.example:{port}/img.png", policy)
        with pytest.raises(ImageError, match="HTTP 404"):
            fetch_url(f"http://images.example:{port}/missing", policy)
        assert _ImageHandler.hits == [
            "/img.png",
            "/redirect/http://evil.example:PORT/img.png",
            "/redirect/http://loop.example:PORT/img.png",
            "/missing",
        ]


# --------------------------------------------------------------------------- the command


def test_refuses_to_listen_beyond_loopback_without_a_key(run_cli, monkeypatch, tmp_path):
    monkeypatch.delenv("DEIT_API_KEY", raising=False)
    rc, out, err = run_cli("serve", "--host", "0.0.0.0", "-m", str(tmp_path / "never-loaded.safetensors"))
    assert rc == 2 and out == "" and "without an API key" in err and "--api-key-file" in err
    assert len(err.strip().splitlines()) == 1
    empty = tmp_path / "key.txt"
    empty.write_text("\n")
    rc, _, err = run_cli("serve", "--host", "0.0.0.0", "--api-key-file", str(empty))
    assert rc == 2 and "is empty" in err
    rc, _, err = run_cli("serve", "--max-images", "64", "--max-queue", "32")
    assert rc == 2 and "--max-queue" in err


def test_without_the_extra_says_how_to_install_it(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    rc, out, err = run_cli("serve")
    assert rc == 69 and out == "" and "pip install 'deit-cli[serve]'" in err


def _start_server(model_path, *args) -> tuple[subprocess.Popen, int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEIT_API_KEY": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deit_cli", "serve", "-m", str(model_path), "--device", "cpu", "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(90):
        proc.kill()
        proc.wait(10)
        raise AssertionError("the server did not become ready: " + "".join(lines))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
    return proc, port, lines


def _post(port: int, path: str, body: dict, timeout: float = 30) -> tuple[int, dict, object]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _post_raw(port: int, body: bytes) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_real_server_batches_concurrent_clients_and_drains_on_sigterm(model_path):
    proc, port, _ = _start_server(model_path, "--max-delay-ms", "300", "--max-body-mb", "0.5")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ready"
        names = [LABELS[i % len(LABELS)] for i in range(32)]
        bodies = {n: {"input_data": [b64(png(COLOURS[n][1], (30 + i, 40)))]} for i, n in enumerate(LABELS)}
        barrier = threading.Barrier(len(names), timeout=30)

        def one(name):
            barrier.wait()
            return _post(port, "/score", bodies[name])

        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(one, names))
        assert all(status == 200 for status, _, _ in answers), answers
        assert [a[2][0][0]["label"] for a in answers] == names  # each request got its own image's answer
        sizes = [int(h["x-batch-size"]) for _, h, _ in answers]
        assert max(sizes) > 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        batches = float(re.search(r"^deit_batch_size_count (\S+)", metrics, re.MULTILINE).group(1))
        assert batches < len(names)

        # Over real HTTP: a body past the limit, chunked or announced; not JSON; still healthy.
        big = json.dumps({"input_data": [b64(os.urandom(600 * 1024))]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            "POST",
            "/score",
            body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
            encode_chunked=True,
            headers={"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error_type"] == "body_too_large"
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Length", str(10**9))  # a length it never sends
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 413
        conn.close()
        assert _post_raw(port, b"not json") == 400
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200

        # SIGTERM while requests wait in the queue: every one is answered, then exit 0.
        assert _post(port, "/score", bodies["red"])[0] == 200  # busy now: the next ones wait for company
        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(_post, port, "/score", bodies[n]) for n in LABELS]
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            late = [f.result(30) for f in pending]
        assert [s for s, _, _ in late] == [200] * len(LABELS)
        assert [b[0][0]["label"] for _, _, b in late] == LABELS
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_help_imports_neither_torch_nor_the_server():
    probe = (
        "import sys; from deit_cli.cli.app import main; rc = main(['serve', '--help']); "
        "print(sorted(m for m in ('torch', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules), "
        "file=sys.stderr); sys.exit(rc)"
    )
    p = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0 and "--max-batch-size" in p.stdout
    assert p.stderr.strip().endswith("[]"), p.stderr
