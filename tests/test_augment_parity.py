"""The training augmentation against timm's, the reference the DeiT release trained with.

Our transforms draw from a per-sample `random.Random` (timm: the global `random`, and
numpy's for RandAugment's choice of operations), so parity is shown given the same draws:
a `random.Random(s)` against timm after `random.seed(s)` (the same stream), and for the
draws timm takes from numpy, the same numbers fed to both or the same distribution.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from imagegen import noise, smooth
from PIL import Image

from deit_cli.engine.train import augment
from deit_cli.engine.train.augment import Mixup, RandAugment, TrainTransform, parse_rand_augment
from deit_cli.errors import UsageError
from deit_cli.variants import Preprocessing

aa = pytest.importorskip("timm.data.auto_augment")
from timm.data.mixup import Mixup as TimmMixup
from timm.data.mixup import cutmix_bbox_and_lam
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

SPEC = "rand-m9-mstd0.5-inc1"
MEAN = (0.485, 0.456, 0.406)
# what DeiT's create_transform(..., auto_augment=SPEC, interpolation="bicubic") gives RandAugment
HPARAMS = {
    "translate_const": int(224 * 0.45),
    "img_mean": tuple(round(255 * x) for x in MEAN),
    "interpolation": Image.Resampling.BICUBIC,
}
FILL = augment.fill_colour(MEAN)


def photo() -> Image.Image:
    """A smooth gradient with a noisy patch: every op changes it, and resampling shows."""
    img = smooth(64, 48)
    img.paste(noise(20, 16, seed=3), (30, 20))
    return img


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_the_fill_is_the_mean_in_bytes():
    assert FILL == (124, 116, 104) == HPARAMS["img_mean"]


def _timm_pixels(op, img: Image.Image) -> np.ndarray:
    try:
        return pixels(op(img))
    except ValueError:
        # Posterize keeping 0 bits: today's Pillow refuses it; the Pillow timm had when DeiT
        # was trained gave black (a mask of no bits), which is what ours gives
        assert op.name.startswith("Posterize")
        return np.zeros_like(pixels(img))


@pytest.mark.parametrize("name", augment.RAND_OPS + tuple(n for n in augment.RAND_INCREASING_OPS if "Increasing" in n))
@pytest.mark.parametrize("magnitude", [0, 3, 5.5, 9, 10])
def test_every_op_gives_timms_pixels_at_fixed_magnitudes(name, magnitude):
    spec = augment.RandAugmentSpec(m=magnitude, p=1.0)  # no noise, always applied
    ours = augment.AugmentOp(name, spec, FILL)
    theirs = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=HPARAMS)
    # with p=1 and no noise the one draw left is the sign: 0.84 > 0.5 negates, 0.13 keeps
    assert random.Random(0).random() > 0.5 >= random.Random(1).random()
    for seed in (0, 1):
        random.seed(seed)
        want = _timm_pixels(theirs, photo())
        got = pixels(ours(photo(), random.Random(seed)))
        assert np.array_equal(got, want), f"{name} at {magnitude}, seed {seed}: max diff {abs(got - want).max()}"


def test_ops_with_probability_and_noise_take_timms_draws():
    """p 0.5 and mstd 0.5 (the recipe's): the apply/noise/sign draws in timm's order."""
    spec = parse_rand_augment(SPEC)
    hparams = {**HPARAMS, "magnitude_std": spec.mstd}
    for name in augment.RAND_INCREASING_OPS:
        ours = augment.AugmentOp(name, spec, FILL)
        theirs = aa.AugmentOp(name, prob=spec.p, magnitude=spec.m, hparams=hparams)
        for seed in range(12):
            random.seed(seed)
            want = _timm_pixels(theirs, photo())
            rng = random.Random(seed)
            got = pixels(ours(photo(), rng))
            assert np.array_equal(got, want), f"{name}, seed {seed}"
            assert rng.getstate() == random.getstate()  # and consumed exactly timm's draws


def test_the_pixel_check_sees_the_old_drifts():
    """Each was a pixel difference from timm that the check above catches: bilinear for
    rotate/shear/translate, a grey fill, and posterize keeping a bit at magnitude 10."""
    img = photo()
    for name in ("Rotate", "ShearX", "TranslateYRel"):
        theirs = aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=HPARAMS)
        grey_bilinear = aa.AugmentOp(
            name, prob=1.0, magnitude=9, hparams={**HPARAMS, "img_mean": (128,) * 3, "interpolation": Image.BILINEAR}
        )
        random.seed(0)
        want = pixels(theirs(img))
        random.seed(0)
        assert not np.array_equal(pixels(grey_bilinear(img)), want)
    posterized = augment.AugmentOp("PosterizeIncreasing", augment.RandAugmentSpec(m=10, p=1.0), FILL)(
        img, random.Random()
    )
    assert pixels(posterized).max() == 0


def _record(ops, log):
    """Replace each op's image function with a recorder of (name, magnitude, args)."""
    for op in ops:
        name = op.name
        level = op.level_fn if hasattr(op, "level_fn") else op.level

        def recording_level(m, *rest, _name=name, _level=level):
            args = _level(m, *rest)
            log.append((_name, m, args))
            return args

        def recording_op(img, *args, _name=name, _level=level, **kwargs):
            if _level is None:
                log.append((_name, None, ()))
            return img

        if hasattr(op, "level_fn"):
            op.level_fn = recording_level if level is not None else None
            op.aug_fn = recording_op
        else:
            op.level = recording_level if level is not None else None
            op.op = recording_op


class _Chosen:
    """Wraps an op to log which one was picked."""

    def __init__(self, op, picks):
        self.op, self.picks = op, picks

    def __call__(self, img, *rng):
        self.picks.append(self.op.name)
        return self.op(img, *rng)


N_IMAGES = 20000


@pytest.fixture(scope="module")
def draws():
    """RandAugment(SPEC) over N_IMAGES images, ours on per-image generators and timm's on
    the global ones: (ops picked per image, applied ops with their magnitudes and args)."""
    img = Image.new("RGB", (8, 8))
    ours = RandAugment(SPEC, fill=FILL)
    our_applied, our_picks = [], []
    _record(ours.ops, our_applied)
    ours.ops = [_Chosen(op, our_picks) for op in ours.ops]
    for i in range(N_IMAGES):
        ours(img, random.Random(1000 + i))

    theirs = aa.rand_augment_transform(SPEC, dict(HPARAMS))
    their_applied, their_picks = [], []
    _record(theirs.ops, their_applied)
    theirs.ops = [_Chosen(op, their_picks) for op in theirs.ops]
    random.seed(0)
    np.random.seed(0)
    for _ in range(N_IMAGES):
        theirs(img)
    return (our_picks, our_applied), (their_picks, their_applied)


def _pairs(picks):
    return [(a, b) for a, b in zip(picks[::2], picks[1::2], strict=True)]


def test_ops_are_drawn_with_replacement_as_timm(draws):
    from scipy.stats import chi2_contingency

    (ours, _), (theirs, _) = draws
    names = list(augment.RAND_INCREASING_OPS)
    assert len(ours) == len(theirs) == 2 * N_IMAGES
    # each op picked equally often by both: a two-sample chi-square on the 15 counts
    table = [[ours.count(n) for n in names], [theirs.count(n) for n in names]]
    assert chi2_contingency(table).pvalue > 1e-3
    # the same op twice on an image: 1/15 of images in timm; never with a draw without replacement
    same_ours = sum(a == b for a, b in _pairs(ours)) / N_IMAGES
    same_theirs = sum(a == b for a, b in _pairs(theirs)) / N_IMAGES
    sigma = math.sqrt((1 / 15) * (14 / 15) / N_IMAGES)
    assert abs(same_theirs - 1 / 15) < 4 * sigma
    assert abs(same_ours - same_theirs) < 4 * math.sqrt(2) * sigma
    # and the 225 ordered pairs are alike
    pair_names = [(a, b) for a in names for b in names]
    po, pt = _pairs(ours), _pairs(theirs)
    table = [[po.count(p) for p in pair_names], [pt.count(p) for p in pair_names]]
    assert chi2_contingency(table).pvalue > 1e-3


def test_applied_ops_magnitudes_and_signs_follow_timms_distribution(draws):
    (_, ours), (_, theirs) = draws
    # half the picked ops are applied (p 0.5)
    assert abs(len(ours) - len(theirs)) < 4 * math.sqrt(2 * 2 * N_IMAGES * 0.25)
    assert abs(len(ours) / (2 * N_IMAGES) - 0.5) < 0.01
    mo = np.array([m for _, m, _ in ours if m is not None])
    mt = np.array([m for _, m, _ in theirs if m is not None])
    # magnitude 9 with noise 0.5, clipped at 10: mean, std and the share at the ceiling
    se = 0.5 / math.sqrt(min(len(mo), len(mt)))
    assert abs(mo.mean() - mt.mean()) < 4 * math.sqrt(2) * se
    assert abs(mo.mean() - 9.0) < 0.02
    assert abs(mo.std() / mt.std() - 1) < 0.05
    assert abs((mo == 10).mean() - (mt == 10).mean()) < 0.01
    # signs of the signed ops: half negative
    signed = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    neg_o = np.mean([args[0] < 0 for n, _, args in ours if n in signed])
    neg_t = np.mean([args[0] < 0 for n, _, args in theirs if n in signed])
    assert abs(neg_o - 0.5) < 0.02 and abs(neg_t - 0.5) < 0.02


def test_spec_fields_are_read_as_timm_reads_them():
    assert parse_rand_augment(SPEC) == augment.RandAugmentSpec(n=2, m=9, mstd=0.5, mmax=None, inc=True, p=0.5)
    spec = parse_rand_augment("rand-n3-m12-mstd101-mmax15-p0.7")
    assert spec == augment.RandAugmentSpec(n=3, m=12, mstd=math.inf, mmax=15, inc=False, p=0.7)
    timm_ra = aa.rand_augment_transform("rand-n3-m12-mstd101-mmax15-p0.7", dict(HPARAMS))
    op = timm_ra.ops[0]
    assert (timm_ra.num_layers, op.magnitude, op.magnitude_std, op.magnitude_max, op.prob) == (3, 12, math.inf, 15, 0.7)
    assert [o.name for o in timm_ra.ops] == list(augment.RAND_OPS)  # inc0: the plain set
    assert [o.name for o in RandAugment("rand-n3-m12-mstd101-mmax15-p0.7").ops] == list(augment.RAND_OPS)
    # uniform magnitudes (mstd > 100) up to m, clipped at mmax: timm's draws again
    ours = augment.AugmentOp("Rotate", spec, FILL)
    theirs = aa.AugmentOp(
        "Rotate", prob=0.7, magnitude=12, hparams={**HPARAMS, "magnitude_std": math.inf, "magnitude_max": 15}
    )
    for seed in range(8):
        random.seed(seed)
        assert np.array_equal(pixels(ours(photo(), random.Random(seed))), _timm_pixels(theirs, photo()))


@pytest.mark.parametrize("spec", ["rand-x5", "rand-m", "rand-tweights", "rand-m9.5", "augmix-m5", "rand-inc"])
def test_an_unknown_or_malformed_field_is_a_one_line_usage_error(spec):
    with pytest.raises(UsageError) as e:
        parse_rand_augment(spec)
    assert "\n" not in str(e.value) and spec in str(e.value)


def test_a_recipe_with_a_bad_spec_is_refused_before_training():
    from deit_cli.engine.train.recipes import resolve_recipe

    assert resolve_recipe("scratch", {}).rand_augment == SPEC
    with pytest.raises(UsageError, match="'q3'"):
        resolve_recipe("scratch", {"rand_augment": "rand-m9-q3"})


def test_the_random_resized_crop_is_timms_given_the_same_draws():
    pre = Preprocessing(image_size=32, mean=MEAN)
    ours = TrainTransform(pre, rand_augment=None, reprob=0.0)
    rrc = RandomResizedCropAndInterpolation(32, interpolation="bicubic")
    for size in [(64, 48), (40, 90), (300, 20), (33, 33)]:
        img = noise(*size, seed=sum(size))
        for seed in range(50):
            random.seed(seed)
            i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
            assert augment.rrc_box(*size, random.Random(seed)) == (j, i, j + w, i + h)
            # and the pixels: crop, then resize (torchvision's resized_crop), then flip or not
            random.seed(seed)
            want = np.asarray(rrc(img))
            rng = random.Random(seed)
            got, erase = ours(img, rng)
            flipped = random.Random(seed)
            augment.rrc_box(*size, flipped)
            if flipped.random() < 0.5:
                want = want[:, ::-1]
            # uint8, the augmented image's pixels as they are
            assert got.dtype == torch.uint8 and erase is None
            assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want.transpose(2, 0, 1)))), (size, seed)


def test_random_erasing_is_timms_given_the_same_draws():
    """timm's RandomErasing(0.25, mode "pixel", max_count 1) on a normalised image: the
    same boxes after the same draws (ours drawn in the transform, `erase_params`, applied
    to the normalised batch on the device, `erase_batch`); the noise inside is standard
    normal in both (timm's from torch's global generator, ours from one seeded by the
    sample's draw)."""
    erasing = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    erased = 0
    values = []
    for seed in range(400):
        for shape in [(3, 32, 32), (3, 20, 50)]:
            random.seed(seed)
            theirs = torch.full(shape, 100.0)
            erasing(theirs)
            rng = random.Random(seed)
            params = augment.erase_params(shape[1], shape[2], rng, 0.25)
            ours = torch.full((2, *shape), 100.0)  # a batch of two, the second left alone
            augment.erase_batch(ours, torch.tensor([params or (-1,) * 5, (-1,) * 5]))
            assert torch.equal(theirs != 100, ours[0] != 100), (seed, shape)
            assert (ours[1] == 100).all()
            if params is not None:
                erased += 1
                values.append(ours[0][ours[0] != 100])
                again = torch.full((1, *shape), 100.0)
                augment.erase_batch(again, torch.tensor([params]))
                assert torch.equal(again[0], ours[0])  # the noise fixed by the sample's seed
    assert 0.2 < erased / 800 < 0.3
    v = torch.cat(values)
    assert abs(v.mean()) < 0.02 and abs(v.std() - 1) < 0.02


def test_cutmix_box_and_lambda_are_timms_given_the_same_draws():
    for seed in range(300):
        for shape in [(2, 3, 32, 32), (2, 3, 24, 40), (2, 3, 7, 5)]:
            np.random.seed(seed)
            lam = float(np.random.beta(1.0, 1.0))
            state = np.random.get_state()
            (yl, yh, xl, xh), want_lam = cutmix_bbox_and_lam(shape, lam, correct_lam=True)
            np.random.set_state(state)
            cy, cx = np.random.randint(0, shape[-2]), np.random.randint(0, shape[-1])
            box, got_lam = augment.cutmix_box(shape[-2], shape[-1], lam, cy, cx)
            assert box == (yl, yh, xl, xh) and got_lam == want_lam


@pytest.mark.parametrize("cutmix", [False, True])
def test_mixup_and_cutmix_batches_are_timms_given_the_same_draws(cutmix):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 3, 1, 3])
    theirs = TimmMixup(0.8, 1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=5)
    ours = Mixup(0.8, 1.0, 0.5, 0.1, 5)
    done = 0
    for seed in range(40):
        # timm's draws: apply? (prob 1), cutmix?, lambda, then the box's centre
        np.random.seed(seed)
        np.random.rand()
        use_cutmix = np.random.rand() < 0.5
        if use_cutmix != cutmix:
            continue
        lam = float(np.random.beta(1.0, 1.0) if use_cutmix else np.random.beta(0.8, 0.8))
        centre = (np.random.randint(16), np.random.randint(16)) if use_cutmix else None
        np.random.seed(seed)
        want_x, want_y = theirs(x.clone(), target)
        got_x, got_y = ours.mix(x, target, lam, centre)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y), seed
        done += 1
    assert done >= 10


def test_mixup_of_a_batch_of_one_gives_back_the_image_and_its_smoothed_one_hot_row():
    x = torch.randn(1, 3, 16, 16)
    for mixup, cutmix in [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)]:
        mix = Mixup(mixup, cutmix, 0.5, 0.1, 4)
        for seed in range(10):
            mx, my = mix(x, torch.tensor([2]), np.random.default_rng(seed))
            torch.testing.assert_close(mx, x, rtol=0, atol=1e-6)
            torch.testing.assert_close(my, torch.tensor([[0.025, 0.025, 0.925, 0.025]]), rtol=0, atol=1e-6)
    # multi-hot rows as they are
    mx, my = Mixup(0.8, 1.0, 0.5, 0.0, 4)(x, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), np.random.default_rng(0))
    torch.testing.assert_close(my, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), rtol=0, atol=1e-6)


def test_the_transform_is_reproducible_and_uses_the_recipe_fill():
    pre = Preprocessing(image_size=32, mean=MEAN)
    t = TrainTransform(pre, rand_augment=SPEC, reprob=0.25)
    assert t.rand_augment.ops[0].kwargs["fill"] == FILL
    img = photo()
    erased = 0
    for seed in range(20):
        (x, erase), (x2, erase2) = t(img, random.Random(seed)), t(img, random.Random(seed))
        assert torch.equal(x, x2) and erase == erase2
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        erased += erase is not None
    assert 0 < erased < 20
