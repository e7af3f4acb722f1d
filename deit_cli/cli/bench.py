"""`deit bench`: throughput, latency and memory, optionally side by side with timm,
transformers and onnxruntime (same weights, batch, dtype and device, interleaved round by round)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from . import output
from .options import (
    DEFAULT_MODEL_NAME,
    Backend,
    BackendOpt,
    BatchListOpt,
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
)

CSV_FIELDS = [
    "model",
    "impl",
    "mode",
    "device",
    "device_name",
    "dtype",
    "batch",
    "images_per_s",
    "images_per_s_min",
    "images_per_s_max",
    "ms_per_batch",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "peak_memory_mb",
    "memory",
    "params",
    "gmacs_per_image",
    "tflops",
    "peak_tflops",
    "pct_of_peak",
    "deit_speedup",
    "compile",
    "threads",
    "path",
    "torch",
    "warmup",
    "iters",
    "reps",
    "max_abs_diff",
    "input_s",
    "model_s",
    "images",
]


RandomInitOpt = Annotated[
    bool,
    typer.Option(
        "--random-init",
        help="The registry variant's architecture with random weights (offline; speed does not depend on the values).",
    ),
]
BenchDtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16 (or a comma list).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile deit (and the peers, alike).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (torch.set_num_threads).")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Untimed iterations first (at least one runs).")]
ItersOpt = Annotated[
    int | None, typer.Option("--iters", min=1, help="Iterations per repetition (default: as many as fit --seconds).")
]
SecondsOpt = Annotated[
    float, typer.Option("--seconds", min=0.001, help="Target seconds per repetition when --iters is not given.")
]
RepsOpt = Annotated[int, typer.Option("--reps", min=1, help="Repetitions; the median is reported, with the spread.")]
CompareOpt = Annotated[
    str | None,
    typer.Option(
        "--compare",
        help="Also run peers on the same weights, interleaved: timm, transformers, onnxruntime (a comma list).",
    ),
]
EndToEndOpt = Annotated[
    Path | None,
    typer.Option(
        "--end-to-end",
        file_okay=False,
        help="A directory of images: time the whole classify path (decode, preprocess, model).",
    ),
]
WorkersOpt = Annotated[int | None, typer.Option("--workers", "-j", min=0, help="Decoding threads for --end-to-end.")]
PeakOpt = Annotated[
    float | None,
    typer.Option("--peak-tflops", min=0.0, help="The device's peak TFLOP/s in this dtype (known for some GPUs)."),
]
ImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", min=16, help="Input resolution (position embeddings resampled).")
]
CsvOpt = Annotated[bool, typer.Option("--csv", help="The same as --format csv.")]


def bench(
    model: ModelOpt = DEFAULT_MODEL_NAME,
    random_init: RandomInitOpt = False,
    device: DeviceOpt = "auto",
    batch: BatchListOpt = "1,32",
    dtype: BenchDtypeOpt = "fp32",
    compile_: CompileOpt = False,
    backend: BackendOpt = Backend.auto,
    threads: ThreadsOpt = None,
    warmup: WarmupOpt = 3,
    iters: ItersOpt = None,
    seconds: SecondsOpt = 1.0,
    reps: RepsOpt = 5,
    compare: CompareOpt = None,
    end_to_end: EndToEndOpt = None,
    workers: WorkersOpt = None,
    peak_tflops: PeakOpt = None,
    image_size: ImageSizeOpt = None,
    format_: FormatOpt = None,
    csv: CsvOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Benchmark the model: images/s, latency percentiles, peak memory, TFLOP/s.

    Warm-up is excluded, CUDA is timed with events, every row is the median of --reps
    repetitions (with min..max). With --compare, timm, transformers and onnxruntime (the graph
    `deit export` writes, cached) run the same weights interleaved with deit, and each row
    shows deit's speed-up over it. --backend onnxruntime or openvino runs deit itself on that
    graph. A table on a terminal; when piped, one JSON record per row as each is measured.
    """
    from ..engine.bench import BenchSpec, parse_batches, parse_compare, run_bench

    if csv:
        if format_ is not None and format_.value != "csv":
            raise UsageError(f"--csv and --format {format_.value} disagree; give one of them")
        format_ = "csv"
    fmt = output.choose_format(format_, json_, per_item=True)

    spec = BenchSpec(
        model=model,
        random_init=random_init,
        device=device,
        batches=parse_batches(batch),
        dtypes=[d.strip() for d in dtype.split(",") if d.strip()],
        compile=compile_,
        threads=threads,
        warmup=warmup,
        iters=iters,
        seconds=seconds,
        reps=reps,
        compare=parse_compare(compare),
        end_to_end=str(end_to_end) if end_to_end else None,
        workers=workers,
        peak_tflops=peak_tflops,
        image_size=image_size,
        backend=backend.value,
    )
    note = (lambda _m: None) if quiet else output.warn
    progress = not quiet and output.show_progress()
    rows = []

    def measured():
        for row in run_bench(spec, note=note):
            rows.append(row)
            if progress:
                output.info(f"{row.impl} {row.dtype} batch {row.batch}: {row.images_per_s:.1f} images/s")
            yield row.to_dict()

    if fmt != "table":
        output.write_records(measured(), fmt, fieldnames=CSV_FIELDS)  # each row as it is measured
        return
    for _ in measured():
        pass
    _table(rows, quiet=quiet)


def _fmt(v, spec: str = ".1f", none: str = "") -> str:
    return none if v is None else format(v, spec)


def _table(rows, *, quiet: bool) -> None:
    from rich.table import Table

    if not rows:
        return
    first = rows[0]
    e2e = first.mode == "end-to-end"
    title = (
        f"{first.model} on {first.device_name} · torch {first.torch} · {first.params / 1e6:.2f} M params · "
        f"{first.gmacs_per_image:.2f} GMACs/image"
    )
    table = Table(title=title, title_justify="left")
    cols = [
        "impl",
        "dtype",
        "batch",
        "images/s",
        "min..max",
        "ms/batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "peak MiB",
        "TFLOP/s",
        "% peak",
    ]
    cols += ["input s", "model s"] if e2e else ["deit ×", "path"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("impl", "dtype", "path") else "right")
    for r in rows:
        cells = [
            r.impl,
            r.dtype,
            str(r.batch),
            _fmt(r.images_per_s),
            f"{r.images_per_s_min:.1f}..{r.images_per_s_max:.1f}",
            _fmt(r.ms_per_batch, ".2f"),
            _fmt(r.latency_ms_p50, ".2f"),
            _fmt(r.latency_ms_p90, ".2f"),
            _fmt(r.latency_ms_p99, ".2f"),
            _fmt(r.peak_memory_mb, ".0f", "n/a"),
            _fmt(r.tflops, ".3f"),
            _fmt(r.pct_of_peak, ".1f"),
        ]
        if e2e:
            cells += [_fmt(r.input_s, ".2f"), _fmt(r.model_s, ".2f")]
        else:
            cells += ["" if r.deit_speedup is None else f"{r.deit_speedup:.2f}", r.path]
        table.add_row(*cells)
    output.stdout_console().print(table)
    if not quiet:
        output.info(f"memory: {first.memory}; deit × = deit's images/s over the row's, median of per-round ratios")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
