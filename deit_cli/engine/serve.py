"""Serving: one model, prepared once, that the HTTP server's queue calls with batches.

    served = ServedModel(load_model("deit-small"), device="cuda", dtype="bf16")
    served.warm_up(max_batch_size=32)
    x, notes = served.preprocess(jpeg_bytes, "image 0")   # in a decode thread
    probs = served.probabilities([x1, x2, x3])           # (3, classes) float32 numpy
    feats = served.embeddings([x1, x2], ["token", "avg"], [False, True])

The same decoder (`decode_bytes`), transform and runner as `deit classify`, so a served
answer equals the command's for the same image. Nothing here knows about HTTP.

`backend="auto"` on the CPU in fp32, with onnxruntime (or openvino) installed: warm-up
times the torch runner and the graph ones (engine.ort, engine.ov) at each batch size the
server uses, and each batch of classifier scores runs on the one measured fastest at its
size (`self.choice`); all are checked against the reference model when they load, so any
gives the same answer to 1e-4. Embeddings always run on torch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..config import pool_name
from ..errors import UsageError
from ..images.decode import DEFAULT_MAX_PIXELS, decode_bytes
from ..images.transform import eval_transform
from ..model import DeiT
from .classify import default_head
from .features import pool_tokens
from .results import ImageOptions
from .runner import prepare

__all__ = ["ServedModel"]


def _graph_backends(runner) -> list[str]:
    """The graph backends (engine.ort, engine.ov) that can run beside `runner` here: CPU,
    fp32, and installed."""
    if runner.device.type != "cpu" or runner.dtype != torch.float32:
        return []
    from .ort import NEEDS, check_backend

    usable = []
    for backend in NEEDS:
        try:
            usable.append(check_backend(backend, runner.device, runner.dtype))
        except UsageError:  # not installed: not a candidate
            pass
    return usable


class ServedModel:
    """A model made ready to serve: its runner, its eval transform, its labels."""

    def __init__(
        self,
        model: DeiT,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        compile: bool = False,
        backend: str = "auto",
        head: str | None = None,
        options: ImageOptions = ImageOptions(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        cfg = model.config
        self.model = model
        self.config = cfg
        self.labels = list(model.labels)
        self.has_classifier = cfg.num_classes > 0 and model.head is not None
        self.multi_label = bool(getattr(model, "multi_label", False))  # sigmoid scores over a threshold
        self.threshold = float(getattr(model, "threshold", 0.5))
        self.head = head or default_head(cfg)
        if self.head == "dist" and not cfg.has_dist_head:
            raise UsageError("head 'dist' needs a distilled model with a distillation classifier")
        self.options = options
        self.max_pixels = max_pixels
        self.transform = eval_transform(model.preprocessing, crop_pct=options.crop_pct, resize_mode=options.resize_mode)
        self.runner = prepare(model, device=device, dtype=dtype, compile=compile, backend=backend)
        # auto: onnxruntime and openvino join as candidates, per batch size, where they can run
        # and are installed.
        self.others: dict[str, object] = {}
        self.choice: dict[int, str] = {}  # batch size -> the backend warm-up measured fastest
        auto = backend == "auto" and not compile and self.has_classifier
        self._candidates = _graph_backends(self.runner) if auto else []
        # Paths that specialise on the input shape (a CUDA graph or a compiled graph per batch
        # size) get batches padded up to a few sizes, fixed by warm_up: a server's batch
        # sizes vary with its load, and capturing or compiling one at request time costs more
        # than the padding. Rows are independent, so padding never changes an answer.
        self.pad_batches = self.runner.shape_specialised
        self.buckets: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes if self.has_classifier else 0

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def preprocess(self, data: bytes, name: str) -> tuple[torch.Tensor, list[str]]:
        """Image bytes -> the model's input (3, H, W) float32 and decoding notes.
        Raises ImageError (one line, starting with `name`). Thread-safe."""
        decoded = decode_bytes(
            data,
            name,
            exif_transpose=self.options.exif_transpose,
            allow_truncated=self.options.allow_truncated,
            max_pixels=self.max_pixels,
        )
        return self.transform(decoded.image), decoded.notes

    def _batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(list(images))  # (N, 3, H, W)
        size = next((b for b in self.buckets if b >= len(x)), len(x)) if self.pad_batches else len(x)
        if size > len(x):
            x = torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])  # (bucket, 3, H, W)
        return x

    def probabilities(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """(N, classes) float32 scores of one batch of preprocessed images: softmax
        probabilities, or each class's sigmoid for a multi-label model."""
        if not self.has_classifier:
            raise UsageError("this model has no classifier head", "use /embed")
        x = self._batch(images)
        runner = self._runner_for(len(x))
        logits = runner.logits(x, self.head)[: len(images)]  # (N, classes) float32
        return (logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)).cpu().numpy()

    def _runner_for(self, n: int):
        """The runner warm-up measured fastest at the smallest warmed size >= n."""
        if not self.choice:
            return self.runner
        size = next((b for b in sorted(self.choice) if b >= n), max(self.choice))
        name = self.choice[size]
        return self.others.get(name, self.runner)

    def embeddings(
        self, images: Sequence[torch.Tensor], pools: Sequence[str], normalize: Sequence[bool]
    ) -> list[np.ndarray]:
        """Each image's pooled features (float32), pooled as its own `pools[i]` says."""
        tokens = self.runner.features(self._batch(images))[: len(images)]  # (N, prefix + patches, D)
        out: list[np.ndarray | None] = [None] * len(images)
        for key in sorted(set(zip(pools, normalize))):
            rows = [i for i, k in enumerate(zip(pools, normalize)) if k == key]
            feats = pool_tokens(tokens[rows], key[0], self.config, normalize=key[1])
            for i, f in zip(rows, feats.float().cpu().numpy()):
                out[i] = f
        return out  # type: ignore[return-value]

    def check_pool(self, pool: str) -> str:
        """The canonical pool name; UsageError for an unknown or unavailable one."""
        pool = pool_name(pool)
        if pool == "dist" and not self.config.distilled:
            raise UsageError("pool 'dist' needs a distilled model (this one has no distillation token)")
        return pool

    def warm_up(self, max_batch_size: int) -> None:
        """Run the batch shapes the server will use (1 image and a full batch; on the
        shape-specialising paths, each padding size), so that lazy initialisation, CUDA
        graphs and compilation happen before the server reports ready (the server's
        Service.start calls it with its queues' batch size)."""
        s = self.image_size
        self.buckets = tuple(sorted({b for b in (1, 4, 16) if b < max_batch_size} | {max_batch_size}))
        sizes = self.buckets if self.pad_batches else sorted({1, max_batch_size})
        for n in sizes:
            x = [torch.zeros(3, s, s)] * n
            if self.has_classifier:
                self.probabilities(x)
            else:
                self.embeddings(x, ["token"] * n, [False] * n)
        if self._candidates:
            self._choose(sizes)

    def _choose(self, sizes) -> None:
        """Time torch and each graph backend at each size, interleaved; keep the fastest per size."""
        for name in self._candidates:
            if name not in self.others:
                self.others[name] = prepare(self.model, device="cpu", dtype="fp32", backend=name)
        runners = {"torch": self.runner, **self.others}
        g = torch.Generator().manual_seed(0)
        for n in sizes:
            x = torch.randn(n, 3, self.image_size, self.image_size, generator=g)
            times: dict[str, list[float]] = {k: [] for k in runners}
            reps = 5 if n <= 4 else 2
            for r in runners.values():
                r.logits(x, self.head)  # warm: this size's allocations and primitives
            for _ in range(reps):
                for k, r in runners.items():
                    t = time.perf_counter()
                    r.logits(x, self.head)
                    times[k].append(time.perf_counter() - t)
            self.choice[n] = min(times, key=lambda k: statistics.median(times[k]))
