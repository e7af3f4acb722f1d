"""`deit eval SET`: top-1/top-5 (any --top) accuracy of a model on a labelled image set."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_OK, EXIT_PARTIAL, InputNotFound
from . import output
from .inputs import (
    AllowTruncatedOpt, BatchSizeOpt, CropPctOpt, NoExifOpt, ProgressBar, ResizeOpt, WorkersOpt, image_options,
    load, wants_progress,
)  # fmt: skip
from .options import DEFAULT_MODEL_NAME, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelOpt, QuietOpt


class Head(str, Enum):
    avg = "avg"
    cls = "cls"
    dist = "dist"


class LabelBy(str, Enum):
    auto = "auto"
    wnid = "wnid"
    index = "index"
    name = "name"


def evaluate(
    dataset: Annotated[str, typer.Argument(
        metavar="SET", show_default=False,
        help="Image-folder tree (one subfolder per class, named by WordNet id, class index or label) "
             "or a list file (CSV/TSV `path,label`; paths relative to the list's folder).")],
    model: ModelOpt = DEFAULT_MODEL_NAME,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="A list file (`path,label`) of the images in SET: a folder, its paths relative to it.",
    )] = None,
    label_by: Annotated[LabelBy, typer.Option(
        "--label-by", help="How the set names classes (auto: whichever matches every name).")] = LabelBy.auto,
    top: Annotated[str, typer.Option("--top", "-k", help="The k of the top-k accuracies, comma-separated.")] = "1,5",
    per_class: Annotated[bool, typer.Option("--per-class", help="Also the accuracy of every class.")] = False,
    confused: Annotated[int, typer.Option(
        "--confused", min=0, help="How many most-confused class pairs to list.")] = 10,
    predictions: Annotated[Path | None, typer.Option(
        "--predictions", help="Write every image's prediction to this JSONL file.")] = None,
    force: ForceOpt = False,
    head: Annotated[
        Head | None, typer.Option("--head", help="Distilled models: avg (default), cls or dist classifier.")
    ] = None,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    crop_pct: CropPctOpt = None,
    resize: ResizeOpt = None,
    no_exif: NoExifOpt = False,
    allow_truncated: AllowTruncatedOpt = False,
    workers: WorkersOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1/top-5 (any --top) accuracy on a labelled image set, e.g. ImageNet val.

    Accuracy is over the images that decoded; the others are counted and listed as failed.

    Exit codes: 0 all evaluated, 1 some images failed, 65 unknown classes or a bad list, 66 nothing to read.

    Under torchrun the set is split across processes and the metrics summed.
    """
    from .. import distributed
    from .. import evaluate as ev
    from ..checkpoints.writing import check_destination

    options = image_options(batch_size, workers, crop_pct, resize, no_exif, allow_truncated)
    ev.parse_top(top)
    if predictions is not None:
        check_destination(predictions, force=force)
    scanned = ev.scan_set(dataset, labels_file=labels)  # before the model: fail fast
    device = distributed.local_device(device)
    show = wants_progress(quiet=quiet, stdout_streams=False)
    with distributed.init(device):
        net = load(model)
        ks = ev.parse_top(top, net.config.num_classes)
        lset = ev.labelled_set(scanned, net.labels, label_by=label_by.value)
        if distributed.is_main() and not quiet:
            for name in lset.empty_classes:
                output.warn(f"class folder {name!r} has no images")
        chosen_head = head.value if head else None
        entries = ev.set_entries(lset)
        metrics = ev.EvalMetrics(net.config.num_classes, ks)
        with ProgressBar(show, "evaluating", len(entries)) as bar:
            results = bar.wrap(_warning_failures(metrics.counting(ev.iter_results(
                net, entries, top=max(ks), head=chosen_head, device=device, dtype=dtype, options=options))))
            records = (_record(r, net.labels) for r in results)
            if predictions is None:
                for _ in records:
                    pass
            elif not distributed.is_distributed():
                _write_jsonl(predictions, records)
            else:
                with distributed.merged_shards(records, _write_shard, _read_shard, near=predictions) as merged:
                    if merged is not None:
                        _write_jsonl(predictions, merged)
        metrics = metrics.reduced()
    if not distributed.is_main():
        raise typer.Exit(EXIT_OK)  # rank 0 reports for every rank

    from ..engine import default_head

    summary = {
        "model": str(net.source),
        "set": lset.source,
        "label_by": lset.label_by,
        "classes": len(set(lset.classes.values())),
        "head": chosen_head or default_head(net.config),
        "top": list(ks),
        **metrics.to_dict(net.labels, classes=lset.classes, per_class=per_class, confused=confused),
    }
    if net.variant is not None:
        summary["published"] = {"variant": net.variant.name, "top1": net.variant.top1, "top5": net.variant.top5}
    if predictions is not None:
        summary["predictions"] = str(predictions)
    if json_:
        output.write_json(summary)
    else:
        _render(summary, ks)
    if not metrics.images:
        raise InputNotFound(f"{lset.source}: none of the {len(metrics.failed)} images could be read")
    if metrics.failed:
        output.warn(f"{len(metrics.failed)} of {summary['total']} images failed; accuracy is over the other "
                    f"{metrics.images}")  # fmt: skip
        raise typer.Exit(EXIT_PARTIAL)


def _warning_failures(results: Iterable) -> Iterator:
    for r in results:
        if not r.ok:
            output.error(r.message)  # one line per bad image, whatever --quiet says
        yield r


def _record(r, labels) -> dict:
    """One image's JSONL record: classify's, plus its true class and whether it was right."""
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


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Written beside `path`, renamed over it once complete (nothing left on failure)."""
    from ..checkpoints.writing import atomic_path

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


_MAX_FAILED_SHOWN = 20
_KIND_WORDS = {"wnid": "WordNet id", "index": "class index", "name": "label"}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _render(s: dict, ks) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = output.stdout_console()
    head = Table(title=escape(f"deit eval: {s['set']}"), title_justify="left", show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", escape(f"{s['model']} (head {s['head']})"))
    head.add_row("classes", f"{s['classes']}, named by {_KIND_WORDS[s['label_by']]}")
    head.add_row("images", f"{s['images']:,}" + (f"   failed {s['failed']:,}" if s["failed"] else ""))
    if s["images_per_s"] is not None:
        head.add_row("speed", f"{s['images_per_s']:,.1f} images/s ({s['seconds']:.1f} s)")
    pub = s.get("published") or {}
    for k in ks:
        extra = f"   (published {pub[f'top{k}']:.1f}%)" if f"top{k}" in pub else ""
        head.add_row(f"top-{k}", f"[bold]{_pct(s[f'top{k}'])}[/]   {s['correct'][f'top{k}']:,} right{extra}")
    console.print(head)
    if s.get("per_class"):
        table = Table(title="per class", title_justify="left")
        for col in ("index", "class", "label", "images", *(f"top-{k}" for k in ks)):
            table.add_column(col, justify="right" if col in ("index", "images") or col.startswith("top") else "left")
        for r in s["per_class"]:
            table.add_row(str(r["index"]), escape(r["name"]), escape(r["label"]), str(r["images"]),
                          *(_pct(r[f"top{k}"]) for k in ks))  # fmt: skip
        console.print(table)
    if s["confused"]:
        table = Table(title="most confused (true → predicted)", title_justify="left")
        for col, j in (("true", "left"), ("predicted", "left"), ("images", "right")):
            table.add_column(col, justify=j)
        for c in s["confused"]:
            table.add_row(escape(f"{c['true']} {c['true_label']}"), escape(f"{c['predicted']} {c['predicted_label']}"),
                          str(c["count"]))  # fmt: skip
        console.print(table)
    if s["failed_images"]:
        table = Table(title="failed images", title_justify="left")
        table.add_column("path")
        table.add_column("error")
        for f in s["failed_images"][:_MAX_FAILED_SHOWN]:
            table.add_row(escape(f["path"]), escape(f["error"]))
        console.print(table)
        if len(s["failed_images"]) > _MAX_FAILED_SHOWN:
            console.print(f"... and {len(s['failed_images']) - _MAX_FAILED_SHOWN} more (all of them with --json)")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
