"""Labelled image sets, read one way for `deit train` and `deit eval` (no torch, no Pillow).

A set is one of:

- a class-folder tree: one subfolder per class, its images anywhere below it (a symlinked
  class folder counts). An image directly in the root is outside every class: it is kept as
  an entry with no label and an error, so that it is counted, never dropped silently.
- a list file, one image per line; blank lines and `#` comments are skipped:
  - JSON lines (`.jsonl` or `.json`, or any name whose first line starts with `{`): one
    object per line, the image in `"image_url"` or `"path"`, its label in `"label"`: a
    class name (a string, or an integer index), or a list of them (several labels: a
    multi-label set; `[]` is a negative example). A string holding `|` is refused: in
    JSON, several labels are a list.
  - CSV (`.csv`), TSV (`.tsv`), or for any other name what the first line holds: a tab, a
    comma, else whitespace (`path label`, the path may hold spaces). A first line naming
    its columns (path/file/image... and label/class/target/wnid...) is a header, and then
    those columns are used. A label holding `|` is a list of labels, and then every label
    of the file is a list (an empty field is a negative example).

Image references: `http(s)://` is a URL, `file://` is stripped to a path, another scheme
is kept as written (it fails as an image, alone); a relative path is relative to the list
file's folder (or to the folder given with `base`). A list of labels keeps its first
order, each name once; names are stripped.

Every problem with the set itself is a `LabelError` (exit 65) naming the file and line; a
set with nothing in it is `InputNotFound` (66). What a set's names mean (the model's
classes, or training's) is for the caller.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import EXIT_DATA, DeiTError, InputNotFound, UsageError
from ..files import input_error
from .inputs import IMAGE_EXTENSIONS, InputItem, is_url, iter_inputs

__all__ = [
    "JSONL_HINT",
    "LabelError",
    "Label",
    "Row",
    "Entry",
    "ScannedSet",
    "scan_set",
    "read_label_list",
    "list_item",
]

JSONL_HINT = 'in JSON lines, give several labels as a list: "label": ["a", "b"]'
_JSONL_EXTENSIONS = (".jsonl", ".json")
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

Label = str | list[str]  # one class name, or (multi-label) a list of them


class LabelError(DeiTError):
    """A malformed list file, or labels that cannot be matched to a model's classes."""

    exit_code = EXIT_DATA


class Row(NamedTuple):
    """One line of a list file: the image as written, its label(s), the line number."""

    ref: str
    label: Label
    line: int


class Entry(NamedTuple):
    """One image of a set: the label is None for an image that has none (it fails);
    `line` is its list file's line (None in a folder tree)."""

    item: InputItem
    label: Label | None
    line: int | None = None


@dataclass
class ScannedSet:
    """A labelled set as found on disk, before its names are matched to any classes.

    `entries` are in the set's order. `class_names` are every name the set uses, in first
    use order (class folders: sorted, empty ones included).
    """

    source: str
    layout: str  # "folders" or "list"
    entries: list[Entry]
    class_names: list[str]
    empty_classes: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # list files: name -> first line

    @property
    def multi_label(self) -> bool:
        """Any image with a list of labels (JSON `"label": [...]`, CSV `a|b`) makes a
        multi-label set."""
        return any(isinstance(e.label, list) for e in self.entries)

    def where(self, entry: Entry) -> str:
        """`source, line N` (list files) or `source` (folders), for messages."""
        return f"{self.source}, line {entry.line}" if entry.line is not None else self.source


def scan_set(spec: str | os.PathLike, *, labels_file: str | os.PathLike | None = None) -> ScannedSet:
    """Find a labelled set: a folder tree, a list file, or (with `labels_file`) a list
    whose paths are relative to the folder `spec`. Raises InputNotFound (66) when there
    is nothing in it, LabelError (65) for a malformed list."""
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


def list_item(ref: str, base: str) -> InputItem:
    """The input a list file's image reference names (see the module's rules)."""
    if is_url(ref):
        return InputItem(ref, url=True)
    if ref.startswith("file://"):
        ref = ref.removeprefix("file://")
    if os.path.isabs(ref) or "://" in ref:
        return InputItem(ref)
    return InputItem(os.path.join(base, ref))


def read_label_list(path: str | os.PathLike) -> list[Row]:
    """The rows of a list file (JSON lines, CSV, TSV or whitespace-separated), in order."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise LabelError(f"{path}: not a UTF-8 text file (a list file is CSV/TSV `path,label` or JSON lines)") from None
    except OSError as e:
        raise input_error(path, e) from None
    lines = [
        (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        return []
    ext = os.path.splitext(path)[1].lower()
    if ext in _JSONL_EXTENSIONS or (ext not in (".csv", ".tsv") and lines[0][1].lstrip().startswith("{")):
        return [_jsonl_row(path, n, line) for n, line in lines]
    return _delimited_rows(path, ext, lines)


def _delimited_rows(path: str, ext: str, lines: list[tuple[int, str]]) -> list[Row]:
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
    multi = any("|" in f[label_col] for _, f in rows if len(f) > label_col)
    out = []
    for n, fields in rows:
        if len(fields) <= max(path_col, label_col) or not fields[path_col] or not (fields[label_col] or multi):
            raise LabelError(f"{path}, line {n}: expected a path and a label", "one `path,label` per line")
        label = fields[label_col]
        out.append(Row(fields[path_col], _unique(label.split("|")) if multi else label, n))
    return out


def _jsonl_row(path: str, n: int, line: str) -> Row:
    where = f"{path}, line {n}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise LabelError(f"{where}: not JSON ({e.msg})", 'one {"image_url": ..., "label": ...} per line') from None
    ref = rec.get("image_url", rec.get("path")) if isinstance(rec, dict) else None
    if not isinstance(ref, str) or not ref:
        raise LabelError(f'{where}: no image (an "image_url" or "path" string)')
    if "label" not in rec:
        raise LabelError(f'{where}: no "label" (a class name, or a list of them)')
    value = rec["label"]
    if isinstance(value, str) and "|" in value:  # CSV's spelling of a list; JSON has lists
        raise LabelError(f"{where}: the label {json.dumps(value)} holds '|'", JSONL_HINT)
    if isinstance(value, list):
        return Row(ref, _unique(_name(x, where) for x in value), n)
    return Row(ref, _name(value, where), n)


def _name(value, where: str) -> str:
    """A class name: a non-empty string, or an integer (a class index)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise LabelError(f"{where}: a label must be a class name (a string or an index), not {json.dumps(value)}")
    return str(value).strip()


def _unique(names) -> list[str]:
    return list(dict.fromkeys(x.strip() for x in names if x.strip()))


def _scan_list(list_path: str, *, base: str) -> ScannedSet:
    rows = read_label_list(list_path)
    if not rows:
        raise InputNotFound(f"{list_path}: lists no images")
    entries, first_line = [], {}
    for ref, label, n in rows:
        entries.append(Entry(list_item(ref, base), label, n))
        for name in label if isinstance(label, list) else [label]:
            first_line.setdefault(name, n)
    return ScannedSet(list_path, "list", entries, list(first_line), [], first_line)


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
    entries: list[Entry] = []
    empty = []
    for d in class_dirs:
        images = [item for item in iter_inputs([d.path]) if not (item.error and item.path == d.path)]
        if not images:
            empty.append(d.name)
        entries.extend(Entry(item, d.name) for item in images)
    for path in loose:
        entries.append(Entry(InputItem(path, error=f"{path}: not inside a class folder, so it has no label"), None))
    if not any(e.item.error is None for e in entries):
        raise InputNotFound(f"{root}: no images in any class folder")
    return ScannedSet(root, "folders", entries, [d.name for d in class_dirs], empty)
