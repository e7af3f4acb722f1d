"""deit_cli.checkpoints.hub against a fake hub on loopback (tests/fakehub.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deit_cli.checkpoints import hub  # noqa: E402
from deit_cli.errors import (  # noqa: E402
    AccessDenied,
    CheckpointError,
    HubUnavailable,
    InputNotFound,
)

pytest_plugins = ("fakehub",)  # the fake_hub and hf_env fixtures

REPO = "facebook/deit-tiny-patch16-224"


def make_dir(root: Path, name: str, files: dict[str, bytes]) -> Path:
    d = root / name
    d.mkdir()
    for filename, data in files.items():
        (d / filename).write_bytes(data)
    return d


@pytest.fixture
def repos(tmp_path):
    """Directories for the usual repo shapes."""
    return {
        "st": make_dir(
            tmp_path,
            "st",
            {
                "model.safetensors": b"ST-main",
                "config.json": b'{"v": "main"}',
                "README.md": b"readme",
            },
        ),
        "st_v1": make_dir(tmp_path, "st_v1", {"model.safetensors": b"ST-v1", "config.json": b'{"v": "v1"}'}),
        "bin": make_dir(tmp_path, "bin", {"pytorch_model.bin": b"BIN", "config.json": b"{}"}),
        "bare": make_dir(tmp_path, "bare", {"model.safetensors": b"ST-bare"}),
        "noweights": make_dir(tmp_path, "noweights", {"config.json": b"{}", "README.md": b"x"}),
    }


# --- parse_repo_id ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, expected",
    [
        ("facebook/deit-tiny-patch16-224", ("facebook/deit-tiny-patch16-224", None)),
        ("facebook/deit-tiny-patch16-224@v1", ("facebook/deit-tiny-patch16-224", "v1")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
        ("Qwen/Qwen2.5-7B", ("Qwen/Qwen2.5-7B", None)),
        ("my_org/model.v2", ("my_org/model.v2", None)),
    ],
)
def test_parse_repo_id_accepts(source, expected):
    assert hub.parse_repo_id(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "",
        "deit_tiny",
        "/abs/path",
        "/org/name",
        "./x",
        "./org/name",
        "../org/name",
        "~/x",
        "org/name/extra",
        "org/",
        "/name",
        "org//name",
        "org/name@",
        "org/name@a b",
        "org/name.pth",
        "org/weights.safetensors",
        "org/pytorch_model.bin",
        "a\\b",
        "org/na me",
        "org/-name",
        "org/name.",
        "org/na--me",
        "org/na..me",
        " org/name",
        "org/name@v1@v2",
        "C:\\models\\x.pth",
    ],
)
def test_parse_repo_id_rejects(source):
    assert hub.parse_repo_id(source) is None


# --- downloads -------------------------------------------------------------------------


def test_download_safetensors_and_config(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["st"]})
    files = hub.fetch_model_files(REPO)
    assert files.weights.name == "model.safetensors"
    assert files.weights.read_bytes() == b"ST-main"
    assert files.config is not None and files.config.read_bytes() == b'{"v": "main"}'
    assert files.repo_id == REPO and files.revision == "main"
    assert files.commit == fake_hub.commit(REPO)
    assert fake_hub.cache in files.weights.parents  # the isolated standard cache
    # plain HTTP: the files themselves came from /resolve (no Xet)
    gets = [r.path for r in fake_hub.requests if r.method == "GET"]
    assert sorted(gets) == sorted(f"/{REPO}/resolve/main/{f}" for f in ("model.safetensors", "config.json"))
    assert "README.md" not in str(fake_hub.requests)

    # a second call is served from the cache (metadata requests only, no download)
    fake_hub.reset()
    again = hub.fetch_model_files(REPO)
    assert again.weights == files.weights
    assert fake_hub.count("GET") == 0


def test_fallback_to_pytorch_model_bin(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["bin"]})
    files = hub.fetch_model_files(REPO)
    assert files.weights.name == "pytorch_model.bin"
    assert files.weights.read_bytes() == b"BIN"
    assert files.config is not None


def test_no_config_is_fine(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["bare"]})
    files = hub.fetch_model_files(REPO)
    assert files.weights.read_bytes() == b"ST-bare"
    assert files.config is None


def test_revision(fake_hub, repos):
    fake_hub.add_repo(REPO, {"main": repos["st"], "v1": repos["st_v1"]})
    v1 = hub.fetch_model_files(REPO, "v1")
    main = hub.fetch_model_files(REPO)
    assert v1.weights.read_bytes() == b"ST-v1" and v1.config.read_bytes() == b'{"v": "v1"}'
    assert main.weights.read_bytes() == b"ST-main"
    assert v1.revision == "v1" and v1.commit == fake_hub.commit(REPO, "v1") != main.commit
    # parse_repo_id's output goes straight in
    assert hub.fetch_model_files(*hub.parse_repo_id(f"{REPO}@v1")).weights == v1.weights
    # a commit hash works as a revision too
    by_hash = hub.fetch_model_files(REPO, fake_hub.commit(REPO, "v1"))
    assert by_hash.weights.read_bytes() == b"ST-v1"


def test_revision_with_slashes(fake_hub, repos):
    fake_hub.add_repo(REPO, {"main": repos["st"], "refs/pr/3": repos["bin"]})
    files = hub.fetch_model_files(*hub.parse_repo_id(f"{REPO}@refs/pr/3"))
    assert files.weights.read_bytes() == b"BIN"


# --- errors ----------------------------------------------------------------------------


def test_repo_not_found(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["st"]})
    with pytest.raises(InputNotFound) as info:
        hub.fetch_model_files("facebook/no-such-model")
    e = info.value
    assert e.exit_code == 66
    assert "facebook/no-such-model" in e.message and "\n" not in e.message
    assert "HF_TOKEN" in e.hint


def test_revision_not_found(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["st"]})
    with pytest.raises(InputNotFound, match="revision 'v9'"):
        hub.fetch_model_files(REPO, "v9")


def test_gated_repo(fake_hub, repos, monkeypatch):
    fake_hub.add_repo(REPO, repos["st"], gated=True, token="hf_good")
    with pytest.raises(AccessDenied) as info:
        hub.fetch_model_files(REPO)
    assert info.value.exit_code == 77
    assert "gated" in info.value.message
    assert "HF_TOKEN" in info.value.hint and "terms" in info.value.hint
    # a token without access: 403, same error
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(AccessDenied):
        hub.fetch_model_files(REPO)
    # the right token (read from HF_TOKEN) opens it
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert hub.fetch_model_files(REPO).weights.read_bytes() == b"ST-main"


def test_private_repo_without_token_is_not_found(fake_hub, repos):
    fake_hub.add_repo(REPO, repos["st"], private=True, token="hf_good")
    with pytest.raises(InputNotFound) as info:
        hub.fetch_model_files(REPO)
    assert "HF_TOKEN" in info.value.hint


def test_neither_weights_file(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["noweights"]})
    with pytest.raises(CheckpointError) as info:
        hub.fetch_model_files(REPO)
    assert info.value.exit_code == 65
    assert "model.safetensors" in info.value.message and "pytorch_model.bin" in info.value.message


# --- offline, unreachable ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_offline_uses_the_cache_without_requests(fake_hub, repos, kind):
    fake_hub.add_repo(REPO, {"main": repos[kind], "v1": repos["st_v1"]})
    online = hub.fetch_model_files(REPO)
    online_v1 = hub.fetch_model_files(REPO, "v1")
    fake_hub.reset()
    fake_hub.set_offline()
    offline = hub.fetch_model_files(REPO)
    assert offline == online
    assert hub.fetch_model_files(REPO, "v1") == online_v1
    assert fake_hub.count() == 0


def test_offline_with_empty_cache(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["st"]})
    fake_hub.set_offline()
    with pytest.raises(HubUnavailable) as info:
        hub.fetch_model_files(REPO)
    e = info.value
    assert e.exit_code == 69
    assert "not in the cache while offline" in e.message
    assert "HF_HUB_OFFLINE" in e.hint
    assert fake_hub.count() == 0


def test_offline_revision_not_cached(fake_hub, repos):
    fake_hub.add_repo(REPO, {"main": repos["st"], "v1": repos["st_v1"]})
    hub.fetch_model_files(REPO)
    fake_hub.set_offline()
    with pytest.raises(HubUnavailable, match="offline"):
        hub.fetch_model_files(REPO, "v1")


def test_connection_refused(fake_hub, repos):
    fake_hub.serve_repos({REPO: repos["st"]})
    fake_hub.fast_retries()
    fake_hub.stop()  # HF_ENDPOINT now names a closed port on 127.0.0.1
    start = time.monotonic()
    with pytest.raises(HubUnavailable) as info:
        hub.fetch_model_files(REPO)
    assert time.monotonic() - start < 10
    e = info.value
    assert e.exit_code == 69
    assert "hub unreachable" in e.message and "\n" not in e.message
    assert e.hint


def test_default_endpoint_is_never_the_real_hub(hf_env):
    """Without a fake hub the isolated environment still cannot reach huggingface.co."""
    from huggingface_hub import constants

    assert constants.ENDPOINT.startswith("http://127.0.0.1:")
    assert hf_env == Path(constants.HF_HUB_CACHE) and not hub.is_cached(REPO)


def test_server_errors(fake_hub, repos):
    fake_hub.fast_retries()
    fake_hub.serve_repos({REPO: repos["st"]})
    fake_hub.fail_with = 503
    with pytest.raises(HubUnavailable, match="hub unreachable.*503"):
        hub.fetch_model_files(REPO)


def test_hub_down_but_cached(fake_hub, repos):
    fake_hub.fast_retries()
    fake_hub.serve_repos({REPO: repos["bin"]})
    cached = hub.fetch_model_files(REPO)
    fake_hub.fail_with = 503
    assert hub.fetch_model_files(REPO) == cached
    fake_hub.stop()
    assert hub.fetch_model_files(REPO) == cached


# --- is_cached ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_is_cached(fake_hub, repos, kind):
    fake_hub.add_repo(REPO, {"main": repos[kind], "v1": repos["st_v1"]})
    assert not hub.is_cached(REPO)
    hub.fetch_model_files(REPO)
    fake_hub.reset()
    assert hub.is_cached(REPO)
    assert not hub.is_cached(REPO, "v1")
    assert not hub.is_cached("facebook/other")
    assert fake_hub.count() == 0


# --- an unreachable hub, as a user meets it: one line, fast, exit 69 ---------------------


@pytest.mark.parametrize("endpoint", ["refused", "http://hub.does-not-resolve.invalid"])
def test_unreachable_hub_is_one_line_and_fast(tmp_path, endpoint):
    """No fast_retries here: huggingface_hub's own retry timing, as users get it."""
    import socket
    import subprocess

    from PIL import Image

    if endpoint == "refused":
        with socket.socket() as s:  # a port that was free a moment ago: nothing listens
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    image = tmp_path / "bird.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint)
    # The command's own time, after the interpreter and torch have started (a shared
    # 2-core machine can take seconds for those alone), written to a pipe of its own.
    code = (
        "import os, sys, time, torch; from deit_cli.cli.app import main; t = time.monotonic(); "
        "rc = main(sys.argv[2:]); os.write(int(sys.argv[1]), b'%f' % (time.monotonic() - t)); sys.exit(rc)"
    )
    read, write = os.pipe()
    p = subprocess.run(
        [sys.executable, "-c", code, str(write), "classify", str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        pass_fds=(write,),
    )
    os.close(write)
    with os.fdopen(read) as f:
        took = float(f.read())
    assert p.returncode == 69, p.stderr
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hub unreachable" in lines[0], p.stderr
    assert took < 5, f"{took:.1f} s"
