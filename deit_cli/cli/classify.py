"""`deit classify INPUTS...`: the top classes of each image, for people and for pipelines."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Callable, Iterable

import typer

from . import output
from .inputs import image_options, load, positioned, prefetch, read_inputs, wants_progress
from .options import (
    DEFAULT_MODEL_NAME,
    AllowTruncatedOpt,
    Backend,
    BackendOpt,
    BatchSizeOpt,
    CropPctOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    HeadOpt,
    InputsArg,
    JsonOpt,
    ModelOpt,
    NoExifOpt,
    NullOpt,
    QuietOpt,
    ResizeOpt,
    TopOpt,
    WorkersOpt,
)


class Scores(str, Enum):
    prob = "prob"
    logit = "logit"


CSV_FIELDS = ["path", "rank", "index", "label", "score", "error"]
FEW = 3  # up to this many images get a table each on a terminal; more get one compact table


def classify(
    inputs: InputsArg,
    model: ModelOpt = DEFAULT_MODEL_NAME,
    top: TopOpt = 5,
    head: HeadOpt = None,
    scores: Annotated[
        Scores, typer.Option("--scores", help="prob (softmax; sigmoid for a multi-label model) or logit.")
    ] = Scores.prob,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Multi-label models: report the labels scoring at least this (default: the model's).",
        ),
    ] = None,
    format_: FormatOpt = None,
    json_: JsonOpt = False,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    backend: BackendOpt = Backend.auto,
    crop_pct: CropPctOpt = None,
    resize: ResizeOpt = None,
    no_exif: NoExifOpt = False,
    allow_truncated: AllowTruncatedOpt = False,
    null: NullOpt = False,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Classify images: the top classes of each, with probabilities.

    A table on a terminal; JSON lines (one record per image, streamed) when piped.
    Exit code 0: all classified; 1: some inputs failed (each has an error record);
    66: none could be read.
    """
    from .. import distributed
    from ..engine import classify as engine

    fmt = output.choose_format(format_, json_, per_item=True)
    options = image_options(batch_size, workers, crop_pct, resize, no_exif, allow_truncated)
    device = distributed.local_device(device)
    show = wants_progress(quiet=quiet, stdout_streams=fmt != "table")
    items = read_inputs(inputs, null_separated=null)  # checked now, read lazily
    with distributed.init(device):
        net = load(model)
        output.set_batch_size(batch_size)
        items = prefetch(inputs, items, counted=show)
        chosen_head = head.value if head else engine.default_head(net.config)
        extra = {"model": str(net.source), "head": chosen_head}
        if net.multi_label:
            extra["threshold"] = net.threshold if threshold is None else threshold
        with output.ProgressBar(show, "classifying", len(items) if isinstance(items, list) else None) as bar:
            results = bar.wrap(
                engine.classify(
                    net,
                    items,
                    top=top,
                    head=chosen_head,
                    scores=scores.value,
                    threshold=threshold,
                    device=device,
                    dtype=dtype,
                    backend=backend.value,
                    options=options,
                )
            )
            if not distributed.is_distributed():
                code = render(results, fmt, extra, scores.value, before_table=bar.stop)
            else:
                with distributed.merged_shards(results, engine.write_shard, engine.read_shard) as merged:
                    bar.stop()
                    # Rank 0 reports for every rank; the others are done once their shard is written.
                    code = 0 if merged is None else render(positioned(merged), fmt, extra, scores.value)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- rendering


def render(
    results: Iterable, fmt: str, extra: dict[str, Any], scores: str, before_table: Callable[[], None] = lambda: None
) -> int:
    """Write `results` to stdout in `fmt`, each failure on stderr; returns the exit code."""
    tally = output.Tally()
    counted = tally.counting(results)
    if fmt in ("json", "jsonl"):
        output.write_records((r.to_record(**extra) for r in counted), fmt)
    elif fmt in ("csv", "tsv"):
        output.write_records(_rows(counted), fmt, fieldnames=CSV_FIELDS)
    else:
        done = list(counted)
        before_table()
        _write_tables(done, scores)
    return tally.exit_code()


def _rows(results: Iterable) -> Iterable[dict]:
    for r in results:
        if not r.ok:
            yield {"path": r.path, "error": r.error}
            continue
        if not r.predictions:  # multi-label: nothing over the threshold
            yield {"path": r.path}
        for p in r.predictions:
            yield {"path": r.path, "rank": p.rank, "index": p.index, "label": p.label, "score": repr(p.score)}


def _bar(p: float, width: int = 20) -> str:
    eighths = round(max(0.0, min(1.0, p)) * width * 8)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def _score(value: float, scores: str) -> str:
    return f"{value * 100:.1f}%" if scores == "prob" else f"{value:.3f}"


def _write_tables(results: list, scores: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = output.stdout_console()
    good = [r for r in results if r.ok]
    heading = "probability" if scores == "prob" else "logit"
    if len(results) <= FEW:
        for r in good:
            notes = [*r.notes, *([] if r.predictions else ["no label at or above the threshold"])]
            table = Table(
                title=escape(r.path),
                title_justify="left",
                caption=escape("; ".join(notes)) or None,
                caption_justify="left",
            )
            table.add_column("#", justify="right")
            table.add_column("label")
            table.add_column(heading, justify="right")
            if scores == "prob":
                table.add_column("", style="cyan", no_wrap=True)
            for p in r.predictions:
                cells = [str(p.rank), escape(p.label), _score(p.score, scores)]
                table.add_row(*cells, _bar(p.score)) if scores == "prob" else table.add_row(*cells)
            console.print(table)
        return
    table = Table(title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("label")
    table.add_column(heading, justify="right")
    table.add_column("next", style="dim")
    for r in results:
        if not r.ok:
            table.add_row(escape(r.path), "[red]error[/]", "", f"[red]{escape(r.error)}[/]")
            continue
        if not r.predictions:  # multi-label: nothing over the threshold
            table.add_row(escape(r.path), "[dim](none)[/]", "", "")
            continue
        best, rest = r.predictions[0], r.predictions[1:4]
        others = ", ".join(f"{escape(p.label)} {_score(p.score, scores)}" for p in rest)
        table.add_row(escape(r.path), escape(best.label), _score(best.score, scores), others)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)
