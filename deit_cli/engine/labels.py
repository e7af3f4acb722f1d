"""Matching a labelled set's names to a model's classes, for `deit eval`.

A set names a class by WordNet id (a 1000-class ImageNet model), by class index, or by the
model's label (exact, else case-folded). "auto" takes the one kind that matches every name;
names that match several kinds with different classes are ambiguous and need `label_by`.
A name the model does not know is an error naming it (and its list line), never a
silently dropped image.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..config import imagenet_wnids
from ..errors import UsageError
from ..images.inputs import InputItem
from ..images.labelled import LabelError, ScannedSet

__all__ = ["LABEL_KINDS", "LabelledSet", "resolve_classes", "labelled_set", "check_kind"]

LABEL_KINDS = ("wnid", "index", "name")  # also the preference when several agree
_WNID = re.compile(r"n\d{8}")
_KIND_WORDS = {"wnid": "WordNet ids", "index": "class indices", "name": "the model's labels"}


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
    items = [e.item for e in scanned.entries]
    if scanned.multi_label:
        sets = [
            sorted({mapping[x] for x in (e.label if isinstance(e.label, list) else [e.label])})
            if e.label is not None
            else []
            for e in scanned.entries
        ]
        return LabelledSet(
            scanned.source, scanned.layout, kind, items, [-1] * len(items), mapping, list(scanned.empty_classes), sets
        )
    targets = [mapping[e.label] if e.label is not None else -1 for e in scanned.entries]
    return LabelledSet(scanned.source, scanned.layout, kind, items, targets, mapping, list(scanned.empty_classes))


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
