"""`deit eval SET`: top-1/top-5 (any --top) accuracy of a model on a labelled image set."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_OK, EXIT_PARTIAL, InputNotFound
from . import output
from .inputs import image_options, load, wants_progress
from .options import (
    DEFAULT_MODEL_NAME,
    AllowTruncatedOpt,
    BatchSizeOpt,
    CropPctOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    HeadOpt,
    JsonOpt,
    ModelOpt,
    NoExifOpt,
    QuietOpt,
    ResizeOpt,
    WorkersOpt,
)


class LabelBy(str, Enum):
    auto = "auto"
    wnid = "wnid"
    index = "index"
    name = "name"


def evaluate(
    dataset: Annotated[
        str,
        typer.Argument(
            metavar="SET",
            show_default=False,
            help="Image-folder tree (one subfolder per class, named by WordNet id, class index or label) "
            "or a list file (CSV/TSV `path,label`, `a|b` for several; or JSON lines "
            '{"image_url" or "path": ..., "label": ... or [...]}; paths relative to the list\'s folder).',
        ),
    ],
    model: ModelOpt = DEFAULT_MODEL_NAME,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="A list file (`path,label` or JSON lines) of the images in SET: a folder, its paths relative to it.",
        ),
    ] = None,
    label_by: Annotated[
        LabelBy, typer.Option("--label-by", help="How the set names classes (auto: whichever matches every name).")
    ] = LabelBy.auto,
    topk: Annotated[str, typer.Option("--topk", help="The k of the top-k accuracies, comma-separated.")] = "1,5",
    per_class: Annotated[bool, typer.Option("--per-class", help="Also the accuracy of every class.")] = False,
    confused: Annotated[
        int, typer.Option("--confused", min=0, help="How many most-confused class pairs to list.")
    ] = 10,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="Write every image's prediction to this JSONL file.")
    ] = None,
    force: ForceOpt = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Multi-label models: a label is predicted at or above this score (default: the model's).",
        ),
    ] = None,
    head: HeadOpt = None,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    crop_pct: CropPctOpt = None,
    resize: ResizeOpt = None,
    no_exif: NoExifOpt = False,
    allow_truncated: AllowTruncatedOpt = False,
    workers: WorkersOpt = None,
    format_: FormatOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1/top-5 (any --topk) accuracy on a labelled image set, e.g. ImageNet val.

    Accuracy is over the images that decoded; the others are counted and listed as failed.
    A multi-label model (a set with label lists) gets mAP, F1 and IoU at its threshold.

    Exit codes: 0 all evaluated, 1 some images failed, 65 unknown classes or a bad list, 66 nothing to read.

    Under torchrun the set is split across processes and the metrics summed.
    """
    from .. import distributed
    from ..config import parse_top
    from ..engine.evaluate import evaluate_set
    from ..files import check_destination
    from ..images.labelled import scan_set

    fmt = output.choose_format(format_, json_, per_item=False, allowed=("table", "json", "jsonl"))
    options = image_options(batch_size, workers, crop_pct, resize, no_exif, allow_truncated)
    ks = parse_top(topk)
    if predictions is not None:
        check_destination(predictions, force=force)
    scanned = scan_set(dataset, labels_file=labels)  # before the model: fail fast
    device = distributed.local_device(device)
    show = wants_progress(quiet=quiet, stdout_streams=False)

    def watch(lset, results: Iterable) -> Iterator:
        if distributed.is_main() and not quiet:
            for name in lset.empty_classes:
                output.warn(f"class folder {name!r} has no images")
        rank, size = distributed.world()
        with output.ProgressBar(show, "evaluating", len(range(rank, len(lset), size))) as bar:  # this rank's share
            yield from bar.wrap(_warning_failures(results))

    with distributed.init(device):
        net = load(model)
        output.set_batch_size(batch_size)
        summary = evaluate_set(
            net,
            scanned,
            ks=ks,
            label_by=label_by.value,
            threshold=threshold,
            head=head.value if head else None,
            per_class=per_class,
            confused=confused,
            predictions=predictions,
            device=device,
            dtype=dtype,
            options=options,
            watch=watch,
        )
    if not distributed.is_main():
        raise typer.Exit(EXIT_OK)  # rank 0 reports for every rank

    if fmt != "table":
        output.write_document(summary, fmt)
    elif summary.get("multi_label"):
        _render_multi_label(summary)
    else:
        _render(summary, summary["top"])
    if not summary["images"]:
        raise InputNotFound(f"{summary['set']}: none of the {summary['failed']} images could be read")
    if summary["failed"]:
        output.warn(
            f"{summary['failed']} of {summary['total']} images failed; accuracy is over the other {summary['images']}"
        )
        raise typer.Exit(EXIT_PARTIAL)


def _warning_failures(results: Iterable) -> Iterator:
    for r in results:
        if not r.ok:
            output.error(r.message)  # one line per bad image, whatever --quiet says
        yield r


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
            table.add_row(
                str(r["index"]),
                escape(r["name"]),
                escape(r["label"]),
                str(r["images"]),
                *(_pct(r[f"top{k}"]) for k in ks),
            )
        console.print(table)
    if s["confused"]:
        table = Table(title="most confused (true → predicted)", title_justify="left")
        for col, j in (("true", "left"), ("predicted", "left"), ("images", "right")):
            table.add_column(col, justify=j)
        for c in s["confused"]:
            table.add_row(
                escape(f"{c['true']} {c['true_label']}"),
                escape(f"{c['predicted']} {c['predicted_label']}"),
                str(c["count"]),
            )
        console.print(table)
    _failed_table(console, s["failed_images"])


def _failed_table(console, failed: list[dict]) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not failed:
        return
    table = Table(title="failed images", title_justify="left")
    table.add_column("path")
    table.add_column("error")
    for f in failed[:_MAX_FAILED_SHOWN]:
        table.add_row(escape(f["path"]), escape(f["error"]))
    console.print(table)
    if len(failed) > _MAX_FAILED_SHOWN:
        console.print(f"... and {len(failed) - _MAX_FAILED_SHOWN} more (all of them with --json)")


def _frac(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _render_multi_label(s: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = output.stdout_console()
    head = Table(
        title=escape(f"deit eval: {s['set']} (multi-label)"), title_justify="left", show_header=False, box=None
    )
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", escape(s["model"]))
    head.add_row("classes", str(s["classes"]))
    head.add_row("images", f"{s['images']:,}" + (f"   failed {s['failed']:,}" if s["failed"] else ""))
    head.add_row("threshold", f"{s['threshold']:g}")
    head.add_row("mAP", f"[bold]{_frac(s['map'])}[/]")
    head.add_row("F1", f"micro {_frac(s['f1_micro'])}   macro {_frac(s['f1_macro'])}")
    head.add_row("IoU", f"micro {_frac(s['iou_micro'])}   macro {_frac(s['iou_macro'])}")
    console.print(head)
    if s.get("per_class"):
        table = Table(title="per class", title_justify="left")
        for col in ("index", "label", "positives", "predicted", "AP", "F1", "IoU"):
            table.add_column(col, justify="left" if col == "label" else "right")
        for r in s["per_class"]:
            table.add_row(
                str(r["index"]),
                escape(r["label"]),
                str(r["positives"]),
                str(r["predicted"]),
                _frac(r["ap"]),
                _frac(r["f1"]),
                _frac(r["iou"]),
            )
        console.print(table)
    _failed_table(console, s["failed_images"])


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
