"""torchrun: inputs split across ranks without overlap, one output in input order, the
same as one process gives. Two CPU processes on the gloo backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from colours import colour_files
from conftest import torchrun


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_cover_every_input_once_and_interleave_back_in_order(n, world_size):
    from deit_cli.distributed import global_position, interleave, shard

    items = list(range(n))
    shards = [list(shard(items, rank, world_size)) for rank in range(world_size)]
    assert sorted(x for s in shards for x in s) == items  # no overlap, nothing lost
    for rank, s in enumerate(shards):
        assert s == [global_position(k, rank, world_size) for k in range(len(s))]
    assert list(interleave(shards)) == items


def test_one_process_is_rank_0_of_1(monkeypatch):
    import torch

    from deit_cli import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.world() == (0, 1) and distributed.is_main() and not distributed.is_distributed()
    with distributed.init("cpu") as (rank, size):
        assert (rank, size) == (0, 1)
        t = torch.tensor([1.0, 2.0])
        assert distributed.all_reduce_sum(t).tolist() == [1.0, 2.0]
        assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
        assert distributed.broadcast_object("x") == "x"
        distributed.barrier()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert distributed.world() == (2, 4) and not distributed.is_main()
    assert distributed.local_device("cpu") == "cpu"


@pytest.fixture
def seven_images(tmp_path, colour_dir):
    """Seven inputs (an odd number: the shards differ in length) in a directory."""
    d = tmp_path / "images"
    d.mkdir()
    for i, f in enumerate([*colour_files(colour_dir), colour_dir / "mixed.png"]):
        (d / f"{i}-{f.name}").write_bytes(f.read_bytes())
    return d


def test_torchrun_features_equal_one_process(run_cpu, model_path, seven_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, _ = run_cpu("extract-features", seven_images, "--model", model_path, "-o", out / "one.npy", "-q")
    assert rc == 0
    p = torchrun(
        "extract-features",
        seven_images,
        "--model",
        model_path,
        "-o",
        out / "two.npy",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    np.testing.assert_array_equal(np.load(out / "two.npy"), np.load(out / "one.npy"))
    assert (out / "two.paths.jsonl").read_text() == (out / "one.paths.jsonl").read_text()
    assert sorted(x.name for x in out.iterdir()) == ["one.npy", "one.paths.jsonl", "two.npy", "two.paths.jsonl"]
    assert p.stderr.count("wrote 7") == 1  # rank 0 alone writes and reports
    assert not list(out.glob(".*"))  # the shards (written beside the output) are cleaned up


def test_torchrun_classify_jsonl_equals_one_process_with_a_failure(run_cpu, model_path, seven_images, tmp_path):
    (seven_images / "3-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rc, one, _ = run_cpu("classify", seven_images, "--model", model_path, "--format", "jsonl")
    assert rc == 1
    p = torchrun("classify", seven_images, "--model", model_path, "--format", "jsonl", "--device", "cpu", cwd=tmp_path)
    assert p.returncode != 0  # rank 0 exits 1 (one input failed); torchrun reports that
    assert p.stdout == one
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(recs) == 8 and "error" in recs[3] and recs[3]["path"].endswith("3-broken.png")
    assert p.stderr.count("3-broken.png: cannot decode PNG") == 1  # reported once, by rank 0
    assert not list((tmp_path / "tmp").glob("deit-shards-*"))  # the shards are cleaned up


def test_stdin_is_refused_under_torchrun(run_cpu, model_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc, out, err = run_cpu("classify", "-", "--model", model_path)
    assert rc == 2 and out == "" and "not supported under torchrun" in err
