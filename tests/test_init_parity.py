"""DeiT.init_weights against timm's init of the same architecture (weight_init='').

The two draw from different generators, so each parameter tensor is compared by its
distribution: mean and std within 5%, plus four standard errors of the two estimates so
that a tensor of a few hundred values (a bias, a token) does not fail by chance; a tensor
timm sets to a constant (LayerNorm, zero biases) must be that constant.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from deit_cli.config import DeiTConfig
from deit_cli.engine.peers import timm_module
from deit_cli.model import DeiT
from deit_cli.variants import find_variant

pytest.importorskip("timm")

SMALL = DeiTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def timm_model(cfg: DeiTConfig) -> nn.Module:
    torch.manual_seed(0)
    return timm_module(cfg)


def mismatches(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    bad = []
    for name, t in theirs.items():
        o, t = ours[name].double().flatten(), t.double().flatten()
        if t.std() == 0:
            if not torch.equal(o, t):
                bad.append(f"{name}: want all {t[0].item()}")
            continue
        se = 4 / math.sqrt(t.numel())  # four standard errors of the difference of two stds (relative)
        if abs(o.std() / t.std() - 1) > 0.05 + se:
            bad.append(f"{name}: std {o.std():.3g}, timm {t.std():.3g}")
        if abs(o.mean() - t.mean()) > (0.05 + math.sqrt(2) * se) * t.std():
            bad.append(f"{name}: mean {o.mean():.3g}, timm {t.mean():.3g} (std {t.std():.3g})")
    return bad


TINY = find_variant("deit_tiny_patch16_224").config
TINY_DISTILLED = find_variant("deit_tiny_distilled_patch16_224").config


@pytest.mark.parametrize(
    "cfg",
    [SMALL, replace(SMALL, distilled=True), TINY, TINY_DISTILLED],
    ids=["small", "small-distilled", "deit-tiny", "deit-tiny-distilled"],
)
def test_every_parameter_is_initialised_as_timm_initialises_it(cfg):
    model = DeiT(cfg)
    model.init_weights(seed=1)
    theirs = timm_model(cfg).state_dict()
    # the class token as the DeiT release (timm 0.3.2) initialised it; timm 1.x uses N(0, 1e-6)
    nn.init.trunc_normal_(theirs["cls_token"], std=0.02)
    ours = model.state_dict()
    assert mismatches(ours, theirs) == []


def test_the_old_init_differed_from_timms():
    """What the comparison catches: Linear weights truncated at 2 std (12% narrower), a
    truncated-normal patch convolution with a zero bias."""
    theirs = timm_model(SMALL).state_dict()
    nn.init.trunc_normal_(theirs["cls_token"], std=0.02)
    old = DeiT(SMALL).state_dict()
    g = torch.Generator().manual_seed(0)
    for name, t in old.items():
        if name.endswith("weight") and t.ndim == 2 or name in ("cls_token", "pos_embed"):
            nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04, generator=g)
    conv = old["patch_embed.proj.weight"]
    std = 1 / math.sqrt(conv[0].numel())
    nn.init.trunc_normal_(conv, std=std, a=-2 * std, b=2 * std, generator=g)
    old["patch_embed.proj.bias"].zero_()
    bad = {line.split(":")[0] for line in mismatches(old, theirs)}
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.mlp.fc1.weight"} <= bad


def test_the_init_is_seeded_and_the_same_on_the_meta_path():
    a, b = DeiT(SMALL), DeiT(SMALL)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    b.init_weights(seed=4)
    assert not torch.equal(a.pos_embed, b.pos_embed)
    with torch.device("meta"):
        c = DeiT(SMALL)
    c.to_empty(device="cpu")
    c.init_weights(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_a_model_without_qkv_bias_initialises():
    model = DeiT(replace(SMALL, qkv_bias=False))
    model.init_weights(seed=0)
    assert model.blocks[0].attn.qkv.bias is None
