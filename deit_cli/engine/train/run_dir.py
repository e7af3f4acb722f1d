"""The run directory: what a run writes, and reading it back to resume.

    model.safetensors  the raw model at the end of the run (the weights the paper reports)
    best.safetensors   the raw model of the epoch with the best validation top-1 (mAP)
    ema.safetensors    the EMA of the weights at the end, with --model-ema
    checkpoint.pt      everything to resume: weights, optimizer, EMA, each rank's RNG, position
    metrics.jsonl      one record per epoch

Only rank 0 writes; every file is written beside its target and renamed into place.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ... import distributed
from ...errors import CheckpointError, InputNotFound, OutputExists
from ...files import atomic_path
from ...model import DeiT

__all__ = [
    "CHECKPOINT_FORMAT",
    "META_RUN",
    "RUN_FILES",
    "create_run_dir",
    "has_checkpoint",
    "prepare_run_dir",
    "read_metrics",
    "read_run_checkpoint",
    "restore_rng",
    "rng_state",
    "save_model",
    "write_checkpoint",
    "write_metrics",
]

RUN_FILES = ("model.safetensors", "best.safetensors", "ema.safetensors", "checkpoint.pt", "metrics.jsonl")
CHECKPOINT_FORMAT = "deit-train/1"
META_RUN = "deit.run"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether RUN_DIR holds a run to resume (what `--auto-resume` decides by). Every rank
    asks before the process group starts, so before any rank can have written one."""
    return (run_dir / "checkpoint.pt").is_file()


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse a RUN_DIR that is not a directory, or holds a run without --resume/--force."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExists(f"{run_dir}: exists and is not a directory")
    holds = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not has_checkpoint(run_dir):
            raise InputNotFound(f"{run_dir}: no checkpoint.pt to resume from")
        return
    if holds and not force:
        raise OutputExists(
            f"{run_dir}: already holds a run ({', '.join(holds)})",
            "continue it with --resume, or replace it with --force",
        )


def create_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Make RUN_DIR (and, with --force, clear the old run's files), once the inputs are known good."""
    if resume:
        return
    holds = [name for name in RUN_FILES if (run_dir / name).exists()]
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputExists(f"{run_dir}: cannot create the directory ({e.strerror})") from None
        for name in holds:
            (run_dir / name).unlink()
    distributed.barrier()


def read_run_checkpoint(path: Path) -> dict:
    from ...checkpoints.formats import read_torch

    ckpt = read_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a deit train checkpoint")
    return ckpt


def rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(saved, rank: int, world: int, device: torch.device) -> bool:
    """This rank's saved RNG state (drop path draws), restored; False when the run was saved
    by another number of processes (the caller seeds afresh and says so)."""
    if isinstance(saved, dict):  # a checkpoint of one state for every rank (before per-rank states)
        saved = [saved] * world
    if len(saved) != world:
        return False
    mine = saved[rank]
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine.get("cuda") is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)
    return True


def write_checkpoint(path: Path, state: dict, device: torch.device) -> None:
    """`state` plus every rank's RNG state, written by rank 0 (a collective: all ranks call it)."""
    rngs = distributed.gather_objects(rng_state(device))
    if distributed.is_main():
        buffer = io.BytesIO()  # serialised first, so that a failing write is an OSError (exit 74)
        torch.save({"format": CHECKPOINT_FORMAT, **state, "rng": rngs}, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    distributed.barrier()


def save_model(path: Path, model: DeiT, summary: dict | None) -> None:
    from ...checkpoints.writing import canonical_tensors, deit_metadata, save_safetensors

    meta = deit_metadata(model)
    if summary is not None:
        meta[META_RUN] = json.dumps(summary)
    with atomic_path(path) as tmp:
        save_safetensors(tmp, canonical_tensors(model, torch.float32), meta)


def write_metrics(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_metrics(path: Path, before_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= before_epoch]
