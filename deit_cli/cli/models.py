"""`deit models`: the registry of released models."""

from __future__ import annotations

import typer

from ..variants import VARIANTS
from . import output
from .options import JsonOpt


def models(json_: JsonOpt = False) -> None:
    """List the released DeiT models: size, cost, published accuracy, hub repo, cache state."""
    from ..checkpoints.hub import is_cached

    rows = [
        {
            "name": v.name,
            "aliases": list(v.aliases),
            "params_m": v.params_m,
            "gmacs": v.gmacs,
            "resolution": v.image_size,
            "distilled": v.distilled,
            "top1": v.top1,
            "top5": v.top5,
            "hub_repo": v.hub_repo,
            "cached": is_cached(v.hub_repo),
        }
        for v in VARIANTS
    ]
    if json_:
        output.write_json(rows)
        return
    from rich.table import Table

    table = Table(title="DeiT models (ImageNet-1k, published numbers)", title_justify="left")
    for col, justify in [("name", "left"), ("alias", "left"), ("params (M)", "right"), ("GMACs", "right"),
                         ("res", "right"), ("top-1", "right"), ("top-5", "right"), ("hub repo", "left"),
                         ("cached", "center")]:  # fmt: skip
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["aliases"]), f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}",
                      str(r["resolution"]), f"{r['top1']:.1f}", f"{r['top5']:.1f}", r["hub_repo"],
                      "yes" if r["cached"] else "")  # fmt: skip
    output.stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
