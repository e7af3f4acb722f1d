"""Every speed path agrees with the plain fp32 model: fp32 paths to float rounding,
bf16/fp16 within loose bounds that the test prints (max difference, top-1 agreement)."""

from __future__ import annotations

import pytest
import torch
from conftest import images, randomize

from deit_cli.engine import runner as runner_module
from deit_cli.model import DeiT, DeiTConfig

TOL = 1e-4
# Small DeiT shapes, so that every path (compile too) runs in seconds.
SMALL = dict(image_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=2, num_classes=100)


def small(seed: int = 0, **kw) -> DeiT:
    return randomize(DeiT(DeiTConfig(**{**SMALL, **kw})), seed).requires_grad_(False)


def reference(model: DeiT, x: torch.Tensor):
    with torch.no_grad():
        tokens = model.forward_features(x)
        heads = {h: model.forward_head(tokens, h) for h in heads_of(model)}
    return tokens, heads


def heads_of(model: DeiT) -> list[str]:
    return ["avg", "cls", "dist"] if model.config.has_dist_head else ["avg", "cls"]


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


ARCHS = {
    "distilled": {},
    "plain": dict(distilled=False),
    "distilled-no-dist-head": dict(dist_head=False),
    "headless": dict(num_classes=0),
    # DeiT III: LayerScale (randomize moves it far from its init) and a patch-only position embedding
    "deit3": dict(distilled=False, layer_scale_init=1e-4, pos_embed_prefix=False),
    "deit3-distilled": dict(layer_scale_init=1e-4, pos_embed_prefix=False),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("linear", ["onednn", "aten"])
def test_fp32_paths_match_the_model(arch, linear):
    if linear == "onednn" and not runner_module._onednn_ok(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    model = small(**ARCHS[arch])
    x = images(3, 64)
    tokens, heads = reference(model, x)
    fast = runner_module.FastDeiT(model, device=torch.device("cpu"), dtype=torch.float32, linear=linear)
    with torch.no_grad():
        assert max_diff(fast.features(x), tokens) <= TOL
        for head, logits in heads.items():
            assert max_diff(fast.logits(x, head), logits) <= TOL, head


def test_prepare_picks_the_fast_cpu_path_and_keeps_the_contract():
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(2, 64)
    tokens, heads = reference(model, x)
    runner = runner_module.prepare(model, device="cpu", dtype="fp32")
    assert runner.path == ("cpu-onednn" if runner_module._onednn_ok(torch.float32) else "cpu-eager")
    assert runner.config is model.config and runner.model is model
    assert not runner.shape_specialised  # one packing serves every batch size
    out = runner(x)
    assert out.dtype == torch.float32 and out.shape == (2, 100)
    assert max_diff(out, heads["avg"]) <= TOL
    assert max_diff(runner.logits(x, "dist"), heads["dist"]) <= TOL
    assert max_diff(runner.features(x), tokens) <= TOL
    # prepare never changes the model it is given
    assert model.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_any_batch_size_through_one_runner():
    model = small()
    runner = runner_module.prepare(model, device="cpu")
    for n in (1, 5, 2):
        x = images(n, 64, seed=n)
        _, heads = reference(model, x)
        assert max_diff(runner(x), heads["avg"]) <= TOL


def _low_precision_report(dtype: str, model: DeiT, x: torch.Tensor, **kw):
    _, heads = reference(model, x)
    runner = runner_module.prepare(model, device="cpu", dtype=dtype, **kw)
    out = runner(x)
    ref = heads["avg"]
    diff = max_diff(out, ref)
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"\n{dtype} {runner.path}: max |logit diff| {diff:.4f} (logit std {ref.std():.2f}), top-1 agreement {agree:.0%}"
    )
    return out, ref, diff, agree


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_stays_close(dtype):
    if dtype == "fp16" and not runner_module._onednn_ok(torch.float16):
        pytest.skip("fp16 is emulated on this CPU")
    model = small(embed_dim=96, depth=4, num_heads=3)
    x = images(32, 64, seed=1)
    out, ref, diff, agree = _low_precision_report(dtype, model, x)
    assert out.dtype == torch.float32
    bound = 0.1 if dtype == "bf16" else 0.02  # bf16 keeps 8 bits of mantissa, fp16 11
    assert diff <= bound * ref.abs().max().item()
    assert agree >= 0.9


def test_compile_path_matches_the_model():
    model = small(depth=2)
    x = images(2, 64)
    tokens, heads = reference(model, x)
    runner = runner_module.prepare(model, device="cpu", compile=True)
    assert runner.path.startswith("inductor") and runner.shape_specialised
    assert max_diff(runner(x), heads["avg"]) <= TOL
    assert max_diff(runner.features(x), tokens) <= TOL
    _, _, diff, agree = _low_precision_report("bf16", model, images(16, 64, seed=2), compile=True)
    assert agree >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_path_matches_the_model():
    model = small()
    x = images(4, 64)
    tokens, heads = reference(model, x)
    runner = runner_module.prepare(model, device="cuda", dtype="fp32")
    assert runner.path == "cuda-graphs" and runner.shape_specialised
    for _ in range(2):  # capture, then replay
        assert max_diff(runner(x).cpu(), heads["avg"]) <= 1e-3
    assert max_diff(runner.features(x).cpu(), tokens) <= 1e-3
    bf = runner_module.prepare(model, device="cuda", dtype="bf16")
    out = bf(x).cpu()
    assert (out.argmax(-1) == heads["avg"].argmax(-1)).float().mean() >= 0.75
