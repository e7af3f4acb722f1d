"""DeiT III training (`--recipe deit3`, `--recipe deit3-finetune`), piece by piece against the
references the release runs: LAMB against timm's `Lamb` (apex FusedLAMB's settings), each
3-Augment op against the library op the release calls on the same image and draws, the
binarized-target BCE step against a step written here from timm's deit3, the uniform drop
path and the initialisation against models_v2's rules; then the recipes as data and a tiny
end-to-end run."""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from conftest import randomize
from PIL import Image, ImageFilter, ImageOps
from test_train import make_set
from training import ARCH, load_weights, records

from deit_cli.config import LAYER_SCALE_INIT, DeiTConfig
from deit_cli.engine.peers import timm_module
from deit_cli.engine.train.augment import (
    Mixup,
    ThreeAugment,
    color_jitter,
    simple_crop,
    simple_crop_offsets,
)
from deit_cli.engine.train.losses import BinarizedBCE, DistillationLoss, base_loss
from deit_cli.engine.train.optim import Lamb, build_optimizer, param_groups
from deit_cli.engine.train.recipes import SIZES, for_model, resolve_recipe
from deit_cli.engine.train.student import TrainingHeads
from deit_cli.model import DeiT
from deit_cli.variants import Preprocessing, find_variant

timm = pytest.importorskip("timm")
from timm.optim import Lamb as TimmLamb

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny DeiT III: LayerScale at the release's 1e-4, the position embedding on the patches only
TINY3 = DeiTConfig(**ARCH, distilled=False, num_classes=3, layer_scale_init=LAYER_SCALE_INIT, pos_embed_prefix=False)


def release_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The release's groups (timm's add_weight_decay with models_v2's no_weight_decay()):
    no decay for 1-D parameters, biases, pos_embed and cls_token."""
    skip = {"pos_embed", "cls_token", "dist_token"}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# --------------------------------------------------------------------------- LAMB


def test_our_groups_are_the_releases():
    model = DeiT(TINY3)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [{names[id(p)] for p in g["params"]} for g in sorted(param_groups(model, 0.05), key=_wd)]
    want = [{names[id(p)] for p in g["params"]} for g in sorted(release_groups(model, 0.05), key=_wd)]
    assert ours == want
    assert {"cls_token", "pos_embed", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "norm.weight"} <= ours[0]


def _wd(group):
    return group["weight_decay"]


@pytest.mark.parametrize("scale", [0.01, 30.0], ids=["norm-below-1", "norm-clipped"])
def test_lamb_equals_timms_over_several_steps(scale):
    """Same parameters, same gradients, five steps (a learning-rate change between them):
    equal to timm's Lamb with eps 1e-8 and max_grad_norm 1 (apex FusedLAMB's) within float
    rounding, whether the global norm is clipped or not."""
    torch.manual_seed(0)
    ours_model = randomize(DeiT(TINY3), 1)
    ref_model = DeiT(TINY3)
    ref_model.load_state_dict(ours_model.state_dict())
    ours = Lamb(param_groups(ours_model, 0.05), lr=4e-3, eps=1e-8, max_grad_norm=1.0)
    ref = TimmLamb(release_groups(ref_model, 0.05), lr=4e-3, eps=1e-8, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        for (_, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad, q.grad = grad.clone(), grad.clone()
        lr = 4e-3 * (step + 1) / 5
        for opt in (ours, ref):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
    start = randomize(DeiT(TINY3), 1).state_dict()
    for (name, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        assert (p - start[name]).abs().max() > 0, f"{name} did not move"
        assert torch.allclose(p, q, rtol=0, atol=1e-6), f"{name}: {(p - q).abs().max():.3g}"


def test_lamb_leaves_the_gradients_and_resumes_from_its_state():
    model = randomize(DeiT(TINY3), 1)
    opt = Lamb(param_groups(model, 0.05), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    opt.step()
    assert all(torch.equal(p.grad, torch.full_like(p, 5.0)) for p in model.parameters())
    twin = DeiT(TINY3)
    twin.load_state_dict(model.state_dict())
    opt2 = Lamb(param_groups(twin, 0.05), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as checkpoint.pt carries it
    for m, o in ((model, opt), (twin, opt2)):
        for p in m.parameters():
            p.grad = torch.full_like(p, -1.0)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_the_recipe_builds_lamb_with_the_releases_settings():
    recipe = for_model(resolve_recipe("deit3", {}), TINY3, scratch=True)
    opt = build_optimizer(DeiT(TINY3), recipe, torch.device("cpu"))
    assert isinstance(opt, Lamb) and opt.max_grad_norm == 1.0
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    assert all(g["eps"] == 1e-8 and g["lr"] == 4e-3 for g in opt.param_groups)


# --------------------------------------------------------------------------- 3-Augment


def photo(seed: int = 0, size=(53, 41)) -> Image.Image:
    """A smooth image with edges (blur, solarization and the crop all show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    a = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) % 64 * 4], -1) + rng.normal(0, 25, (*x.shape, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# The release's secondary ops (augment.py), written out: each draws `random.random()` against
# its p (1.0 in 3-Augment), the blur its radius; RandomChoice picks one with `random.choices`.
class ReleaseGrayScale:
    def __call__(self, img):
        return T.Grayscale(3)(img) if random.random() < 1.0 else img


class ReleaseSolarization:
    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < 1.0 else img


class ReleaseGaussianBlur:
    def __call__(self, img):
        if not random.random() <= 1.0:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def test_each_3augment_op_equals_the_releases_on_the_same_draws():
    """The crop-free 3-Augment (colour jitter off) on one image, for seeds that pick each of
    the three ops: pixel for pixel what the release's RandomChoice gives from the global
    generator seeded alike (flip and crop at full size, so they draw but do not change)."""
    img = photo(1, size=(32, 32))
    release = T.RandomChoice([ReleaseGrayScale(), ReleaseSolarization(), ReleaseGaussianBlur()])
    ours = ThreeAugment(Preprocessing(32), color_jitter=0.0)
    picked = set()
    for seed in range(12):
        random.seed(seed)
        want = release(img)
        rng = random.Random(seed)
        picked.add(int(random.Random(seed).random() * 3))
        got = ours.secondary(img, rng)
        assert np.array_equal(np.asarray(got), np.asarray(want)), seed
    assert picked == {0, 1, 2}
    # each op is the library op
    assert np.array_equal(np.asarray(ours.secondary(img, _forcing(0))), np.asarray(T.Grayscale(3)(img)))
    assert np.array_equal(np.asarray(ours.secondary(img, _forcing(1))), np.asarray(ImageOps.solarize(img, 128)))


def _forcing(op: int) -> random.Random:
    """A generator whose first draw picks `op`."""
    for seed in range(100):
        if int(random.Random(seed).random() * 3) == op:
            return random.Random(seed)
    raise AssertionError


def test_color_jitter_equals_torchvisions_on_the_same_draws():
    img = photo(2)
    cj = T.ColorJitter(0.3, 0.3, 0.3)
    for seed in range(6):
        torch.manual_seed(seed)
        want = cj(img)
        torch.manual_seed(seed)
        order, b, c, s, h = T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
        assert h is None
        got = color_jitter(img, order.tolist(), b, c, s)
        assert np.array_equal(np.asarray(got), np.asarray(want)), seed


@pytest.mark.parametrize("size", [(53, 41), (41, 53), (40, 40)], ids=["wide", "tall", "square"])
def test_the_simple_crop_equals_torchvisions_on_the_same_offsets(size):
    img = photo(3, size)
    release = T.Compose(
        [T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.RandomCrop(32, padding=4, padding_mode="reflect")]
    )
    for seed in range(5):
        torch.manual_seed(seed)
        want = release(img)
        torch.manual_seed(seed)
        padded = TF.pad(T.Resize(32, interpolation=T.InterpolationMode.BICUBIC)(img), 4, padding_mode="reflect")
        top, left, _, _ = T.RandomCrop.get_params(padded, (32, 32))
        assert np.array_equal(np.asarray(simple_crop(img, 32, top, left)), np.asarray(want))
    # our offsets cover torchvision's range, both ends included
    rng = random.Random(0)
    offsets = {simple_crop_offsets(img.size, 32, rng) for _ in range(3000)}
    w, h = (32, int(32 * size[1] / size[0])) if size[0] <= size[1] else (int(32 * size[0] / size[1]), 32)
    assert {t for t, _ in offsets} == set(range(h + 8 - 32 + 1))
    assert {x for _, x in offsets} == set(range(w + 8 - 32 + 1))


def test_three_augment_is_reproducible_per_sample_and_uint8():
    """The augmented image's pixels as uint8 (normalised later, on the device)."""
    t = ThreeAugment(Preprocessing(32), color_jitter=0.3)
    img = photo(4, size=(60, 45))
    a, b = t(img, random.Random(7)), t(img, random.Random(7))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, t(img, random.Random(8)))
    assert ThreeAugment(Preprocessing(32), simple=True)(img, random.Random(0)).shape == (3, 32, 32)


# --------------------------------------------------------------------------- the loss and the step


def test_binarized_bce_is_the_releases_loss():
    """engine.py's `targets.gt(0.0).type(targets.dtype)` then BCEWithLogitsLoss, for mixed
    targets and for class indices (one-hot)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    _, mixed = Mixup(0.8, 1.0, 0.5, 0.0, 5).mix(x, y, 0.7, None)
    want = torch.nn.BCEWithLogitsLoss()(logits, mixed.gt(0.0).type(mixed.dtype))
    assert torch.allclose(BinarizedBCE()(logits, mixed), want, atol=0, rtol=1e-6)
    onehot = torch.nn.functional.one_hot(y, 5).float()
    assert torch.allclose(BinarizedBCE()(logits, y), torch.nn.BCEWithLogitsLoss()(logits, onehot), rtol=1e-6)
    with pytest.raises(ValueError, match="smoothing 0"):
        base_loss(soft_targets=True, smoothing=0.1, bce=True)


def test_multi_label_data_under_deit3_binarizes_its_mixed_label_sets():
    """Multi-hot targets mixed by mixup become the union of the pair's labels: the release's
    rule applied to lists of labels (base_loss picks the binarized BCE for them too)."""
    assert isinstance(base_loss(soft_targets=True, smoothing=0.0, multi_label=True, bce=True), BinarizedBCE)
    x = torch.zeros(2, 3, 4, 4)
    multi = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    _, mixed = Mixup(0.8, 0.0, 0.5, 0.0, 4).mix(x, multi, 0.9, None)
    assert torch.equal(mixed.gt(0).float(), torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2))


def test_one_deit3_step_equals_a_reference_step_from_timm():
    """Mixup (drawn), the binarized BCE on the class head, LAMB: our Stepper's step against
    timm's deit3 with the same weights, loss and timm's Lamb written here."""
    from deit_cli.engine.train.step import Stepper

    model = randomize(DeiT(TINY3), 3)
    ref = timm_module(TINY3)  # timm's deit3 architecture: VisionTransformer, no_embed_class, LayerScale
    ref.load_state_dict(model.state_dict())  # our keys are timm's
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    recipe = for_model(resolve_recipe("deit3", {"drop_path": 0.0}), TINY3, scratch=True)
    mixup = Mixup(recipe.mixup, recipe.cutmix, recipe.mixup_switch_prob, recipe.smoothing, 3)
    model.train()
    stepper = Stepper(
        TrainingHeads(model),
        model,
        None,
        DistillationLoss(base_loss(soft_targets=True, smoothing=0.0, bce=True)),
        build_optimizer(model, recipe, torch.device("cpu")),
        torch.amp.GradScaler("cpu", enabled=False),
        None,
        mixup,
        device=torch.device("cpu"),
        amp_dtype=None,
        grad_accum=1,
        clip_grad=None,
        world=1,
    )
    stepper.step(x, y, 6, mix_seed=11, global_step=0)

    # the reference: the same mixed batch (Mixup's draws, proven against timm's in
    # test_augment_parity), the release's loss and optimizer
    xm, ym = mixup(x, y, np.random.default_rng(11))
    assert ym.gt(0).sum(1).max() == 2  # pairs of classes: binarization matters
    ref.train()
    loss = torch.nn.BCEWithLogitsLoss()(ref(xm), ym.gt(0.0).type(ym.dtype))
    loss.backward()
    opt = TimmLamb(release_groups(ref, 0.05), lr=4e-3, eps=1e-8, max_grad_norm=1.0)
    opt.step()
    theirs = ref.state_dict()
    d = TINY3.embed_dim
    for name, w in model.state_dict().items():
        diff = (w - theirs[name]).abs()
        if name.endswith("attn.qkv.bias"):
            # the key biases' exact gradient is zero (softmax ignores a shift): Adam's step on
            # rounding noise is up to one lr either way
            assert diff[d : 2 * d].max() <= 4e-3 * 1.001, name
            diff = torch.cat([diff[:d], diff[2 * d :]])
        assert diff.max() <= 2e-6, f"{name}: {diff.max():.3g}"


# --------------------------------------------------------------------------- drop path, init


def test_uniform_drop_path_is_the_releases_rule_and_linear_stays():
    model = DeiT(replace(TINY3, depth=4))
    model.set_drop_path(0.2, uniform=True)
    assert [b.drop_path for b in model.blocks] == [0.2] * 4  # models_v2: dpr = [rate] * depth
    model.set_drop_path(0.3)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_scratch_init_is_models_v2s_per_tensor():
    """models_v2's vit_models: pos_embed and cls_token trunc normal 0.02, Linear weights trunc
    normal 0.02 with zero biases, LayerNorm 1/0, every LayerScale at 1e-4, the patch convolution
    at PyTorch's default; applied here to timm's deit3 as the reference."""
    from test_init_parity import mismatches

    cfg = find_variant("deit3_small_patch16_224").config
    assert cfg.layer_scale_init == 1e-4 and not cfg.pos_embed_prefix
    ours = DeiT(cfg)
    ours.init_weights(seed=1)
    torch.manual_seed(0)
    ref = timm.create_model("deit3_small_patch16_224", pretrained=False)
    with torch.no_grad():
        torch.nn.init.trunc_normal_(ref.pos_embed, std=0.02)
        torch.nn.init.trunc_normal_(ref.cls_token, std=0.02)  # timm draws 1e-6; the release 0.02
        ref.patch_embed.proj.reset_parameters()
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.LayerNorm):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1e-4)
    assert mismatches(ours.state_dict(), ref.state_dict()) == []


def test_scratch_from_a_deit3_name_gets_the_releases_layer_scale(tmp_path):
    from deit_cli.engine.train.options import Events, TrainOptions
    from deit_cli.engine.train.student import build_student

    opts = TrainOptions(
        data="x", run_dir=tmp_path, recipe=resolve_recipe("deit3", {}), model="deit3_small_patch16_224", scratch=True
    )
    model = build_student(opts, ["a", "b"], Events())
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 24 and all(torch.all(g == 1e-4) for g in gammas)
    assert model.pos_embed.shape == (1, 196, 384) and model.head.out_features == 2


# --------------------------------------------------------------------------- the recipes


@pytest.mark.parametrize(
    ("name", "lr", "drop_path", "size"),
    [
        ("deit3_small_patch16_224", 4e-3, 0.05, 224),
        ("deit3_medium_patch16_224", 4e-3, 0.05, 224),
        ("deit3_base_patch16_224", 3e-3, 0.2, 192),
        ("deit3_large_patch16_224", 3e-3, 0.45, 192),
        ("deit3_huge_patch14_224", 3e-3, 0.6, 160),
    ],
)
def test_deit3_takes_the_releases_values_by_size(name, lr, drop_path, size):
    cfg = find_variant(name).config
    r = for_model(resolve_recipe("deit3", {}), cfg, scratch=True)
    assert (r.peak_lr(), r.drop_path, r.image_size or cfg.image_size) == (lr, drop_path, size)
    assert (r.epochs, r.batch_size, r.weight_decay, r.warmup_epochs, r.warmup_lr, r.min_lr) == (
        800,
        2048,
        0.05,
        5,
        1e-6,
        1e-5,
    )
    assert (r.optimizer, r.bce, r.three_augment, r.color_jitter, r.smoothing, r.reprob) == (
        "lamb",
        True,
        True,
        0.3,
        0.0,
        0.0,
    )
    assert (r.mixup, r.cutmix, r.repeated_aug, r.drop_path_schedule, r.unscale_lr) == (0.8, 1.0, 3, "uniform", True)
    # the flags win; the lr is not scaled by the batch
    r = for_model(resolve_recipe("deit3", {"lr": 1e-3, "drop_path": 0.1, "batch_size": 256}), cfg, scratch=True)
    assert (r.peak_lr(), r.drop_path) == (1e-3, 0.1)
    assert for_model(resolve_recipe("deit3", {"batch_size": 256}), cfg, scratch=True).peak_lr() == lr
    # from pretrained weights the model keeps its size
    assert for_model(resolve_recipe("deit3", {}), cfg, scratch=False).image_size is None


def test_deit3_finetune_is_the_releases_command():
    r = resolve_recipe("deit3-finetune", {})
    assert (r.epochs, r.batch_size, r.peak_lr(), r.weight_decay, r.smoothing, r.rand_augment) == (
        20,
        512,
        1e-5,
        0.1,
        0.1,
        "rand-m9-mstd0.5-inc1",
    )
    assert (r.optimizer, r.three_augment, r.bce, r.repeated_aug, r.reprob, r.warmup_epochs) == (
        "adamw",
        False,
        False,
        1,
        0.0,
        5,
    )
    sized = {
        n: for_model(r, find_variant(n).config, scratch=False).drop_path
        for n in (
            "deit3_small_patch16_384",
            "deit3_base_patch16_224",
            "deit3_large_patch16_224",
            "deit3_huge_patch14_224",
        )
    }
    assert list(sized.values()) == [0.0, 0.2, 0.45, 0.55]
    assert set(SIZES) == {"deit3", "deit3-finetune"}


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--recipe", "deit3", "--smoothing", "0.1"], "--bce-loss needs --smoothing 0"),
        (["--bce-loss"], "--bce-loss needs --smoothing 0"),  # scratch smooths by 0.1
        (["--simple-crop"], "--simple-crop"),
    ],
)
def test_bad_combinations_are_refused_in_one_line(tmp_path, run_cpu, flags, words):
    rc, _, err = run_cpu("train", tmp_path, "-o", tmp_path / "run", *flags)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- end to end


def test_deit3_trains_from_scratch_then_fine_tunes(tmp_path, run_cpu):
    data = make_set(tmp_path / "data", 4, 2)
    cfg = tmp_path / "deit3.json"
    cfg.write_text(json.dumps(TINY3.to_dict()))
    rc, out, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "--recipe",
        "deit3",
        "--config",
        cfg,
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--json",
    )
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["recipe"] == "deit3" and all(math.isfinite(r["train_loss"]) for r in records(tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    recipe = ckpt["args"]["recipe"]
    assert (recipe["optimizer"], recipe["base_lr"], recipe["drop_path"], recipe["bce"]) == ("lamb", 4e-3, 0.05, True)
    assert set(ckpt["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert ckpt["preprocessing"]["crop_pct"] == 1.0  # validated uncropped, as the release evaluates
    final = load_weights(tmp_path / "run" / "model.safetensors")
    assert final["pos_embed"].shape == (1, 16, 32)
    assert not torch.all(final["blocks.0.ls1.gamma"] == 1e-4)  # LayerScale trained
    # a resume continues the sized recipe; a flag that would change it is refused
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "run", "--resume", "--drop-path", "0.3")
    assert rc == 2 and "--drop-path 0.3 (the run has 0.05)" in err, err
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "run", "--resume", "--epochs", "2", "-q")
    assert rc == 0, err
    assert len(records(tmp_path / "run")) == 2
    rc, out, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "ft",
        "--recipe",
        "deit3-finetune",
        "-m",
        tmp_path / "run" / "model.safetensors",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["recipe"] == "deit3-finetune"
