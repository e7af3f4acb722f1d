"""Option types shared by several commands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

from ..variants import DEFAULT_MODEL, all_names


def _complete_model(incomplete: str) -> list[str]:
    return [n for n in all_names() if n.startswith(incomplete)]


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Registry name or alias (see `deit models`), hub repo id[@revision], model directory or checkpoint file.",
        autocompletion=_complete_model,
    ),
]  # fmt: skip
DEFAULT_MODEL_NAME = DEFAULT_MODEL
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute precision: fp32, bf16 or fp16.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
