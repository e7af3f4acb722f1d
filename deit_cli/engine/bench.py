"""Benchmarks: throughput, latency and memory of the shared core, side by side with timm,
transformers and ONNX Runtime (engine.peers). No terminal here: `run_bench` yields `BenchRow`s, the CLI renders them.

    for row in run_bench(BenchSpec(model="deit-tiny-distilled", random_init=True, batches=(1, 32))):
        print(row.batch, row.images_per_s)

Timing: warm-up iterations are excluded; on CUDA, iterations are timed with events and
the device synchronised; every implementation runs `reps` repetitions, interleaved round
by round with the others (so load on a shared machine hits all of them alike); the
median repetition is reported with the slowest and fastest, and each peer's ratio is the
median of the per-round ratios.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..checkpoints.loading import load_model, random_model
from ..devices import DTYPE_NAMES, resolve_device, resolve_dtype
from ..errors import InputNotFound, OutOfMemory, UsageError, is_out_of_memory
from ..model import DeiT
from .peers import PEERS, build_peer, peer_fn
from .runner import prepare

# Dense tensor-core peaks in TFLOP/s from the vendors' data sheets (SXM parts where
# there are two), by (device-name fragment, dtype); fp32 is the non-tensor-core rate.
KNOWN_PEAKS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989.0,
    ("H200", "fp16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("H100 PCIe", "bf16"): 756.0,
    ("H100 PCIe", "fp16"): 756.0,
    ("H100 PCIe", "fp32"): 51.0,
    ("H100", "bf16"): 989.0,
    ("H100", "fp16"): 989.0,
    ("H100", "fp32"): 67.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp16"): 312.0,
    ("A100", "fp32"): 19.5,
    ("L4", "bf16"): 121.0,
    ("L4", "fp16"): 121.0,
    ("L4", "fp32"): 30.3,
    ("A10", "bf16"): 125.0,
    ("A10", "fp16"): 125.0,
    ("A10", "fp32"): 31.2,
}


@dataclass(frozen=True)
class BenchSpec:
    """What to measure. `iters=None`: as many iterations per repetition as fit `seconds`."""

    model: str
    random_init: bool = False
    device: str = "auto"
    batches: Sequence[int] = (1,)
    dtypes: Sequence[str] = ("fp32",)
    compile: bool = False
    threads: int | None = None
    warmup: int = 3
    iters: int | None = None
    seconds: float = 1.0
    reps: int = 5
    compare: Sequence[str] = ()
    end_to_end: str | None = None  # a directory of images: the whole classify path
    workers: int | None = None  # decode threads for end_to_end
    peak_tflops: float | None = None
    image_size: int | None = None
    backend: str = "auto"  # deit's: auto, torch, onnxruntime or openvino (engine.runner.prepare)


@dataclass
class BenchRow:
    """One measured configuration. Throughput: median repetition (min..max spread)."""

    model: str
    impl: str  # deit, timm or transformers
    mode: str  # "model" (synthetic batches, already in memory) or "end-to-end"
    device: str
    device_name: str
    dtype: str
    batch: int
    images_per_s: float
    images_per_s_min: float
    images_per_s_max: float
    ms_per_batch: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    peak_memory_mb: float | None
    memory: str  # what peak_memory_mb measures
    params: int
    gmacs_per_image: float
    tflops: float  # achieved, 1 MAC = 2 FLOPs
    peak_tflops: float | None
    pct_of_peak: float | None
    deit_speedup: float | None  # deit's images/s over this row's (median of per-round ratios)
    compile: bool
    threads: int
    path: str  # what ran: deit's accel path, or the peer's precision mode
    torch: str
    warmup: int
    iters: int
    reps: int
    max_abs_diff: float | None = None  # peers: largest logit difference from deit's output
    input_s: float | None = None  # end-to-end: seconds waiting for decoded batches
    model_s: float | None = None  # end-to-end: seconds in the model (incl. transfer)
    images: int | None = None  # end-to-end: images per pass

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            name = m.group(1).strip()
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def known_peak(name: str, dtype: str) -> float | None:
    for (fragment, dt), tflops in KNOWN_PEAKS.items():
        if fragment in name and dt == dtype:
            return tflops
    return None


def _parse_list(values: str | Sequence, cast, what: str) -> list:
    items = values.split(",") if isinstance(values, str) else list(values)
    out = []
    for v in items:
        v = v.strip() if isinstance(v, str) else v
        if v == "":
            continue
        try:
            out.append(cast(v))
        except (TypeError, ValueError):
            raise UsageError(f"bad {what} {v!r}") from None
    if not out:
        raise UsageError(f"no {what} given")
    return out


def parse_batches(text: str) -> list[int]:
    sizes = _parse_list(text, int, "batch size")
    if any(b < 1 for b in sizes):
        raise UsageError("batch sizes must be at least 1")
    return sizes


def parse_compare(text: str | None) -> list[str]:
    if not text:
        return []
    names = _parse_list(text, str, "peer")
    for n in names:
        if n not in PEERS:
            raise UsageError(f"--compare takes {', '.join(PEERS)}; not {n!r}")
    return list(dict.fromkeys(names))


# --- measuring -----------------------------------------------------------------------------


class _Memory:
    """Peak memory of a stretch of work: CUDA's max allocated, or on the CPU the growth
    of the process's resident set over what it held at the start (Linux: free heap
    memory is handed back first, then the high-water mark is reset through clear_refs;
    elsewhere getrusage, which only shows growth past the process's earlier peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max allocated" if device.type == "cuda" else "peak RSS growth"
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            self._base = _rss_reset()

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.device.type == "cpu":
            return max(0.0, (_rss_peak() - self._base) / 2**20)
        return None


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _rss_reset() -> int:
    """Reset the peak-RSS mark where the OS allows; returns the baseline in bytes."""
    _malloc_trim()  # memory another implementation freed would otherwise hide this one's
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        rss = _proc_status("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return _rss_peak()


def _malloc_trim() -> None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_peak() -> int:
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


class _Timer:
    """Per-iteration times of `fn(x)`: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def run(self, fn: Callable, x, iters: int) -> tuple[float, list[float]]:
        """(total seconds, per-iteration milliseconds)."""
        self.sync()
        if self.device.type == "cuda":
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in ev:
                start.record()
                fn(x)
                end.record()
            ev[-1][1].synchronize()
            lat = [s.elapsed_time(e) for s, e in ev]
            return ev[0][0].elapsed_time(ev[-1][1]) / 1e3, lat
        lat = []
        t0 = time.perf_counter()
        for _ in range(iters):
            t = time.perf_counter()
            fn(x)
            self.sync()
            lat.append((time.perf_counter() - t) * 1e3)
        return time.perf_counter() - t0, lat


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class _Impl:
    name: str
    fn: Callable  # x (float32 on device) -> logits
    path: str
    ips: list[float] = field(default_factory=list)  # images/s per repetition
    lat: list[float] = field(default_factory=list)  # ms per iteration, all repetitions
    mem: float | None = None
    iters: int = 1
    diff: float | None = None


# --- the benchmark ---------------------------------------------------------------------------


def _load(spec: BenchSpec) -> DeiT:
    if spec.random_init:
        return random_model(spec.model, image_size=spec.image_size)
    return load_model(spec.model, image_size=spec.image_size)


def run_bench(spec: BenchSpec, *, note: Callable[[str], None] | None = None) -> Iterator[BenchRow]:
    """Measure `spec`; yields one row per (dtype, batch, implementation) as each is done.
    `note` receives messages for a person (a peer that is missing, a skipped row)."""
    note = note or (lambda _msg: None)
    device = resolve_device(spec.device)
    if device.type == "cpu":
        # Before anything is measured, so that every implementation runs with it.
        from .runner import tune_cpu_allocator

        tune_cpu_allocator()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    dtypes = [resolve_dtype(d) for d in spec.dtypes]
    if spec.warmup < 0 or spec.reps < 1 or (spec.iters is not None and spec.iters < 1) or spec.seconds <= 0:
        raise UsageError("--warmup must be ≥ 0, --reps and --iters ≥ 1, --seconds > 0")
    model = _load(spec)
    name = model.variant.name if model.variant and spec.random_init else (model.source or spec.model)

    peers: dict[str, torch.nn.Module] = {}
    for p in spec.compare:
        try:
            peers[p] = build_peer(p, model)
        except ImportError:
            hint = "pip install 'deit-cli[onnx]'" if p == "onnxruntime" else f"pip install {p}"
            note(f"{p} is not installed; skipping it in --compare ({hint})")
        except UsageError as e:
            note(f"{p}: {e.message}; skipping it in --compare")
    if "onnxruntime" in peers:
        peers["onnxruntime"].note = note  # "exporting the graph ... (once)"
    if spec.end_to_end and peers:
        note("--compare measures the model on in-memory batches; the end-to-end rows are deit's only")

    common = dict(
        model=name,
        device=str(device),
        device_name=device_name(device),
        params=sum(p.numel() for p in model.parameters()),
        gmacs_per_image=model.config.macs_per_image() / 1e9,
        compile=spec.compile,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        warmup=spec.warmup,
        reps=spec.reps,
    )
    for dtype in dtypes:
        runner = prepare(model, device=device, dtype=dtype, compile=spec.compile, backend=spec.backend)
        peer_fns = {}
        for p, net in peers.items():
            try:
                peer_fns[p] = peer_fn(p, net, device, dtype, spec.compile)
            except UsageError as e:
                note(f"{p}: {e.message}; skipping it for {DTYPE_NAMES[dtype]} on {device.type}")
        for batch in spec.batches:
            try:
                if spec.end_to_end:
                    row = _end_to_end(spec, runner, batch, dtype, common)
                else:
                    impls = [_Impl("deit", runner.logits, runner.path)]
                    impls += [_Impl(p, fn, path) for p, (fn, path) in peer_fns.items()]
                    rows = list(_measure(spec, impls, batch, dtype, device, common, runner))
            except Exception as e:
                if is_out_of_memory(e):
                    raise OutOfMemory(
                        f"out of memory at batch size {batch} ({DTYPE_NAMES[dtype]}, {device})", batch_size=batch
                    ) from e
                raise
            if spec.end_to_end:
                yield row
            else:
                yield from rows


def _measure(spec, impls, batch, dtype, device, common, runner) -> Iterator[BenchRow]:
    cfg = runner.config
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g).to(device)
    timer, memory = _Timer(device), _Memory(device)
    ours = None
    for impl in impls:  # warm-up (compiles, autotunes, packs), excluded from timing
        memory.start()
        t = time.perf_counter()
        out = impl.fn(x)
        timer.sync()
        first = time.perf_counter() - t
        for _ in range(max(spec.warmup - 1, 0)):
            out = impl.fn(x)
        timer.sync()
        elapsed = time.perf_counter() - t
        impl.mem = memory.peak_mb()
        one = (elapsed - first) / max(spec.warmup - 1, 1) if spec.warmup > 1 else first
        impl.iters = spec.iters or max(1, math.ceil(spec.seconds / max(one, 1e-6)))
        if ours is None:
            ours = out.float()
        else:
            impl.diff = (out.float() - ours).abs().max().item()
    # Timed repetitions, interleaved, starting with a different one each round. Memory
    # was measured in the warm-up: it is the same work, and measuring here would time it.
    for r in range(spec.reps):
        for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
            total, lat = timer.run(impl.fn, x, impl.iters)
            impl.ips.append(batch * impl.iters / total)
            impl.lat.extend(lat)
    for impl in impls:
        ratio = None
        if len(impls) > 1:
            ratio = statistics.median(a / b for a, b in zip(impls[0].ips, impl.ips))
        yield _row(spec, impl, batch, dtype, common, memory.kind, ratio)


def _row(spec, impl: _Impl, batch, dtype, common, memory_kind, ratio, **extra) -> BenchRow:
    ips = statistics.median(impl.ips)
    dt = DTYPE_NAMES[dtype]
    peak = spec.peak_tflops or known_peak(common["device_name"], dt)
    tflops = 2 * common["gmacs_per_image"] * 1e9 * ips / 1e12
    return BenchRow(
        **common,
        impl=impl.name,
        mode="end-to-end" if spec.end_to_end else "model",
        dtype=dt,
        batch=batch,
        images_per_s=ips,
        images_per_s_min=min(impl.ips),
        images_per_s_max=max(impl.ips),
        ms_per_batch=1e3 * batch / ips,
        latency_ms_p50=percentile(impl.lat, 50),
        latency_ms_p90=percentile(impl.lat, 90),
        latency_ms_p99=percentile(impl.lat, 99),
        peak_memory_mb=impl.mem,
        memory=memory_kind,
        tflops=tflops,
        peak_tflops=peak,
        pct_of_peak=100 * tflops / peak if peak else None,
        deit_speedup=ratio,
        path=impl.path,
        iters=impl.iters,
        max_abs_diff=impl.diff,
        **extra,
    )


def _end_to_end(spec: BenchSpec, runner, batch: int, dtype, common) -> BenchRow:
    """The classify path on real files: decode, preprocess, transfer, model. The time is
    split into waiting for input (decoding threads could not keep up) and the model."""
    try:
        from ..images.batches import iter_batches
        from ..images.inputs import iter_inputs
        from ..images.transform import eval_transform
    except ImportError as e:  # pragma: no cover - the images layer ships with the package
        raise UsageError(f"--end-to-end needs deit_cli.images ({e})") from None
    if not os.path.isdir(spec.end_to_end):
        raise InputNotFound(f"{spec.end_to_end}: no such directory")
    items = list(iter_inputs([spec.end_to_end]))
    items = [i for i in items if i.error is None]
    if not items:
        raise InputNotFound(f"{spec.end_to_end}: no images found")
    transform = eval_transform(runner.model.preprocessing)
    device = runner.device
    timer, memory = _Timer(device), _Memory(device)
    cfg = runner.config
    warm = torch.zeros(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    memory.start()  # before the warm-up, so that trimming the heap costs no timed pass
    for _ in range(max(spec.warmup, 1)):
        runner.logits(warm)
    timer.sync()
    impl = _Impl("deit", runner.logits, runner.path + "+decode")
    input_s = model_s = 0.0
    images = 0
    for _ in range(spec.reps):  # one repetition: one pass over the directory
        n = 0
        t_in = t_model = 0.0
        t0 = time.perf_counter()
        batches = iter_batches(items, transform, batch, workers=spec.workers)
        try:
            while True:
                t = time.perf_counter()
                try:
                    b = next(batches)
                except StopIteration:
                    break
                t_in += time.perf_counter() - t
                if b.tensor.shape[0] == 0:
                    continue
                t = time.perf_counter()
                runner.logits(b.tensor).cpu()  # results come back, as classify's do
                t_model += time.perf_counter() - t
                impl.lat.append((time.perf_counter() - t) * 1e3)
                n += len(b.items)
        finally:
            close = getattr(batches, "close", None)
            if close:
                close()
        total = time.perf_counter() - t0
        impl.ips.append(n / total if total > 0 else 0.0)
        input_s, model_s, images = t_in, t_model, n
    impl.mem = memory.peak_mb()
    impl.iters = math.ceil(images / batch)
    return _row(spec, impl, batch, dtype, common, memory.kind, None, input_s=input_s, model_s=model_s, images=images)
