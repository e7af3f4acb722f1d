"""Engine: run a model over batches of images; results as generators of dataclasses.

    model = load_model("deit-small")
    for r in classify(model, iter_inputs(["photos/"]), top=5):
        print(r.path, r.predictions[0].label if r.ok else r.error)

Decoding runs in a thread pool ahead of the model (`images.iter_batches`), results come
out in input order, and one bad input is a result with an `error`, never an exception.
Nothing here prints or parses flags: the CLI renders what these generators yield.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .accel import prepare
from .errors import UsageError
from .images import InputItem, eval_transform, iter_batches
from .model import HEADS, DeiT, DeiTConfig

__all__ = [
    "HEADS",
    "POOLS",
    "SCORES",
    "ImageOptions",
    "Prediction",
    "Classification",
    "Features",
    "default_head",
    "default_pool",
    "pool_tokens",
    "feature_shape",
    "classify",
    "extract_features",
]

POOLS = ("cls", "dist", "avg", "mean", "tokens")
SCORES = ("prob", "logit")


@dataclass(frozen=True)
class ImageOptions:
    """How inputs are read and preprocessed (the model's own eval transform by default)."""

    batch_size: int = 32
    workers: int | None = None  # decode threads; None: min(8, CPU count); 0: in the caller
    crop_pct: float | None = None  # None: the model's
    resize_mode: str | None = None  # "shorter" | "squash"; None: the model's
    exif_transpose: bool = True
    allow_truncated: bool = False


@dataclass
class Prediction:
    rank: int  # 1 = best
    index: int  # class index
    label: str
    score: float  # probability or logit

    def to_record(self) -> dict[str, Any]:
        return {"rank": self.rank, "index": self.index, "label": self.label, "score": self.score}


def _reason(path: str, error: str) -> str:
    # The images layer's messages start with the path; a record keys them by path already.
    prefix = f"{path}: "
    return error[len(prefix):] if error.startswith(prefix) else error


@dataclass
class Result:
    """What every per-image result has: where it was, and why it failed if it did."""

    position: int  # 0-based input position
    path: str
    error: str | None = None  # why this input failed (without the path); None when it did not
    notes: list[str] = field(default_factory=list)  # e.g. "first frame of 12"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def message(self) -> str:
        """One line for stderr: the path and what went wrong."""
        return f"{self.path}: {self.error}"


@dataclass
class Classification(Result):
    predictions: list[Prediction] = field(default_factory=list)  # best first; empty on error

    def to_record(self, **extra: Any) -> dict[str, Any]:
        """The JSON record: {"path", "predictions": [...], **extra, "notes"?} or {"path", "error"}."""
        if not self.ok:
            return {"path": self.path, "error": self.error}
        rec: dict[str, Any] = {"path": self.path, "predictions": [p.to_record() for p in self.predictions]}
        rec.update(extra)
        if self.notes:
            rec["notes"] = list(self.notes)
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any], position: int) -> Classification:
        preds = [Prediction(**p) for p in rec.get("predictions", [])]
        return cls(position, rec["path"], rec.get("error"), list(rec.get("notes", [])), preds)


@dataclass
class Features(Result):
    features: np.ndarray | None = None  # float32: (D,) pooled, or (tokens, D) for pool "tokens"


def default_head(config: DeiTConfig) -> str:
    return "avg" if config.distilled else "cls"


def default_pool(config: DeiTConfig) -> str:
    """avg (mean of the class and distillation tokens) for distilled models, else cls."""
    return "avg" if config.distilled else "cls"


def feature_shape(config: DeiTConfig, pool: str) -> tuple[int, ...]:
    """The shape of one image's features for `pool`."""
    if pool == "tokens":
        return (config.num_prefix_tokens + config.num_patches, config.embed_dim)
    return (config.embed_dim,)


def _check_pool(config: DeiTConfig, pool: str) -> None:
    if pool not in POOLS:
        raise UsageError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
    if pool == "dist" and not config.distilled:
        raise UsageError("pool 'dist' needs a distilled model (this one has no distillation token)")


def pool_tokens(tokens: torch.Tensor, pool: str, config: DeiTConfig, *, normalize: bool = False) -> torch.Tensor:
    """All tokens (B, prefix + patches, D) -> features: cls (B, D), dist (B, D), avg (mean of
    the class and distillation tokens; cls for a model without one), mean (mean of the
    patch tokens), tokens (all of them). `normalize`: L2 over the last dimension."""
    _check_pool(config, pool)
    if pool == "tokens":
        out = tokens
    elif pool == "cls" or (pool == "avg" and not config.distilled):
        out = tokens[:, 0]
    elif pool == "dist":
        out = tokens[:, 1]
    elif pool == "avg":
        out = (tokens[:, 0] + tokens[:, 1]) / 2
    else:  # mean
        out = tokens[:, config.num_prefix_tokens :].mean(dim=1)
    if normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
    return out


def _entries(
    model: DeiT, items: Iterable[InputItem], options: ImageOptions, compute
) -> Iterator[tuple[int, InputItem, Any, str | None, list[str]]]:
    """(position, item, this input's row of compute(batch) or None, error, notes), in order."""
    transform = eval_transform(model.preprocessing, crop_pct=options.crop_pct, resize_mode=options.resize_mode)
    batches = iter_batches(
        items, transform, options.batch_size, workers=options.workers,
        exif_transpose=options.exif_transpose, allow_truncated=options.allow_truncated,
    )  # fmt: skip
    with closing(batches):  # `| head -1`: stop decoding at once, leave no threads behind
        for batch in batches:
            out = compute(batch.tensor) if batch.positions else None
            for pos, item, row, err, notes in batch.entries():
                yield pos, item, (None if row is None else out[row]), err, notes


def classify(
    model: DeiT,
    items: Iterable[InputItem],
    *,
    top: int = 5,
    head: str | None = None,
    scores: str = "prob",
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions = ImageOptions(),
) -> Iterator[Classification]:
    """The `top` classes of each input, best first, with probabilities (or logits), in input
    order. `head`: avg (default for distilled models), cls or dist."""
    cfg = model.config
    if cfg.num_classes == 0 or model.head is None:
        raise UsageError("this model has no classifier head", "use extract-features instead")
    head = head or default_head(cfg)
    if head not in HEADS:
        raise UsageError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if head == "dist" and not cfg.has_dist_head:
        raise UsageError("head 'dist' needs a distilled model with a distillation classifier")
    if scores not in SCORES:
        raise UsageError(f"unknown scores {scores!r}; use prob or logit")
    if top < 1:
        raise UsageError("--top must be at least 1")
    k = min(top, cfg.num_classes)
    labels = list(model.labels)
    runner = prepare(model, device=device, dtype=dtype)

    def compute(x: torch.Tensor) -> list[tuple[list[float], list[int]]]:
        logits = runner.logits(x, head)  # (B, classes) float32
        values = logits.softmax(dim=-1) if scores == "prob" else logits
        best = values.topk(k, dim=-1)
        return list(zip(best.values.cpu().tolist(), best.indices.cpu().tolist()))

    def results() -> Iterator[Classification]:
        for pos, item, row, err, notes in _entries(model, items, options, compute):
            if err is not None:
                yield Classification(pos, item.path, _reason(item.path, err))
                continue
            vals, idxs = row
            preds = [Prediction(r, i, labels[i], v) for r, (v, i) in enumerate(zip(vals, idxs), 1)]
            yield Classification(pos, item.path, None, list(notes), preds)

    return results()  # a generator, but the checks above run at the call


def extract_features(
    model: DeiT,
    items: Iterable[InputItem],
    *,
    pool: str | None = None,
    normalize: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions = ImageOptions(),
) -> Iterator[Features]:
    """Each input's features (float32 numpy), pooled from the model's `forward_features`
    as `pool` says (default: `default_pool`), optionally L2-normalised, in input order."""
    cfg = model.config
    pool = pool or default_pool(cfg)
    _check_pool(cfg, pool)
    runner = prepare(model, device=device, dtype=dtype)

    def compute(x: torch.Tensor) -> np.ndarray:
        feats = pool_tokens(runner.features(x), pool, cfg, normalize=normalize)
        return feats.float().cpu().numpy()

    def results() -> Iterator[Features]:
        for pos, item, row, err, notes in _entries(model, items, options, compute):
            if err is not None:
                yield Features(pos, item.path, _reason(item.path, err))
            else:
                yield Features(pos, item.path, None, list(notes), row)

    return results()
