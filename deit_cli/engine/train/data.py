"""Training data: the training and validation sets, their classes, and the batches.

Sets are read by `images.labelled` (`scan_set`), as `deit eval` reads them: a class-folder
tree (with `train/` and `val/` inside, those are the two sets), a CSV/TSV list or JSON
lines; see that module for the formats. An image outside every class folder is skipped
and counted. Classes are the sorted training label names.

A single-label run refuses an image with a list of labels; a multi-label run takes a
single name as a list of one (an empty list is a negative example). With neither asked
for, the training set decides: any list makes the run multi-label
(`find_sets(..., multi_label=None)`).

Batches are deterministic: the order of an epoch depends only on (seed, epoch), and each
sample's augmentation on (seed, epoch, position), so a run gives the same batches on any
number of processes and decoding threads, and a resumed run continues exactly. An image
that fails to decode is skipped and counted, never a crash.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import EXIT_DATA, DeiTError, InputNotFound, UsageError
from ...images.inputs import InputItem
from ...images.labelled import scan_set


class DatasetError(DeiTError):
    """A training set that cannot be used as it is (exit 65)."""

    exit_code = EXIT_DATA


MULTI_LABEL_HINT = (
    "the training set gives one label per image; give this set one too, or train with "
    "--multi-label (any list of labels in the training set implies it)"
)


# --------------------------------------------------------------------------- sets


@dataclass
class LabelledImages:
    """Images with their label names, as found on disk (before classes are fixed)."""

    source: str
    items: list[InputItem]
    labels: list  # a class name per image, or (multi-label) a list of names
    empty_classes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # entries with no label (loose files)
    lists: bool = False  # the set gave some image a list of labels


@dataclass
class TrainSet:
    """Images and their class indices into `classes` (multi-label: a list per image)."""

    source: str
    items: list[InputItem]
    targets: list  # int per image, or (multi_label) a sorted list of ints, maybe empty
    classes: list[str]
    multi_label: bool = False

    def target_tensor(self, indices: Sequence[int]) -> torch.Tensor:
        """The targets of `indices`: int64 class indices, or float32 multi-hot rows."""
        if not self.multi_label:
            return torch.tensor([self.targets[i] for i in indices], dtype=torch.long)
        y = torch.zeros((len(indices), len(self.classes)), dtype=torch.float32)
        for row, i in enumerate(indices):
            y[row, self.targets[i]] = 1.0
        return y

    def __len__(self) -> int:
        return len(self.items)


def read_set(spec: str, *, multi_label: bool = False) -> LabelledImages:
    """A class-folder tree or a list file (`images.labelled.scan_set`), as images and label
    names: with `multi_label` a list of names per image, else one name, a list refused."""
    scanned = scan_set(spec)
    items, labels, skipped = [], [], []
    for entry in scanned.entries:
        if entry.label is None:  # outside every class folder
            skipped.append(entry.item.error or entry.item.path)
            continue
        several = isinstance(entry.label, list)
        if several and not multi_label:
            raise DatasetError(
                f"{scanned.where(entry)}: several labels for one image in a single-label run", MULTI_LABEL_HINT
            )
        items.append(entry.item)
        labels.append(entry.label if several or not multi_label else [entry.label])
    return LabelledImages(scanned.source, items, labels, list(scanned.empty_classes), skipped, scanned.multi_label)


def _check_training(found: LabelledImages) -> list[str]:
    if found.empty_classes:
        names = ", ".join(repr(n) for n in found.empty_classes[:5])
        raise DatasetError(
            f"{found.source}: class folder {names} has no images", "remove it or add images: every class needs examples"
        )
    if _multi(found):
        classes = sorted({name for names in found.labels for name in names})
        if not classes:
            raise DatasetError(
                f"{found.source}: no labels (every image's list is empty)",
                "a multi-label set needs images with labels, not only negative examples",
            )
        return classes
    classes = sorted(set(found.labels))
    if len(classes) < 2:
        raise DatasetError(
            f"{found.source}: only one class ({classes[0]!r}); a classifier needs at least two"
            if classes
            else f"{found.source}: no labelled images"
        )
    return classes


def _multi(found: LabelledImages) -> bool:
    return any(isinstance(label, list) for label in found.labels)


def _indexed(found: LabelledImages, classes: list[str], what: str, multi_label: bool = False) -> TrainSet:
    index = {c: i for i, c in enumerate(classes)}
    names = {n for names in found.labels for n in names} if multi_label else set(found.labels)
    unknown = sorted(names - set(index))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetError(
            f"{found.source}: {what} labels unknown to training: {shown}",
            f"training has {len(classes)} classes: {', '.join(classes[:5])}" + ("..." if len(classes) > 5 else ""),
        )
    if multi_label:
        targets = [sorted(index[n] for n in names) for names in found.labels]
        return TrainSet(found.source, list(found.items), targets, classes, multi_label=True)
    return TrainSet(found.source, list(found.items), [index[label] for label in found.labels], classes)


def split_stratified(found: LabelledImages, fraction: float) -> tuple[LabelledImages, LabelledImages]:
    """A deterministic stratified split: per class, the `fraction` of its images whose path
    hashes lowest go to validation (at least one when the class has two or more). A
    multi-label set is stratified by each image's set of labels."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(found.labels):
        key = "|".join(sorted(label)) if isinstance(label, list) else label
        by_class.setdefault(key, []).append(i)
    val_idx: set[int] = set()
    for idx in by_class.values():
        k = round(len(idx) * fraction)
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        ranked = sorted(idx, key=lambda i: hashlib.sha1(found.items[i].path.encode()).hexdigest())
        val_idx.update(ranked[:k])

    def pick(keep: Callable[[int], bool], source: str) -> LabelledImages:
        idx = [i for i in range(len(found.items)) if keep(i)]
        return LabelledImages(source, [found.items[i] for i in idx], [found.labels[i] for i in idx])

    return (
        pick(lambda i: i not in val_idx, found.source),
        pick(lambda i: i in val_idx, f"{found.source} (validation split)"),
    )


@dataclass
class Sets:
    train: TrainSet
    val: TrainSet | None
    skipped: list[str]  # entries that could not be used (no label), with the reason


def find_sets(
    data: str, *, val: str | None = None, val_split: float | None = None, multi_label: bool | None = False
) -> Sets:
    """The training and validation sets named by DATA, `--val` and `--val-split`.

    `multi_label` True reads label lists; False one label per image; None lets the
    training set decide (any list of labels makes it multi-label). The validation set is
    read as the training set is."""
    if val_split is not None and not 0 < val_split < 1:
        raise UsageError(f"--val-split must be between 0 and 1, not {val_split:g}")
    if val is not None and val_split is not None:
        raise UsageError("--val and --val-split both name a validation set; give one of them")
    data = os.fspath(data)
    if not os.path.exists(data):
        raise InputNotFound(f"{data}: no such file or directory")
    multi = multi_label is not False
    val_found = None
    inner_val = None
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(data):
        train_found = read_set(os.path.join(data, "train"), multi_label=multi)
        if val is None and val_split is None and os.path.isdir(os.path.join(data, "val")):
            inner_val = os.path.join(data, "val")
    else:
        train_found = read_set(data, multi_label=multi)
    if multi_label is None and not train_found.lists:  # no list anywhere: a single-label set
        train_found.labels = [names[0] for names in train_found.labels]
        multi = False
    if inner_val is not None:
        val_found = read_set(inner_val, multi_label=multi)
    skipped = list(train_found.skipped)
    classes = _check_training(train_found)
    if val is not None:
        val_found = read_set(val, multi_label=multi)
    elif val_split is not None:
        train_found, val_found = split_stratified(train_found, val_split)
    if val_found is not None:
        skipped += val_found.skipped
    train = _indexed(train_found, classes, "training", multi)
    val_set = _indexed(val_found, classes, "validation", multi) if val_found is not None else None
    if val_set is not None and not len(val_set):
        val_set = None
    return Sets(train, val_set, skipped)


# --------------------------------------------------------------------------- order


def epoch_order(n: int, *, seed: int, epoch: int, repeats: int = 1) -> list[int]:
    """The sample order of an epoch: a permutation fixed by (seed, epoch); with repeated
    augmentation each sample appears `repeats` times in a row (differently augmented),
    and the epoch keeps its length (the first n of the repeated order)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if repeats > 1:
        perm = [i for i in perm for _ in range(repeats)][:n]
    return perm


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches of an epoch; the last, smaller one is dropped unless it is the only one."""
    return max(1, n // batch_size)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one sample's augmentation: fixed by (seed, epoch, position in epoch)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class TrainBatch:
    """One process's share of a global batch."""

    step: int  # within the epoch
    images: torch.Tensor  # (n, 3, H, W) uint8, normalised on the device (`Stepper.step`)
    targets: torch.Tensor  # (n,) int64, or (multi-label) (n, classes) float32 multi-hot
    failed: list[str]  # images of this share that could not be decoded (skipped)
    # random erasing's draws: (n, 5) int64 (top, left, height, width, noise seed; -1 for
    # none), or None where no image of the share is erased
    erase: torch.Tensor | None = None


def check_classes(saved: Sequence[str], now: Sequence[str]) -> None:
    """A resumed run must see the classes it started with."""
    if list(saved) != list(now):
        extra = sorted(set(now) - set(saved))
        missing = sorted(set(saved) - set(now))
        what = []
        if extra:
            what.append("new: " + ", ".join(repr(x) for x in extra[:5]))
        if missing:
            what.append("missing: " + ", ".join(repr(x) for x in missing[:5]))
        raise DatasetError(
            f"the data's classes differ from the run's ({'; '.join(what) or 'another order'})",
            "resume with the data the run started with, or start a new run",
        )
