"""`deit convert SRC DST`: any checkpoint deit reads, to deit/timm/transformers files."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from . import output
from .options import ForceOpt, FormatOpt, JsonOpt, QuietOpt


def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint file, model directory, registry name or hub repo id.")],
    dst: Annotated[Path, typer.Argument(help="Output file (--to deit/timm) or directory (--to hf).")],
    to: Annotated[
        str,
        typer.Option("--to", help="deit (safetensors with config and labels), timm, or hf (a transformers directory)."),
    ] = "deit",
    dtype: Annotated[str, typer.Option("--dtype", help="Stored precision: fp32, fp16 or bf16.")] = "fp32",
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance", help="Largest allowed logit difference in the read-back check (default: by dtype)."
        ),
    ] = None,
    force: ForceOpt = False,
    format_: FormatOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a checkpoint, then read it back and check its logits against the source.

    A panel on a terminal; the result as one JSON record when piped (or with --json).
    """
    from ..checkpoints.writing import convert as run_convert

    fmt = output.choose_format(format_, json_, per_item=False, allowed=("table", "json", "jsonl"))
    result = run_convert(src, dst, to=to, dtype=dtype, force=force, tolerance=tolerance)
    if fmt != "table":
        output.write_document(asdict(result), fmt)
        return
    from rich.markup import escape
    from rich.panel import Panel

    src_, dst_ = escape(str(result.source)), escape(str(result.destination))
    lines = [
        f"[bold]{src_}[/] ({result.layout_in}) → [bold]{dst_}[/] ({result.to}, {result.dtype})",
        f"parameters: {result.params:,}   size: {result.bytes / 2**20:.1f} MiB",
        f"read back: max logit difference {result.max_abs_diff:.3g} ≤ tolerance {result.tolerance:.3g}",
    ]
    if result.to == "timm" and result.timm_name:
        lines.append(f"timm: timm.create_model('{result.timm_name}', checkpoint_path='{dst_}')")
    if result.hf_architecture:
        lines.append(f"transformers: {result.hf_architecture}.from_pretrained('{dst_}')")
    output.stdout_console().print(Panel("\n".join(lines), title="converted", title_align="left"))


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
