"""Validation during training: the inference heads on the validation set, every epoch.

Single-label: top-1 / top-5 (percent) and cross-entropy; multi-label: mAP, F1 and IoU and
the BCE loss. The metrics are counted by engine.metrics' EvalMetrics and MultiLabelMetrics,
the classes `deit eval` counts with, so a run's validation and `deit eval` of its model
mean the same thing. Under torchrun each rank takes its shard and the counts (or the
scores) are merged, so the metrics are exact.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ... import distributed
from ...model import DeiT
from ..classify import Prediction
from ..metrics import EvalMetrics, ImageResult, Metrics, MultiLabelMetrics, ScoredImage
from .data import TrainSet

__all__ = ["validate"]


@torch.no_grad()
def validate(
    model: DeiT,
    val: TrainSet,
    *,
    device: torch.device,
    amp_dtype,
    batch_size: int,
    workers: int | None,
    threshold: float | None = None,
) -> dict:
    """The validation record of `model` (inference heads) on `val` (multi-label when `val`
    is, at `threshold`): the metrics of engine.metrics, as `deit eval` counts them, and the
    training loss, summed over ranks."""
    from ...images.batches import iter_batches
    from ...images.transform import eval_transform

    multi = val.multi_label
    k = min(5, len(val.classes))
    metrics: Metrics = (
        MultiLabelMetrics(len(val.classes), threshold) if multi else EvalMetrics(len(val.classes), sorted({1, k}))
    )
    indexed = list(distributed.shard(range(len(val.items))))  # this rank's share: indices into val
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    batches = iter_batches(
        [val.items[i] for i in indexed], eval_transform(model.preprocessing), batch_size, workers=workers
    )
    for b in batches:
        for (item, err), p in zip(b.failed, b.failed_positions):
            i = indexed[p]
            failed = ScoredImage(i, item.path, err) if multi else ImageResult(i, item.path, err)
            metrics.add(failed)
        if not b.positions:
            continue
        rows = [indexed[p] for p in b.positions]
        y = val.target_tensor(rows).to(device)
        with ctx:
            logits = model(b.tensor.to(device)).float()
        if multi:
            loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item()
            for i, scores in zip(rows, logits.sigmoid().cpu().numpy()):
                metrics.add(ScoredImage(i, val.items[i].path, targets=val.targets[i], scores=scores))
        else:
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(k, dim=1)
            for i, scores, classes in zip(rows, top.values.tolist(), top.indices.tolist()):
                target = val.targets[i]
                rank = classes.index(target) + 1 if target in classes else None
                best = Prediction(1, classes[0], val.classes[classes[0]], scores[0])  # what a miss is confused with
                metrics.add(ImageResult(i, val.items[i].path, target=target, predictions=[best], target_rank=rank))
    (loss_sum,) = distributed.sum_across([loss_sum])
    metrics = metrics.reduced()
    model.train(was_training)
    skipped = {"val_skipped": len(metrics.failed), "val_skipped_images": [e for _, _, e in metrics.failed]}
    seen = metrics.images
    if multi:
        d = metrics.to_dict(val.classes)
        return {
            "val_map": d["map"],
            "val_f1_micro": d["f1_micro"],
            "val_f1_macro": d["f1_macro"],
            "val_iou_micro": d["iou_micro"],
            "val_iou_macro": d["iou_macro"],
            "val_threshold": threshold,
            "val_loss": loss_sum / (seen * len(val.classes)) if seen else None,  # per element, as in training
            "val_images": seen,
            **skipped,
        }
    # percentages, as `deit eval` and timm report them
    return {
        "val_top1": metrics.accuracy(1),
        f"val_top{k}": metrics.accuracy(k),
        "val_loss": loss_sum / seen if seen else None,
        "val_images": seen,
        **skipped,
    }
