"""Large JPEGs in `deit train` decode at reduced scale (engine/train/loader.py over
images/decode.py's `reduce`): the crop is drawn from the header's size, the JPEG decoded at
the largest DCT scale at which the crop still covers the output size, and what comes out is
the full decode's to within a mean of 2.5 levels in 255; a crop too small, a PNG and
`--full-decode` give today's pixels bit for bit, whatever decodes."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from imagegen import orient, photo, save, save_with_orientation
from PIL import Image
from test_train_input import WAYS, assert_same
from training import config_file, load_weights

from deit_cli.engine.train.augment import ThreeAugment, TrainTransform
from deit_cli.engine.train.data import TrainSet, epoch_order, sample_seed
from deit_cli.engine.train.loader import TrainLoader, load_sample
from deit_cli.engine.train.options import TrainOptions, resumed_options
from deit_cli.engine.train.recipes import resolve_recipe
from deit_cli.engine.train.run_dir import read_run_checkpoint
from deit_cli.errors import UsageError
from deit_cli.images.decode import decode_image
from deit_cli.images.inputs import InputItem
from deit_cli.variants import Preprocessing

# the mean absolute difference (0-255 levels) from the full decode's output that a reduced
# decode stays within: libjpeg's scaled decode, then a shorter bicubic resize, instead of one
# long bicubic resize (measured: 0.1 to 1.4 on these pictures, RandAugment included)
CLOSE = 2.5
W, H = 1200, 900


def transforms(size: int) -> dict:
    pre = Preprocessing(image_size=size)
    return {
        "randaugment": TrainTransform(pre, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25),
        "3-augment": ThreeAugment(pre),
        "3-augment simple crop": ThreeAugment(pre, simple=True),
    }


class Seen:
    """A transform that records the size of every image it is given: what was decoded."""

    def __init__(self, transform):
        self.transform, self.sizes = transform, []

    def draw(self, width, height, rng):
        return self.transform.draw(width, height, rng)

    def reduction(self, drawn):
        return self.transform.reduction(drawn)

    def finish(self, image, drawn, rng, reduced=None):
        self.sizes.append(image.size)
        return self.transform.finish(image, drawn, rng, reduced)

    def __call__(self, image, rng):
        self.sizes.append(image.size)
        return self.transform(image, rng)


def run(path: Path, transform, seed: int, reduce: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """(the augmented uint8 image, the size of the image the transform was given)."""
    seen = Seen(transform)
    (out, _), err = load_sample(InputItem(str(path)), seen, seed, {}, reduce)
    assert err is None
    return out, seen.sizes[-1]


def mean_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def largest_scale(transform, size: tuple[int, int], seed: int) -> int:
    """The DCT scale the crop that `seed` draws allows: the largest of 8, 4, 2 (else 1) by
    which its box, reduced, still covers the output size each way."""
    (left, top, right, bottom), *_ = _box(transform.draw(*size, random.Random(seed)))
    side = min(right - left, bottom - top) / transform.image_size
    return next((a for a in (8, 4, 2) if side >= a), 1)


def _box(drawn):
    return (drawn[0], drawn[1]) if isinstance(drawn[0], tuple) else (drawn, None)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return save(photo(W, H, seed=1), tmp_path_factory.mktemp("big") / "photo.jpg", quality=90)


@pytest.mark.parametrize("kind", ["randaugment", "3-augment", "3-augment simple crop"])
def test_a_large_jpeg_decodes_at_the_scale_its_crop_allows_close_to_the_full_decode(big, kind):
    transform = transforms(96)[kind]
    scales = set()
    for seed in range(40):
        scale = largest_scale(transform, (W, H), seed)
        reduced, seen = run(big, transform, seed, reduce=True)
        full, full_seen = run(big, transform, seed, reduce=False)
        assert full_seen == (W, H)
        assert seen == (math.ceil(W / scale), math.ceil(H / scale)), seed
        assert mean_diff(reduced, full) <= CLOSE, seed
        scales.add(scale)
    # random crops of 8% to all of the picture: every scale; the simple crop resizes it all
    assert scales == ({8} if kind == "3-augment simple crop" else {2, 4, 8})


def test_a_crop_too_small_to_reduce_decodes_in_full_bit_for_bit(big):
    transform = transforms(224)["randaugment"]
    small = [seed for seed in range(24) if largest_scale(transform, (W, H), seed) == 1]
    assert len(small) >= 3
    for seed in small:
        reduced, seen = run(big, transform, seed, reduce=True)
        full, _ = run(big, transform, seed, reduce=False)
        assert seen == (W, H) and torch.equal(reduced, full)
        # and today's path: the transform on the decoded image
        want, _ = transform(decode_image(str(big)).image, random.Random(seed))
        assert torch.equal(reduced, want)


def test_a_png_is_never_reduced(tmp_path):
    path = save(photo(W, H, seed=2), tmp_path / "photo.png")
    transform = transforms(112)["randaugment"]
    for seed in range(4):
        reduced, seen = run(path, transform, seed, reduce=True)
        full, _ = run(path, transform, seed, reduce=False)
        assert seen == (W, H) and torch.equal(reduced, full)


def stripes(w: int, h: int) -> Image.Image:
    """Waves a few reduced pixels long: a crop mapped half a reduced pixel off shows."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = [127 + 110 * np.sin(x / 7.0), 127 + 110 * np.sin(y / 9.0), 127 + 110 * np.sin((x - 2 * y) / 11.0)]
    return Image.fromarray(np.stack(rgb, -1).astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_rotated_jpeg_gives_what_the_same_picture_stored_upright_gives(tmp_path, orientation):
    # sides that no DCT scale divides: the reversed axes' partial blocks come first
    stored = np.asarray(stripes(1021, 767))
    rotated = save_with_orientation(Image.fromarray(stored), tmp_path / "rotated.jpg", orientation, quality=95)
    upright = save(Image.fromarray(np.ascontiguousarray(orient(stored, orientation))), tmp_path / "up.jpg", quality=95)
    size = Image.open(upright).size
    transform = transforms(64)["3-augment"]
    for seed in range(6):
        got, seen = run(rotated, transform, seed, reduce=True)
        want, want_seen = run(upright, transform, seed, reduce=True)
        assert seen == want_seen != size  # reduced, and upright
        assert mean_diff(got, want) <= CLOSE, seed


# --------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> TrainSet:
    root = tmp_path_factory.mktemp("photos")
    paths = [save(photo(800 + 8 * i, 600 - 4 * i, seed=i), root / f"{i}.jpg", quality=90) for i in range(6)]
    paths.append(save(photo(640, 480, seed=9), root / "png.png"))
    paths.append(save(photo(48, 40, seed=10), root / "small.jpg", quality=90))
    return TrainSet(str(root), [InputItem(str(p)) for p in paths], [i % 2 for i in range(8)], ["a", "b"])


TRANSFORM = TrainTransform(Preprocessing(image_size=32), rand_augment="rand-m9-mstd0.5-inc1", reprob=0.5)


def loader_batches(data: TrainSet, reduce: bool, **kw) -> list:
    with TrainLoader(data, TRANSFORM, batch_size=4, seed=3, reduce=reduce, **kw) as loader:
        return [b for e in (0, 1) for b in loader.epoch(e)]


def test_full_decode_batches_are_todays_bit_for_bit_and_reduced_ones_close(photos):
    full = loader_batches(photos, reduce=False, workers=0)
    reduced = loader_batches(photos, reduce=True, workers=0)
    differ = 0
    for f, r in zip(full, reduced, strict=True):
        assert torch.equal(f.targets, r.targets)
        assert (f.erase is None and r.erase is None) or torch.equal(f.erase, r.erase)  # the same draws
        for x, y in zip(f.images, r.images, strict=True):
            assert mean_diff(x, y) <= CLOSE
            differ += not torch.equal(x, y)
    assert differ >= 6  # the large JPEGs' crops (twice six), reduced
    # --full-decode: the transform on the full decode, as before reduced decoding existed
    order = epoch_order(len(photos), seed=3, epoch=0)
    for b in full[:2]:  # epoch 0
        for row, p in enumerate(range(4 * b.step, 4 * b.step + 4)):
            want, _ = TRANSFORM(decode_image(photos.items[order[p]]).image, random.Random(sample_seed(3, 0, p)))
            assert torch.equal(b.images[row], want)


@pytest.mark.parametrize("way", [w for w in WAYS if w != "in-process"])
def test_reduced_batches_are_the_same_whatever_decodes(photos, way):
    assert_same(loader_batches(photos, True, **WAYS[way]), loader_batches(photos, True, workers=0))


# --------------------------------------------------------------------------- the run


def test_full_decode_reaches_the_run_and_resume_refuses_a_change_of_it(tmp_path, run_cpu):
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            save(photo(640, 480, seed=10 * ord(c) + i), data / c / f"{i}.jpg", quality=90)
    cfg = config_file(tmp_path / "cfg.json", num_classes=2)
    args = ["--config", cfg, "--recipe", "finetune", "--epochs", "1", "--batch-size", "4", "--workers", "0"]
    args += ["--mixup", "0", "--cutmix", "0", "--drop-path", "0", "-q"]
    for name, extra in (("reduced", []), ("full", ["--full-decode"])):
        rc, _, err = run_cpu("train", data, "-o", tmp_path / name, *args, *extra)
        assert rc == 0, err
    reduced, full = (load_weights(tmp_path / n / "model.safetensors") for n in ("reduced", "full"))
    assert any(not torch.equal(reduced[k], full[k]) for k in reduced)  # other pixels, another model

    rc, _, err = run_cpu("train", data, "-o", tmp_path / "reduced", "--resume", "--full-decode")
    assert rc == 2 and "--full-decode True (the run has False)" in err.strip().splitlines()[-1]
    # a run started with it goes on with it, unasked
    rc, _, err = run_cpu("train", data, "-o", tmp_path / "full", "--resume", "--epochs", "2", "--workers", "0")
    assert rc == 0, err
    assert read_run_checkpoint(tmp_path / "full" / "checkpoint.pt")["args"]["full_decode"] is True


def test_a_run_saved_before_the_flag_resumes_decoding_in_full(tmp_path):
    recipe = resolve_recipe("plain", {})
    opts = TrainOptions(data="d", run_dir=tmp_path, recipe=recipe, resume=True)
    saved = {k: v for k, v in opts.to_plain().items() if k != "full_decode"}
    assert resumed_options(opts, saved, 0).full_decode is True
    refused = TrainOptions(data="d", run_dir=tmp_path, recipe=recipe, resume=True, given=frozenset({"full_decode"}))
    with pytest.raises(UsageError, match=r"--full-decode False \(the run has True\)"):
        resumed_options(refused, saved, 0)
