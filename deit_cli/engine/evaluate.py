"""Evaluation on a labelled image set: running the model over it and summing up.

    scanned = scan_set("imagenet/val")            # images.labelled: the set as on disk
    report = evaluate_set(model, scanned)         # what `deit eval --json` prints
    print(report["top1"])

`evaluate_set` is the whole of `deit eval`: it matches the set's names to the model's
classes (engine.labels), runs a single-label model for top-k accuracy or a multi-label
one for mAP, F1 and IoU (engine.metrics; the model decides, and a set of the other kind
is an error), writes the predictions file on the way (engine.predictions), and returns
the summary. Single-label images run through the engine's `classify`; multi-label ones
keep every class's sigmoid score.

Under torchrun, call it inside `distributed.init()`: each rank takes its share, and the
metrics are every rank's, merged. Nothing here prints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .. import distributed
from ..config import check_threshold, parse_top
from ..images.inputs import InputItem
from ..images.labelled import ScannedSet
from .classify import classify, default_head
from .labels import LabelledSet, check_kind, labelled_set
from .metrics import EvalMetrics, ImageResult, MultiLabelMetrics, ScoredImage
from .predictions import write_predictions
from .results import ImageOptions, Result, reason, run_batches
from .runner import prepare

__all__ = [
    "set_entries",
    "iter_results",
    "iter_scores",
    "evaluation",
    "multi_label_evaluation",
    "evaluate",
    "summary",
    "multi_label_summary",
    "evaluate_set",
]


def set_entries(lset: LabelledSet) -> list[tuple[int, InputItem, int]]:
    """(position, item, target) of this process's share of the set: all of it in a plain
    process, every world_size-th entry under torchrun."""
    entries = [(i, item, t) for i, (item, t) in enumerate(zip(lset.items, lset.targets))]
    return list(distributed.shard(entries))


def iter_results(
    model,
    entries: Sequence[tuple[int, InputItem, int]],
    *,
    top: int = 5,
    head: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions | None = None,
) -> Iterator[ImageResult]:
    """Classify the (position, item, target) entries with the engine; one result per entry,
    in order. Failed images are results with an `error`."""
    results = classify(
        model,
        (item for _, item, _ in entries),
        top=top,
        head=head,
        scores="prob",
        device=device,
        dtype=dtype,
        options=options or ImageOptions(),
    )
    for r in results:
        position, _, target = entries[r.position]
        if not r.ok:
            yield ImageResult(position, r.path, r.error, r.notes, target=target)
            continue
        preds = r.predictions
        if any(math.isnan(p.score) for p in preds):
            # NaN scores rank arbitrarily: a miss at every k, never a lucky hit.
            yield ImageResult(position, r.path, notes=[*r.notes, "NaN scores"], target=target, predictions=preds)
            continue
        rank = next((p.rank for p in preds if p.index == target), None)
        yield ImageResult(position, r.path, notes=r.notes, target=target, predictions=preds, target_rank=rank)


def iter_scores(
    model,
    lset: LabelledSet,
    *,
    head: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions | None = None,
) -> Iterator[ScoredImage]:
    """This process's share of a multi-label set, each image with all its sigmoid scores."""
    entries = list(distributed.shard(list(enumerate(zip(lset.items, lset.target_sets or [])))))
    runner = prepare(model, device=device, dtype=dtype)
    head = head or default_head(model.config)

    def compute(x):
        return runner.logits(x, head).sigmoid().float().cpu().numpy()

    items = [item for _, (item, _) in entries]
    for local, item, row, err, notes in run_batches(model, items, options or ImageOptions(), compute):
        position, (_, targets) = entries[local]
        if err is not None:
            yield ScoredImage(position, item.path, reason(item.path, err), targets=targets)
        else:
            yield ScoredImage(position, item.path, None, list(notes), targets=targets, scores=row)


def evaluation(
    model,
    lset: LabelledSet,
    *,
    ks: Sequence[int] = (1, 5),
    head: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions | None = None,
) -> tuple[EvalMetrics, Iterator[ImageResult]]:
    """`evaluate` as it runs: this process's metrics, and its results, which add to the
    metrics as they are consumed (for a progress bar, or a predictions file on the way).
    Call `metrics.reduced()` once they are consumed."""
    check_kind(model, lset)
    metrics = EvalMetrics(model.config.num_classes, ks)
    results = iter_results(
        model, set_entries(lset), top=max(ks), head=head, device=device, dtype=dtype, options=options
    )
    return metrics, metrics.counting(results)


def multi_label_evaluation(
    model,
    lset: LabelledSet,
    *,
    threshold: float | None = None,
    head: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions | None = None,
) -> tuple[MultiLabelMetrics, Iterator[ScoredImage]]:
    """Like `evaluation`, for a multi-label model on a set with label lists."""
    check_kind(model, lset)
    t = model.threshold if check_threshold(threshold) is None else threshold
    metrics = MultiLabelMetrics(model.config.num_classes, t)
    results = iter_scores(model, lset, head=head, device=device, dtype=dtype, options=options)
    return metrics, metrics.counting(results)


def evaluate(
    model,
    lset: LabelledSet,
    *,
    ks: Sequence[int] = (1, 5),
    head: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions | None = None,
) -> EvalMetrics:
    """Top-k accuracy of a single-label `model` on `lset`.

    lset = labelled_set(scan_set("imagenet/val"), model.labels)
    print(evaluate(model, lset).accuracy(1))
    """
    metrics, results = evaluation(model, lset, ks=ks, head=head, device=device, dtype=dtype, options=options)
    for _ in results:
        pass
    return metrics.reduced()


def summary(
    model,
    lset: LabelledSet,
    metrics: EvalMetrics,
    *,
    head: str | None = None,
    per_class: bool = False,
    confused: int = 10,
    predictions: str | os.PathLike | None = None,
) -> dict:
    """The whole result of a single-label evaluation as one record."""
    out = {
        "model": str(model.source),
        "set": lset.source,
        "label_by": lset.label_by,
        "classes": len(set(lset.classes.values())),
        "head": head or default_head(model.config),
        "top": list(metrics.ks),
        **metrics.to_dict(model.labels, classes=lset.classes, per_class=per_class, confused=confused),
    }
    if model.variant is not None:
        published = {"variant": model.variant.name, "top1": model.variant.top1, "top5": model.variant.top5}
        out["published"] = {k: v for k, v in published.items() if v is not None}  # DeiT III: no top-5
    if predictions is not None:
        out["predictions"] = os.fspath(predictions)
    return out


def multi_label_summary(
    model,
    lset: LabelledSet,
    metrics: MultiLabelMetrics,
    *,
    per_class: bool = False,
    predictions: str | os.PathLike | None = None,
) -> dict:
    """The whole result of a multi-label evaluation as one record (`"multi_label": true`)."""
    out = {
        "model": str(model.source),
        "set": lset.source,
        "multi_label": True,
        "label_by": lset.label_by,
        "classes": len(set(lset.classes.values())),
        **metrics.to_dict(model.labels, per_class=per_class),
    }
    if predictions is not None:
        out["predictions"] = os.fspath(predictions)
    return out


def evaluate_set(
    model,
    scanned: ScannedSet,
    *,
    ks: str | Sequence[int] = (1, 5),
    label_by: str = "auto",
    threshold: float | None = None,
    head: str | None = None,
    per_class: bool = False,
    confused: int = 10,
    predictions: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    options: ImageOptions | None = None,
    watch: Callable[[LabelledSet, Iterator[Result]], Iterable[Result]] | None = None,
) -> dict:
    """`deit eval`: the summary of `model` on a scanned set (`summary`, or for a multi-label
    model `multi_label_summary`, which has `"multi_label": true`), every rank's on every rank.

    `ks` are the top-k accuracies of a single-label model; `threshold` (default: the
    model's) is a multi-label model's. `predictions` names a JSON-lines file for every
    image's record. `watch(lset, results)` sees this rank's results pass (each a `Result`,
    failed ones included) and must yield them all: for a progress bar, or a line per
    failure; it is called once the labels are resolved, before the first image runs.
    """
    multi = bool(getattr(model, "multi_label", False))
    # top-k is for single-label models (a multi-label one may have fewer classes than the default 5)
    ks = () if multi else parse_top(ks, model.config.num_classes)
    lset = labelled_set(scanned, model.labels, label_by=label_by)
    run = dict(head=head, device=device, dtype=dtype, options=options)
    if multi or lset.multi_label:
        metrics, results = multi_label_evaluation(model, lset, threshold=threshold, **run)
    else:
        metrics, results = evaluation(model, lset, ks=ks, **run)
    write_predictions(
        watch(lset, results) if watch else results,
        model.labels,
        predictions,
        threshold=metrics.threshold if isinstance(metrics, MultiLabelMetrics) else None,
    )
    metrics = metrics.reduced()
    if isinstance(metrics, MultiLabelMetrics):
        return multi_label_summary(model, lset, metrics, per_class=per_class, predictions=predictions)
    return summary(model, lset, metrics, head=head, per_class=per_class, confused=confused, predictions=predictions)
