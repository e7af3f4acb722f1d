"""Validation during training: the inference heads on the validation set, every epoch.

Single-label: top-1 / top-5 (percent, as `deit eval` and timm report them) and
cross-entropy; multi-label: mAP, F1 and IoU with `deit eval`'s definitions and the BCE
loss. Under torchrun each rank takes its shard and the sums (or the scores) are combined,
so the metrics are exact.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ... import distributed
from ...model import DeiT
from .data import TrainSet

__all__ = ["validate"]


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
    """The validation record of `model` on `val` (multi-label when `val` is)."""
    if val.multi_label:
        return evaluate_multi_label(
            model, val, device=device, amp_dtype=amp_dtype, batch_size=batch_size, workers=workers, threshold=threshold
        )
    return evaluate(model, val, device=device, amp_dtype=amp_dtype, batch_size=batch_size, workers=workers)


@torch.no_grad()
def evaluate(
    model: DeiT, val: TrainSet, *, device: torch.device, amp_dtype, batch_size: int, workers: int | None
) -> dict:
    """Top-1 and top-5 (percent) and cross-entropy of `model` (inference heads) on `val`,
    summed over ranks."""
    from ...images.batches import iter_batches
    from ...images.transform import eval_transform

    was_training = model.training
    model.eval()
    k = min(5, model.config.num_classes)
    indexed = list(distributed.shard(list(enumerate(val.items))))
    items = [item for _, item in indexed]
    targets = torch.tensor([val.targets[i] for i, _ in indexed], dtype=torch.long)
    correct1 = correctk = loss_sum = seen = 0.0
    failed: list[str] = []
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for b in iter_batches(items, eval_transform(model.preprocessing), batch_size, workers=workers):
        failed += [err for _, err in b.failed]
        if not b.positions:
            continue
        y = targets[b.positions].to(device)
        with ctx:
            logits = model(b.tensor.to(device)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correctk += (top == y[:, None]).any(1).sum().item()
        seen += len(y)
    correct1, correctk, loss_sum, seen = distributed.sum_across([correct1, correctk, loss_sum, seen])
    failed = [f for rank_failed in distributed.gather_objects(failed) for f in rank_failed]
    model.train(was_training)
    # percentages, as `deit eval` and timm report them
    return {
        "val_top1": 100 * correct1 / seen if seen else None,
        f"val_top{k}": 100 * correctk / seen if seen else None,
        "val_loss": loss_sum / seen if seen else None,
        "val_images": int(seen),
        "val_skipped": len(failed),
        "val_skipped_images": failed,
    }


@torch.no_grad()
def evaluate_multi_label(
    model: DeiT,
    val: TrainSet,
    *,
    device: torch.device,
    amp_dtype,
    batch_size: int,
    workers: int | None,
    threshold: float,
) -> dict:
    """mAP, F1 and IoU (micro and macro) at `threshold`, with `deit eval`'s definitions
    (engine.evaluate.MultiLabelMetrics), and the BCE loss of `model` on `val`; every
    rank's scores are gathered, so the metrics are exact under torchrun."""
    from ...images.batches import iter_batches
    from ...images.transform import eval_transform
    from ..evaluate import MultiLabelMetrics, ScoredImage

    was_training = model.training
    model.eval()
    indexed = list(distributed.shard(list(enumerate(val.items))))
    items = [item for _, item in indexed]
    metrics = MultiLabelMetrics(len(val.classes), threshold)
    loss_sum = 0.0
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for b in iter_batches(items, eval_transform(model.preprocessing), batch_size, workers=workers):
        for (item, err), p in zip(b.failed, b.failed_positions):
            metrics.add(ScoredImage(indexed[p][0], item.path, err, targets=val.targets[indexed[p][0]]))
        if not b.positions:
            continue
        with ctx:
            logits = model(b.tensor.to(device)).float()
        y = val.target_tensor([indexed[p][0] for p in b.positions]).to(device)
        loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item()
        for p, row in zip(b.positions, logits.sigmoid().cpu().numpy()):
            i = indexed[p][0]
            metrics.add(ScoredImage(i, items[p].path, targets=val.targets[i], scores=row))
    (loss_sum,) = distributed.sum_across([loss_sum])
    metrics = metrics.reduced()
    model.train(was_training)
    d = metrics.to_dict(val.classes)
    seen = d["images"]
    return {
        "val_map": d["map"],
        "val_f1_micro": d["f1_micro"],
        "val_f1_macro": d["f1_macro"],
        "val_iou_micro": d["iou_micro"],
        "val_iou_macro": d["iou_macro"],
        "val_threshold": threshold,
        "val_loss": loss_sum / (seen * len(val.classes)) if seen else None,  # per element, as in training
        "val_images": seen,
        "val_skipped": d["failed"],
        "val_skipped_images": [f["error"] for f in d["failed_images"]],
    }
