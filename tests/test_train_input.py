"""The training input pipeline (engine/train/loader.py): the same batches, bit for bit,
whatever does the decoding (this process, threads, worker processes), on any number of
ranks, resumed mid-epoch or not; a broken image is skipped with its one-line error."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from imagegen import noise, save, smooth

from deit_cli.engine.train.augment import TrainTransform
from deit_cli.engine.train.data import TrainSet, epoch_order, sample_seed
from deit_cli.engine.train.loader import TrainLoader
from deit_cli.images.decode import decode_image
from deit_cli.images.inputs import InputItem
from deit_cli.variants import Preprocessing

BATCH = 6
SEED = 7
# every part of the augmentation on (RandAugment, random erasing), at a small size
TRANSFORM = TrainTransform(Preprocessing(image_size=32), rand_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
# (loader keyword arguments) for every way of decoding
WAYS = {
    "in-process": {"workers": 0},
    "1 process": {"workers": 1, "processes": True},
    "2 processes": {"workers": 2, "processes": True},
    "2 threads": {"workers": 2, "processes": False},
}


def make_set(root: Path, n: int = 20, broken: tuple[int, ...] = (5,), multi_label: bool = False) -> TrainSet:
    root.mkdir(parents=True, exist_ok=True)
    items, targets = [], []
    for i in range(n):
        path = root / f"img{i}.{'png' if i in broken else 'jpg'}"
        if i in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        else:
            save(noise(40 + i, 30 + 2 * i, seed=i) if i % 2 else smooth(50, 40 + i), path, quality=90)
        items.append(InputItem(str(path)))
        targets.append(sorted({i % 3, i % 4}) if multi_label else i % 3)
    classes = ["a", "b", "c", "d"] if multi_label else ["a", "b", "c"]
    return TrainSet(str(root), items, targets, classes, multi_label=multi_label)


def batches(data: TrainSet, epochs=(0, 1), start_step: int = 0, batch_size: int = BATCH, **kw) -> list:
    with TrainLoader(data, TRANSFORM, batch_size=batch_size, seed=SEED, **kw) as loader:
        return [b for e in epochs for b in loader.epoch(e, start_step)]


def assert_same(got: list, want: list) -> None:
    assert [b.step for b in got] == [b.step for b in want]
    for g, w in zip(got, want):
        assert g.images.dtype == w.images.dtype == torch.uint8
        assert torch.equal(g.images, w.images), g.step
        assert (g.erase is None) == (w.erase is None) and (g.erase is None or torch.equal(g.erase, w.erase)), g.step
        assert torch.equal(g.targets, w.targets), g.step
        assert g.failed == w.failed, g.step


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TrainSet:
    return make_set(tmp_path_factory.mktemp("set"))


@pytest.fixture(scope="module")
def in_process(data) -> list:
    return batches(data, workers=0)


@pytest.mark.parametrize("way", [w for w in WAYS if w != "in-process"])
def test_the_same_batches_whatever_decodes(data, in_process, way):
    assert_same(batches(data, **WAYS[way]), in_process)


def test_the_batches_are_the_definition(data, in_process):
    """Step s holds positions s*B .. (s+1)*B-1 of the epoch's order, each augmented with
    its own seed; the broken image is left out and named."""
    steps = len(data) // BATCH  # the last, smaller batch is dropped
    assert len(in_process) == 2 * steps
    order = epoch_order(len(data), seed=SEED, epoch=0)
    for b in in_process[:steps]:
        want = [order[p] for p in range(b.step * BATCH, (b.step + 1) * BATCH) if order[p] != 5]
        assert b.targets.tolist() == [data.targets[i] for i in want]
        assert b.images.shape == (len(want), 3, 32, 32)
        assert len(b.failed) == BATCH - len(want)
    assert not torch.equal(in_process[0].images[0], in_process[1].images[0])
    # uint8, the pixels of each image as augmented with its own seed; erasing's draws beside
    b = in_process[1]
    ok = [p for p in range(BATCH, 2 * BATCH) if order[p] != 5]
    for row, p in enumerate(ok):
        image = decode_image(data.items[order[p]]).image
        x, erase = TRANSFORM(image, random.Random(sample_seed(SEED, 0, p)))
        assert b.images.dtype == torch.uint8 and torch.equal(b.images[row], x)
        drawn = b.erase[row].tolist() if b.erase is not None else [-1] * 5
        assert drawn == list(erase or (-1,) * 5)
    assert any(b.erase is not None and (b.erase[:, 4] >= 0).any() for b in in_process)


@pytest.mark.parametrize("way", ["in-process", "2 processes"])
def test_rank_shares_in_position_order_are_the_global_batch(data, in_process, way):
    shares = [batches(data, rank=r, world_size=2, **WAYS[way]) for r in (0, 1)]
    steps = len(data) // BATCH
    for k, (whole, first, second) in enumerate(zip(in_process, *shares, strict=True)):
        assert first.step == second.step == whole.step
        order = epoch_order(len(data), seed=SEED, epoch=k // steps)
        positions = range(whole.step * BATCH, (whole.step + 1) * BATCH)
        rows = {}
        for r, share in enumerate((first, second)):
            ok = [p for p in positions[r::2] if order[p] != 5]
            erase = share.erase if share.erase is not None else torch.full((len(ok), 5), -1)
            rows.update({p: (x, y, e) for p, x, y, e in zip(ok, share.images, share.targets, erase)})
        merged = [rows[p] for p in sorted(rows)]
        assert torch.equal(torch.stack([x for x, _, _ in merged]), whole.images)
        assert torch.equal(torch.stack([y for _, y, _ in merged]), whole.targets)
        erase = whole.erase if whole.erase is not None else torch.full((len(merged), 5), -1)
        assert torch.equal(torch.stack([e for _, _, e in merged]), erase)
        assert sorted(first.failed + second.failed) == sorted(whole.failed)


@pytest.mark.parametrize("way", ["in-process", "2 processes", "2 threads"])
def test_a_resumed_epoch_is_the_tail_of_the_whole_one(data, in_process, way):
    resumed = batches(data, epochs=(1,), start_step=2, **WAYS[way])
    whole = in_process[len(in_process) // 2 :]  # epoch 1
    assert [b.step for b in resumed] == [2]
    assert_same(resumed, whole[2:])


class Pid:
    """A transform that says which process ran it (and is picklable, for workers)."""

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        return torch.full((1,), os.getpid(), dtype=torch.float64)


def test_worker_processes_serve_every_epoch_and_outlive_a_ctrl_c_or_sigterm(data, in_process):
    with TrainLoader(data, TRANSFORM, batch_size=BATCH, seed=SEED, workers=2, processes=True) as loader:
        first = list(loader.epoch(0))
        assert_same(first, in_process[:3])
        abandoned = loader.epoch(1)
        next(abandoned)  # an epoch left half-read: the next one starts clean
        abandoned.close()
        assert_same(list(loader.epoch(1)), in_process[3:])
        assert_same(list(loader.epoch(0)), first)  # no state carried from epoch to epoch
    fresh = batches(data, epochs=(1,), **WAYS["2 processes"])  # workers that never saw epoch 0
    assert_same(fresh, in_process[3:])

    with TrainLoader(data, Pid(), batch_size=BATCH, seed=SEED, workers=2, processes=True) as loader:
        pids = [{int(x) for x in b.images.flatten().tolist()} for e in (0, 1) for b in loader.epoch(e)]
        workers = set().union(*pids)
        assert len(workers) == 2 and os.getpid() not in workers
        for pid in workers:  # Ctrl-C in a terminal reaches the workers too, SLURM's SIGTERM as well
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        again = {int(x) for e in (2, 3) for b in loader.epoch(e) for x in b.images.flatten().tolist()}
        assert again == workers  # the same processes, still alive


def test_a_broken_image_is_skipped_with_its_one_line_error(tmp_path):
    # two images, one broken, one global batch over two ranks: one share has no image
    data = make_set(tmp_path, n=2, broken=(1,))
    for way in ("in-process", "2 processes", "2 threads"):
        shares = [batches(data, epochs=(0,), rank=r, world_size=2, batch_size=2, **WAYS[way])[0] for r in (0, 1)]
        shares.sort(key=lambda b: len(b.failed))
        good, bad = shares
        assert good.images.shape == (1, 3, 32, 32) and good.targets.tolist() == [0] and good.failed == []
        assert bad.images.shape[0] == 0 and bad.targets.shape == (0,)
        assert len(bad.failed) == 1 and bad.failed[0].startswith(f"{tmp_path / 'img1.png'}: cannot decode PNG (")
        assert "\n" not in bad.failed[0]


def test_multi_label_targets_are_multi_hot_rows(tmp_path):
    data = make_set(tmp_path, n=12, broken=(), multi_label=True)
    want = batches(data, epochs=(0,), workers=0)
    got = batches(data, epochs=(0,), workers=2, processes=True)
    assert_same(got, want)
    assert want[0].targets.shape == (BATCH, 4) and want[0].targets.dtype == torch.float32


@pytest.mark.parametrize("way", ["2 processes", "2 threads", "in-process"])
def test_pinned_batches_for_a_cuda_device(data, in_process, way):
    got = batches(data, pin_memory=True, **WAYS[way])  # asked for without a GPU: harmless
    assert_same(got, in_process)
    if torch.cuda.is_available():
        assert all(b.images.is_pinned() and b.targets.is_pinned() for b in got if b.images.numel())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mean, std",
    [
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.1, 0.7, 0.33), (0.3, 0.9, 0.17)),
    ],
)
def test_normalisation_on_the_device_is_the_eval_transforms_bit_for_bit(mean, std, device):
    """uint8 batches normalised where the model runs: every byte of every channel gives the
    float32 of the eval transform's lookup table; a whole image, the eval transform's tensor."""
    from deit_cli.engine.train.augment import PlainTransform, norm_tensors, normalize
    from deit_cli.images.transform import eval_transform

    pre = Preprocessing(image_size=32, mean=mean, std=std)
    every = torch.arange(256, dtype=torch.uint8).expand(2, 3, 1, 256).to(device)
    got = normalize(every, *norm_tensors(pre, device)).cpu()
    want = torch.from_numpy(eval_transform(pre)._lut)
    assert got.dtype == torch.float32 and torch.equal(got[0, :, 0], want) and torch.equal(got[1, :, 0], want)
    img = smooth(50, 37)
    x = PlainTransform(pre)(img, random.Random(0))
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert torch.equal(normalize(x[None].to(device), *norm_tensors(pre, device))[0].cpu(), eval_transform(pre)(img))


def test_the_step_normalises_and_erases_uint8_batches_before_everything_else():
    """`Stepper.prepare`: a uint8 batch normalised with the model's mean and std (as the eval
    transform), then the erasing draws' boxes filled with noise; a float batch as it is."""
    from deit_cli.engine.train.augment import erase_batch
    from deit_cli.engine.train.step import Stepper
    from deit_cli.images.transform import eval_transform

    pre = Preprocessing(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    stepper = Stepper(
        *[None] * 8,
        device=torch.device("cpu"),
        amp_dtype=None,
        grad_accum=1,
        clip_grad=None,
        world=1,
        preprocessing=pre,
    )
    images = [smooth(40, 40 + i) for i in range(3)]
    x = torch.stack(
        [TrainTransform(pre, rand_augment=None, reprob=0.0)(im, random.Random(i))[0] for i, im in enumerate(images)]
    )
    lut = eval_transform(pre)._lut
    want = torch.stack([torch.from_numpy(np.stack([lut[c][r[c].numpy()] for c in range(3)])) for r in x])
    assert torch.equal(stepper.prepare(x), want)
    erase = torch.tensor([[-1] * 5, [2, 3, 10, 5, 1234], [-1] * 5])
    got = stepper.prepare(x, erase)
    erased = want.clone()
    erase_batch(erased, erase)
    assert torch.equal(got, erased) and not torch.equal(got[1], want[1])
    assert torch.equal(got[[0, 2]], want[[0, 2]]) and torch.equal(got[1, :, :2], want[1, :, :2])
    assert torch.equal(stepper.prepare(want), want)  # float: as it is
