"""`deit export SRC DST.onnx`: an ONNX graph with the labels and preprocessing inside,
run with onnxruntime and compared with deit's own model before it is renamed into place."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..config import DEFAULT_OPSET
from . import output
from .features import Pool
from .options import ForceOpt, FormatOpt, HeadOpt, JsonOpt, QuietOpt


def export(
    src: Annotated[str, typer.Argument(help="Checkpoint file, model directory, registry name or hub repo id.")],
    dst: Annotated[Path, typer.Argument(help="The ONNX file to write (DST.onnx).")],
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Stored and computed precision: fp32 or fp16 (inputs and outputs stay float32)."),
    ] = "fp32",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset to write (17 or later).")] = DEFAULT_OPSET,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", min=1, help="Input size of the graph (position embeddings resampled; default: the model's)."
        ),
    ] = None,
    head: HeadOpt = None,
    features: Annotated[bool, typer.Option("--features", help="Output pooled features instead of logits.")] = False,
    pool: Annotated[
        Pool | None,
        typer.Option("--pool", help="With --features: token (default), avg, cls, dist or tokens, as extract-features."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance", help="Largest allowed difference from deit's outputs in the check (default: by dtype)."
        ),
    ] = None,
    force: ForceOpt = False,
    format_: FormatOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    r"""Export to ONNX, then run it with onnxruntime and check it against deit's model.

    The graph takes pixel_values (float32, batch x 3 x S x S, preprocessed)
    and gives logits (or features); the labels and the preprocessing are in
    its metadata. It is renamed into place only if its outputs match deit's
    (exit 65 and nothing written if not). A panel on a terminal; one JSON
    record when piped (or with --json). Needs: pip install 'deit-cli\[onnx]'.
    """
    from ..engine.export import export as run_export

    fmt = output.choose_format(format_, json_, per_item=False, allowed=("table", "json", "jsonl"))
    if not quiet and output.show_progress():
        output.info(f"exporting {src} to {dst} (opset {opset}, {dtype}) and checking it with onnxruntime...")
    result = run_export(
        src,
        dst,
        dtype=dtype,
        opset=opset,
        image_size=image_size,
        head=getattr(head, "value", head),
        features=features,
        pool=getattr(pool, "value", pool),
        force=force,
        tolerance=tolerance,
    )
    if fmt != "table":
        output.write_document(asdict(result), fmt)
        return
    from rich.markup import escape
    from rich.panel import Panel

    what = f"head {result.head}" if result.output == "logits" else f"pool {result.pool}"
    shape = lambda s: escape("[" + " × ".join(str(d) for d in s) + "]")  # noqa: E731
    lines = [
        f"[bold]{escape(result.source)}[/] → [bold]{escape(result.destination)}[/] (opset {result.opset}, {result.dtype}, {what})",
        f"input:  {result.input_name} float32 {shape(result.input_shape)}",
        f"output: {result.output_name} float32 {shape(result.output_shape)}",
        f"parameters: {result.params:,}   size: {result.bytes / 2**20:.1f} MiB",
        f"onnxruntime {result.onnxruntime}, batches {' and '.join(map(str, result.checked_batches))}: "
        f"max difference {result.max_abs_diff:.3g} ≤ tolerance {result.tolerance:.3g}"
        + (f", top-1 agreement {result.top1_agreement:.0%}" if result.output == "logits" else ""),
    ]
    output.stdout_console().print(Panel("\n".join(lines), title="exported", title_align="left"))


def register(app: typer.Typer) -> None:
    app.command("export")(export)
