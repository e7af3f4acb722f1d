"""The engine end to end, and how the commands behave in a pipeline and on a terminal.

The colour model and its fixtures (model_path, colour_dir, run_cpu) are in colours.py
and conftest.py.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from colours import LABELS, colour_files, expected_features, expected_scores

ROOT = Path(__file__).resolve().parents[1]


def deit(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m deit_cli ARGS...` in a subprocess (stdout and stderr are pipes)."""
    return subprocess.run(
        [sys.executable, "-m", "deit_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        **kw,
    )


# --------------------------------------------------------------------------- engine


def test_the_colour_model_prefers_the_colour_it_sees(model_path, colour_dir):
    probs = expected_scores(model_path, colour_files(colour_dir))
    assert [LABELS[i] for i in probs.argmax(1)] == LABELS
    assert (probs.max(1) > 0.75).all()


def test_engine_classify_gives_the_models_labels_and_probabilities(model_path, colour_dir):
    from deit_cli.checkpoints import load_model
    from deit_cli.engine import ImageOptions
    from deit_cli.engine.classify import classify
    from deit_cli.images import iter_inputs

    paths = colour_files(colour_dir)
    model = load_model(str(model_path))
    results = list(classify(model, iter_inputs(map(str, paths)), top=3, options=ImageOptions(batch_size=4)))
    probs = expected_scores(model_path, paths)
    assert [r.position for r in results] == list(range(len(paths)))
    for r, p, path in zip(results, probs, paths):
        assert r.ok and r.path == str(path)
        order = np.argsort(-p)[:3]
        assert [q.index for q in r.predictions] == order.tolist()
        assert [q.label for q in r.predictions] == [LABELS[i] for i in order]
        assert [q.rank for q in r.predictions] == [1, 2, 3]
        np.testing.assert_allclose([q.score for q in r.predictions], p[order], atol=1e-6)


@pytest.mark.parametrize("pool", ["token", "avg", "cls", "dist", "tokens", "mean"])
def test_engine_features_are_forward_features_pooled(model_path, colour_dir, pool):
    from deit_cli import engine
    from deit_cli.checkpoints import load_model
    from deit_cli.images import iter_inputs

    paths = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    model = load_model(str(model_path))
    got = [r.features for r in engine.extract_features(model, iter_inputs(map(str, paths)), pool=pool)]
    np.testing.assert_allclose(np.stack(got), expected_features(model_path, paths, pool), atol=1e-6)


def test_engine_rejects_what_the_model_cannot_do(model_path):
    from deit_cli.checkpoints import load_model
    from deit_cli.engine.classify import classify
    from deit_cli.engine.features import extract_features
    from deit_cli.errors import UsageError

    model = load_model(str(model_path))
    for kwargs in ({"head": "nope"}, {"scores": "odds"}, {"top": 0}):
        with pytest.raises(UsageError):
            classify(model, [], **kwargs)  # at the call, before any input is read
    with pytest.raises(UsageError):
        extract_features(model, [], pool="max")


# --------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="session")
def many_dir(tmp_path_factory, colour_dir) -> Path:
    d = tmp_path_factory.mktemp("many")
    data = (colour_dir / "red.png").read_bytes()
    for i in range(200):
        (d / f"{i:03d}.png").write_bytes(data)
    return d


@pytest.mark.parametrize("command", [["classify", "--format", "jsonl"], ["extract-features"]])
def test_head_1_ends_cleanly(model_path, many_dir, command):
    deit_cmd = " ".join(
        [sys.executable, "-m", "deit_cli", *command, str(many_dir), "--model", str(model_path), "--batch-size", "2"]
    )
    p = subprocess.run(
        ["bash", "-c", f'{deit_cmd} | head -1; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(p.stdout.splitlines()) == 1
    assert p.stderr.strip() == "status=0", p.stderr  # no traceback, no "Exception ignored"


def _run_with_ptys(args: list[str], *, stdout_tty: bool, stderr_tty: bool, env: dict) -> tuple[bytes, bytes, int]:
    """Run with stdout and/or stderr on a pseudo-terminal; returns (stdout, stderr, rc)."""
    fds = {}
    streams = {}
    for name, tty in (("stdout", stdout_tty), ("stderr", stderr_tty)):
        if tty:
            master, slave = pty.openpty()
            fds[name] = master
            streams[name] = slave
        else:
            streams[name] = subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-m", "deit_cli", *args],
        stdout=streams["stdout"],
        stderr=streams["stderr"],
        env={**os.environ, "COLUMNS": "120", **env},
    )
    for name in fds:
        os.close(streams[name])
    got = {"stdout": b"", "stderr": b""}
    readers = {fd: name for name, fd in fds.items()}
    for name in ("stdout", "stderr"):
        if name not in fds:
            readers[getattr(proc, name).fileno()] = name
    while readers:
        ready, _, _ = select.select(list(readers), [], [], 60)
        assert ready, "timed out"
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pty's master reads EIO once the child has gone
                chunk = b""
            if chunk:
                got[readers[fd]] += chunk
            else:
                del readers[fd]
    rc = proc.wait(timeout=60)
    for fd in fds.values():
        os.close(fd)
    return got["stdout"], got["stderr"], rc


def test_no_ansi_off_a_terminal(run_cpu, model_path, colour_dir):
    files = colour_files(colour_dir)[:2]
    # stdout not a terminal: JSON lines by default, and even an explicit table is plain text
    rc, out, err = run_cpu("classify", *files, "--model", model_path)
    assert rc == 0 and "\x1b" not in out + err
    assert [json.loads(line)["predictions"][0]["label"] for line in out.splitlines()] == ["red", "green"]
    rc, out, err = run_cpu("classify", *files, *files, "--model", model_path, "--format", "table")
    assert rc == 0 and "\x1b" not in out + err and "red" in out


def test_terminal_gets_a_table_and_no_color_means_no_ansi(model_path, colour_dir):
    files = colour_files(colour_dir)[:2]
    out, _, rc = _run_with_ptys(
        ["classify", *map(str, files), "--model", str(model_path)],
        stdout_tty=True,
        stderr_tty=False,
        env={"NO_COLOR": "1"},
    )
    text = out.decode()
    assert rc == 0 and "\x1b" not in text
    assert "probability" in text and "red" in text and "green" in text and "█" in text


def test_progress_goes_to_stderr_and_leaves_stdout_clean(model_path, many_dir):
    # stderr a terminal, stdout a pipe: the bar is drawn on stderr, stdout stays pure JSON lines
    out, err, rc = _run_with_ptys(
        ["classify", str(many_dir), "--model", str(model_path), "--batch-size", "8"],
        stdout_tty=False,
        stderr_tty=True,
        env={"TERM": "xterm"},
    )
    assert rc == 0
    lines = out.decode().splitlines()
    assert len(lines) == len(list(many_dir.iterdir()))
    assert all(json.loads(line)["predictions"][0]["label"] == "red" for line in lines)
    assert "\x1b" not in out.decode() and "classifying" in err.decode()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [("fp32", 5e-3), ("bf16", 5e-2), ("fp16", 1e-2)])
def test_cuda_gives_the_cpu_answers(run_cpu, model_path, colour_dir, dtype, tol):
    files = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    rc, out, _ = run_cpu("classify", *files, "--model", model_path, "--device", "cuda", "--dtype", dtype)
    assert rc == 0
    recs = [json.loads(line) for line in out.splitlines()]
    for rec, probs in zip(recs, expected_scores(model_path, files)):
        assert rec["predictions"][0]["index"] == int(probs.argmax())
        assert rec["predictions"][0]["score"] == pytest.approx(float(probs.max()), abs=tol)
    rc, out, _ = run_cpu(
        "extract-features", *files, "--model", model_path, "--device", "cuda", "--dtype", dtype, "--pool", "mean"
    )
    assert rc == 0
    feats = np.array([json.loads(line)["features"] for line in out.splitlines()])
    np.testing.assert_allclose(feats, expected_features(model_path, files, "mean"), atol=tol * 10, rtol=tol)
