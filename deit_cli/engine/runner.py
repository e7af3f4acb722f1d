"""The fast paths that classify, extract-features, eval and bench share.

    runner = prepare(model, device="cpu", dtype="bf16")
    logits = runner(x)              # float32 images (B, 3, H, W) -> float32 logits
    tokens = runner.features(x)     # -> float32 tokens (B, prefix + patches, D)

What makes it fast, by device (each path is checked against the plain fp32 model in
tests/test_accel.py):

- Everywhere: weights are cast once (no autocast re-casting every matmul), and the
  logits path runs the last block on the class/distillation tokens only: the head
  reads nothing else, so the other 196 rows of that block's queries, projection and
  MLP are never computed (exact, about 7% of the work). DeiT III's LayerScale is folded
  into the projection and fc2 weights it scales (gamma * (a W^T + b) = a (gamma W)^T + gamma b),
  so it costs nothing at run time.
- CPU with oneDNN: weights packed once into oneDNN's blocked layout; the bias, the
  GELU and the residual add are fused into the matmuls (one pass over the activations
  instead of three). bf16 runs on AMX/AVX512-BF16. glibc is told to keep freed
  activation memory (`tune_cpu_allocator`), so batches stop page-faulting it back in.
- CUDA: bf16/fp16 weights, SDPA's flash kernels, the patch embedding as a matmul (no
  TF32 convolution in fp32), and the whole forward replayed as one CUDA graph per input
  shape (a small model is otherwise bound by kernel launches).
- compile=True: torch.compile (inductor; on CPU with weight freezing, on CUDA with its
  CUDA graphs). On CUDA the fastest path; on a 2-core CPU the oneDNN path beats it.
- backend="onnxruntime": the graph `deit export` writes, cached on disk and checked on
  every load (engine.ort; CPU, fp32). backend="openvino": that graph compiled by OpenVINO
  in fp32 (engine.ov), checked on every load too.

`prepare` never changes the model it is given.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import resolve_device, resolve_dtype
from ..model import DeiT

# Graphs are kept for this many input shapes (a dataset's last, smaller batch is one).
_MAX_CUDA_GRAPHS = 4


class Runner:
    """A model made ready for one device and dtype. Takes float32 image batches (on any
    device; they are moved and cast), returns float32 tensors on the runner's device."""

    def __init__(
        self,
        model: DeiT,
        device: torch.device,
        dtype: torch.dtype,
        path: str,
        logits_fn: Callable,
        features_fn: Callable,
        *,
        shape_specialised: bool = False,
    ):
        self.model = model  # the model prepare() was given (config, labels, preprocessing)
        self.device = device
        self.dtype = dtype
        self.path = path  # what runs, in words: "cpu-onednn", "cuda-graphs", "inductor", ...
        # Whether the path specialises on the input shape (a CUDA graph or a compiled graph
        # per batch size): a new shape then costs a capture or a compile, so callers whose
        # batch sizes vary (the server) pad batches up to a few sizes they warm up.
        self.shape_specialised = shape_specialised
        self._logits = logits_fn
        self._features = features_fn

    @property
    def config(self):
        return self.model.config

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        # Move first, then cast: the cast runs on the (faster) device, and a pinned
        # batch moves without blocking.
        return x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, like `DeiT.forward_features`."""
        return self._features(self._input(x)).float()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, head: str = "avg") -> torch.Tensor:
        """Logits (or pooled features for a headless model), like `DeiT.forward_head`."""
        return self._logits(self._input(x), head).float()

    __call__ = logits

    def __repr__(self) -> str:
        return f"Runner({self.model.source or 'DeiT'}, device={self.device}, dtype={self.dtype}, path={self.path})"


def prepare(
    model: DeiT,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    backend: str | None = None,
) -> Runner:
    """The fastest faithful way to run `model` on `device` in `dtype`.

    `device` and `dtype` default to the model's own. fp32 paths match the plain fp32
    model to float rounding; bf16/fp16 paths keep weights in that precision (no autocast).
    `backend`: auto (default) or torch run the paths below; onnxruntime runs the graph
    `deit export` writes, cached and checked on load (engine.ort; CPU, fp32, onnx extra);
    openvino compiles that graph with OpenVINO, checked again on load (engine.ov).
    """
    device = resolve_device(device) if device is not None else model.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    if backend not in (None, "auto", "torch"):
        from .ort import check_backend, prepare_graph

        which = check_backend(backend, device, dtype)
        if which != "torch":
            return prepare_graph(model, device, dtype, which)
    if device.type == "cpu" and dtype == torch.float16 and not _onednn_ok(dtype):
        warnings.warn("fp16 on this CPU is emulated and slow; bf16 or fp32 are faster here", stacklevel=2)

    if device.type == "cpu":
        tune_cpu_allocator()
    kind = "onednn" if device.type == "cpu" and not compile and _onednn_ok(dtype) else "aten"
    fast = FastDeiT(model, device=device, dtype=dtype, linear=kind)

    if compile:
        return _compiled(model, fast, device, dtype)
    if device.type == "cuda":
        graphs = _CudaGraphs(fast)
        return Runner(model, device, dtype, "cuda-graphs", graphs.logits, graphs.features, shape_specialised=True)
    path = f"{device.type}-{'onednn' if kind == 'onednn' else 'eager'}"
    return Runner(model, device, dtype, path, fast.logits, fast.features)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed activation memory in the process instead of handing it back to the OS.

    glibc's malloc returns large blocks to the kernel on free, so every forward pass
    page-faults its activations in again (about 11,000 faults per batch of 32 for
    deit-tiny: a quarter of the bf16 time here). Raising the mmap and trim thresholds, as
    jemalloc or tcmalloc would, makes repeated batches reuse the same memory. Process-wide
    (everything in the process benefits, peers in `deit bench --compare` too); glibc
    only, done once; returns whether it applied. Freed memory is kept by the process
    (up to the 1 GiB trim threshold). DEIT_NO_MALLOC_TUNING=1 turns it off.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import ctypes.util
    import os
    import platform

    if os.environ.get("DEIT_NO_MALLOC_TUNING", "") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1  # glibc's largest allowed value
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1 and ok
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


def _onednn_ok(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


class FastDeiT(nn.Module):
    """The DeiT forward pass with weights cast (and on CPU, packed) once.

    `linear="onednn"` (CPU) packs each weight into oneDNN's layout and fuses bias, GELU
    and the residual add into the matmul; `"aten"` uses F.linear (CUDA, MPS, compile).
    Tensors already on `device` in `dtype` are shared with the model, never written to.
    """

    def __init__(self, model: DeiT, *, device: torch.device, dtype: torch.dtype, linear: str = "aten"):
        super().__init__()
        cfg = self.config = model.config
        self.patch_size, self.num_prefix = cfg.patch_size, cfg.num_prefix_tokens
        self.ops = ops = _OneDNNOps() if linear == "onednn" else _AtenOps()
        cast = _Cast(device, dtype, ops)
        # The patch embedding as a matmul over flattened patches: the convolution's sums,
        # and on CUDA never TF32 (which cuDNN convolutions use by default).
        proj = model.patch_embed.proj
        self.register_buffer("patch_w", cast.weight(proj.weight.reshape(proj.weight.shape[0], -1)), persistent=False)
        self.register_buffer("patch_b", cast(proj.bias), persistent=False)
        P = cfg.num_pos_prefix_tokens  # rows of pos_embed for the prefix: all of them, or none (DeiT III)
        prefix = torch.cat([model.cls_token] + ([model.dist_token] if model.dist_token is not None else []), dim=1)
        pos = cast(model.pos_embed)
        prefix_pos = cast(prefix) + pos[:, :P] if P else cast(prefix)
        self.register_buffer("prefix_pos", prefix_pos, persistent=False)  # (1, prefix, D)
        self.register_buffer("patch_pos", pos[:, P:], persistent=False)  # (1, patches, D)
        self.blocks = nn.ModuleList(_FastBlock(b, cfg, cast) for b in model.blocks)
        self.last = _LastBlockPrefix(self.blocks[-1], model.blocks[-1], cfg, cast)
        self.norm = _Norm(model.norm, cast)
        # The classifier runs through DeiT.forward_head (its semantics live in one place).
        self.head = cast.module(model.head)
        self.head_dist = cast.module(model.head_dist)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        # Cast and cut into patches in one pass: (B, C, H, W) -> (B, gh, gw, C, p, p)
        patches = torch.empty((B, gh, gw, C, p, p), dtype=self.patch_pos.dtype, device=x.device)
        patches.copy_(x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5))
        x = self.ops.mm(patches.view(B, gh * gw, C * p * p), self.patch_w, self.patch_b)  # (B, patches, D)
        return torch.cat([self.prefix_pos.expand(B, -1, -1), x + self.patch_pos], dim=1)  # (B, prefix + patches, D)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> all tokens after the final norm (B, prefix + patches, D)."""
        x = self._embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def logits(self, x: torch.Tensor, head: str = "avg") -> torch.Tensor:
        """Images -> logits. The head reads only the prefix tokens, so the last block
        computes only their rows (its keys and values still see every token)."""
        x = self._embed(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        x = self.norm(self.last(x))  # (B, prefix, D)
        return DeiT.forward_head(self, x, head=head)

    def forward(self, x: torch.Tensor, head: str | None = "avg") -> torch.Tensor:
        return self.features(x) if head is None else self.logits(x, head)


class _Cast:
    """Tensors to the runner's device and dtype: `.to()` shares what is already there."""

    def __init__(self, device: torch.device, dtype: torch.dtype, ops):
        self.device, self.dtype, self.ops = device, dtype, ops
        # Layer norms keep fp32 affine parameters on the CPU: its kernels take bf16/fp16
        # activations with fp32 weights and compute in fp32 either way.
        self.norm_dtype = torch.float32 if device.type == "cpu" else dtype

    def __call__(self, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(device=self.device, dtype=dtype or self.dtype)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.ops.pack(self(w))

    def module(self, m: nn.Module | None) -> nn.Module | None:
        if m is None:
            return None
        if all(p.device == self.device and p.dtype == self.dtype for p in m.parameters()):
            return m
        return copy.deepcopy(m).to(device=self.device, dtype=self.dtype)


class _AtenOps:
    """The three kinds of matmul in a block, as plain ATen ops (inductor fuses these)."""

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def mm(self, h, w, b):
        return F.linear(h, w, b)

    def mm_gelu(self, h, w, b):
        return F.gelu(F.linear(h, w, b))  # exact (erf) GELU, as trained

    def mm_add(self, h, w, b, residual):
        return residual + F.linear(h, w, b)


class _OneDNNOps:
    """The same with oneDNN: the bias, the GELU and the residual add are fused into the
    matmul, and weights are packed once into oneDNN's blocked layout."""

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        # No batch-size hint: one packing serves every batch size (measured as fast).
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)

    def mm(self, h, w, b):
        return torch.ops.mkldnn._linear_pointwise(h, w, b, "none", [], "")

    def mm_gelu(self, h, w, b):  # algorithm "none": exact (erf) GELU
        return torch.ops.mkldnn._linear_pointwise(h, w, b, "gelu", [], "none")

    def mm_add(self, h, w, b, residual):
        return torch.ops.mkldnn._linear_pointwise.binary(h, residual, w, b, "add")


class _Norm(nn.Module):
    def __init__(self, ln: nn.LayerNorm, cast: _Cast):
        super().__init__()
        self.eps = ln.eps
        self.register_buffer("weight", cast(ln.weight, cast.norm_dtype), persistent=False)
        self.register_buffer("bias", cast(ln.bias, cast.norm_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class _FastBlock(nn.Module):
    def __init__(self, block, cfg, cast: _Cast):
        super().__init__()
        self.ops, self.num_heads = cast.ops, cfg.num_heads
        self.norm1, self.norm2 = _Norm(block.norm1, cast), _Norm(block.norm2, cast)
        for name, lin, ls in (
            ("qkv", block.attn.qkv, None),
            ("proj", block.attn.proj, block.ls1),
            ("fc1", block.mlp.fc1, None),
            ("fc2", block.mlp.fc2, block.ls2),
        ):
            w, b = _scaled(lin, ls)
            self.register_buffer(f"{name}_w", cast.weight(w), persistent=False)
            self.register_buffer(f"{name}_b", cast(b), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, o = self.num_heads, self.ops
        qkv = o.mm(self.norm1(x), self.qkv_w, self.qkv_b).view(B, N, 3, H, C // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, head_dim)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, head_dim)
        x = o.mm_add(a.transpose(1, 2).reshape(B, N, C), self.proj_w, self.proj_b, x)
        return o.mm_add(o.mm_gelu(self.norm2(x), self.fc1_w, self.fc1_b), self.fc2_w, self.fc2_b, x)


def _scaled(lin: nn.Linear, ls: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's (weight, bias), with the LayerScale that follows it folded in (in fp32, before
    any cast): gamma * (x W^T + b) = x (gamma[:, None] * W)^T + gamma * b."""
    gamma = getattr(ls, "gamma", None)
    if gamma is None:  # no LayerScale (nn.Identity): the tensors as they are, shared
        return lin.weight, lin.bias
    g = gamma.detach().float()
    w = lin.weight.detach().float() * g[:, None]
    b = lin.bias.detach().float() * g if lin.bias is not None else None
    return w, b


class _LastBlockPrefix(nn.Module):
    """The last block for the prefix (class, distillation) tokens only: (B, N, D) ->
    (B, prefix, D). Keys and values are still computed for every token; everything but
    the split query/key-value weights is shared with the full block."""

    def __init__(self, fast: _FastBlock, block, cfg, cast: _Cast):
        super().__init__()
        self.ops, self.num_heads, self.num_prefix = cast.ops, cfg.num_heads, cfg.num_prefix_tokens
        self.norm1, self.norm2 = fast.norm1, fast.norm2
        for name in ("proj_w", "proj_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b"):
            self.register_buffer(name, getattr(fast, name), persistent=False)
        d = cfg.embed_dim
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        self.register_buffer("q_w", cast.weight(w[:d]), persistent=False)
        self.register_buffer("kv_w", cast.weight(w[d:]), persistent=False)
        self.register_buffer("q_b", cast(b[:d]) if b is not None else None, persistent=False)
        self.register_buffer("kv_b", cast(b[d:]) if b is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, P, o = self.num_heads, self.num_prefix, self.ops
        h = self.norm1(x)
        kv = o.mm(h, self.kv_w, self.kv_b).view(B, N, 2, H, C // H)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, head_dim)
        q = o.mm(h[:, :P].contiguous(), self.q_w, self.q_b).view(B, P, H, C // H).transpose(1, 2)  # (B, H, P, hd)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, P, head_dim)
        x = x[:, :P].contiguous()  # (B, prefix, D)
        x = o.mm_add(a.transpose(1, 2).reshape(B, P, C), self.proj_w, self.proj_b, x)
        return o.mm_add(o.mm_gelu(self.norm2(x), self.fc1_w, self.fc1_b), self.fc2_w, self.fc2_b, x)


class _CudaGraphs:
    """Replays the forward as one CUDA graph per input shape (and head).

    A small model at any batch size is bound by kernel launches; one replay launches
    them all at once. Falls back to eager (with a warning) if capture fails.
    """

    def __init__(self, fast: FastDeiT):
        self.fast = fast
        self.graphs: dict = {}
        self.pool = None
        self.broken = False

    def _run(self, x: torch.Tensor, head: str | None) -> torch.Tensor:
        if self.broken:
            return self.fast(x, head)
        key = (tuple(x.shape), x.dtype, head)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x, head)
            except Exception as e:  # noqa: BLE001 - eager is always a correct fallback
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly", stacklevel=3)
                self.broken = True
                return self.fast(x, head)
            if len(self.graphs) >= _MAX_CUDA_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: torch.Tensor, head: str | None):
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init, autotuning
            for _ in range(2):
                self.fast(static_in, head)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fast(static_in, head)
        return graph, static_in, static_out

    def logits(self, x: torch.Tensor, head: str = "avg") -> torch.Tensor:
        return self._run(x, head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)


def _compiled(model: DeiT, fast: FastDeiT, device: torch.device, dtype: torch.dtype) -> Runner:
    if device.type == "cpu":
        # Freezing folds the weights into the graph as constants, which lets inductor
        # pack them for oneDNN/MKL and fuse bias, GELU, residual add and layer norm.
        options = {"freezing": True}
        fn = torch.compile(fast, dynamic=False, options=options)
        path = "inductor-frozen"
    elif device.type == "cuda":
        # inductor's fusions plus its CUDA graphs (cudagraph trees).
        fn = torch.compile(fast, mode="reduce-overhead", dynamic=False)
        path = "inductor-cudagraphs"
    else:
        fn = torch.compile(fast, dynamic=False)
        path = "inductor"

    def call(x, head):
        if device.type != "cuda":
            return fn(x, head)
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: replay
        return fn(x, head).clone()  # the next replay overwrites the graph's output

    def logits(x, head="avg"):
        return call(x, head)

    def features(x):
        return call(x, None)

    return Runner(
        model, device, dtype, path, logits, features, shape_specialised=True
    )  # dynamic=False: a graph per shape
