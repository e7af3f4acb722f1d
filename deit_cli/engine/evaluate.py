"""Evaluation on a labelled image set: finding the set, resolving its labels to the
model's classes, running the model, and top-k metrics that merge across processes.

A labelled set is either an image-folder tree (one subfolder per class, named by WordNet
id, by class index or by the model's label; images anywhere below it) or a list file
(CSV/TSV/whitespace `path,label`, the label a class index, WordNet id or label name).

Images run through the engine's `classify`. Accuracy is over the images that were
decoded: a failed image (unreadable, not an image, missing from disk, outside any class
folder) is counted and listed in `failed`, never folded into the accuracy and never
dropped silently. Nothing here prints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import distributed
from ..config import check_threshold, imagenet_wnids
from ..errors import EXIT_DATA, DeiTError, InputNotFound, UsageError
from ..files import atomic_path, input_error
from ..images.inputs import IMAGE_EXTENSIONS, InputItem, iter_inputs
from .classify import Prediction, classify, default_head
from .results import ImageOptions, Result, reason, run_batches
from .runner import prepare

__all__ = [
    "LABEL_KINDS",
    "LabelError",
    "ScannedSet",
    "LabelledSet",
    "ImageResult",
    "EvalMetrics",
    "parse_top",
    "scan_set",
    "read_label_list",
    "resolve_classes",
    "labelled_set",
    "set_entries",
    "iter_results",
    "evaluate",
]

LABEL_KINDS = ("wnid", "index", "name")  # also the preference when several agree
_WNID = re.compile(r"n\d{8}")
_PATH_HEADERS = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img", "relpath"}
_LABEL_HEADERS = {
    "label",
    "labels",
    "class",
    "class_id",
    "class_index",
    "class_name",
    "target",
    "wnid",
    "synset",
    "category",
    "label_index",
    "index",
    "name",
}


class LabelError(DeiTError):
    """Labels that cannot be matched to the model's classes, or a malformed list file."""

    exit_code = EXIT_DATA


# --------------------------------------------------------------------------- discovery


@dataclass
class ScannedSet:
    """A labelled set as found on disk, before its labels are matched to a model.

    `entries` are (item, label text) in evaluation order; the label is None for an image
    that has none (it will fail). `class_names` are every class named by the set, empty
    class folders included.
    """

    source: str
    layout: str  # "folders" or "list"
    entries: list[tuple[InputItem, str | list[str] | None]]  # a list of labels: multi-label
    class_names: list[str]
    empty_classes: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # list files: label -> first line

    @property
    def multi_label(self) -> bool:
        """Any image with a list of labels (JSONL `"label": [...]`, CSV `a|b`) makes a
        multi-label set."""
        return any(isinstance(label, list) for _, label in self.entries)


@dataclass
class LabelledSet:
    """A set whose labels are the model's class indices. `targets[i]` is the class of
    `items[i]` (-1 for an image with no label: it carries an error and fails)."""

    source: str
    layout: str
    label_by: str  # wnid | index | name
    items: list[InputItem]
    targets: list[int]
    classes: dict[str, int]  # class name as the set writes it -> class index
    empty_classes: list[str]
    target_sets: list[list[int]] | None = None  # multi-label: each image's classes (maybe none)

    @property
    def multi_label(self) -> bool:
        return self.target_sets is not None

    def __len__(self) -> int:
        return len(self.items)


def scan_set(spec: str | os.PathLike, *, labels_file: str | os.PathLike | None = None) -> ScannedSet:
    """Find a labelled set: a folder tree, a list file, or (with `labels_file`) a list
    whose paths are relative to the folder `spec`. Raises InputNotFound (66) when there
    is nothing to evaluate."""
    spec = os.fspath(spec)
    if labels_file is not None:
        if not os.path.isdir(spec):
            raise UsageError(f"{spec}: with --labels, the set must be the folder the list's paths are relative to")
        return _scan_list(os.fspath(labels_file), base=spec)
    if os.path.isdir(spec):
        return _scan_folders(spec)
    if os.path.isfile(spec):
        return _scan_list(spec, base=os.path.dirname(spec))
    raise InputNotFound(f"{spec}: no such file or directory")


def _scan_folders(root: str) -> ScannedSet:
    try:
        with os.scandir(root) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise InputNotFound(f"{root}: cannot list directory ({e.strerror or e})") from None
    class_dirs, loose = [], []
    for entry in found:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()  # a symlinked class folder counts (ImageNet setups use them)
        except OSError:
            is_dir = False
        if is_dir:
            class_dirs.append(entry)
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            loose.append(entry.path)
    if not class_dirs:
        raise InputNotFound(
            f"{root}: no class folders (a labelled set is one subfolder per class)",
            "for a flat folder of images, give its labels with --labels FILE",
        )
    entries: list[tuple[InputItem, str | None]] = []
    empty = []
    for d in class_dirs:
        images = [item for item in iter_inputs([d.path]) if not (item.error and item.path == d.path)]
        if not images:
            empty.append(d.name)
        entries.extend((item, d.name) for item in images)
    for path in loose:
        entries.append((InputItem(path, error=f"{path}: not inside a class folder, so it has no label"), None))
    if not any(item.error is None for item, _ in entries):
        raise InputNotFound(f"{root}: no images in any class folder")
    return ScannedSet(root, "folders", entries, [d.name for d in class_dirs], empty)


def read_label_list(path: str | os.PathLike) -> list[tuple[str, str | list[str], int]]:
    """(path, label or labels, line number) rows of a list file.

    JSONL (`.jsonl`): one object per line, the image in `image_url` or `path`, its label in
    `label`: a string, or a list of strings for a multi-label set (the Azure form).
    CSV (`.csv`), TSV (`.tsv`), or for any other name the first data line decides: a tab,
    a comma, else whitespace (`path label`, the path may hold spaces). Blank lines and
    `#` comments are skipped; a first line naming its columns (path/file/image and
    label/class/target/wnid...) is a header, and then those columns are used. A label
    holding `|` is a list of labels (multi-label); an empty field after a `|`-list header
    is no label at all (a negative example).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise LabelError(f"{path}: not a UTF-8 text file (a list file is CSV/TSV `path,label`)") from None
    except OSError as e:
        raise input_error(path, e) from None

    lines = [
        (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        return []
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return [_jsonl_row(path, n, line) for n, line in lines]
    first = lines[0][1]
    delimiter = {".csv": ",", ".tsv": "\t"}.get(ext) or ("\t" if "\t" in first else "," if "," in first else None)

    def split(line: str) -> list[str]:
        if delimiter is None:
            return line.strip().rsplit(None, 1)
        return next(csv.reader([line], delimiter=delimiter))

    rows = [(n, [f.strip() for f in split(line)]) for n, line in lines]
    path_col, label_col = 0, 1
    head = [f.lower() for f in rows[0][1]]
    if any(f in _PATH_HEADERS for f in head) or (len(head) > 1 and head[1] in _LABEL_HEADERS):
        path_col = next((i for i, f in enumerate(head) if f in _PATH_HEADERS), 0)
        label_col = next(
            (i for i, f in enumerate(head) if f in _LABEL_HEADERS and i != path_col), 1 if path_col == 0 else 0
        )
        rows = rows[1:]
    out: list[tuple[str, str | list[str], int]] = []
    multi = any("|" in f[label_col] for _, f in rows if len(f) > label_col)
    for n, fields in rows:
        if len(fields) <= max(path_col, label_col) or not fields[path_col] or not (fields[label_col] or multi):
            raise LabelError(f"{path}, line {n}: expected a path and a label", "one `path,label` per line")
        label = fields[label_col]
        out.append((fields[path_col], [x.strip() for x in label.split("|") if x.strip()] if multi else label, n))
    return out


def _jsonl_row(path: str, n: int, line: str) -> tuple[str, str | list[str], int]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise LabelError(
            f"{path}, line {n}: not JSON ({e.msg})", 'one {"image_url": ..., "label": ...} per line'
        ) from None
    image = rec.get("image_url", rec.get("path")) if isinstance(rec, dict) else None
    label = rec.get("label") if isinstance(rec, dict) else None
    if not isinstance(image, str) or not image:
        raise LabelError(f'{path}, line {n}: no image (an "image_url" or "path" string)')
    if isinstance(label, list) and all(isinstance(x, str) and x for x in label):
        return image, list(label), n
    if isinstance(label, str) and label:
        return image, label, n
    raise LabelError(f'{path}, line {n}: "label" must be a string or a list of strings')


def _scan_list(list_path: str, *, base: str) -> ScannedSet:
    rows = read_label_list(list_path)
    if not rows:
        raise InputNotFound(f"{list_path}: lists no images")
    entries, first_line, names = [], {}, []
    for rel, label, n in rows:
        full = rel if os.path.isabs(rel) or "://" in rel else os.path.join(base, rel)
        entries.append((InputItem(full, url=full.startswith(("http://", "https://"))), label))
        for name in label if isinstance(label, list) else [label]:
            if name not in first_line:
                first_line[name] = n
                names.append(name)
    return ScannedSet(list_path, "list", entries, names, [], first_line)


# --------------------------------------------------------------------------- labels


def _candidates(names: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """For each kind, the names it resolves (name -> class index)."""
    n = len(labels)
    out: dict[str, dict[str, int]] = {k: {} for k in LABEL_KINDS}
    wnids = {w: i for i, w in enumerate(imagenet_wnids())} if n == 1000 else {}
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        exact.setdefault(label, []).append(i)
        folded.setdefault(label.casefold(), []).append(i)
    for name in names:
        if name in wnids:
            out["wnid"][name] = wnids[name]
        if name.isascii() and name.isdigit() and int(name) < n:
            out["index"][name] = int(name)
        hits = exact.get(name) or folded.get(name.casefold()) or []
        if len(hits) == 1:
            out["name"][name] = hits[0]
    return out


def _few(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


_KIND_WORDS = {"wnid": "WordNet ids", "index": "class indices", "name": "the model's labels"}


def resolve_classes(
    names: Sequence[str],
    labels: Sequence[str],
    *,
    label_by: str = "auto",
    what: str = "class folder",
    where: Callable[[str], str] | None = None,
) -> tuple[str, dict[str, int]]:
    """Match class names from a set to the model's classes: (kind, name -> class index).

    `label_by` "auto" picks the one kind (WordNet id, class index, label name) that
    matches every name; several kinds that match with different classes are ambiguous.
    Raises LabelError (exit 65) naming the names the model does not know.
    """
    if label_by not in ("auto", *LABEL_KINDS):
        raise UsageError(f"--label-by must be auto, {', '.join(LABEL_KINDS)}; not {label_by!r}")
    where = where or (lambda name: "")
    n = len(labels)
    found = _candidates(names, labels)
    if label_by != "auto":
        if label_by == "wnid" and n != 1000:
            raise LabelError(f"WordNet ids name the 1000 ImageNet classes, but this model has {n} classes")
        unknown = [x for x in names if x not in found[label_by]]
        if unknown:
            raise _unknown(unknown, label_by, labels, what, where, len(names))
        return label_by, found[label_by]
    complete = [k for k in LABEL_KINDS if len(found[k]) == len(names)]
    if complete:
        distinct = {tuple(sorted(found[k].items())) for k in complete}
        if len(distinct) > 1:
            example = next(x for x in names if len({found[k][x] for k in complete}) > 1)
            readings = "; ".join(f"as {_KIND_WORDS[k]}: class {found[k][example]}" for k in complete)
            raise LabelError(
                f"{what} names are ambiguous: they read as {' and as '.join(_KIND_WORDS[k] for k in complete)}, "
                f"with different classes ({example!r} {readings})",
                f"say which with --label-by {'|'.join(complete)}",
            )
        return complete[0], found[complete[0]]
    best = max(LABEL_KINDS, key=lambda k: len(found[k]))
    if not found[best]:
        looks_wnid = all(_WNID.fullmatch(x) for x in names)
        if looks_wnid and n != 1000:
            raise LabelError(
                f"{what} names are WordNet ids, but this model has {n} classes, not the 1000 of ImageNet",
                "name them by class index or by the model's labels",
            )
        raise LabelError(
            f"{what} names match neither WordNet ids, class indices (0-{n - 1}) nor the model's labels: {_few(names)}",
            f"the model's labels begin {_few(labels, 3)}",
        )
    unknown = [x for x in names if x not in found[best]]
    raise _unknown(unknown, best, labels, what, where, len(names))


def _unknown(unknown, kind, labels, what, where, total) -> LabelError:
    n = len(labels)
    shown = ", ".join(f"{x!r}{where(x)}" for x in unknown[:5]) + (
        f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    )
    plural = "s are" if len(unknown) > 1 else " is"
    matched = total - len(unknown)
    known = {
        "wnid": "it knows the 1000 ImageNet-1k WordNet ids",
        "index": f"its class indices run from 0 to {n - 1}",
        "name": f"its labels begin {_few(labels, 3)}",
    }[kind]
    context = f"the other {matched} matched as {_KIND_WORDS[kind]}; " if matched else ""
    return LabelError(f"{len(unknown)} {what}{plural} not a class of this model: {shown}", context + known)


def labelled_set(scanned: ScannedSet, labels: Sequence[str], *, label_by: str = "auto") -> LabelledSet:
    """Resolve a scanned set's labels against the model's `labels`."""
    what = "class folder" if scanned.layout == "folders" else "label"

    def where(name: str) -> str:
        line = scanned.lines.get(name)
        return f" (line {line})" if line else ""

    kind, mapping = resolve_classes(scanned.class_names, labels, label_by=label_by, what=what, where=where)
    items = [item for item, _ in scanned.entries]
    if scanned.multi_label:
        sets = [
            sorted({mapping[x] for x in (name if isinstance(name, list) else [name])}) if name is not None else []
            for _, name in scanned.entries
        ]
        return LabelledSet(
            scanned.source, scanned.layout, kind, items, [-1] * len(items), mapping, list(scanned.empty_classes), sets
        )
    targets = [mapping[name] if name is not None else -1 for _, name in scanned.entries]
    return LabelledSet(scanned.source, scanned.layout, kind, items, targets, mapping, list(scanned.empty_classes))


# --------------------------------------------------------------------------- running


def parse_top(spec: str | Sequence[int], num_classes: int | None = None) -> tuple[int, ...]:
    """ "1,5" -> (1, 5): sorted, unique, each at least 1 (and at most `num_classes`)."""
    if isinstance(spec, str):
        try:
            ks = [int(p) for p in spec.replace(" ", "").split(",") if p]
        except ValueError:
            raise UsageError(f"--topk must be a comma-separated list of integers, not {spec!r}") from None
    else:
        ks = list(spec)
    if not ks or min(ks) < 1:
        raise UsageError(f"--topk needs positive integers, not {spec!r}")
    if num_classes is not None and max(ks) > num_classes:
        raise UsageError(f"--topk {max(ks)} is more than the model's {num_classes} classes")
    return tuple(sorted(set(ks)))


@dataclass
class ImageResult(Result):
    """One image of the set: its top classes (best first) and the rank of its true class
    among them (1 = right at top-1; None = not among them), or why it failed."""

    target: int = -1  # class index; -1 for an image with no label
    predictions: list[Prediction] = field(default_factory=list)
    target_rank: int | None = None


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


def _reduced(metrics, empty):
    """`metrics` of every torchrun rank merged into `empty()`; `metrics` itself in one process."""
    parts = distributed.gather_objects(metrics)
    if len(parts) == 1:
        return metrics
    total = empty()
    for part in parts:
        total.merge(part)
    return total


class EvalMetrics:
    """Top-k counts, per-class counts, confusions and failures. `merge` adds another
    process's counts, so `reduced()` is exact across torchrun ranks."""

    def __init__(self, num_classes: int, ks: Sequence[int]):
        self.num_classes = num_classes
        self.ks = tuple(ks)
        self.class_images = np.zeros(num_classes, dtype=np.int64)
        self.class_correct = np.zeros((len(self.ks), num_classes), dtype=np.int64)  # (k, C)
        self.confusions: Counter[tuple[int, int]] = Counter()  # (true, predicted top-1) of misses
        self.failed: list[tuple[int, str, str]] = []  # (position, path, error)
        self.seconds = 0.0

    def add(self, r: ImageResult) -> None:
        if not r.ok:
            self.failed.append((r.position, r.path, r.error or "failed"))
            return
        self.class_images[r.target] += 1
        for i, k in enumerate(self.ks):
            if r.target_rank is not None and r.target_rank <= k:
                self.class_correct[i, r.target] += 1
        if r.target_rank != 1 and r.predictions:
            self.confusions[(r.target, r.predictions[0].index)] += 1

    def counting(self, results: Iterable[ImageResult]) -> Iterator[ImageResult]:
        """`results`, each added as it passes; `seconds` is the time they took."""
        start = time.perf_counter()
        for r in results:
            self.add(r)
            yield r
        self.seconds += time.perf_counter() - start

    def merge(self, other: EvalMetrics) -> EvalMetrics:
        self.class_images += other.class_images
        self.class_correct += other.class_correct
        self.confusions.update(other.confusions)
        self.failed = sorted(self.failed + other.failed)
        self.seconds = max(self.seconds, other.seconds)  # ranks run side by side
        return self

    def reduced(self) -> EvalMetrics:
        """The metrics of every torchrun rank summed (on every rank); itself in one process."""
        return _reduced(self, lambda: EvalMetrics(self.num_classes, self.ks))

    @property
    def images(self) -> int:
        """Images evaluated (decoded): the denominator of every accuracy."""
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
        images = self.images
        out: dict = {"images": images, "failed": len(self.failed), "total": images + len(self.failed)}
        for k in self.ks:
            out[f"top{k}"] = self.accuracy(k)
        out["correct"] = {f"top{k}": self.correct(k) for k in self.ks}
        out["seconds"] = round(self.seconds, 3)
        out["images_per_s"] = round(images / self.seconds, 2) if self.seconds > 0 else None
        out["failed_images"] = [{"path": p, "error": e} for _, p, e in self.failed]
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
    """Top-k accuracy of `model` on `lset`.

        lset = labelled_set(scan_set("imagenet/val"), model.labels)
        print(evaluate(model, lset).accuracy(1))

    Under torchrun, call it inside `distributed.init()`: each rank takes its share and
    the metrics returned are every rank's, summed.
    """
    metrics, results = evaluation(model, lset, ks=ks, head=head, device=device, dtype=dtype, options=options)
    for _ in results:
        pass
    return metrics.reduced()


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


def write_predictions(
    results: Iterable, labels: Sequence[str], path: Path | None, *, threshold: float | None = None
) -> None:
    """Consume `results`, writing each image's record (`prediction_record`, or with a
    `threshold` the multi-label `scored_record`) to `path` as JSON lines (atomically; under
    torchrun rank 0 writes every rank's, in input order)."""
    if threshold is None:
        records = (prediction_record(r, labels) for r in results)
    else:
        records = (scored_record(r, labels, threshold) for r in results)
    if path is None:
        for _ in records:
            pass
    elif not distributed.is_distributed():
        write_jsonl(path, records)
    else:
        with distributed.merged_shards(records, _write_shard, _read_shard, near=path) as merged:
            if merged is not None:
                write_jsonl(path, merged)


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
    """The whole result of an evaluation as one record: what `deit eval --json` prints."""
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
        out["published"] = {"variant": model.variant.name, "top1": model.variant.top1, "top5": model.variant.top5}
    if predictions is not None:
        out["predictions"] = os.fspath(predictions)
    return out


def prediction_record(r: ImageResult, labels: Sequence[str]) -> dict:
    """One image's record in `--predictions`: classify's, plus its true class and whether
    it was right."""
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


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Records as JSON lines, written beside `path` and renamed over it once complete."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_shard(records: Iterable[dict], stem: Path) -> None:
    with open(stem.with_suffix(".jsonl"), "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _read_shard(stem: Path) -> Iterator[dict]:
    with open(stem.with_suffix(".jsonl"), encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


# --------------------------------------------------------------------------- multi-label


def check_kind(model, lset: LabelledSet) -> None:
    """A multi-label model needs a set with label lists, and a single-label model one
    label per image: a mix-up is an error, never a silent metric of the wrong kind."""
    multi = bool(getattr(model, "multi_label", False))
    if multi and not lset.multi_label:
        raise LabelError(
            f"{lset.source}: this model is multi-label, but the set gives one label per image",
            'give each image a list of labels (JSONL "label": [...] or CSV `a|b`)',
        )
    if lset.multi_label and not multi:
        raise LabelError(
            f"{lset.source}: the set gives lists of labels (multi-label), but this model is single-label",
            "evaluate a multi-label model (deit train --multi-label), or give one label per image",
        )


@dataclass
class ScoredImage(Result):
    """One image of a multi-label set: its true classes and every class's sigmoid score."""

    targets: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None  # (classes,) float32, None when the image failed


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


class MultiLabelMetrics:
    """mAP, and F1 and IoU (micro and macro) at a threshold, over the images that decoded.

    - mAP: the mean of each class's average precision, over the classes with a positive.
    - At the threshold (a class is predicted when its score is at or above it), per class
      TP, FP, FN: F1 = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN). Micro sums the
      counts over classes first; macro averages the per-class values over the classes that
      are present or predicted somewhere (a class that is neither has 0/0 and is left out).

    `merge` adds another process's images, so `reduced()` is exact across torchrun ranks.
    """

    def __init__(self, num_classes: int, threshold: float):
        self.num_classes = num_classes
        self.threshold = float(threshold)
        self.scores: list[np.ndarray] = []
        self.targets: list[list[int]] = []
        self.failed: list[tuple[int, str, str]] = []  # (position, path, error)
        self.seconds = 0.0

    def add(self, r: ScoredImage) -> None:
        if not r.ok:
            self.failed.append((r.position, r.path, r.error or "failed"))
            return
        self.scores.append(np.asarray(r.scores, dtype=np.float32))
        self.targets.append(list(r.targets))

    def counting(self, results: Iterable[ScoredImage]) -> Iterator[ScoredImage]:
        start = time.perf_counter()
        for r in results:
            self.add(r)
            yield r
        self.seconds += time.perf_counter() - start

    def merge(self, other: MultiLabelMetrics) -> MultiLabelMetrics:
        self.scores += other.scores
        self.targets += other.targets
        self.failed = sorted(self.failed + other.failed)
        self.seconds = max(self.seconds, other.seconds)
        return self

    def reduced(self) -> MultiLabelMetrics:
        """Every torchrun rank's images (on every rank); itself in one process."""
        return _reduced(self, lambda: MultiLabelMetrics(self.num_classes, self.threshold))

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
            "images": self.images,
            "failed": len(self.failed),
            "total": self.images + len(self.failed),
            "threshold": self.threshold,
            "map": float(np.mean(valid)) if valid else None,
            "f1_micro": 2 * T / (2 * T + F + N) if T + F + N else None,
            "f1_macro": float(f1[seen].mean()) if seen.any() else None,
            "iou_micro": T / (T + F + N) if T + F + N else None,
            "iou_macro": float(iou[seen].mean()) if seen.any() else None,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds > 0 else None,
            "failed_images": [{"path": p, "error": e} for _, p, e in self.failed],
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


def scored_record(r: ScoredImage, labels: Sequence[str], threshold: float) -> dict:
    """One multi-label image's record in `--predictions`: its true labels and the labels
    at or above the threshold, best first."""
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


def multi_label_summary(
    model,
    lset: LabelledSet,
    metrics: MultiLabelMetrics,
    *,
    per_class: bool = False,
    predictions: str | os.PathLike | None = None,
) -> dict:
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
