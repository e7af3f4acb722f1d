"""Option types shared by several commands, defined once, so that one name has one
meaning (and one spelling) on every command. No torch here."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ..variants import DEFAULT_MODEL, all_names


def _complete_model(incomplete: str) -> list[str]:
    return [n for n in all_names() if n.startswith(incomplete)]


def _enum(name: str, values) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Registry name or alias (see `deit models`), hub repo id\\[@revision], model directory or "
        "checkpoint file.",
        autocompletion=_complete_model,
    ),
]
DEFAULT_MODEL_NAME = DEFAULT_MODEL
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute precision: fp32, bf16 or fp16.")]
Backend = _enum("Backend", ("auto", "torch", "onnxruntime", "openvino"))
BackendOpt = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="auto (torch), torch, onnxruntime: the graph `deit export` writes, built once and cached, "
        "checked on load (CPU, fp32; pip install 'deit-cli\\[onnx]'), or openvino: that graph compiled by "
        "OpenVINO in fp32, checked on load (pip install 'deit-cli\\[openvino]').",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, notes or hints on stderr (errors still).")]

# Output: one convention for every command (output.choose_format).
Format = _enum("Format", ("table", "json", "jsonl", "csv", "tsv"))
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format", "-F", help="table, json, jsonl, csv or tsv (default: a table on a terminal, records when piped)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="The same as --format json.")]

# Batching: --batch-size and --batch are one option everywhere.
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "--batch", "-b", min=1, help="Images per model call.")]
BatchListOpt = Annotated[
    str, typer.Option("--batch-size", "--batch", "-b", help="Batch size, or a comma list for a sweep: 1,8,32.")
]
TopOpt = Annotated[int, typer.Option("--top", "-k", min=1, help="How many classes to report per image.")]

Head = _enum("Head", ("avg", "cls", "dist"))
HeadOpt = Annotated[
    Head | None,
    typer.Option("--head", help="Distilled models: avg (the mean of both classifiers; default), cls or dist."),
]

# Images: what classify, extract-features and eval share.
InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Image files, directories (recursive), glob patterns, http(s) URLs, or - to read paths from stdin.",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-j", min=0, help="Decoding threads (default: min(8, CPUs); 0: none).")
]
CropPctOpt = Annotated[
    float | None, typer.Option("--crop-pct", help="Center-crop ratio (default: the model's, 0.875).")
]


class Resize(str, Enum):
    shorter = "shorter"
    squash = "squash"


ResizeOpt = Annotated[
    Resize | None,
    typer.Option(
        "--resize",
        help="shorter: shorter side to size/crop-pct, aspect kept (the original DeiT eval); "
        "squash: both sides, as transformers' DeiTImageProcessor.",
    ),
]
NoExifOpt = Annotated[bool, typer.Option("--no-exif", help="Ignore EXIF orientation.")]
AllowTruncatedOpt = Annotated[bool, typer.Option("--allow-truncated", help="Decode what is there of truncated files.")]
NullOpt = Annotated[bool, typer.Option("-0", "--null", help="Paths on stdin are NUL-separated (find -print0).")]
