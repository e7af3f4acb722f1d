"""The peers `deit bench --compare` runs beside deit: timm and transformers, built on the
same weights and run as their users run them (fp32 weights, autocast for bf16/fp16), and
onnxruntime running the graph `deit export` writes for the same weights (fp32, CPU; the
graph cached as the onnxruntime backend caches it, engine.ort).

Only `bench --compare` imports them, at run time, when they are installed.
"""

from __future__ import annotations

import importlib
import os
from contextlib import nullcontext

import torch

from ..config import DeiTConfig
from ..devices import DTYPE_NAMES
from ..errors import UsageError
from ..model import DeiT

PEERS = ("timm", "transformers", "onnxruntime")


def _import_peer(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def timm_module(cfg: DeiTConfig) -> torch.nn.Module:
    """timm's module for `cfg`'s architecture (VisionTransformer, VisionTransformerDistilled
    for distilled models, the deit3_* options for DeiT III) as timm initialises it: no
    weights loaded. Raises UsageError for an architecture timm cannot express."""
    from functools import partial

    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if cfg.distilled and not cfg.has_dist_head and cfg.num_classes > 0:
        raise UsageError("timm has no distilled model without a distillation head")
    kw = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        num_classes=cfg.num_classes,
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.layer_norm_eps),
    )
    if cfg.distilled and not cfg.pos_embed_prefix:  # its distilled class keeps prefix slots in pos_embed
        raise UsageError("timm has no distilled model with a patch-only position embedding")
    if cfg.layer_scale_init is not None or not cfg.pos_embed_prefix:
        # DeiT III, as timm's deit3_* builds it (its state dict keys are our canonical ones)
        kw.update(init_values=cfg.layer_scale_init, no_embed_class=not cfg.pos_embed_prefix)
    return VisionTransformerDistilled(**kw) if cfg.distilled else VisionTransformer(**kw, global_pool="token")


def build_peer(name: str, model: DeiT) -> torch.nn.Module:
    """`name`'s implementation of the model's architecture, holding the same weights
    (fp32, CPU, eval). Raises ImportError when the package is missing, UsageError when it
    cannot express this architecture."""
    if name == "onnxruntime":
        from .ort import check_backend

        try:
            check_backend("onnxruntime", torch.device("cpu"), torch.float32)
        except UsageError:
            raise ImportError(name) from None
        from .ort import OnnxRuntimeModel, cpu_fp32

        return OnnxRuntimeModel(cpu_fp32(model))
    mod = _import_peer(name)
    if mod is None:
        raise ImportError(name)
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if name == "timm":
        net = timm_module(cfg)
        net.load_state_dict(sd, strict=True)
        if cfg.distilled:
            net.set_distilled_training(False)
        return net.eval().requires_grad_(False)
    import transformers

    from ..checkpoints.layouts import hf_architecture, to_hf

    _, arch = hf_architecture(cfg)
    kw = dict(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu",
        num_labels=max(cfg.num_classes, 1),
        attn_implementation="sdpa",
    )
    if arch in ("DeiTModel", "ViTModel"):
        raise UsageError("comparing headless models with transformers is not supported")
    conf = (transformers.DeiTConfig if cfg.distilled else transformers.ViTConfig)(**kw)
    # Through from_pretrained, as users load it: it maps the file layout (what to_hf
    # writes) to whatever module names this transformers release uses.
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="deit-bench-") as tmp:
        conf.save_pretrained(tmp)
        save_file(to_hf(sd, cfg), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # stderr is for our notes
        try:
            net = getattr(transformers, arch).from_pretrained(tmp, attn_implementation="sdpa")
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
    return net.eval().requires_grad_(False)


def peer_fn(name: str, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, compile: bool):
    """The peer's forward as its users run it: fp32 weights, autocast for bf16/fp16.
    onnxruntime: its fp32 graph on the CPU (UsageError elsewhere), built or read now."""
    if name == "onnxruntime":
        if device.type != "cpu" or dtype != torch.float32 or compile:
            raise UsageError("onnxruntime runs deit's fp32 graph on the CPU only (no --compile)")
        net.session(net.logits_spec())  # exported or read now, not in the timing
        return net.logits, "fp32 graph (deit export)"
    net = net.to(device)
    graphs = compile and device.type == "cuda"
    if compile:
        net = _compile_like_deit(net, device)

    def ctx():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    hf = name == "transformers"

    def fn(x):
        with torch.inference_mode(), ctx():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = net(pixel_values=x) if hf else net(x)
            return (out.logits if hf else out).clone() if graphs else (out.logits if hf else out)

    path = "fp32" if dtype == torch.float32 else f"autocast({DTYPE_NAMES[dtype]})"
    return fn, path + ("+compile" if compile else "")


def _compile_like_deit(net, device):
    # The same settings deit's own compile path uses, so that compile meets compile.
    if device.type == "cpu":
        return torch.compile(net, dynamic=False, options={"freezing": True})
    if device.type == "cuda":
        return torch.compile(net, mode="reduce-overhead", dynamic=False)
    return torch.compile(net, dynamic=False)
