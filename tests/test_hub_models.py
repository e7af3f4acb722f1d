"""The real download path, against a fake hub on loopback, serving models in each
transformers layout the facebook/ repos use."""

from __future__ import annotations

import pytest
import torch
from conftest import images
from fakehub import fake_hub, hf_env  # noqa: F401 - fixtures
from references import TOL, hf_reference, max_diff
from safetensors.torch import load_file

import deit_cli

TINY_D = "facebook/deit-tiny-distilled-patch16-224"
TINY = "facebook/deit-tiny-patch16-224"


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    """Two repos as published: DeiT-with-teacher (model.safetensors) and ViT with only
    pytorch_model.bin, each with its reference logits."""
    root = tmp_path_factory.mktemp("repos")
    x = images(1)
    out = {}
    for repo, name, bin_only in [
        (TINY_D, "deit_tiny_distilled_patch16_224", False),
        (TINY, "deit_tiny_patch16_224", True),
    ]:
        ref, _ = hf_reference(name)
        d = root / repo.split("/")[1]
        ref.save_pretrained(d)
        if bin_only:
            torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
            (d / "model.safetensors").unlink()
        with torch.no_grad():
            out[repo] = (d, ref(pixel_values=x).logits)
    return out, x


@pytest.mark.parametrize("source", [TINY_D, "deit-tiny-distilled", "deit_tiny_distilled_patch16_224", TINY])
def test_load_from_hub(fake_hub, hub_dirs, source):  # noqa: F811
    dirs, x = hub_dirs
    fake_hub.serve_repos({repo: d for repo, (d, _) in dirs.items()})
    model = deit_cli.load_model(source)
    repo = TINY if source == TINY else TINY_D
    with torch.no_grad():
        assert max_diff(model(x), dirs[repo][1]) <= TOL
    assert model.variant is not None and model.variant.hub_repo == repo


def test_revision_and_offline_cache(fake_hub, hub_dirs):  # noqa: F811
    dirs, x = hub_dirs
    fake_hub.add_repo(TINY_D, {"main": dirs[TINY][0], "v1": dirs[TINY_D][0]})
    model = deit_cli.load_model(f"{TINY_D}@v1")
    with torch.no_grad():
        assert max_diff(model(x), dirs[TINY_D][1]) <= TOL
    # offline, from the filled cache: no request reaches the server
    fake_hub.reset()
    fake_hub.set_offline()
    fake_hub.stop()
    model = deit_cli.load_model(f"{TINY_D}@v1")
    with torch.no_grad():
        assert max_diff(model(x), dirs[TINY_D][1]) <= TOL
    assert fake_hub.count("GET") == 0 and fake_hub.count("HEAD") == 0


def test_cli_errors_from_hub(fake_hub, hub_dirs, run_cli, tmp_path):  # noqa: F811
    dirs, _ = hub_dirs
    fake_hub.serve_repos({TINY_D: dirs[TINY_D][0]})
    fake_hub.add_repo("acme/gated-deit", {"main": dirs[TINY_D][0]}, gated=True)
    rc, out, err = run_cli("convert", "acme/no-such-model", tmp_path / "o.safetensors")
    assert rc == 66 and err.count("\n") == 1 and "acme/no-such-model" in err
    rc, out, err = run_cli("convert", "acme/gated-deit", tmp_path / "o.safetensors")
    assert rc == 77 and err.count("\n") == 1
    fake_hub.set_offline()
    rc, out, err = run_cli("convert", "facebook/deit-small-patch16-224", tmp_path / "o.safetensors")
    assert rc == 69 and "offline" in err
    assert not (tmp_path / "o.safetensors").exists()
    # deit models marks what is in the cache
    fake_hub.set_offline(False)
    deit_cli.load_model(TINY_D)
    rc, out, _ = run_cli("models", "--json")
    cached = {r["hub_repo"]: r["cached"] for r in __import__("json").loads(out)}
    assert cached[TINY_D] is True and cached[TINY] is False
