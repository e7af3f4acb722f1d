"""`deit models`: the registry of released models."""

from __future__ import annotations

import typer

from ..variants import VARIANTS
from . import output
from .options import FormatOpt, JsonOpt, QuietOpt

CSV_FIELDS = ["name", "aliases", "params_m", "gmacs", "image_size", "distilled", "top1", "top5", "hub_repo", "cached"]


def models(format_: FormatOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List the released DeiT models: size, cost, published accuracy, hub repo, cache state.

    A table on a terminal; one JSON record per model when piped.
    """
    from ..checkpoints.hub import is_cached

    fmt = output.choose_format(format_, json_, per_item=True)
    rows = (
        {
            "name": v.name,
            "aliases": list(v.aliases),
            "params_m": v.params_m,
            "gmacs": v.gmacs,
            "image_size": v.image_size,
            "distilled": v.distilled,
            "top1": v.top1,
            "top5": v.top5,
            "hub_repo": v.hub_repo,
            "cached": is_cached(v.hub_repo),
        }
        for v in VARIANTS
    )
    if fmt != "table":
        output.write_records(rows, fmt, fieldnames=CSV_FIELDS)
        return
    from rich.table import Table

    table = Table(title="DeiT models (ImageNet-1k, published numbers)" if not quiet else None, title_justify="left")
    for col, justify in [
        ("name", "left"),
        ("alias", "left"),
        ("params (M)", "right"),
        ("GMACs", "right"),
        ("res", "right"),
        ("top-1", "right"),
        ("top-5", "right"),
        ("hub repo", "left"),
        ("cached", "center"),
    ]:
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            r["name"],
            ", ".join(r["aliases"]),
            f"{r['params_m']:.2f}",
            f"{r['gmacs']:.2f}",
            str(r["image_size"]),
            f"{r['top1']:.1f}",
            f"{r['top5']:.1f}",
            r["hub_repo"],
            "yes" if r["cached"] else "",
        )
    output.stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
