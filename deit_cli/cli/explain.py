"""`deit explain INPUTS... -o DIR`: where the class (and distillation) token look, as
pictures and as numbers. The maps, pictures and files are `deit_cli.engine.explain`."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import output
from .inputs import image_options, load, read_inputs, wants_progress
from .options import (
    DEFAULT_MODEL_NAME,
    AllowTruncatedOpt,
    BatchSizeOpt,
    CropPctOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    InputsArg,
    ModelOpt,
    NoExifOpt,
    NullOpt,
    QuietOpt,
    ResizeOpt,
    TopOpt,
    WorkersOpt,
)


class Method(str, Enum):
    rollout = "rollout"
    attention = "attention"


class ExplainFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


def explain(
    inputs: InputsArg,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Directory for NAME.METHOD.png (and .npy); created if missing.", show_default=False
        ),
    ],
    model: ModelOpt = DEFAULT_MODEL_NAME,
    method: Annotated[
        Method,
        typer.Option(
            "--method", help="rollout (attention through all blocks, the default) or attention (the last block only)."
        ),
    ] = Method.rollout,
    per_head: Annotated[bool, typer.Option("--per-head", help="Add the last block's maps, one per head.")] = False,
    tokens: Annotated[
        str | None,
        typer.Option(
            "--tokens",
            help="Which tokens to map: cls, dist or cls,dist (default: the class token, and the "
            "distillation token when a teacher trained it).",
            show_default=False,
        ),
    ] = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="Also write NAME.METHOD.npy: the unnormalised float32 maps, "
            "tokens × grid × grid (with --per-head also NAME.METHOD.heads.npy, tokens × heads × grid × grid).",
        ),
    ] = False,
    top: TopOpt = 5,
    force: ForceOpt = False,
    format_: Annotated[
        ExplainFormat | None,
        typer.Option(
            "--format",
            "-F",
            help="table, json or jsonl (default: a table on a terminal, JSON lines "
            "when piped): one record per image with its files and top classes.",
        ),
    ] = None,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    crop_pct: CropPctOpt = None,
    resize: ResizeOpt = None,
    no_exif: NoExifOpt = False,
    allow_truncated: AllowTruncatedOpt = False,
    null: NullOpt = False,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Explain images: where the class token (and a distilled model's distillation token) looks.

    \b
    The distillation token is mapped only when a teacher trained it (a released distilled
    model, or `deit train --teacher`). A model trained without one still has the token but
    nothing taught it where to look: --tokens cls,dist maps it anyway, marked "not trained
    by a teacher" on its panel and in the record (trained_by_teacher: false).

    \b
    rollout (default; Abnar & Zuidema 2020): per block l, A_l = attention probabilities
      averaged over heads (N×N), Â_l = 0.5·A_l + 0.5·I with rows renormalised to 1;
      R = Â_L···Â_1; the map is R's class-token (distillation-token) row over the patches.
    attention: the last block's attention probabilities from the class (distillation)
      token to the patches, averaged over heads.

    Writes DIR/NAME.METHOD.png for each image: the input as the model saw it, then each
    token's map over it (viridis, with its range), and the top classes. Inputs with the
    same file name get NAME-2, NAME-3... Files already in DIR are not replaced without
    --force. Exit code 0: all explained; 1: some inputs failed (each has an error record);
    66: none could be read; 73: an output exists.
    """
    from .. import distributed
    from ..engine import explain as engine
    from ..errors import UsageError

    if distributed.is_distributed():  # each rank would name its shard's files on its own
        raise UsageError("explain does not run under torchrun", "run it as one process; --device picks the GPU")
    fmt = output.choose_format(format_, per_item=True, allowed=("table", "json", "jsonl"))
    options = image_options(batch_size, workers, crop_pct, resize, no_exif, allow_truncated)
    show = wants_progress(quiet=quiet, stdout_streams=fmt != "table")
    items = read_inputs(inputs, null_separated=null)  # checked now, read lazily
    engine.check_directory(out_dir, create=False)
    names = None
    if "-" not in inputs:  # the inputs are known: refuse before any work (from stdin: at each write)
        items = list(items)
        if not force:
            names = engine.check_outputs([i.path for i in items], out_dir, method.value, raw=raw, per_head=per_head)
    wanted = engine.parse_tokens(tokens) if tokens is not None else None  # the names, before the model loads
    net = load(model)
    chosen = engine.choose_tokens(net, wanted)
    engine.check_directory(out_dir)  # created once the model has loaded
    output.set_batch_size(batch_size)
    if tokens is None and "dist" not in chosen and net.config.distilled and not quiet:
        output.info(
            f"{engine.TOKEN_TITLES['dist']}: {engine.UNTAUGHT}, so its map is left out (--tokens cls,dist draws it)"
        )
    extra = {"model": str(net.source)}
    total = len(items) if isinstance(items, list) else None
    with output.ProgressBar(show, "explaining", total) as bar:
        results = engine.explain(
            net,
            items,
            method=method.value,
            per_head=per_head,
            top=top,
            tokens=chosen,
            device=device,
            dtype=dtype,
            options=options,
        )
        written = engine.write_explanations(results, out_dir, raw=raw, force=force, names=names, model=str(net.source))
        code = _render(bar.wrap(written), fmt, extra, before_table=bar.stop)
    if not quiet:
        output.info(f"wrote the pictures to {out_dir}")
    raise typer.Exit(code)


def _render(results: Iterable, fmt: str, extra: dict, before_table) -> int:
    tally = output.Tally()
    counted = tally.counting(results)
    if fmt in ("json", "jsonl"):
        output.write_records((r.to_record(**extra) for r in counted), fmt)
    else:
        done = list(counted)
        before_table()
        _table(done)
    return tally.exit_code()


def _table(results: list) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("picture", overflow="fold")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for r in results:
        if not r.ok:
            table.add_row(escape(r.path), "", "[red]error[/]", f"[red]{escape(r.error)}[/]")
            continue
        best = r.predictions[0] if r.predictions else None
        table.add_row(
            escape(r.path),
            escape(r.files.get("png", "")),
            escape(best.label) if best else "(no head)",
            f"{best.score * 100:.1f}%" if best else "",
        )
    output.stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
