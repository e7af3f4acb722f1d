"""What the training tests share: the tiny architecture they train, and reading a run back."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCH = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def config_file(path: Path, *, num_classes: int, **kw) -> Path:
    """A `--config` file: ARCH without a distillation token, `num_classes` classes."""
    path.write_text(json.dumps({**ARCH, "distilled": False, "num_classes": num_classes, **kw}))
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def records(run: Path) -> list[dict]:
    """A run directory's metrics.jsonl, one record per epoch."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_one_step(ours: dict, want: dict, before: dict, lr: float, tol: float = 1e-5) -> None:
    """Weights after one step of `deit train` equal the reference step's within `tol`, and
    every one of them moved. Adam's first step is about lr·sign(gradient), so where the exact
    gradient is zero (the attention key biases) rounding noise moves a weight by up to lr."""
    d = ARCH["embed_dim"]
    for name, w in ours.items():
        diff = (w - want[name]).abs()
        assert (w - before[name]).abs().max() > 0, f"{name} did not move"
        if name.endswith("attn.qkv.bias"):  # the key biases: at most one lr
            assert diff[d : 2 * d].max() <= lr * 1.001, name
            diff = torch.cat([diff[:d], diff[2 * d :]])
        assert diff.max() <= tol, f"{name}: {diff.max():.3g}"
