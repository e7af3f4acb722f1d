"""`deit convert`: round trips through every target load in the reference libraries with
unchanged logits; the summary is right; reduced precision is stored."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers
from conftest import images
from references import TOL, max_diff, timm_model
from safetensors import safe_open

import deit_cli


@pytest.fixture(scope="module")
def timm_pth(tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("src")
    for name in ("deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"):
        ref = timm_model(name, seed=1)
        path = d / f"{name}-b40b3cf7.pth"
        torch.save({"model": ref.state_dict()}, path)
        out[name] = (path, ref)
    return out


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"])
def test_round_trip_timm_deit_timm_hf(tmp_path, timm_pth, run_cli, name):
    src, ref = timm_pth[name]
    before = src.read_bytes()
    x = images(2)
    with torch.no_grad():
        expected = ref(x)

    rc, out, err = run_cli("convert", src, tmp_path / "m.safetensors", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["layout_in"] == "timm" and summary["to"] == "deit" and summary["max_abs_diff"] <= TOL
    assert summary["timm_name"] == name and summary["params"] == sum(p.numel() for p in ref.parameters())
    # --to deit is self-describing: loads with nothing else, labels and config included
    model = deit_cli.load_model(str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert max_diff(model(x), expected) <= TOL
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["deit.config"])["distilled"] == ("distilled" in name)
    assert json.loads(meta["deit.labels"])[281] == "tabby, tabby cat"

    # deit -> timm: timm's own loader takes it
    rc, out, err = run_cli("convert", tmp_path / "m.safetensors", tmp_path / "t.safetensors", "--to", "timm")
    assert rc == 0, err
    t = timm.create_model(name, pretrained=False, checkpoint_path=str(tmp_path / "t.safetensors")).eval()
    with torch.no_grad():
        assert max_diff(t(x), expected) <= TOL

    # deit -> hf: transformers' from_pretrained takes it
    rc, out, err = run_cli("convert", tmp_path / "m.safetensors", tmp_path / "hf", "--to", "hf", "--json")
    assert rc == 0, err
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    expected_cls = "DeiTForImageClassificationWithTeacher" if "distilled" in name else "ViTForImageClassification"
    assert type(hf).__name__ == expected_cls
    with torch.no_grad():
        assert max_diff(hf(pixel_values=x).logits, expected) <= TOL
    assert hf.config.id2label[281] == "tabby, tabby cat"
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])

    # and back from the transformers directory
    model = deit_cli.load_model(str(tmp_path / "hf"))
    with torch.no_grad():
        assert max_diff(model(x), expected) <= TOL
    assert src.read_bytes() == before  # the source is never modified


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_reduced_precision(tmp_path, timm_pth, run_cli, dtype, torch_dtype):
    src, ref = timm_pth["deit_tiny_distilled_patch16_224"]
    rc, out, err = run_cli("convert", src, tmp_path / "h.safetensors", "--dtype", dtype, "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert 0 < summary["max_abs_diff"] <= summary["tolerance"]
    with safe_open(tmp_path / "h.safetensors", "pt") as f:
        assert f.get_tensor("blocks.0.attn.qkv.weight").dtype == torch_dtype
    fp32_size = sum(p.numel() for p in ref.parameters()) * 4
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * fp32_size
    # loads (computing in fp32 by default) and mostly agrees with the fp32 source
    model = deit_cli.load_model(str(tmp_path / "h.safetensors"))
    x = images(8)
    with torch.no_grad():
        agree = (model(x).argmax(-1) == ref(x).argmax(-1)).float().mean().item()
    assert agree >= 0.75


def test_destination_rules(tmp_path, timm_pth, run_cli):
    src, _ = timm_pth["deit_tiny_patch16_224"]
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"mine")
    rc, out, err = run_cli("convert", src, dst)
    assert rc == 73 and "--force" in err and dst.read_bytes() == b"mine"
    rc, out, err = run_cli("convert", src, dst, "--force")
    assert rc == 0 and dst.read_bytes()[8:9] == b"{"
    # a terminal-less run prints the result as one JSON record, nothing on stderr
    result = json.loads(out)
    assert result["destination"] == str(dst) and result["max_abs_diff"] <= result["tolerance"] and err == ""
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # to hf over an existing directory needs --force too, and then replaces it whole
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("x")
    rc, out, err = run_cli("convert", src, tmp_path / "hf", "--to", "hf")
    assert rc == 73
    rc, out, err = run_cli("convert", src, tmp_path / "hf", "--to", "hf", "--force")
    assert rc == 0 and not (tmp_path / "hf" / "old.txt").exists()


def test_unknown_target_is_a_usage_error(tmp_path, timm_pth, run_cli):
    src, _ = timm_pth["deit_tiny_patch16_224"]
    rc, _, err = run_cli("convert", src, tmp_path / "x", "--to", "onnx")
    assert rc == 2 and "--to" in err


def test_table_shows_odd_paths_as_they_are(tmp_path, timm_pth, run_cli):
    # A path is text, not rich markup: "[/b]" would otherwise end a tag that was never opened.
    src, _ = timm_pth["deit_tiny_patch16_224"]
    dst = tmp_path / "[" / "b]" / "[bold]m.safetensors"
    dst.parent.mkdir(parents=True)
    rc, out, err = run_cli("convert", src, dst, "--format", "table")
    assert rc == 0, err
    assert "[/b]" in out and "[bold]m.safetensors" in out
