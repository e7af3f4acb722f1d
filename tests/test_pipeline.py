"""The engine end to end, and how the commands behave in a pipeline and on a terminal.

Also the shared fixtures of test_classify, test_features and test_distributed: a tiny
DeiT whose weights are built so that the mean colour of an image decides its class
(a red image is "red", a cyan one "cyan"), saved as `deit convert` saves models.
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# name: (logit prototype over the normalised mean (r, g, b), an RGB that is clearly it)
COLOURS = {
    "red": ((2, -1, -1), (255, 0, 0)),
    "green": ((-1, 2, -1), (0, 255, 0)),
    "blue": ((-1, -1, 2), (0, 0, 255)),
    "yellow": ((1, 1, -2), (255, 255, 0)),
    "cyan": ((-2, 1, 1), (0, 255, 255)),
    "magenta": ((1, -2, 1), (255, 0, 255)),
}
LABELS = list(COLOURS)


@torch.no_grad()
def colour_model():
    """A DeiT (32 px, patch 16, 8 dims, 1 block) that classifies by mean colour.

    The patch embedding gives each channel's mean as the pair (m, -m); attention with
    zero queries and keys is uniform, so the class and distillation tokens receive the mean
    over all tokens; the pairs keep every token's mean at zero, so each LayerNorm only
    rescales; the heads score that mean colour against the prototypes (the distillation
    head at half the scale, so cls, dist and avg give different probabilities).
    """
    from deit_cli.model import DeiT, DeiTConfig

    cfg = DeiTConfig(image_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.0,
                     num_classes=len(COLOURS))  # fmt: skip
    m = DeiT(cfg)
    for p in m.parameters():
        p.zero_()
    for norm in (m.blocks[0].norm1, m.blocks[0].norm2, m.norm):
        norm.weight.fill_(1)
    w = m.patch_embed.proj.weight  # (8, 3, 16, 16)
    for c in range(3):
        w[2 * c, c], w[2 * c + 1, c] = 1 / 256, -1 / 256  # the patch's channel mean, both signs
    for token in (m.cls_token, m.dist_token):
        token[0, 0, 6], token[0, 0, 7] = 1.0, -1.0  # a constant pair: no division by ~0
    m.blocks[0].attn.qkv.weight[16:24] = torch.eye(8)  # q = k = 0, v = identity
    m.blocks[0].attn.proj.weight.copy_(torch.eye(8))
    protos = torch.tensor([p for p, _ in COLOURS.values()], dtype=torch.float32)
    m.head.weight[:, 0:6:2] = 2 * protos
    m.head_dist.weight[:, 0:6:2] = protos
    m.labels, m.source = list(LABELS), "colours-test"
    return m.eval()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    from deit_cli.checkpoints.writing import deit_metadata, save_safetensors

    path = tmp_path_factory.mktemp("model") / "colours.safetensors"
    m = colour_model()
    save_safetensors(path, m.state_dict(), deit_metadata(m))
    return path


@pytest.fixture(scope="session")
def colour_dir(tmp_path_factory) -> Path:
    """One PNG per colour (odd sizes, so the resize and crop matter), plus a gradient."""
    d = tmp_path_factory.mktemp("colours")
    for i, (name, (_, rgb)) in enumerate(COLOURS.items()):
        Image.new("RGB", (40 + 7 * i, 30 + 3 * i), rgb).save(d / f"{name}.png")
    y, x = np.mgrid[0:45, 0:60]
    Image.fromarray(np.stack([x * 4, y * 5, 255 - x * 4], -1).astype(np.uint8)).save(d / "mixed.png")
    return d


def colour_files(d: Path) -> list[Path]:
    return [d / f"{name}.png" for name in COLOURS]


def model_inputs(model, paths, *, crop_pct=None, resize_mode=None, exif_transpose=True) -> torch.Tensor:
    """What the model should see: the images layer's decode and eval transform."""
    from deit_cli.images import decode_image, eval_transform

    t = eval_transform(model.preprocessing, crop_pct=crop_pct, resize_mode=resize_mode)
    return torch.stack([t(decode_image(str(p), exif_transpose=exif_transpose).image) for p in paths])


def expected_scores(model_path: Path, paths, head: str = "avg", scores: str = "prob", **kw) -> np.ndarray:
    """(images, classes): the model's own probabilities (or logits), one image at a time."""
    from deit_cli.checkpoints import load_model

    model = load_model(str(model_path))
    x = model_inputs(model, paths, **kw)
    with torch.no_grad():
        logits = torch.cat([model.forward_head(model.forward_features(x[i : i + 1]), head) for i in range(len(x))])
    return (logits.softmax(-1) if scores == "prob" else logits).numpy()


def expected_features(model_path: Path, paths, pool: str, normalize: bool = False) -> np.ndarray:
    """The model's own forward_features, pooled here independently of the engine."""
    from deit_cli.checkpoints import load_model

    model = load_model(str(model_path))
    with torch.no_grad():
        tokens = model.forward_features(model_inputs(model, paths))
    pooled = {
        "cls": tokens[:, 0],
        "dist": tokens[:, 1],
        "avg": (tokens[:, 0] + tokens[:, 1]) / 2,
        "mean": tokens[:, 2:].mean(1),
        "tokens": tokens,
    }[pool]
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return pooled.numpy()


@pytest.fixture
def run_cli(run_cli):
    """conftest's `deit ARGS...` in-process, on the CPU: the answers are compared with the
    model's own on the CPU to 1e-6, which a GPU's TF32 convolutions would not meet."""

    def run(command: str, *args) -> tuple[int, str, str]:
        return run_cli(command, "--device", "cpu", *args)

    return run


def deit(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m deit_cli ARGS...` in a subprocess (stdout and stderr are pipes)."""
    return subprocess.run([sys.executable, "-m", "deit_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, **kw)  # fmt: skip


# --------------------------------------------------------------------------- engine


def test_the_colour_model_prefers_the_colour_it_sees(model_path, colour_dir):
    probs = expected_scores(model_path, colour_files(colour_dir))
    assert [LABELS[i] for i in probs.argmax(1)] == LABELS
    assert (probs.max(1) > 0.75).all()


def test_engine_classify_gives_the_models_labels_and_probabilities(model_path, colour_dir):
    from deit_cli import engine
    from deit_cli.checkpoints import load_model
    from deit_cli.images import iter_inputs

    paths = colour_files(colour_dir)
    model = load_model(str(model_path))
    results = list(engine.classify(model, iter_inputs(map(str, paths)), top=3, options=engine.ImageOptions(batch_size=4)))
    probs = expected_scores(model_path, paths)
    assert [r.position for r in results] == list(range(len(paths)))
    for r, p, path in zip(results, probs, paths):
        assert r.ok and r.path == str(path)
        order = np.argsort(-p)[:3]
        assert [q.index for q in r.predictions] == order.tolist()
        assert [q.label for q in r.predictions] == [LABELS[i] for i in order]
        assert [q.rank for q in r.predictions] == [1, 2, 3]
        np.testing.assert_allclose([q.score for q in r.predictions], p[order], atol=1e-6)


@pytest.mark.parametrize("pool", ["cls", "dist", "avg", "mean", "tokens"])
def test_engine_features_are_forward_features_pooled(model_path, colour_dir, pool):
    from deit_cli import engine
    from deit_cli.checkpoints import load_model
    from deit_cli.images import iter_inputs

    paths = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    model = load_model(str(model_path))
    got = [r.features for r in engine.extract_features(model, iter_inputs(map(str, paths)), pool=pool)]
    np.testing.assert_allclose(np.stack(got), expected_features(model_path, paths, pool), atol=1e-6)


def test_engine_rejects_what_the_model_cannot_do(model_path):
    from deit_cli import engine
    from deit_cli.checkpoints import load_model
    from deit_cli.errors import UsageError

    model = load_model(str(model_path))
    for kwargs in ({"head": "nope"}, {"scores": "odds"}, {"top": 0}):
        with pytest.raises(UsageError):
            engine.classify(model, [], **kwargs)  # at the call, before any input is read
    with pytest.raises(UsageError):
        engine.extract_features(model, [], pool="max")


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
    deit_cmd = " ".join([sys.executable, "-m", "deit_cli", *command, str(many_dir), "--model", str(model_path),
                         "--batch-size", "2"])  # fmt: skip
    p = subprocess.run(["bash", "-c", f"{deit_cmd} | head -1; echo \"status=${{PIPESTATUS[0]}}\" >&2"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
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
    proc = subprocess.Popen([sys.executable, "-m", "deit_cli", *args], stdout=streams["stdout"],
                            stderr=streams["stderr"], env={**os.environ, "COLUMNS": "120", **env})  # fmt: skip
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


def test_no_ansi_off_a_terminal(run_cli, model_path, colour_dir):
    files = colour_files(colour_dir)[:2]
    # stdout not a terminal: JSON lines by default, and even an explicit table is plain text
    rc, out, err = run_cli("classify", *files, "--model", model_path)
    assert rc == 0 and "\x1b" not in out + err
    assert [json.loads(line)["predictions"][0]["label"] for line in out.splitlines()] == ["red", "green"]
    rc, out, err = run_cli("classify", *files, *files, "--model", model_path, "--format", "table")
    assert rc == 0 and "\x1b" not in out + err and "red" in out


def test_terminal_gets_a_table_and_no_color_means_no_ansi(model_path, colour_dir):
    files = colour_files(colour_dir)[:2]
    out, _, rc = _run_with_ptys(["classify", *map(str, files), "--model", str(model_path)], stdout_tty=True,
                                stderr_tty=False, env={"NO_COLOR": "1"})  # fmt: skip
    text = out.decode()
    assert rc == 0 and "\x1b" not in text
    assert "probability" in text and "red" in text and "green" in text and "█" in text


def test_progress_goes_to_stderr_and_leaves_stdout_clean(model_path, many_dir):
    # stderr a terminal, stdout a pipe: the bar is drawn on stderr, stdout stays pure JSON lines
    out, err, rc = _run_with_ptys(["classify", str(many_dir), "--model", str(model_path), "--batch-size", "8"],
                                  stdout_tty=False, stderr_tty=True, env={"TERM": "xterm"})  # fmt: skip
    assert rc == 0
    lines = out.decode().splitlines()
    assert len(lines) == len(list(many_dir.iterdir()))
    assert all(json.loads(line)["predictions"][0]["label"] == "red" for line in lines)
    assert "\x1b" not in out.decode() and "classifying" in err.decode()


PROBE = (
    "import sys; from deit_cli.cli.app import main; rc = main(sys.argv[1:]); "
    "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)"
)


@pytest.mark.parametrize("command", ["classify", "extract-features"])
def test_help_does_not_import_torch(command):
    p = subprocess.run([sys.executable, "-c", PROBE, command, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Usage" in p.stdout and p.stderr.strip().endswith("NO-TORCH")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [("fp32", 5e-3), ("bf16", 5e-2), ("fp16", 1e-2)])
def test_cuda_gives_the_cpu_answers(run_cli, model_path, colour_dir, dtype, tol):
    files = [*colour_files(colour_dir), colour_dir / "mixed.png"]
    rc, out, _ = run_cli("classify", *files, "--model", model_path, "--device", "cuda", "--dtype", dtype)
    assert rc == 0
    recs = [json.loads(line) for line in out.splitlines()]
    for rec, probs in zip(recs, expected_scores(model_path, files)):
        assert rec["predictions"][0]["index"] == int(probs.argmax())
        assert rec["predictions"][0]["score"] == pytest.approx(float(probs.max()), abs=tol)
    rc, out, _ = run_cli("extract-features", *files, "--model", model_path, "--device", "cuda", "--dtype", dtype,
                         "--pool", "mean")  # fmt: skip
    assert rc == 0
    feats = np.array([json.loads(line)["features"] for line in out.splitlines()])
    np.testing.assert_allclose(feats, expected_features(model_path, files, "mean"), atol=tol * 10, rtol=tol)
