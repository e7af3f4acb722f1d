"""Running one command as several processes (`torchrun --nproc-per-node N -m deit_cli ...`).

Generic helpers: who am I (`world`), set up and tear down the process group (`init`),
split inputs without overlap (`shard`), put per-rank results back in input order
(`interleave`), reduce numbers and gather objects across ranks. Commands use them as
"each rank processes its shard and writes it; rank 0 merges". Nothing here prints.

In one plain process every helper is a cheap no-op (rank 0 of 1), so commands call them
unconditionally. Shards written to files must be on a filesystem all ranks share (one
machine, or a shared mount).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "world",
    "is_distributed",
    "is_main",
    "init",
    "local_device",
    "shard",
    "global_position",
    "interleave",
    "barrier",
    "all_reduce_sum",
    "sum_across",
    "gather_objects",
    "broadcast_object",
    "shared_tempdir",
    "write_jsonl_shard",
    "read_jsonl_shard",
    "merged_shards",
]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) in a plain process; torchrun's RANK and WORLD_SIZE otherwise."""
    size = max(1, _env_int("WORLD_SIZE", 1))
    rank = _env_int("RANK", 0) if size > 1 else 0
    return rank, size


def is_distributed() -> bool:
    return world()[1] > 1


def is_main() -> bool:
    """True on the rank that merges and reports (rank 0)."""
    return world()[0] == 0


def local_device(device: str) -> str:
    """The device this rank should use: a bare `cuda` (or `auto` on a CUDA machine) becomes
    cuda:LOCAL_RANK under torchrun, so the ranks of one machine use different GPUs."""
    if not is_distributed():
        return device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else device
    if device == "cuda":
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return device


def _dist():
    import torch.distributed as dist

    return dist


def _active() -> bool:
    if not is_distributed():
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


@contextmanager
def init(device: str = "cpu") -> Iterator[tuple[int, int]]:
    """Join the process group for the duration of the block when WORLD_SIZE > 1
    (gloo on CPU, nccl on CUDA); yields (rank, world size). A group the caller already
    initialised is used and left alone."""
    rank, size = world()
    if size == 1:
        yield rank, size
        return
    import torch

    dist = _dist()
    if dist.is_initialized():
        yield rank, size
        return
    backend = "gloo"
    if str(device).startswith("cuda") and torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    dist.init_process_group(backend=backend)
    try:
        yield rank, size
    finally:
        dist.destroy_process_group()


def shard(items: Iterable[T], rank: int | None = None, world_size: int | None = None) -> Iterator[T]:
    """This rank's share of `items`: those at positions p with p % world_size == rank.

    Deterministic and without overlap, as long as every rank sees the same `items`; the
    k-th item of rank r is the input at `global_position(k, r, world_size)`.
    """
    if rank is None or world_size is None:
        rank, world_size = world()
    if world_size == 1:
        yield from items
        return
    for pos, item in enumerate(items):
        if pos % world_size == rank:
            yield item


def global_position(local_index: int, rank: int, world_size: int) -> int:
    return local_index * world_size + rank


def interleave(shards: list[Iterable[T]]) -> Iterator[T]:
    """Items of per-rank shards (`shard`'s split, rank order) back in input order.

    Rank r holds inputs r, r + n, r + 2n...; taking one from each in turn rebuilds the
    order, and the first exhausted shard marks the end (shards differ by at most one).
    """
    iterators = [iter(s) for s in shards]
    while True:
        for it in iterators:
            try:
                yield next(it)
            except StopIteration:
                return


def barrier() -> None:
    if _active():
        _dist().barrier()


def all_reduce_sum(tensor):
    """The element-wise sum of `tensor` over all ranks (in place, and returned)."""
    if _active():
        dist = _dist()
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            import torch

            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_across(values: list[float]) -> list[float]:
    """Each number summed over all ranks (float64); the numbers themselves in one process."""
    if not _active():
        return list(values)
    import torch

    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not _active():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def shared_tempdir(near: Path | None = None) -> Iterator[Path]:
    """One temporary directory for all ranks: rank 0 creates it beside `near` (or in the
    system temporary directory) and removes it when it leaves the block. Ranks write their
    shards, meet at a `barrier()`, then rank 0 reads them, still inside the block."""
    path = None
    if is_main():
        parent = near.parent if near is not None and str(near.parent) else None
        prefix = f".{near.name}.shards-" if near is not None else "deit-shards-"
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    path = broadcast_object(path)
    try:
        yield Path(path)
    finally:
        if is_main():
            shutil.rmtree(path, ignore_errors=True)


def write_jsonl_shard(records: Iterable[dict], stem: Path) -> None:
    """One rank's records (JSON objects) as STEM.jsonl, one per line."""
    with open(stem.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl_shard(stem: Path) -> Iterator[dict]:
    """The records `write_jsonl_shard` wrote, in order."""
    with open(stem.with_suffix(".jsonl"), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


@contextmanager
def merged_shards(
    results: Iterable[T], write=write_jsonl_shard, read=read_jsonl_shard, *, near: Path | None = None
) -> Iterator[Iterator[T] | None]:
    """Each rank's `results` written as its shard, then, on rank 0, all of them in input order.

    `write(results, stem)` writes one rank's results to files named from `stem` (a Path
    without a suffix); `read(stem)` yields them back. The default pair keeps JSON records
    as STEM.jsonl; a job whose results are not plain records converts them on the way and
    still writes through that pair. On other ranks the block gets None (they have nothing
    left to do). The shards are removed when rank 0 leaves the block.
    """
    rank, size = world()
    with shared_tempdir(near) as tmp:
        write(results, tmp / f"rank{rank}")
        barrier()  # every shard is complete before rank 0 reads any
        yield interleave([read(tmp / f"rank{r}") for r in range(size)]) if rank == 0 else None
