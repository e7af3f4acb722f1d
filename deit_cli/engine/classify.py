"""Classify: the top classes of each image, best first, in input order.

    model = load_model("deit-small")
    for r in classify(model, iter_inputs(["photos/"]), top=5):
        print(r.path, r.predictions[0].label if r.ok else r.error)

Decoding runs in a thread pool ahead of the model, results come out in input order, and
one bad input is a result with an `error`, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..config import HEADS, SCORES, DeiTConfig, check_threshold
from ..errors import UsageError
from ..images.inputs import InputItem
from ..model import DeiT
from .results import ImageOptions, Result, reason, run_batches
from .runner import prepare

__all__ = ["Prediction", "Classification", "default_head", "check_head", "classify", "write_shard", "read_shard"]


@dataclass
class Prediction:
    rank: int  # 1 = best
    index: int  # class index
    label: str
    score: float  # probability or logit

    def to_record(self) -> dict[str, Any]:
        return {"rank": self.rank, "index": self.index, "label": self.label, "score": self.score}


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


def default_head(config: DeiTConfig) -> str:
    return "avg" if config.distilled else "cls"


def check_head(model: DeiT, head: str | None, *, hint: str | None = None) -> str:
    """The classifier `head` names (default: `default_head`), checked to exist in `model`."""
    cfg = model.config
    if cfg.num_classes == 0 or model.head is None:
        raise UsageError("this model has no classifier head", hint)
    head = head or default_head(cfg)
    if head not in HEADS:
        raise UsageError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if head == "dist" and not cfg.has_dist_head:
        raise UsageError("head 'dist' needs a distilled model with a distillation classifier")
    return head


def classify(
    model: DeiT,
    items: Iterable[InputItem],
    *,
    top: int = 5,
    head: str | None = None,
    scores: str = "prob",
    threshold: float | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    backend: str = "auto",
    options: ImageOptions = ImageOptions(),
) -> Iterator[Classification]:
    """The `top` classes of each input, best first, with probabilities (or logits), in input
    order. `head`: avg (default for distilled models), cls or dist.

    A multi-label model scores each class with a sigmoid and gives the classes whose score
    is at or above `threshold` (default: the model's), at most `top` of them; an image with
    none over it gets an empty list. `backend`: auto, torch, onnxruntime or openvino (engine.runner.prepare)."""
    cfg = model.config
    head = check_head(model, head, hint="use extract-features instead")
    if scores not in SCORES:
        raise UsageError(f"unknown scores {scores!r}; use prob or logit")
    if top < 1:
        raise UsageError("--top must be at least 1")
    multi = bool(getattr(model, "multi_label", False))
    cut = (model.threshold if check_threshold(threshold) is None else threshold) if multi else None
    k = min(top, cfg.num_classes)
    labels = list(model.labels)
    runner = prepare(model, device=device, dtype=dtype, backend=backend)

    def compute(x: torch.Tensor) -> list[tuple[list[float], list[int], list[bool]]]:
        logits = runner.logits(x, head)  # (B, classes) float32
        if multi:
            probs = logits.sigmoid()
            best = (probs if scores == "prob" else logits).topk(k, dim=-1)
            keep = probs.gather(1, best.indices) >= cut  # the sigmoid decides, whatever is reported
        else:
            best = (logits.softmax(dim=-1) if scores == "prob" else logits).topk(k, dim=-1)
            keep = torch.ones_like(best.indices, dtype=torch.bool)
        return list(zip(best.values.cpu().tolist(), best.indices.cpu().tolist(), keep.cpu().tolist()))

    def results() -> Iterator[Classification]:
        for pos, item, row, err, notes in run_batches(model, items, options, compute):
            if err is not None:
                yield Classification(pos, item.path, reason(item.path, err))
                continue
            vals, idxs, keep = row
            chosen = [(v, i) for v, i, kept in zip(vals, idxs, keep) if kept]
            preds = [Prediction(r, i, labels[i], v) for r, (v, i) in enumerate(chosen, 1)]
            yield Classification(pos, item.path, None, list(notes), preds)

    return results()  # a generator, but the checks above run at the call


# torchrun: each rank writes its results to a shard, rank 0 reads them all back in order.


def write_shard(results: Iterable[Classification], stem: Path) -> None:
    """One rank's results as records in STEM.jsonl (notes kept, so they survive the trip)."""

    def records() -> Iterator[dict[str, Any]]:
        for r in results:
            rec = r.to_record()
            if r.ok:
                rec["notes"] = r.notes
            yield rec

    distributed.write_jsonl_shard(records(), stem)


def read_shard(stem: Path) -> Iterator[Classification]:
    """A shard's results, in the rank's order (positions are set by the caller)."""
    for rec in distributed.read_jsonl_shard(stem):
        yield Classification.from_record(rec, -1)
