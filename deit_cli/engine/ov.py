"""OpenVINO as a backend: the graph the onnxruntime backend builds, caches and checks
(engine.ort), compiled by OpenVINO for the CPU in fp32 and checked again on every load.

    runner = prepare(model, backend="openvino")   # engine.runner; CPU, fp32, the openvino extra
    logits = runner(x)                            # float32 (B, classes), like the torch paths

OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it (AVX512-BF16, AMX);
here the graph is compiled with the f32 precision hint, and its outputs are compared with
the reference model's on the fixed check input at batch 1 and 3, within `deit export`'s fp32
tolerance, on every load. A compiled graph that fails the check is an error (CheckpointError,
exit 65), never a silent fallback. One stream, the latency hint, torch's thread count.
Reading and compiling a cached graph takes ~0.3 s for deit-tiny; importing OpenVINO ~0.2 s.
"""

from __future__ import annotations

import threading

from ..model import DeiT
from .export import GraphSpec, check_input, check_session
from .ort import OnnxRuntimeModel

__all__ = ["OpenVINOModel"]


class _Compiled:
    """One compiled graph, with onnxruntime's `run(None, feeds)` call shape (what
    OnnxRuntimeModel._run and check_session call). Thread-safe: one request, one at a time."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.lock = threading.Lock()

    def run(self, _output_names, feeds: dict):
        (x,) = feeds.values()
        with self.lock:
            out = self.request.infer({0: x}, share_inputs=True)
            return [out[0]]  # a copy of the output (share_outputs is off): the next call may reuse it


class OpenVINOModel(OnnxRuntimeModel):
    """OnnxRuntimeModel's graphs, each compiled by OpenVINO when first asked for."""

    def __init__(self, model: DeiT, *, threads: int | None = None, note=None):
        import openvino

        # onnxruntime only checks the cached file before OpenVINO reads it: no spinning threads.
        super().__init__(model, threads=threads, spinning=False, note=note)
        self.openvino = openvino
        self.core = openvino.Core()

    def _load(self, spec: GraphSpec):
        super()._load(spec)  # the graph file, read from the cache or exported, and checked
        hints = self.openvino.properties.hint
        config = {
            hints.inference_precision: self.openvino.Type.f32,  # not the bf16 default on bf16 CPUs
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            self.openvino.properties.num_streams: 1,
            self.openvino.properties.inference_num_threads: self.threads,
        }
        compiled = self.core.compile_model(self.core.read_model(str(self.paths[spec])), "CPU", config)
        session = _Compiled(compiled)
        check_session(
            session,
            self.model,
            check_input(self.model.config),
            spec,
            version=self.openvino.__version__.split("-")[0],
            engine="openvino",
        )
        return session

    @property
    def precision(self) -> str:
        """The inference precision of the compiled graphs (f32), as OpenVINO reports it."""
        compiled = next(iter(self._sessions.values())).compiled
        return str(compiled.get_property(self.openvino.properties.hint.inference_precision))
