"""`deit eval --predictions FILE`: one JSON line per image of the set, in set order.

A single-label image's record is classify's plus its true class and whether it was right
(`prediction_record`); a multi-label image's has its true labels and the labels at or
above the threshold (`scored_record`). The file is written beside its target and renamed
over it once complete; under torchrun every rank writes a shard and rank 0 merges them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .. import distributed
from ..files import atomic_path
from .metrics import ImageResult, ScoredImage

__all__ = ["prediction_record", "scored_record", "write_jsonl", "write_predictions"]


def prediction_record(r: ImageResult, labels: Sequence[str]) -> dict:
    """One single-label image's record: classify's, plus its true class and whether it was right."""
    rec: dict = {"path": r.path}
    if r.target >= 0:
        rec.update(target=r.target, target_label=labels[r.target])
    if not r.ok:
        rec["error"] = r.error
        return rec
    rec["correct"] = r.target_rank == 1
    rec["target_rank"] = r.target_rank  # among the predictions; null when beyond them
    rec["predictions"] = [p.to_record() for p in r.predictions]
    if r.notes:
        rec["notes"] = list(r.notes)
    return rec


def scored_record(r: ScoredImage, labels: Sequence[str], threshold: float) -> dict:
    """One multi-label image's record: its true labels and the labels at or above the
    threshold, best first."""
    rec: dict = {"path": r.path, "targets": [labels[t] for t in r.targets]}
    if not r.ok:
        rec["error"] = r.error
        return rec
    order = np.argsort(-r.scores, kind="stable")
    rec["predictions"] = [
        {"index": int(i), "label": labels[i], "score": float(r.scores[i])} for i in order if r.scores[i] >= threshold
    ]
    rec["correct"] = sorted(p["index"] for p in rec["predictions"]) == sorted(r.targets)
    if r.notes:
        rec["notes"] = list(r.notes)
    return rec


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Records as JSON lines, written beside `path` and renamed over it once complete."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_predictions(
    results: Iterable, labels: Sequence[str], path: Path | None, *, threshold: float | None = None
) -> None:
    """Consume `results`, writing each image's record (`prediction_record`, or with a
    `threshold` the multi-label `scored_record`) to `path` as JSON lines (atomically; under
    torchrun rank 0 writes every rank's, in input order). With no `path`, only consume them."""
    if path is None:
        for _ in results:
            pass
        return
    if threshold is None:
        records = (prediction_record(r, labels) for r in results)
    else:
        records = (scored_record(r, labels, threshold) for r in results)
    if not distributed.is_distributed():
        write_jsonl(path, records)
    else:
        with distributed.merged_shards(records, near=path) as merged:
            if merged is not None:
                write_jsonl(path, merged)
