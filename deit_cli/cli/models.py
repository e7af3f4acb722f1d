"""`deit models`: the registry of released models."""

from __future__ import annotations

import typer

from ..variants import DEIT3_CROP_SOURCE, VARIANTS
from . import output
from .options import FormatOpt, JsonOpt, QuietOpt

CSV_FIELDS = [
    "name",
    "aliases",
    "family",
    "pretrain",
    "params_m",
    "gmacs",
    "image_size",
    "crop_pct",
    "distilled",
    "top1",
    "top5",
    "hub_repo",
    "cached",
]


def models(format_: FormatOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List the released DeiT and DeiT III models: size, cost, published accuracy, evaluation crop,
    hub repo, cache state.

    A table on a terminal; one JSON record per model when piped. DeiT III is evaluated at crop 1.0,
    as its release's README_revenge.md commands do (--eval-crop-ratio 1.0); timm's config says 0.9
    for its ImageNet-1k weights at 224.
    """
    from ..checkpoints.hub import is_cached

    fmt = output.choose_format(format_, json_, per_item=True)
    rows = (
        {
            "name": v.name,
            "aliases": list(v.aliases),
            "family": v.family,
            "pretrain": v.pretrain,
            "params_m": v.params_m,
            "gmacs": v.gmacs,
            "image_size": v.image_size,
            "crop_pct": v.preprocessing.crop_pct,
            "distilled": v.distilled,
            "top1": v.top1,
            "top5": v.top5,  # None: not published
            "hub_repo": v.hub_repo,
            "cached": is_cached(v.hub_repo),
        }
        for v in VARIANTS
    )
    if fmt != "table":
        output.write_records(rows, fmt, fieldnames=CSV_FIELDS)
        return
    from rich.table import Table

    title = "DeiT and DeiT III models (ImageNet-1k, published numbers)" if not quiet else None
    caption = f"DeiT III {DEIT3_CROP_SOURCE}" if not quiet else None
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for col, justify in [
        ("name", "left"),
        ("alias", "left"),
        ("pretrain", "left"),
        ("params (M)", "right"),
        ("GMACs", "right"),
        ("res", "right"),
        ("crop", "right"),
        ("top-1", "right"),
        ("top-5", "right"),
        ("hub repo", "left"),
        ("cached", "center"),
    ]:
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            r["name"],
            ", ".join(a for a in r["aliases"] if "_" not in a),  # the short ones; JSON has all
            r["pretrain"],
            f"{r['params_m']:.2f}",
            f"{r['gmacs']:.2f}",
            str(r["image_size"]),
            f"{r['crop_pct']:.3f}",
            f"{r['top1']:.1f}",
            f"{r['top5']:.1f}" if r["top5"] is not None else "-",
            r["hub_repo"],
            "yes" if r["cached"] else "",
        )
    output.stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
