"""ONNX Runtime as a backend: the graph `deit export` writes, cached on disk, checked on load.

    runner = prepare(model, backend="onnxruntime")   # engine.runner; CPU, fp32
    logits = runner(x)                               # float32 (B, classes), like the torch paths

The graph is built and checked exactly as `deit export` builds and checks it (export_model:
dynamic batch axis, onnx's checker, onnxruntime against our fp32 model), once per weights,
and kept in the cache (`cache_dir()`), named by a hash of everything it depends on: the
weights and config, the input shape (the batch axis is dynamic, so one file serves every
batch size), dtype, what it computes (head or pooled features), the opset and the torch,
onnx, onnxruntime and deit versions. The same key is stored in the file's metadata and
compared on load: a file whose key differs, that onnxruntime cannot load, or whose outputs
differ from the reference model's on the fixed check input (as `deit export` checks them,
on every load) is rebuilt, never trusted.

Only the onnx extra's users pay for any of it: nothing here is imported by `--help`, and the
torch backend never imports onnx or onnxruntime.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import torch

from .. import __version__
from ..config import DEFAULT_OPSET
from ..errors import CheckpointError, UsageError
from ..model import DeiT
from .export import EXTRA, INPUT_NAME, GraphSpec, check_input, check_session, export_model

__all__ = [
    "BACKENDS",
    "KEY_META",
    "OnnxRuntimeModel",
    "cache_dir",
    "check_backend",
    "graph_key",
    "prepare_graph",
    "stats",
]

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# What each graph backend needs installed, and the extra that installs it.
NEEDS = {
    "onnxruntime": ("onnx", "onnxscript", "onnxruntime"),
    "openvino": ("onnx", "onnxscript", "onnxruntime", "openvino"),
}
EXTRAS = {"onnxruntime": EXTRA, "openvino": "pip install 'deit-cli[openvino]'"}
KEY_META = "deit.cache_key"  # metadata_props key holding the cache key the file was built for
# How many graphs were exported and sessions loaded in this process (tests read it: a cached
# graph is loaded, not exported again).
stats = {"exported": 0, "loaded": 0, "rebuilt": 0}


def check_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """ "torch", "onnxruntime" or "openvino": what `backend` runs on this device and dtype.

    auto is torch (measured: at batch 32 torch's oneDNN path leads onnxruntime; at batch 1
    they are within noise of each other on a 2-core CPU, and a first one-image classify
    would pay for the export). onnxruntime and openvino run the exported graph in fp32 on
    the CPU and need their extra (openvino's includes onnx's: the graph is built and checked
    the same way), else one UsageError line (exit 2) saying what to install."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend not in NEEDS:
        return "torch"
    if device.type != "cpu" or dtype != torch.float32:
        raise UsageError(
            f"--backend {backend} runs fp32 on the CPU, not {dtype_name(dtype)} on {device.type}",
            "use --device cpu --dtype fp32, or --backend torch",
        )
    missing = [m for m in NEEDS[backend] if not _importable(m)]
    if missing:
        raise UsageError(f"--backend {backend} needs {', '.join(missing)}, not installed here", EXTRAS[backend])
    return backend


def dtype_name(dtype: torch.dtype) -> str:
    from ..devices import DTYPE_NAMES

    return DTYPE_NAMES.get(dtype, str(dtype))


def _importable(name: str) -> bool:
    """Whether `import name` would find it, without importing it (onnxscript is slow to
    import, and a cached graph never needs it)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name] is not None  # None: imports of it fail
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cache_dir() -> Path:
    """Where graphs are kept: $DEIT_CACHE, else $XDG_CACHE_HOME/deit, else ~/.cache/deit
    (beside huggingface's cache); graphs under its onnx/ folder."""
    root = os.environ.get("DEIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "deit")
    return Path(root).expanduser() / "onnx"


def weights_digest(model: DeiT) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes) and the config."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def graph_key(model: DeiT, spec: GraphSpec, *, opset: int = DEFAULT_OPSET, digest: str | None = None) -> str:
    """The cache key: a hash of everything the graph depends on."""
    from importlib.metadata import version

    import onnxruntime

    cfg = model.config
    parts = {
        "weights": digest or weights_digest(model),
        "input": ["batch", cfg.in_chans, cfg.image_size, cfg.image_size],
        "spec": [spec.output, spec.head, spec.pool, spec.dtype],
        "opset": opset,
        "versions": [torch.__version__, version("onnx"), onnxruntime.__version__, __version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class OnnxRuntimeModel:
    """A model's graphs in onnxruntime, one session per output (a head's logits, or the
    tokens), each built or read from the cache when first asked for. Thread-safe.

    `spinning=False` stops onnxruntime's threads busy-waiting between runs: on a shared
    2-core CPU (load 2.6) batch 1 took 30.9 ms without and 59.4 ms with (its default, which
    `bench --compare` keeps: the peer runs as its users run it), and a server's decoding
    threads get the cores back. The backend runs without."""

    def __init__(self, model: DeiT, *, threads: int | None = None, spinning: bool = True, note=None):
        import onnxruntime

        self.model, self.ort = model, onnxruntime
        self.threads = threads or torch.get_num_threads()  # as torch's, so that the two compare
        self.spinning = spinning
        self.note = note or (lambda _m: None)
        self._digest: str | None = None
        self._sessions: dict[GraphSpec, object] = {}
        self.paths: dict[GraphSpec, Path] = {}  # the checked graph file of each spec loaded
        self._lock = threading.Lock()

    FEATURES = GraphSpec("features", None, "tokens", "fp32")

    def logits_spec(self, head: str = "avg") -> GraphSpec:
        """The graph that computes `head`'s logits."""
        if self.model.head_dist is None and head == "avg":
            head = "cls"  # the class head serves every head there (DeiT.forward_head): one graph
        return GraphSpec("logits", head, None, "fp32")

    def logits(self, x: torch.Tensor, head: str = "avg") -> torch.Tensor:
        return self._run(self.logits_spec(head), x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.FEATURES, x)

    def _run(self, spec: GraphSpec, x: torch.Tensor) -> torch.Tensor:
        session = self._sessions.get(spec) or self.session(spec)
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

    def session(self, spec: GraphSpec):
        """The checked session for `spec`: from the cache when a good file is there, else
        exported (once) into it."""
        with self._lock:
            if spec not in self._sessions:
                self._sessions[spec] = self._load(spec)
            return self._sessions[spec]

    def _load(self, spec: GraphSpec):
        if self._digest is None:
            self._digest = weights_digest(self.model)
        key = graph_key(self.model, spec, digest=self._digest)
        path = self.paths[spec] = cache_dir() / f"{key}.onnx"
        if path.exists():
            session = self._open(path, key, spec)
            if session is not None:
                stats["loaded"] += 1
                return session
            stats["rebuilt"] += 1
            self.note(f"{path}: not the graph for these weights, or it fails the check; rebuilding it")
        else:
            self.note(f"exporting the graph for onnxruntime (once; cached in {path.parent})")
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(
            self.model,
            path,
            dtype=spec.dtype,
            head=spec.head,
            features=spec.output == "features",
            pool=spec.pool,
            force=True,
            metadata={KEY_META: key},
        )
        stats["exported"] += 1
        session = self._open(path, key, spec)
        if session is None:  # export_model checked it; failing now is not the file's fault
            raise CheckpointError(f"{path}: the graph onnxruntime just checked fails the check on load")
        return session

    def _open(self, path: Path, key: str, spec: GraphSpec):
        """A session of `path`, or None when the file is not the one for `key` or fails
        the check against the reference model."""
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        opts.intra_op_num_threads = self.threads
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = self.ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a corrupt file: onnxruntime's errors have no common base
            return None
        if session.get_modelmeta().custom_metadata_map.get(KEY_META) != key:
            return None
        try:
            check_session(session, self.model, check_input(self.model.config), spec, version=self.ort.__version__)
        except CheckpointError:
            return None
        return session


def prepare_graph(model: DeiT, device: torch.device, dtype: torch.dtype, backend: str = "onnxruntime", *, note=None):
    """A Runner (engine.runner) over onnxruntime or openvino (engine.ov): the logits graph of
    the default head is built or read now (and checked), the others when first asked for."""
    from .classify import default_head
    from .runner import Runner

    model = cpu_fp32(model)
    if backend == "openvino":
        from .ov import OpenVINOModel

        ort_model = OpenVINOModel(model, note=note)
    else:
        ort_model = OnnxRuntimeModel(model, spinning=False, note=note)
    if model.config.num_classes > 0 and model.head is not None:
        ort_model.session(ort_model.logits_spec(default_head(model.config)))
    else:
        ort_model.session(ort_model.FEATURES)
    return Runner(model, device, dtype, backend, ort_model.logits, ort_model.features)


def cpu_fp32(model: DeiT) -> DeiT:
    """The model itself when it is fp32 on the CPU, else such a copy: graphs are built from it."""
    if model.device.type == "cpu" and model.dtype == torch.float32:
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)
