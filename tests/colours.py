"""A tiny DeiT whose weights are built so that the mean colour of an image decides its
class (a red image is "red", a cyan one "cyan"), and the answers it must give, computed
with the model's own forward, one image at a time (independently of the engine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# name: (logit prototype over the normalised mean (r, g, b), an RGB that is clearly it)
COLOURS = {
    "red": ((2, -1, -1), (255, 0, 0)),
    "green": ((-1, 2, -1), (0, 255, 0)),
    "blue": ((-1, -1, 2), (0, 0, 255)),
    "yellow": ((1, 1, -2), (255, 255, 0)),
    "cyan": ((-2, 1, 1), (0, 255, 255)),
    "magenta": ((1, -2, 1), (255, 0, 255)),
}
LABELS = list(COLOURS)


@torch.no_grad()
def colour_model():
    """A DeiT (32 px, patch 16, 8 dims, 1 block) that classifies by mean colour.

    The patch embedding gives each channel's mean as the pair (m, -m); attention with
    zero queries and keys is uniform, so the class and distillation tokens receive the mean
    over all tokens; the pairs keep every token's mean at zero, so each LayerNorm only
    rescales; the heads score that mean colour against the prototypes (the distillation
    head at half the scale, so cls, dist and avg give different probabilities).
    """
    from deit_cli.model import DeiT, DeiTConfig

    cfg = DeiTConfig(
        image_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.0, num_classes=len(COLOURS)
    )
    m = DeiT(cfg)
    for p in m.parameters():
        p.zero_()
    for norm in (m.blocks[0].norm1, m.blocks[0].norm2, m.norm):
        norm.weight.fill_(1)
    w = m.patch_embed.proj.weight  # (8, 3, 16, 16)
    for c in range(3):
        w[2 * c, c], w[2 * c + 1, c] = 1 / 256, -1 / 256  # the patch's channel mean, both signs
    for token in (m.cls_token, m.dist_token):
        token[0, 0, 6], token[0, 0, 7] = 1.0, -1.0  # a constant pair: no division by ~0
    m.blocks[0].attn.qkv.weight[16:24] = torch.eye(8)  # q = k = 0, v = identity
    m.blocks[0].attn.proj.weight.copy_(torch.eye(8))
    protos = torch.tensor([p for p, _ in COLOURS.values()], dtype=torch.float32)
    m.head.weight[:, 0:6:2] = 2 * protos
    m.head_dist.weight[:, 0:6:2] = protos
    m.labels, m.source = list(LABELS), "colours-test"
    return m.eval()


def colour_files(d: Path) -> list[Path]:
    return [d / f"{name}.png" for name in COLOURS]


def model_inputs(model, paths, *, crop_pct=None, resize_mode=None, exif_transpose=True) -> torch.Tensor:
    """What the model should see: the images layer's decode and eval transform."""
    from deit_cli.images import decode_image, eval_transform

    t = eval_transform(model.preprocessing, crop_pct=crop_pct, resize_mode=resize_mode)
    return torch.stack([t(decode_image(str(p), exif_transpose=exif_transpose).image) for p in paths])


def expected_scores(model_path: Path, paths, head: str = "avg", scores: str = "prob", **kw) -> np.ndarray:
    """(images, classes): the model's own probabilities (or logits), one image at a time."""
    from deit_cli.checkpoints import load_model

    model = load_model(str(model_path))
    x = model_inputs(model, paths, **kw)
    with torch.no_grad():
        logits = torch.cat([model.forward_head(model.forward_features(x[i : i + 1]), head) for i in range(len(x))])
    return (logits.softmax(-1) if scores == "prob" else logits).numpy()


def expected_features(model_path: Path, paths, pool: str, normalize: bool = False) -> np.ndarray:
    """The model's own forward_features, pooled here independently of the engine."""
    from deit_cli.checkpoints import load_model

    model = load_model(str(model_path))
    with torch.no_grad():
        tokens = model.forward_features(model_inputs(model, paths))
    pooled = {  # a distilled model: two prefix tokens, then the patches
        "cls": tokens[:, 0],
        "dist": tokens[:, 1],
        "token": (tokens[:, 0] + tokens[:, 1]) / 2,  # timm's forward_head(pre_logits=True)
        "avg": tokens[:, 2:].mean(1),  # timm's global_pool="avg": the patch tokens
        "mean": tokens[:, 2:].mean(1),  # the old name of avg
        "tokens": tokens,
    }[pool]
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return pooled.numpy()
