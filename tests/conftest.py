"""Shared test helpers: seeded random weights and small DeiT-shaped models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helper modules (fakehub, imagegen, ...)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter to seeded random values, so that no mapping error can hide behind
    an init that happens to be zero or one (timm zero-inits its heads)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.ndim == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def run_cli(capsys):
    """Run `deit ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from deit_cli.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU, tiny matmuls split over two threads
    spend most of their time waiting for each other (and a resume must use the run's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_cpu(run_cli):
    """`run_cli` on the CPU: the answers are compared with the model's own on the CPU to
    1e-6, which a GPU's TF32 convolutions would not meet."""

    def run(command: str, *args) -> tuple[int, str, str]:
        return run_cli(command, "--device", "cpu", *args)

    return run


# --- the colour model (tests/colours.py) and its images --------------------------------


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    from deit_cli.checkpoints.writing import deit_metadata, save_safetensors

    path = tmp_path_factory.mktemp("model") / "colours.safetensors"
    from colours import colour_model

    m = colour_model()
    save_safetensors(path, m.state_dict(), deit_metadata(m))
    return path


@pytest.fixture(scope="session")
def colour_dir(tmp_path_factory) -> Path:
    """One PNG per colour (odd sizes, so the resize and crop matter), plus a gradient."""
    from colours import COLOURS
    from PIL import Image

    d = tmp_path_factory.mktemp("colours")
    for i, (name, (_, rgb)) in enumerate(COLOURS.items()):
        Image.new("RGB", (40 + 7 * i, 30 + 3 * i), rgb).save(d / f"{name}.png")
    import numpy as np

    y, x = np.mgrid[0:45, 0:60]
    Image.fromarray(np.stack([x * 4, y * 5, 255 - x * 4], -1).astype(np.uint8)).save(d / "mixed.png")
    return d


def subprocess_env() -> dict:
    """The environment of a `deit` child process: this checkout's deit_cli first, one thread."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


# torchrun's launcher with two processes (gloo on the CPU); a script or `-m deit_cli ...` follows
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun_env(cwd: Path) -> dict:
    """`subprocess_env()` for torchrun: temporary files under cwd/tmp, no inherited rank variables."""
    (cwd / "tmp").mkdir(exist_ok=True)
    env = {**subprocess_env(), "TMPDIR": str(cwd / "tmp")}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def torchrun(*args, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m deit_cli ARGS...` (gloo on the CPU),
    temporary files under cwd/tmp, this checkout's deit_cli first on the path."""
    cmd = [*TORCHRUN, "-m", "deit_cli", *map(str, args)]
    # A session of its own, so that a hang kills the workers too, not only torchrun.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=torchrun_env(cwd),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def signal_after_the_first_epoch(cmd: list, sig: int, *, env: dict, cwd: Path | None = None) -> tuple[int, str]:
    """Run `cmd` (a `deit train`, piped: one line per epoch on stderr), send it `sig` once
    epoch 1's line is out, and return (exit code, stderr). The child has a session of its
    own, so whatever it started dies with it if it does not stop by itself."""
    proc = subprocess.Popen(
        [str(c) for c in cmd], stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for epoch 1 to end, then interrupt epoch 2
            line = proc.stderr.readline()
            if not line or line.startswith("epoch 1"):
                break
        proc.send_signal(sig)
        err = proc.stderr.read()
        return proc.wait(timeout=120), err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
