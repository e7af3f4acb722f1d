"""DeiT III (Touvron, Cord, Jégou 2022) in the one DeiT model: LayerScale and a patch-only
position embedding, read from timm's, the release's and mmpretrain's layouts and from a timm
hub repo, and run by every inference command. timm's deit3_* is the reference; every model
here has random weights with LayerScale far from its init (`randomize`), so that a model
that dropped it, or added the position embedding to the class token, would be caught."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import images, randomize
from fakehub import fake_hub, hf_env  # noqa: F401 - fixtures
from PIL import Image
from references import TOL, max_diff, timm_model
from safetensors.torch import load_file, save_file

import deit_cli
from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.config import LAYER_SCALE_INIT, DeiTConfig
from deit_cli.engine import runner as runner_module
from deit_cli.images.transform import eval_transform
from deit_cli.model import DeiT, resample_pos_embed
from deit_cli.variants import VARIANTS, find_variant, variant_for_config

DEIT3 = [v for v in VARIANTS if v.family == "DeiT III"]
SMALL = "deit3_small_patch16_224"
# A small DeiT III for the commands: timm's deit3_small at 64 pixels, 2 blocks, 5 classes
# (384 wide: 6 heads of 64, which the shapes alone imply).
LITTLE = dict(img_size=64, depth=2, num_classes=5)
LABELS = ["apple", "bear", "cat", "dog", "eel"]


def gammas_far_from_init(model: torch.nn.Module) -> None:
    gammas = [p for n, p in model.named_parameters() if "gamma" in n]
    assert gammas and all((g - LAYER_SCALE_INIT).abs().mean() > 1e-2 for g in gammas)


@pytest.fixture(scope="module")
def small_ref():
    """timm's deit3_small_patch16_224 (the released architecture), random weights."""
    ref = timm_model(SMALL)
    gammas_far_from_init(ref)
    return ref


@pytest.fixture(scope="module")
def little(tmp_path_factory):
    """(timm reference, its weights in timm's layout as a bare safetensors file,
    the same as a deit-converted file with labels)."""
    ref = timm_model(SMALL, seed=3, **LITTLE)
    d = tmp_path_factory.mktemp("deit3")
    bare = d / "deit3-little.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(bare))
    model = deit_cli.load_model(str(bare))
    model.labels = list(LABELS)
    labelled = d / "deit3-little-labelled.safetensors"
    save_safetensors(labelled, model.state_dict(), deit_metadata(model))
    return ref, bare, labelled


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = d / LABELS[i] / f"{i}.png"
        p.parent.mkdir()
        Image.fromarray(rng.integers(0, 256, (50 + 9 * i, 70 - 5 * i, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def reference_batch(model: DeiT, paths: list[Path]) -> torch.Tensor:
    """The images as our evaluation transform makes them (what every command feeds the model)."""
    t = eval_transform(model.preprocessing)
    return torch.stack([t(Image.open(p).convert("RGB")) for p in paths])


# --------------------------------------------------------------------------- the config


def test_a_config_written_before_deit3_still_loads_and_means_the_same():
    old = {k: v for k, v in DeiTConfig().to_dict().items() if k not in ("layer_scale_init", "pos_embed_prefix")}
    cfg = DeiTConfig.from_dict(old)
    assert cfg.layer_scale_init is None and cfg.pos_embed_prefix and cfg.num_pos_prefix_tokens == 2
    m = DeiT(cfg)
    assert m.pos_embed.shape[1] == 2 + cfg.num_patches
    assert not [n for n in m.state_dict() if "gamma" in n]
    new = DeiTConfig(distilled=False, layer_scale_init=1e-4, pos_embed_prefix=False)
    assert DeiTConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    with pytest.raises(ValueError):
        DeiTConfig(layer_scale_init=0.0)


def test_init_puts_every_gamma_at_the_config_value():
    m = DeiT(DeiTConfig(image_size=32, embed_dim=64, depth=2, num_heads=2, layer_scale_init=1e-4))
    with torch.no_grad():
        randomize(m)
    m.init_weights(seed=0)
    gammas = [p for n, p in m.named_parameters() if n.endswith(("ls1.gamma", "ls2.gamma"))]
    assert len(gammas) == 4 and all(bool((g == 1e-4).all()) for g in gammas)


# --------------------------------------------------------------------------- the model is timm's


def test_model_equals_timm_and_training_forward_prefix_matches(small_ref):
    x = images(2)
    cfg = find_variant(SMALL).config
    model = DeiT(cfg).eval()
    model.load_state_dict(small_ref.state_dict())  # timm's keys are the canonical ones
    with torch.no_grad():
        assert max_diff(model(x), small_ref(x)) <= TOL
        assert max_diff(model.forward_features(x), small_ref.forward_features(x)) <= TOL
        # what training runs on the last block: the prefix rows only
        h = model.embed(x)
        for block in model.blocks[:-1]:
            h = block(h)
        last = model.blocks[-1]
        assert max_diff(last.forward_prefix(h, 1), last(h)[:, :1]) <= 1e-5
        # dropping LayerScale, or adding the position embedding to the class token, is caught
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
        assert max_diff(model(x), small_ref(x)) > 1e-2


def test_a_distilled_deit3_embeds_and_runs_its_prefix_rows_alike():
    # timm has no reference for this (its distilled model gives pos_embed prefix slots whatever
    # no_embed_class says): the prefix tokens enter unembedded, the patches with pos_embed
    cfg = DeiTConfig(image_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=7, layer_scale_init=1e-6)
    model = randomize(DeiT(replace(cfg, pos_embed_prefix=False)))
    x = images(3, 64)
    with torch.no_grad():
        h = model.embed(x)
        assert torch.equal(h[:, 0], model.cls_token[0].expand(3, -1))
        assert torch.equal(h[:, 1], model.dist_token[0].expand(3, -1))
        assert max_diff(h[:, 2:], model.patch_embed(x) + model.pos_embed) == 0
        assert max_diff(model.blocks[0].forward_prefix(h, 2), model.blocks[0](h)[:, :2]) <= 1e-5


@pytest.mark.parametrize("variant", DEIT3, ids=lambda v: v.name)
def test_every_variant_is_timms_architecture_with_the_published_cost(variant):
    with torch.device("meta"):
        ref = timm.create_model(variant.name.split(".")[0], pretrained=False)
        ours = DeiT(variant.config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert ref.blocks[0].attn.num_heads == variant.config.num_heads
    params = sum(p.numel() for p in ours.parameters())
    assert params / 1e6 == pytest.approx(variant.params_m, rel=0.01)
    assert variant.config.macs_per_image() / 1e9 == pytest.approx(variant.gmacs, rel=0.01)
    assert variant.preprocessing.crop_pct == 1.0 and variant.top5 is None
    assert variant.hub_repo == f"timm/{variant.name.split('.')[0]}.{'fb_' + variant.pretrain.replace('-', '_')}"


def test_names_aliases_and_hub_ids_find_both_weight_sets():
    one, both = find_variant("deit3-base-384"), find_variant("deit3-base-384-21k")
    assert one.name == "deit3_base_patch16_384" and one.pretrain == "in1k" and one.top1 == 85.0
    assert both.name == "deit3_base_patch16_384.fb_in22k_ft_in1k" and both.top1 == 86.7
    assert find_variant("timm/deit3_base_patch16_384.fb_in22k_ft_in1k") is both
    assert find_variant("deit3_base_patch16_384_in21ft1k") is both  # timm's deprecated name
    assert find_variant("deit3_small_patch16_224.fb_in1k") is find_variant("deit3-small")
    # an architecture is recognised as DeiT III, never as the DeiT of the same shape
    assert variant_for_config(find_variant("deit-small").config).family == "DeiT"
    assert variant_for_config(find_variant("deit3-small").config).name == SMALL
    assert len(DEIT3) == 16


# --------------------------------------------------------------------------- layouts


def _release_keys(sd: dict) -> dict:
    """timm's deit3 keys -> the DeiT III release's (models_v2: gamma_1 / gamma_2 on the block)."""
    return {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()}


def _mmpretrain_keys(sd: dict) -> dict:
    """timm's deit3 keys -> mmpretrain's DeiT3 backbone and linear head."""
    rules = [
        (r"^blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
        (r"^blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
        (r"^blocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn."),
        (r"^blocks\.(\d+)\.ls1\.gamma$", r"backbone.layers.\1.attn.gamma1.weight"),
        (r"^blocks\.(\d+)\.ls2\.gamma$", r"backbone.layers.\1.ffn.gamma2.weight"),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
        (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (r"^norm\.", "backbone.ln1."),
        (r"^(cls_token|pos_embed)$", r"backbone.\1"),
        (r"^head\.", "head.layers.head."),
    ]
    import re

    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, k)
            if n:
                out[new] = v
                break
        else:
            raise AssertionError(k)
    out["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53])
    return out


@pytest.mark.parametrize("layout", ["timm", "deit3-release", "mmpretrain"])
def test_each_layout_gives_timms_logits(tmp_path, small_ref, layout):
    sd = small_ref.state_dict()
    if layout == "timm":
        path = tmp_path / "deit3.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "deit3-release":
        path = tmp_path / "deit_3_small_224_1k.pth"
        torch.save({"model": _release_keys(sd), "epoch": 799}, path)
    else:
        path = tmp_path / "mm.pth"
        torch.save({"state_dict": _mmpretrain_keys(sd)}, path)
    model = deit_cli.load_model(str(path))
    assert model.layout == layout
    cfg = model.config
    assert cfg.layer_scale_init == LAYER_SCALE_INIT and not cfg.pos_embed_prefix and not cfg.distilled
    assert model.variant is not None and model.variant.name == SMALL
    assert model.preprocessing.crop_pct == 1.0 and model.labels[281] == "tabby, tabby cat"
    x = images(2)
    with torch.no_grad():
        assert max_diff(model(x), small_ref(x)) <= TOL


def test_a_new_image_size_resamples_the_patch_only_position_embedding(little):
    ref, bare, _ = little
    model = deit_cli.load_model(str(bare), image_size=96)
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(ref.pos_embed, (6, 6), num_prefix_tokens=0)
    assert max_diff(model.pos_embed, expected) <= 1e-5
    assert max_diff(resample_pos_embed(ref.pos_embed, 6, 0), expected) <= 1e-5
    big = timm_model(SMALL, seed=3, **{**LITTLE, "img_size": 96})
    big.load_state_dict({**ref.state_dict(), "pos_embed": expected})
    x = images(1, 96)
    with torch.no_grad():
        assert max_diff(model(x), big(x)) <= TOL


def test_convert_to_transformers_is_refused_in_one_line_and_to_timm_is_timms(run_cli, little, tmp_path):
    ref, bare, _ = little
    rc, out, err = run_cli("convert", bare, tmp_path / "hf", "--to", "hf")
    assert rc == 2 and out == "" and not (tmp_path / "hf").exists()
    assert len(err.strip().splitlines()) == 1 and "--to deit" in err and "--to timm" in err
    rc, _, err = run_cli("convert", bare, tmp_path / "t.safetensors", "--to", "timm", "--quiet")
    assert rc == 0, err
    net = timm.create_model(SMALL, pretrained=False, **LITTLE).eval()
    net.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)  # timm reads it as it is
    x = images(2, 64)
    with torch.no_grad():
        assert max_diff(net(x), ref(x)) <= TOL


# --------------------------------------------------------------------------- a timm hub repo


def _timm_repo(model: torch.nn.Module, d: Path, labels: list[str] | None = None) -> Path:
    from timm.models._hub import save_for_hf

    save_for_hf(model, d, model_config={"label_names": labels} if labels else None, safe_serialization=True)
    return d


def test_a_registry_name_downloads_timms_repo(fake_hub, small_ref, tmp_path):  # noqa: F811
    repo = "timm/deit3_small_patch16_224.fb_in1k"
    fake_hub.serve_repos({repo: _timm_repo(small_ref, tmp_path / "repo")})
    for source in ("deit3-small", repo):
        model = deit_cli.load_model(source)
        assert model.variant.hub_repo == repo and model.layout == "timm"
        # the registry's preprocessing (the release's crop 1.0), not the repo's pretrained_cfg (0.9)
        assert model.preprocessing.crop_pct == 1.0
        x = images(1)
        with torch.no_grad():
            assert max_diff(model(x), small_ref(x)) <= TOL
    assert fake_hub.count("GET") >= 2  # model.safetensors and config.json


def test_any_timm_repo_reads_its_config_labels_and_preprocessing(fake_hub, little, tmp_path):  # noqa: F811
    ref, _, _ = little
    fake_hub.serve_repos({"someone/deit3-pets": _timm_repo(ref, tmp_path / "repo", LABELS)})
    model = deit_cli.load_model("someone/deit3-pets")
    assert model.labels == LABELS and model.config.num_classes == 5 and model.config.image_size == 64
    assert model.config.num_heads == 6 and model.config.layer_scale_init is not None
    pre = model.preprocessing  # timm's pretrained_cfg, as written by save_for_hf
    assert (pre.image_size, pre.crop_pct, pre.interpolation) == (64, 0.9, "bicubic")
    x = images(2, 64)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


def test_a_timm_repo_pooling_patches_is_refused(fake_hub, little, tmp_path):  # noqa: F811
    ref, _, _ = little
    d = _timm_repo(ref, tmp_path / "repo")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "global_pool": "avg"}))
    fake_hub.serve_repos({"someone/deit3-avg": d})
    with pytest.raises(deit_cli.errors.CheckpointError, match="global_pool 'avg'"):
        deit_cli.load_model("someone/deit3-avg")


# --------------------------------------------------------------------------- the fast runner


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_runner_stays_close(little, dtype):
    ref, bare, _ = little
    model = deit_cli.load_model(str(bare))
    if dtype == "fp16" and not runner_module._onednn_ok(torch.float16):
        pytest.skip("fp16 is emulated on this CPU")
    run = runner_module.prepare(model, device="cpu", dtype=dtype)
    x = images(4, 64)
    with torch.no_grad():
        expected = ref(x)
    out = run(x, "cls")
    assert max_diff(out, expected) <= 0.1 * expected.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_paths_match_timm(little, dtype):
    ref, bare, _ = little
    torch.backends.cuda.matmul.allow_tf32 = False
    run = runner_module.prepare(deit_cli.load_model(str(bare)), device="cuda", dtype=dtype)
    x = images(4, 64)
    with torch.no_grad():
        expected = ref(x)
        tokens = ref.forward_features(x)
    tol = TOL if dtype == "fp32" else 0.1 * expected.abs().max().item()
    for _ in range(2):  # capture, then replay
        assert max_diff(run(x, "cls").cpu(), expected) <= tol
        assert max_diff(run.features(x).cpu(), tokens) <= (TOL if dtype == "fp32" else 0.1 * tokens.abs().max())


# --------------------------------------------------------------------------- every command


def test_classify_gives_timms_probabilities(run_cpu, little, pictures):
    ref, _, labelled = little
    rc, out, err = run_cpu("classify", *pictures, "--model", labelled, "--format", "jsonl", "--top", "5")
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    x = reference_batch(deit_cli.load_model(str(labelled)), pictures)
    with torch.no_grad():
        probs = ref(x).softmax(-1)
    for r, p in zip(records, probs):
        got = {q["label"]: q["score"] for q in r["predictions"]}
        assert got == pytest.approx({LABELS[i]: p[i].item() for i in range(5)}, abs=1e-5)


@pytest.mark.parametrize("pool", ["token", "cls", "avg", "tokens"])
def test_extract_features_pools_as_timm(run_cpu, little, pictures, tmp_path, pool):
    ref, bare, _ = little
    dst = tmp_path / "f.npy"
    rc, _, err = run_cpu("extract-features", *pictures, "--model", bare, "--pool", pool, "-o", dst)
    assert rc == 0, err
    x = reference_batch(deit_cli.load_model(str(bare)), pictures)
    with torch.no_grad():
        tokens = ref.forward_features(x)
    expected = {
        "token": ref.forward_head(tokens, pre_logits=True),
        "cls": tokens[:, 0],
        "avg": tokens[:, 1:].mean(1),
        "tokens": tokens,
    }[pool]
    np.testing.assert_allclose(np.load(dst), expected.numpy(), atol=1e-4)


def test_extract_features_refuses_the_distillation_pool(run_cpu, little, pictures, tmp_path):
    _, bare, _ = little
    rc, _, err = run_cpu("extract-features", *pictures, "--model", bare, "--pool", "dist", "-o", tmp_path / "f.npy")
    assert rc == 2 and "distillation token" in err


def test_eval_agrees_with_classify(run_cpu, little, pictures):
    _, _, labelled = little
    rc, out, err = run_cpu("eval", pictures[0].parent.parent, "--model", labelled, "--json", "--topk", "1,5")
    assert rc == 0, err
    summary = json.loads(out)
    rc, out, _ = run_cpu("classify", *pictures, "--model", labelled, "--format", "jsonl", "--top", "1")
    top1 = [json.loads(line)["predictions"][0]["label"] for line in out.splitlines()]
    right = sum(label == p.parent.name for label, p in zip(top1, pictures))
    assert summary["correct"] == {"top1": right, "top5": 5}  # 5 classes: top-5 is every image
    assert summary["top1"] == pytest.approx(100 * right / 5)


def test_bench_compares_with_timms_deit3(run_cli):
    rc, out, err = run_cli(
        "bench",
        "--model",
        "deit3-small",
        "--random-init",
        "--image-size",
        "64",
        "--batch",
        "2",
        "--compare",
        "timm,transformers",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--iters",
        "1",
        "--json",
    )
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["impl"] for r in rows] == ["deit", "timm"]  # transformers has no DeiT III: skipped, said why
    assert rows[1]["max_abs_diff"] <= TOL
    assert "transformers" in err and "DeiT III" in err
    assert rows[0]["params"] / 1e6 == pytest.approx(22.0, rel=0.02)


def test_export_onnx_runs_in_onnxruntime_as_timm(run_cli, little, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ref, bare, _ = little
    dst = tmp_path / "deit3.onnx"
    rc, out, err = run_cli("export", bare, dst, "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["max_abs_diff"] <= summary["tolerance"]
    x = images(3, 64)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert max_diff(torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0]), ref(x)) <= 2e-4


def test_explain_gives_timms_attention_and_tokens(run_cpu, little, pictures, tmp_path):
    """explain's own forward (explicit attention, LayerScale on both branches) equals timm's
    deit3 attention probabilities and tokens, block for block; the command maps the class token."""
    from deit_cli.engine.explain import attention_probabilities

    ref, _, labelled = little
    model = deit_cli.load_model(str(labelled))
    x = reference_batch(model, pictures[:2])
    theirs = []
    for block in ref.blocks:
        block.attn.fused_attn = False  # timm's explicit path: softmax, then attn_drop (identity here)
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: theirs.append(args[0].detach()))
    with torch.no_grad():
        want_tokens = ref.forward_features(x)
    tokens, ours = attention_probabilities(model, x)
    assert len(ours) == len(theirs) == len(ref.blocks)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() < 1e-5
    assert (tokens - want_tokens).abs().max() < 1e-4
    rc, out, err = run_cpu("explain", pictures[0], "-m", labelled, "-o", tmp_path / "maps", "-F", "jsonl", "--raw")
    assert rc == 0, err
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["tokens"] == ["cls"] and (tmp_path / "maps").is_dir()
