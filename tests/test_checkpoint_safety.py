"""Bad inputs to `deit convert` and `deit_cli.load_model`: unsafe pickles, corrupt files,
wrong tensors, bad destinations, a full disk, Ctrl-C.

Every refusal must be one `error:` line on stderr with the documented exit code
(DESIGN.md), write nothing (no DST, no `.DST.tmp-*` left), leave SRC as it was (bytes and
mtime), and run nothing from the file (a canary a payload would create stays absent).

Most cases run the real CLI in a subprocess. A subprocess costs ~2 s of CPU (importing
torch), so they are started together on a small thread pool when the module's first
subprocess test runs, and each test waits for its own; the cases that do not need a
process of their own run in-process through `main([...])`.
"""

from __future__ import annotations

import builtins
import collections
import concurrent.futures
import hashlib
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import deit_cli
from deit_cli.checkpoints import DeiTWarning, read_checkpoint
from deit_cli.cli.app import main
from deit_cli.errors import CheckpointError, InputNotFound
from deit_cli.model import DeiT, DeiTConfig

TINY = DeiTConfig(image_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=10)
SRC, DST = "src.pth", "out.safetensors"
CANARY = "CANARY"

# The subprocess gets no debug tracebacks, no colour, and no network.
ENV = {k: v for k, v in os.environ.items() if k != "DEIT_DEBUG"}
ENV.update(NO_COLOR="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")


# --- payloads ---------------------------------------------------------------------------


class RunsCode:
    """Pickles as a call of `func(arg)`: unpickling it runs the call."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


class NotAllowed:
    """A class no checkpoint may need: unpickling it would import this module."""


class SubOrderedDict(collections.OrderedDict):
    pass


def shell_payload(d: Path) -> RunsCode:
    return RunsCode(os.system, f"touch '{d / CANARY}'")  # pickled as posix.system


def exec_payload(d: Path) -> RunsCode:
    return RunsCode(builtins.exec, f"open({str(d / CANARY)!r}, 'w').close()")


# --- sources ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    """The state dict of a tiny DeiT, in the timm layout."""
    model = DeiT(TINY)
    model.init_weights(0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def save_torch(path: Path, obj, **kw) -> None:
    torch.save(obj, path, **kw)


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def changed(sd: dict, **edits) -> dict:
    out = dict(sd)
    for k, v in edits.items():
        k = k.replace("__", ".")
        if v is None:
            del out[k]
        else:
            out[k] = v
    return out


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def dup_header() -> bytes:
    entry = '{"dtype":"F32","shape":[1,1,64],"data_offsets":[0,256]}'
    return safetensors_bytes(f'{{"cls_token":{entry},"cls_token":{entry}}}'.encode(), b"\0" * 256)


# Each builder writes its source into the case directory and returns the convert arguments.
def b_valid(d, sd):
    save_torch(d / SRC, {"model": sd})
    return [SRC, DST]


def b_zip_shell(d, sd):
    save_torch(d / SRC, {"model": sd, "args": shell_payload(d)})
    return [SRC, DST]


def b_zip_exec(d, sd):
    save_torch(d / SRC, {"model": sd, "args": exec_payload(d)})
    return [SRC, DST]


def b_zip_shell_protocol4(d, sd):
    save_torch(d / SRC, {"model": sd, "args": shell_payload(d)}, pickle_protocol=4)
    return [SRC, DST]


def b_zip_payload_as_weights(d, sd):
    save_torch(d / SRC, shell_payload(d))
    return [SRC, DST]


def b_bare_pickle(d, sd):
    (d / SRC).write_bytes(pickle.dumps({"model": shell_payload(d)}, protocol=2))
    return [SRC, DST]


def b_bare_pickle_protocol0(d, sd):
    (d / SRC).write_bytes(pickle.dumps(shell_payload(d), protocol=0))
    return [SRC, DST]


def b_bare_pickle_named_safetensors(d, sd):
    (d / "src.safetensors").write_bytes(pickle.dumps(exec_payload(d), protocol=4))
    return ["src.safetensors", DST]


def b_unknown_class(d, sd):
    save_torch(d / SRC, {"model": sd, "meta": NotAllowed()})
    return [SRC, DST]


def b_ordereddict_subclass(d, sd):
    save_torch(d / SRC, {"model": SubOrderedDict(sd)})
    return [SRC, DST]


def b_zero_bytes(d, sd):
    (d / SRC).write_bytes(b"")
    return [SRC, DST]


def b_random_bytes(d, sd):
    g = torch.Generator().manual_seed(1)
    (d / SRC).write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))
    return [SRC, DST]


def b_truncated_zip(d, sd):
    b_valid(d, sd)
    cut_in_half(d / SRC)
    return [SRC, DST]


def b_truncated_safetensors(d, sd):
    save_file(sd, d / "src.safetensors")
    cut_in_half(d / "src.safetensors")
    return ["src.safetensors", DST]


def b_huge_header(d, sd):
    (d / "src.safetensors").write_bytes(struct.pack("<Q", 2**40) + b'{"cls_token":' + b" " * 100)
    return ["src.safetensors", DST]


def b_duplicate_keys(d, sd):
    (d / "src.safetensors").write_bytes(dup_header())
    return ["src.safetensors", DST]


def b_header_not_json(d, sd):
    (d / "src.safetensors").write_bytes(safetensors_bytes(b'{"cls_token": [not json', b"\0" * 16))
    return ["src.safetensors", DST]


def b_legacy_torch(d, sd):
    save_torch(d / SRC, {"model": sd}, _use_new_zipfile_serialization=False)
    return [SRC, DST]


def b_missing(d, sd):
    save_torch(d / SRC, {"model": changed(sd, blocks__1__mlp__fc2__weight=None)})
    return [SRC, DST]


def b_missing_safetensors(d, sd):
    save_file(changed(sd, blocks__1__mlp__fc2__weight=None), d / "src.safetensors")
    return ["src.safetensors", DST]


def b_misshaped(d, sd):
    save_torch(d / SRC, {"model": changed(sd, blocks__0__attn__qkv__weight=torch.zeros(10, 64))})
    return [SRC, DST]


def b_unexpected(d, sd):
    save_torch(d / SRC, {"model": changed(sd, extra__weight=torch.zeros(3))})
    return [SRC, DST]


def b_resnet(d, sd):
    save_torch(
        d / SRC,
        {
            "conv1.weight": torch.zeros(8, 3, 7, 7),
            "bn1.weight": torch.ones(8),
            "fc.weight": torch.zeros(10, 8),
            "fc.bias": torch.zeros(10),
        },
    )
    return [SRC, DST]


def b_int64(d, sd):
    ints = torch.ones(192, 64, dtype=torch.int64)
    save_torch(d / SRC, {"model": changed(sd, blocks__0__attn__qkv__weight=ints)})
    return [SRC, DST]


def b_no_tensors(d, sd):
    save_torch(d / SRC, {"epoch": 3, "args": {"lr": 0.1}})
    return [SRC, DST]


def b_fp16_overflow(d, sd):
    big = sd["blocks.1.mlp.fc2.weight"].clone()
    big[0, 0] = 1e6  # fine in fp32, inf in fp16
    save_torch(d / SRC, {"model": changed(sd, blocks__1__mlp__fc2__weight=big)})
    return [SRC, DST, "--dtype", "fp16"]


def b_dst_exists(d, sd):
    b_valid(d, sd)
    (d / DST).write_bytes(b"precious")
    return [SRC, DST]


def b_dst_is_src(d, sd):
    b_valid(d, sd)
    return [SRC, SRC, "--force"]


def b_dst_is_src_respelled(d, sd):
    b_valid(d, sd)
    (d / "sub").mkdir()
    return [SRC, "./sub/../" + SRC, "--force"]


def b_dst_is_src_abs(d, sd):
    b_valid(d, sd)
    return [str(d / SRC), SRC]


def b_dst_symlink_to_src(d, sd):
    b_valid(d, sd)
    (d / "link.pth").symlink_to(SRC)
    return [SRC, "link.pth", "--force"]


def b_dst_symlink_elsewhere(d, sd):
    b_valid(d, sd)
    (d / "precious.bin").write_bytes(b"precious")
    (d / DST).symlink_to("precious.bin")
    return [SRC, DST, "--force"]


def b_dst_no_dir(d, sd):
    b_valid(d, sd)
    return [SRC, "nosuchdir/" + DST]


def b_dst_proc(d, sd):
    b_valid(d, sd)
    return [SRC, "/proc/deit-safety-test.safetensors"]


def b_dst_sys(d, sd):
    b_valid(d, sd)
    return [SRC, "/sys/deit-safety-test.safetensors"]


def b_dst_dev_full(d, sd):
    b_valid(d, sd)
    return [SRC, "/dev/full"]


def b_dst_dev_full_force(d, sd):
    b_valid(d, sd)
    return [SRC, "/dev/full", "--force"]


def b_src_missing(d, sd):
    return ["nosuch.pth", DST]


def b_src_empty_dir(d, sd):
    (d / "model").mkdir()
    return ["model", DST]


def b_src_dir_config_only(d, sd):
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text('{"model_type": "deit"}')
    return ["model", DST]


@dataclass
class Case:
    id: str
    build: Callable[[Path, dict], list[str]]
    rc: int
    words: tuple[str, ...]  # each in the error line (case-insensitive)
    subprocess: bool = True  # False: in-process through main()
    canary: bool = False  # the file carries a payload that would create CANARY
    elsewhere: str | None = None  # a directory outside the case where nothing may appear


CASES = [
    # 1. payloads that would run code
    Case("zip-os-system", b_zip_shell, 65, ("refused", "posix.system"), canary=True),
    Case("zip-builtins-exec", b_zip_exec, 65, ("refused", "builtins.exec"), canary=True),
    Case("zip-protocol4-os-system", b_zip_shell_protocol4, 65, ("refused", "opcode"), canary=True),
    Case(
        "zip-payload-is-the-object",
        b_zip_payload_as_weights,
        65,
        ("refused", "posix.system"),
        subprocess=False,
        canary=True,
    ),
    Case("bare-pickle-os-system", b_bare_pickle, 65, ("bare pickle",), canary=True),
    Case("bare-pickle-protocol0", b_bare_pickle_protocol0, 65, ("not a checkpoint",), canary=True),
    Case("bare-pickle-named-safetensors", b_bare_pickle_named_safetensors, 65, ("bare pickle",), canary=True),
    # 2. unknown classes
    Case("zip-unknown-class", b_unknown_class, 65, ("refused", "NotAllowed")),
    Case("zip-ordereddict-subclass", b_ordereddict_subclass, 65, ("refused", "SubOrderedDict")),
    # 3. corrupt files
    Case("zero-bytes", b_zero_bytes, 65, ("empty", "0 bytes")),
    Case("random-bytes", b_random_bytes, 65, ("not a checkpoint",)),
    Case("truncated-zip", b_truncated_zip, 65, ("unreadable torch checkpoint", "zip")),
    Case("truncated-safetensors", b_truncated_safetensors, 65, ("truncated safetensors",), subprocess=False),
    Case("huge-safetensors-header", b_huge_header, 65, ("corrupt safetensors", "header of 1099511627776 bytes")),
    Case("duplicate-safetensors-keys", b_duplicate_keys, 65, ("duplicate", "cls_token"), subprocess=False),
    Case("safetensors-header-not-json", b_header_not_json, 65, ("not JSON",), subprocess=False),
    Case("legacy-torch-file", b_legacy_torch, 65, ("legacy", "re-save")),
    # 4. wrong tensors
    Case("missing-tensor", b_missing, 65, ("missing tensors", "blocks.1.mlp.fc2.weight"), subprocess=False),
    Case("missing-tensor-safetensors", b_missing_safetensors, 65, ("missing tensors", "blocks.1.mlp.fc2.weight")),
    Case("misshaped-tensor", b_misshaped, 65, ("mis-shaped", "blocks.0.attn.qkv.weight", "(10, 64)"), subprocess=False),
    Case("unexpected-tensor", b_unexpected, 65, ("unexpected tensors", "extra.weight"), subprocess=False),
    Case("resnet-layout", b_resnet, 65, ("unrecognised", "layout", "conv1.weight"), subprocess=False),
    Case("int64-tensor", b_int64, 65, ("blocks.0.attn.qkv.weight", "int64", "floating point"), subprocess=False),
    Case("no-tensors", b_no_tensors, 65, ("no dictionary of tensors",), subprocess=False),
    # 5. the read-back check: fp16 turns a large weight into inf
    Case("fp16-overflow-fails-check", b_fp16_overflow, 65, ("conversion check failed", "fp16", "nothing written")),
    # 6. destinations
    Case("dst-exists", b_dst_exists, 73, ("already exists", "--force")),
    Case("dst-is-src", b_dst_is_src, 2, ("destination is the source",), subprocess=False),
    Case("dst-is-src-respelled", b_dst_is_src_respelled, 2, ("destination is the source",), subprocess=False),
    Case("dst-is-src-absolute-vs-relative", b_dst_is_src_abs, 2, ("destination is the source",), subprocess=False),
    Case("dst-symlink-to-src", b_dst_symlink_to_src, 2, ("destination is the source",)),
    Case("dst-symlink-elsewhere-force", b_dst_symlink_elsewhere, 73, ("not a regular file",), subprocess=False),
    Case("dst-dir-missing", b_dst_no_dir, 73, ("nosuchdir", "does not exist"), subprocess=False),
    Case("dst-under-proc", b_dst_proc, 73, ("cannot create", "/proc"), subprocess=False, elsewhere="/proc"),
    Case("dst-under-sys", b_dst_sys, 73, ("cannot create", "/sys"), subprocess=False, elsewhere="/sys"),
    Case("dst-dev-full", b_dst_dev_full, 73, ("/dev/full", "already exists"), elsewhere="/dev"),
    Case(
        "dst-dev-full-force",
        b_dst_dev_full_force,
        73,
        ("/dev/full", "not a regular file"),
        subprocess=False,
        elsewhere="/dev",
    ),
    # 8. sources that are not there
    Case("src-missing", b_src_missing, 66, ("nosuch.pth", "no such file")),
    Case("src-empty-dir", b_src_empty_dir, 66, ("no model.safetensors",), subprocess=False),
    Case("src-dir-config-only", b_src_dir_config_only, 66, ("no model.safetensors",), subprocess=False),
]
BY_ID = {c.id: c for c in CASES}
# The sources `deit_cli.load_model` must refuse as well.
LIBRARY_CASES = [c for c in CASES if c.rc == 65 and c.id != "fp16-overflow-fails-check"]


# --- running and checking ---------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (hidden ones too): its kind and bytes or link, and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[str(p.relative_to(root))] = ("dir",)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p.relative_to(root))] = ("file", digest, st.st_mtime_ns)
    return out


def temp_files(directory: str | Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".tmp-" in n or n.startswith(".deit-safety")]


def cli(cwd: Path, args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deit_cli", "convert", *args],
        cwd=cwd,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def assert_one_error_line(stderr: str, words: tuple[str, ...] = ()) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in stderr
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
    return line


def assert_refused(case: Case, d: Path, before: dict, rc: int, stdout: str, stderr: str) -> None:
    assert rc == case.rc, f"exit {rc}, expected {case.rc}; stderr: {stderr}"
    assert_one_error_line(stderr, case.words)
    assert stdout == ""
    assert snapshot(d) == before  # no DST, no temp file, SRC bytes and mtime unchanged
    assert not (d / CANARY).exists()
    if case.elsewhere:
        assert not temp_files(case.elsewhere)


_STARTED: list[concurrent.futures.Future] = []


@pytest.fixture(scope="module")
def runs(sd, tmp_path_factory):
    """Every subprocess case, built and started on a pool: id -> (dir, before, future)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    root = tmp_path_factory.mktemp("cli")
    out = {}

    def submit(name: str, build) -> None:
        d = root / name
        d.mkdir()
        args = build(d, sd)
        out[name] = (d, snapshot(d), pool.submit(cli, d, args))
        _STARTED.append(out[name][2])

    for case in CASES:
        if case.subprocess:
            submit(case.id, case.build)
    submit("force", lambda d, sd: [*b_dst_exists(d, sd), "--force"])
    submit("nan", lambda d, sd: _nan_source(d, sd))
    yield out
    pool.shutdown(wait=True)


def _drain() -> None:
    """Wait for the pool, if it was started: nothing else competes for the CPU, and no
    thread is running when a subprocess is started with preexec_fn."""
    concurrent.futures.wait(_STARTED)


# --- the cases --------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.subprocess])
def test_cli_refuses(case_id, runs):
    d, before, future = runs[case_id]
    r = future.result()
    assert_refused(BY_ID[case_id], d, before, r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("case_id", [c.id for c in CASES if not c.subprocess])
def test_cli_refuses_in_process(case_id, sd, tmp_path, monkeypatch, capsys):
    case = BY_ID[case_id]
    args = case.build(tmp_path, sd)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEIT_DEBUG", raising=False)
    rc = main(["convert", *args])
    out, err = capsys.readouterr()
    assert_refused(case, tmp_path, before, rc, out, err)


@pytest.mark.parametrize("case_id", [c.id for c in LIBRARY_CASES])
def test_load_model_refuses(case_id, sd, tmp_path, monkeypatch):
    case = BY_ID[case_id]
    src = case.build(tmp_path, sd)[0]
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        deit_cli.load_model(src)
    assert info.value.exit_code == 65
    for w in case.words:
        assert w.lower() in info.value.one_line().lower()
    assert "\n" not in info.value.one_line()
    assert snapshot(tmp_path) == before
    assert not (tmp_path / CANARY).exists()


@pytest.mark.parametrize("payload", [shell_payload, exec_payload])
def test_payloads_are_live(payload, sd, tmp_path):
    """The canary means something: an unsafe unpickler does run these payloads."""
    torch.save({"model": sd, "args": payload(tmp_path)}, tmp_path / SRC)
    torch.load(tmp_path / SRC, weights_only=False)
    assert (tmp_path / CANARY).exists()
    (tmp_path / CANARY).unlink()
    pickle.loads(pickle.dumps(payload(tmp_path), protocol=2))
    assert (tmp_path / CANARY).exists()


def test_missing_source_is_not_found_in_library(tmp_path):
    with pytest.raises(InputNotFound):
        read_checkpoint(str(tmp_path / "nosuch.pth"))
    with pytest.raises(InputNotFound):
        read_checkpoint(str(tmp_path))  # a directory without weights


def test_huge_safetensors_header_is_refused_fast_without_allocating(sd, tmp_path):
    b_huge_header(tmp_path, sd)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match="header of 1099511627776 bytes"):
            read_checkpoint(str(tmp_path / "src.safetensors"))
        elapsed = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 16 * 2**20


def test_dst_exists_with_force_is_replaced(runs, sd):
    d, before, future = runs["force"]
    r = future.result()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["destination"] == DST
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr
    assert (d / SRC).read_bytes() and snapshot(d)[SRC] == before[SRC]
    assert (d / DST).read_bytes() != b"precious"
    assert not temp_files(d)
    ckpt = read_checkpoint(str(d / DST))
    assert set(ckpt.state_dict) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ckpt.state_dict[k], v), k


def _nan_source(d: Path, sd: dict) -> list[str]:
    w = sd["blocks.0.mlp.fc1.weight"]
    save_torch(d / SRC, {"model": changed(sd, blocks__0__mlp__fc1__weight=torch.full_like(w, float("nan")))})
    return [SRC, DST]


def test_nan_weights_warn_once_and_convert_faithfully(runs):
    """NaN in a weight is not a format error: convert warns (one `warning:` line naming
    the tensor, never the temp file), writes an exact copy and exits 0. The read-back
    check counts NaN where the source has NaN as equal (and fails NaN anywhere else:
    see fp16-overflow-fails-check)."""
    d, before, future = runs["nan"]
    r = future.result()
    assert r.returncode == 0, r.stderr
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1, r.stderr
    assert "blocks.0.mlp.fc1.weight" in warns[0] and "NaN" in warns[0]
    assert ".tmp-" not in r.stderr and "error:" not in r.stderr and "Traceback" not in r.stderr
    assert snapshot(d)[SRC] == before[SRC]
    assert not temp_files(d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = deit_cli.load_model(str(d / DST))
    assert any(issubclass(w.category, DeiTWarning) for w in caught)
    assert model.state_dict()["blocks.0.mlp.fc1.weight"].isnan().all()


def test_file_too_large_is_an_io_error_and_leaves_nothing(sd, tmp_path):
    """A real failed write: RLIMIT_FSIZE makes the write fail with EFBIG."""
    _drain()
    b_valid(tmp_path, sd)
    before = snapshot(tmp_path)
    assert (tmp_path / SRC).stat().st_size > 20_000

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    r = cli(tmp_path, [SRC, DST], preexec_fn=limit)
    case = Case("efbig", b_valid, 74, ("write failed", "too large", "nothing was written"))
    assert_refused(case, tmp_path, before, r.returncode, r.stdout, r.stderr)


def test_write_error_in_process_leaves_nothing(sd, tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through the write: 74, and the partial temp file is removed."""
    import errno

    from deit_cli.checkpoints import writing

    def full(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    b_valid(tmp_path, sd)
    before = snapshot(tmp_path)
    monkeypatch.setattr(writing, "save_safetensors", full)
    monkeypatch.chdir(tmp_path)
    rc = main(["convert", SRC, DST])
    out, err = capsys.readouterr()
    case = Case("enospc", b_valid, 74, ("write failed", "no space left on device"))
    assert_refused(case, tmp_path, before, rc, out, err)


def _big_checkpoint(path: Path) -> None:
    """~40 MB: embed_dim 384, depth 6, at 224 px (random weights, no slow init)."""
    cfg = DeiTConfig(image_size=224, patch_size=16, embed_dim=384, depth=6, num_heads=6, num_classes=10)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DeiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    torch.save({"model": {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}}, path)


def test_ctrl_c_during_the_write_leaves_nothing(tmp_path):
    """SIGINT once the temp file beside DST has data in it: exit 130, no DST, no temp file.

    (The command exits silently on Ctrl-C: typer turns KeyboardInterrupt into exit 130
    before `main()` can print `error: interrupted`; at most one `error:` line is allowed.)
    """
    _drain()
    _big_checkpoint(tmp_path / SRC)
    before = snapshot(tmp_path)

    def default_sigint():  # a runner started in the background may ignore SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen(
        [sys.executable, "-m", "deit_cli", "convert", SRC, DST],
        cwd=tmp_path,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    sent = False
    deadline = time.monotonic() + 60
    try:
        while not sent and p.poll() is None and time.monotonic() < deadline:
            for e in os.scandir(tmp_path):
                if e.name.startswith(f".{DST}.tmp-") and e.stat().st_size > 0:
                    p.send_signal(signal.SIGINT)
                    sent = True
                    break
            else:
                time.sleep(0.0005)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert sent, f"the temp file never showed up (exit {p.returncode}): {err}"
    assert p.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) <= 1 and all(ln.startswith("error:") for ln in lines), err
    assert "Traceback" not in err
    assert out == ""
    assert snapshot(tmp_path) == before


def test_ctrl_c_in_process_leaves_nothing(sd, tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt after part of the temp file is written: 130, nothing left."""
    from deit_cli.checkpoints import writing

    def interrupted(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    b_valid(tmp_path, sd)
    before = snapshot(tmp_path)
    monkeypatch.setattr(writing, "save_safetensors", interrupted)
    monkeypatch.chdir(tmp_path)
    rc = main(["convert", SRC, DST])
    out, err = capsys.readouterr()
    assert rc == 130
    assert len(err.splitlines()) <= 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_json_metadata_of_valid_conversion_is_sane(sd, tmp_path, monkeypatch, capsys):
    """The starting point is valid: the same source converts, in-process, with --json."""
    b_valid(tmp_path, sd)
    monkeypatch.chdir(tmp_path)
    rc = main(["convert", SRC, DST, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["max_abs_diff"] <= result["tolerance"]
    assert (tmp_path / DST).is_file() and not temp_files(tmp_path)
