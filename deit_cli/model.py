"""DeiT: a ViT with an optional distillation token (Touvron et al., 2021).

State-dict keys are the canonical layout, the names of the original release and timm.
This module reads no files and prints nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HEADS, DeiTConfig

__all__ = ["HEADS", "DeiT", "DeiTConfig", "resample_pos_embed"]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # fused q, k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as trained


class Block(nn.Module):
    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)
        # DeiT III's LayerScale on each residual branch; the identity (no parameters) for DeiT
        init = cfg.layer_scale_init
        self.ls1 = LayerScale(cfg.embed_dim, init) if init is not None else nn.Identity()
        self.ls2 = LayerScale(cfg.embed_dim, init) if init is not None else nn.Identity()
        self.drop_path = 0.0  # stochastic depth, training only (DeiT.set_drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + _drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)

    def forward_prefix(self, x: torch.Tensor, P: int) -> torch.Tensor:
        """`self(x)[:, :P]`, computing only what those rows need: the queries, projection
        and MLP of the first P (class, distillation) tokens; keys and values of all. The
        last block's rows are all the heads read, so training and inference use this."""
        B, N, C = x.shape
        H = self.attn.num_heads
        h = self.norm1(x)
        w, b = self.attn.qkv.weight, self.attn.qkv.bias
        q = F.linear(h[:, :P], w[:C], b[:C] if b is not None else None)  # (B, P, C)
        kv = F.linear(h, w[C:], b[C:] if b is not None else None)  # (B, N, 2C)
        q = q.view(B, P, H, C // H).transpose(1, 2)  # (B, heads, P, head_dim)
        k, v = kv.view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, head_dim)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, P, C)  # (B, P, C)
        y = x[:, :P] + _drop_path(self.ls1(self.attn.proj(a)), self.drop_path, self.training)
        return y + _drop_path(self.ls2(self.mlp(self.norm2(y))), self.drop_path, self.training)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (Touvron et al., CaiT 2021; DeiT III).
    Named `gamma` as timm's `ls1.gamma` / `ls2.gamma`."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p
    (scaled by 1/(1-p) when kept), as timm's DropPath. The identity in eval."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, D)


class DeiT(nn.Module):
    """A DeiT. `labels`, `preprocessing` and `source` are set by `load_model`."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        # (1, prefix + patches, D); DeiT III (pos_embed_prefix False): (1, patches, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_prefix_tokens + cfg.num_patches, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else None
        self.head_dist = nn.Linear(d, cfg.num_classes) if cfg.has_dist_head else None
        self.labels: list[str] = [f"class_{i}" for i in range(cfg.num_classes)]
        self.preprocessing = None  # a variants.Preprocessing
        self.source: str | None = None  # what the user named
        self.origin: str | None = None  # where the weights first came from
        self.multi_label = False  # sigmoid scores, any number of labels per image (set by load_model)
        self.threshold = 0.5  # multi-label: the score at or above which a label is predicted
        self.variant = None  # the registry's variants.Variant when the architecture is a released one
        self.layout: str | None = None  # the layout the weights were read from
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """timm's init for VisionTransformer(Distilled) with weight_init='' (deterministic
        given `seed`; used by --scratch and --random-init): position embeddings, the
        distillation token and every Linear's weight N(0, 0.02) truncated at +-2 (so, in
        effect, not truncated), Linear biases zero, LayerNorms one and zero, and the patch
        convolution PyTorch's default, which timm leaves as it is. The class token is N(0, 0.02)
        as in the DeiT release (timm 0.3.2, what the paper trained with); timm 1.x starts it
        at N(0, 1e-6)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.pos_embed.copy_(_trunc_normal(self.pos_embed.shape, 0.02, g))
        self.cls_token.copy_(_trunc_normal(self.cls_token.shape, 0.02, g))
        if self.dist_token is not None:
            self.dist_token.copy_(_trunc_normal(self.dist_token.shape, 0.02, g))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_trunc_normal(m.weight.shape, 0.02, g))
                if m.bias is not None:  # qkv_bias=False has none
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):  # DeiT III: every gamma at config.layer_scale_init
                m.gamma.fill_(self.config.layer_scale_init)
            elif isinstance(m, nn.Conv2d):
                # nn.Conv2d.reset_parameters with our generator: kaiming_uniform(a=sqrt(5)) is
                # U(+-1/sqrt(fan_in)), and the bias takes the same bound
                bound = 1 / math.sqrt(m.weight[0].numel())
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(-bound, bound, generator=g))
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=g))

    def set_drop_path(self, rate: float, uniform: bool = False) -> None:
        """Stochastic depth for training, rising linearly from 0 at the first block to
        `rate` at the last (the DeiT release's schedule), or with `uniform` `rate` in every
        block (DeiT III's: models_v2 gives each block the same rate). No effect in eval."""
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path = rate if uniform or n == 1 else rate * i / (n - 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the blocks' input: prefix and patch tokens with their
        position embeddings (B, prefix + patches, D)."""
        x = self.patch_embed(x)
        B = x.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        if not self.config.pos_embed_prefix:  # DeiT III: the patches only, before the prefix joins
            return torch.cat([*prefix, x + self.pos_embed], dim=1)  # (B, prefix + patches, D)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed  # (B, prefix + patches, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> all tokens after the final norm (B, prefix + patches, D)."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, head: str = "avg", pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (or, with pre_logits or no classifier, the pooled features).

        head "cls" uses the class token, "dist" the distillation token, "avg" the mean of
        both (the paper's, timm's and transformers' inference for distilled models).
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if head == "dist" and not self.config.distilled:
            raise ValueError("head 'dist' needs a distilled model (this one has no distillation token)")
        cls, dist = tokens[:, 0], tokens[:, 1] if self.config.distilled else None
        if pre_logits or self.head is None:
            if head == "cls" or dist is None:
                return cls
            return dist if head == "dist" else (cls + dist) / 2
        if self.head_dist is None:  # no distillation classifier: the class head serves all
            if head == "dist":
                raise ValueError("head 'dist' needs a distillation classifier (this model has none)")
            return self.head(cls)
        if head == "cls":
            return self.head(cls)
        if head == "dist":
            return self.head_dist(dist)
        return (self.head(cls) + self.head_dist(dist)) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype


def _trunc_normal(shape, std: float, generator) -> torch.Tensor:
    """timm's trunc_normal_(std=std), drawn on the CPU (a seed gives the same weights on any
    device): its bounds are +-2 absolute, not +-2 std, so in effect it does not truncate."""
    t = torch.empty(shape)
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0, generator=generator)
    return t


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Resample (1, prefix + g*g, D) position embeddings to a new grid: bicubic with
    antialiasing on the patch part, prefix (class/distillation) tokens kept, as timm does.
    `num_prefix_tokens` counts the prefix rows of `pos_embed` (0 for DeiT III's)."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embeddings of {grid.shape[1]} patches are not a square grid")
    if old == new_grid:
        return pos_embed
    dtype = grid.dtype
    grid = grid.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(dtype)  # (1, g'*g', D)
    return torch.cat([prefix, grid], dim=1)
