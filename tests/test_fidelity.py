"""Our model gives the reference implementations' logits on the same weights, whatever
layout the weights come in. timm and transformers are the references."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
import transformers
from conftest import images, randomize
from references import TOL, hf_reference, max_diff, timm_model

import deit_cli
from deit_cli.variants import VARIANTS

# DeiT III (LayerScale; transformers has no class for it) is proved in test_deit3.py
NAMES = [v.name for v in VARIANTS if v.family == "DeiT"]


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_matches_timm(tmp_path, name):
    ref = timm_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": ref.state_dict()}, path)  # the original release's layout
    model = deit_cli.load_model(str(path))
    size = model.config.image_size
    x = images(1, size)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL
    # the architecture is recognised as the released one, with its published facts
    assert model.variant is not None and model.variant.name == name
    assert model.preprocessing.image_size == size
    assert model.labels[281] == "tabby, tabby cat"


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_matches_transformers(tmp_path, name):
    ref, v = hf_reference(name)
    ref.config.id2label = {i: f"label {i}" for i in range(1000)}
    ref.save_pretrained(tmp_path / "hf")
    model = deit_cli.load_model(str(tmp_path / "hf"))
    assert model.config.layer_norm_eps == 1e-12  # transformers' configs, read from config.json
    assert model.labels[5] == "label 5"
    x = images(1, v.image_size)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).logits) <= TOL


def small_hf_deit_config(**kw):
    base = dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=64,
        patch_size=16,
        num_labels=7,
        attn_implementation="eager",
    )
    base.update(kw)
    return transformers.DeiTConfig(**base)


def test_transformers_deit_without_teacher(tmp_path):
    ref = randomize(transformers.DeiTForImageClassification(small_hf_deit_config()))
    ref.save_pretrained(tmp_path / "m")
    model = deit_cli.load_model(str(tmp_path / "m"))
    # 4 heads of 32: only config.json can say so (shapes would suggest 2 heads of 64)
    assert model.config.num_heads == 4 and model.config.distilled and not model.config.dist_head
    x = images(2, 64)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).logits) <= TOL
    assert model.labels == [f"class_{i}" for i in range(7)]  # LABEL_N placeholders carry nothing


def test_transformers_headless_deit(tmp_path):
    ref = randomize(transformers.DeiTModel(small_hf_deit_config()))  # with its (unused) pooler
    ref.save_pretrained(tmp_path / "m")
    model = deit_cli.load_model(str(tmp_path / "m"))
    assert model.config.num_classes == 0
    x = images(2, 64)
    with torch.no_grad():
        assert max_diff(model.forward_features(x), ref(pixel_values=x).last_hidden_state) <= TOL


def test_transformers_in_memory_state_dict(tmp_path):
    """transformers >= 5 names tensors differently in memory than in its files."""
    ref = randomize(transformers.DeiTForImageClassificationWithTeacher(small_hf_deit_config()))
    torch.save(ref.state_dict(), tmp_path / "sd.bin")
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    model = deit_cli.load_model(str(tmp_path))
    x = images(2, 64)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).logits) <= TOL


def to_mmpretrain(sd: dict) -> dict:
    """The layout of mmpretrain's DeiT checkpoints (its own converter's key rules)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head"):
            out["head.layers." + k] = v
            continue
        k = k.replace("patch_embed.proj.", "patch_embed.projection.")
        if k.startswith("blocks."):
            k = k.replace("blocks.", "layers.").replace("norm1", "ln1").replace("norm2", "ln2")
            k = k.replace("mlp.fc1", "ffn.layers.0.0").replace("mlp.fc2", "ffn.layers.1")
        elif k.startswith("norm."):
            k = k.replace("norm.", "ln1.")
        out["backbone." + k] = v
    return out


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit_small_patch16_224"])
def test_mmpretrain_checkpoint(tmp_path, name):
    ref = timm_model(name)
    ckpt = {
        "meta": {"epoch": 300, "mmpretrain_version": "1.2.0"},
        "state_dict": to_mmpretrain(ref.state_dict()),
    }
    ckpt["state_dict"]["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53])
    torch.save(ckpt, tmp_path / "mm.pth")
    model = deit_cli.load_model(str(tmp_path / "mm.pth"))
    assert model.layout == "mmpretrain"
    x = images(1)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


def test_training_checkpoint_with_wrappers(tmp_path):
    """The original training script's checkpoint: optimizer, epoch, argparse args, EMA, DDP prefix."""
    ref = timm_model("deit_tiny_distilled_patch16_224")
    sd = {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}
    ckpt = {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4}]},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "model_ema": {k: torch.zeros_like(v) for k, v in ref.state_dict().items()},
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="deit_tiny_distilled_patch16_224", lr=5e-4, batch_size=128),
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    model = deit_cli.load_model(str(tmp_path / "checkpoint.pth"))
    x = images(1)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


def test_any_deit_shaped_config(tmp_path):
    """Not one of the eight: other width, depth, patch size, resolution and classes."""
    from timm.models.deit import VisionTransformerDistilled

    ref = randomize(
        VisionTransformerDistilled(
            img_size=96,
            patch_size=8,
            embed_dim=128,
            depth=3,
            num_heads=2,
            num_classes=10,
            mlp_ratio=3.0,
        )
    )
    torch.save(ref.state_dict(), tmp_path / "custom.pth")
    model = deit_cli.load_model(str(tmp_path / "custom.pth"))
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_ratio, cfg.num_classes) == (
        96,
        8,
        128,
        3,
        3.0,
        10,
    )
    assert model.variant is None and model.labels[3] == "class_3"
    x = images(2, 96)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


def test_heads_and_features_match_timm(tmp_path):
    ref = timm_model("deit_tiny_distilled_patch16_224")
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    model = deit_cli.load_model(str(tmp_path / "t.pth"))
    x = images(2)
    with torch.no_grad():
        tokens = model.forward_features(x)
        ref_tokens = ref.forward_features(x)
        assert tokens.shape == (2, 198, 192)
        assert max_diff(tokens, ref_tokens) <= TOL
        assert max_diff(model.forward_head(tokens, "cls"), ref.head(ref_tokens[:, 0])) <= TOL
        assert max_diff(model.forward_head(tokens, "dist"), ref.head_dist(ref_tokens[:, 1])) <= TOL
        assert (
            max_diff(
                model.forward_head(tokens, pre_logits=True),
                ref.forward_head(ref_tokens, pre_logits=True),
            )
            <= TOL
        )


@pytest.mark.parametrize("name,size", [("deit_tiny_distilled_patch16_224", 288), ("deit_small_patch16_224", 160)])
def test_position_embedding_resampling_matches_timm(tmp_path, name, size):
    src = timm_model(name)
    torch.save(src.state_dict(), tmp_path / "t.pth")
    ref = timm.create_model(name, pretrained=False, img_size=size).eval()
    filter_fn = timm.models.deit.checkpoint_filter_fn
    ref.load_state_dict(filter_fn(src.state_dict(), ref))
    model = deit_cli.load_model(str(tmp_path / "t.pth"), image_size=size)
    assert model.config.image_size == size and model.preprocessing.image_size == size
    x = images(1, size)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


def test_reduced_precision_and_device_arguments(tmp_path):
    ref = timm_model("deit_tiny_patch16_224")
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    model = deit_cli.load_model(str(tmp_path / "t.pth"), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    x = images(4)
    with torch.no_grad():
        ours = model(x.bfloat16()).float()
        base = ref(x)
    assert (ours.argmax(-1) == base.argmax(-1)).float().mean() >= 0.75
    assert max_diff(ours, base) < 0.25 * base.abs().max().item()


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"])
def test_pools_mean_what_timm_means(tmp_path, name):
    """--pool avg is timm's global_pool="avg" (the patch tokens' mean), --pool token is
    timm's forward_head(pre_logits=True)."""
    from deit_cli.engine.features import pool_tokens

    ref = timm_model(name)
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    model = deit_cli.load_model(str(tmp_path / "t.pth"))
    # timm's pooling on the final-normed tokens (fc_norm=False; with its default fc_norm
    # it moves the norm after the pooling: another model)
    avg_ref = timm_model(name, global_pool="avg", fc_norm=False) if "distilled" not in name else None
    x = images(2)
    with torch.no_grad():
        tokens = model.forward_features(x)
        ref_tokens = ref.forward_features(x)
        token = pool_tokens(tokens, "token", model.config)
        assert max_diff(token, ref.forward_head(ref_tokens, pre_logits=True)) <= TOL
        avg = pool_tokens(tokens, "avg", model.config)
        assert max_diff(avg, ref_tokens[:, model.config.num_prefix_tokens :].mean(1)) <= TOL
        if avg_ref is not None:  # the same weights under global_pool="avg"
            avg_ref.load_state_dict(ref.state_dict())
            assert max_diff(avg, avg_ref.forward_head(avg_ref.forward_features(x), pre_logits=True)) <= TOL
