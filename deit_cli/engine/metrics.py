"""Metrics of a model on a labelled set: top-k accuracy (single-label) and mAP, F1 and IoU
(multi-label), counted image by image and merged exactly across torchrun ranks.

Both kinds count over the images that decoded: a failed image is listed in `failed`, never
folded into a metric and never dropped silently. `deit eval` and training's validation
count with the same classes, so their numbers mean the same thing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import distributed
from .results import Result

if TYPE_CHECKING:
    from .classify import Prediction

__all__ = ["ImageResult", "ScoredImage", "Metrics", "EvalMetrics", "MultiLabelMetrics", "average_precision"]


@dataclass
class ImageResult(Result):
    """One image of a single-label set: its top classes (best first) and the rank of its
    true class among them (1 = right at top-1; None = not among them), or why it failed."""

    target: int = -1  # class index; -1 for an image with no label
    predictions: list[Prediction] = field(default_factory=list)
    target_rank: int | None = None


@dataclass
class ScoredImage(Result):
    """One image of a multi-label set: its true classes and every class's sigmoid score."""

    targets: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None  # (classes,) float32, None when the image failed


class Metrics:
    """What every kind of metric shares: the failed images, the time taken, and `reduced()`,
    which merges every torchrun rank's counts (`merge`) into one."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.failed: list[tuple[int, str, str]] = []  # (position, path, error)
        self.seconds = 0.0

    def add(self, r: Result) -> None:
        """Count one image; a failed one is only listed."""
        if not r.ok:
            self.failed.append((r.position, r.path, r.error or "failed"))
        else:
            self.count(r)

    def count(self, r: Result) -> None:
        """Count one decoded image (each kind its own way)."""
        raise NotImplementedError

    def empty(self) -> Metrics:
        """A new instance with the same settings and nothing counted."""
        raise NotImplementedError

    @property
    def images(self) -> int:
        """Images counted (decoded): the denominator of every metric."""
        raise NotImplementedError

    def counting(self, results: Iterable[Result]) -> Iterator[Result]:
        """`results`, each added as it passes; `seconds` is the time they took."""
        start = time.perf_counter()
        for r in results:
            self.add(r)
            yield r
        self.seconds += time.perf_counter() - start

    def merge(self, other: Metrics) -> Metrics:
        """Add another process's counts to these."""
        self.failed = sorted(self.failed + other.failed)
        self.seconds = max(self.seconds, other.seconds)  # ranks run side by side
        return self

    def reduced(self) -> Metrics:
        """The metrics of every torchrun rank merged (on every rank); itself in one process."""
        parts = distributed.gather_objects(self)
        if len(parts) == 1:
            return self
        total = self.empty()
        for part in parts:
            total.merge(part)
        return total

    def totals(self) -> dict:
        """{"images", "failed", "total"}: how many were counted, failed, and both."""
        return {"images": self.images, "failed": len(self.failed), "total": self.images + len(self.failed)}

    def timing(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds > 0 else None,
        }

    def failed_images(self) -> list[dict]:
        return [{"path": p, "error": e} for _, p, e in self.failed]


class EvalMetrics(Metrics):
    """Top-k counts, per-class counts and confusions (true class, predicted top-1)."""

    def __init__(self, num_classes: int, ks: Sequence[int]):
        super().__init__(num_classes)
        self.ks = tuple(ks)
        self.class_images = np.zeros(num_classes, dtype=np.int64)
        self.class_correct = np.zeros((len(self.ks), num_classes), dtype=np.int64)  # (k, C)
        self.confusions: Counter[tuple[int, int]] = Counter()  # (true, predicted top-1) of misses

    def count(self, r: ImageResult) -> None:
        self.class_images[r.target] += 1
        for i, k in enumerate(self.ks):
            if r.target_rank is not None and r.target_rank <= k:
                self.class_correct[i, r.target] += 1
        if r.target_rank != 1 and r.predictions:
            self.confusions[(r.target, r.predictions[0].index)] += 1

    def empty(self) -> EvalMetrics:
        return EvalMetrics(self.num_classes, self.ks)

    def merge(self, other: EvalMetrics) -> EvalMetrics:
        super().merge(other)
        self.class_images += other.class_images
        self.class_correct += other.class_correct
        self.confusions.update(other.confusions)
        return self

    @property
    def images(self) -> int:
        return int(self.class_images.sum())

    def correct(self, k: int) -> int:
        return int(self.class_correct[self.ks.index(k)].sum())

    def accuracy(self, k: int) -> float | None:
        """Top-k accuracy in percent over the decoded images (None when there are none)."""
        return 100.0 * self.correct(k) / self.images if self.images else None

    def most_confused(self, n: int = 10) -> list[tuple[int, int, int]]:
        """(true class, predicted class, count) of top-1 misses, most frequent first."""
        return sorted(((t, p, c) for (t, p), c in self.confusions.items()), key=lambda x: (-x[2], x[0], x[1]))[:n]

    def to_dict(
        self,
        labels: Sequence[str],
        *,
        classes: dict[str, int] | None = None,
        per_class: bool = False,
        confused: int = 10,
    ) -> dict:
        """The metrics as plain data (percentages, counts, lists), for JSON and summaries."""
        out: dict = self.totals()
        for k in self.ks:
            out[f"top{k}"] = self.accuracy(k)
        out["correct"] = {f"top{k}": self.correct(k) for k in self.ks}
        out.update(self.timing())
        out["failed_images"] = self.failed_images()
        out["confused"] = [
            {"true": t, "true_label": labels[t], "predicted": p, "predicted_label": labels[p], "count": c}
            for t, p, c in self.most_confused(confused)
        ]
        if per_class:
            names: dict[int, str] = {}
            for name, idx in (classes or {}).items():
                names.setdefault(idx, name)
            indices = sorted(names) if classes else [i for i in range(self.num_classes) if self.class_images[i]]
            rows = []
            for c in indices:
                n = int(self.class_images[c])
                row = {"index": c, "label": labels[c], "name": names.get(c, labels[c]), "images": n}
                for i, k in enumerate(self.ks):
                    row[f"top{k}"] = 100.0 * int(self.class_correct[i, c]) / n if n else None
                rows.append(row)
            out["per_class"] = rows
        return out


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AP of one class: Σ (Rₙ − Rₙ₋₁)·Pₙ over the distinct scores, highest first (the
    definition of scikit-learn's average_precision_score). None without a positive."""
    total = int(positive.sum())
    if total == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s, hit = scores[order], positive[order].astype(np.int64)
    tp = np.cumsum(hit)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each distinct score
    precision = tp[last] / (last + 1)
    recall = tp[last] / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class MultiLabelMetrics(Metrics):
    """mAP, and F1 and IoU (micro and macro) at a threshold.

    - mAP: the mean of each class's average precision, over the classes with a positive.
    - At the threshold (a class is predicted when its score is at or above it), per class
      TP, FP, FN: F1 = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN). Micro sums the
      counts over classes first; macro averages the per-class values over the classes that
      are present or predicted somewhere (a class that is neither has 0/0 and is left out).

    AP needs every score, so each image's scores are kept (and gathered by `reduced()`).
    """

    def __init__(self, num_classes: int, threshold: float):
        super().__init__(num_classes)
        self.threshold = float(threshold)
        self.scores: list[np.ndarray] = []
        self.targets: list[list[int]] = []

    def count(self, r: ScoredImage) -> None:
        self.scores.append(np.asarray(r.scores, dtype=np.float32))
        self.targets.append(list(r.targets))

    def empty(self) -> MultiLabelMetrics:
        return MultiLabelMetrics(self.num_classes, self.threshold)

    def merge(self, other: MultiLabelMetrics) -> MultiLabelMetrics:
        super().merge(other)
        self.scores += other.scores
        self.targets += other.targets
        return self

    @property
    def images(self) -> int:
        return len(self.scores)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N, C) float32, truth (N, C) bool)."""
        scores = np.stack(self.scores) if self.scores else np.zeros((0, self.num_classes), np.float32)
        truth = np.zeros(scores.shape, dtype=bool)
        for i, t in enumerate(self.targets):
            truth[i, t] = True
        return scores, truth

    def to_dict(self, labels: Sequence[str], *, per_class: bool = False) -> dict:
        """The metrics as plain data (fractions in [0, 1], counts, lists)."""
        scores, truth = self.arrays()
        predicted = scores >= self.threshold
        tp = (predicted & truth).sum(0)
        fp = (predicted & ~truth).sum(0)
        fn = (~predicted & truth).sum(0)
        aps = [average_precision(scores[:, c], truth[:, c]) for c in range(self.num_classes)]
        seen = (tp + fp + fn) > 0
        f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=seen)
        iou = np.divide(tp, tp + fp + fn, out=np.zeros(len(tp)), where=seen)
        T, F, N = int(tp.sum()), int(fp.sum()), int(fn.sum())
        valid = [a for a in aps if a is not None]
        out: dict = {
            **self.totals(),
            "threshold": self.threshold,
            "map": float(np.mean(valid)) if valid else None,
            "f1_micro": 2 * T / (2 * T + F + N) if T + F + N else None,
            "f1_macro": float(f1[seen].mean()) if seen.any() else None,
            "iou_micro": T / (T + F + N) if T + F + N else None,
            "iou_macro": float(iou[seen].mean()) if seen.any() else None,
            **self.timing(),
            "failed_images": self.failed_images(),
        }
        if per_class:
            out["per_class"] = [
                {
                    "index": c,
                    "label": labels[c],
                    "positives": int(truth[:, c].sum()),
                    "predicted": int(predicted[:, c].sum()),
                    "ap": aps[c],
                    "f1": float(f1[c]) if seen[c] else None,
                    "iou": float(iou[c]) if seen[c] else None,
                }
                for c in range(self.num_classes)
                if truth[:, c].any() or predicted[:, c].any()
            ]
        return out
