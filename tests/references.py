"""The reference implementations, shaped like our models, with seeded random weights:
what the fidelity tests compare our logits against."""

from __future__ import annotations

import timm
import torch
import transformers
from conftest import randomize

from deit_cli.variants import VARIANTS

TOL = 1e-4


def timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_reference(name: str, seed: int = 0):
    """A transformers model shaped like a released variant (as the facebook/ repos are):
    DeiT with teacher for distilled models, ViT for the others."""
    v = next(v for v in VARIANTS if v.name == name)
    kw = dict(
        hidden_size=v.config.embed_dim,
        num_hidden_layers=v.config.depth,
        num_attention_heads=v.config.num_heads,
        intermediate_size=4 * v.config.embed_dim,
        image_size=v.image_size,
        patch_size=16,
        num_labels=1000,
        attn_implementation="eager",
    )
    if v.distilled:
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**kw))
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**kw))
    return randomize(model, seed), v
