"""`deit explain`: the maps equal the references' attention (timm, transformers) and the
formulas, a model built to look at one patch is drawn looking there, the files are as
documented, bad inputs and existing outputs are handled as everywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from colours import LABELS, colour_files
from conftest import images, randomize
from PIL import Image

import deit_cli
from deit_cli.checkpoints import load_model
from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.config import DeiTConfig
from deit_cli.engine import explain as engine
from deit_cli.engine import picture
from deit_cli.model import DeiT

TOL = 1e-5


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def reference_rollout(attentions) -> np.ndarray:
    """Abnar & Zuidema's rollout, written out here from the README's definition: per block
    A = mean over heads; Â = 0.5 A + 0.5 I, rows renormalised; R = Â_L ... Â_1."""
    r = None
    for a in attentions:
        a = np.asarray(a, dtype=np.float64).mean(axis=1)  # (B, N, N)
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        r = a if r is None else np.einsum("bij,bjk->bik", a, r)
    return r


def as_maps(rows: np.ndarray, prefix: int, grid: int) -> np.ndarray:
    """(B, N, N) -> the prefix tokens' rows over the patch columns, (B, prefix, grid, grid)."""
    return rows[:, :prefix, prefix:].reshape(rows.shape[0], prefix, grid, grid)


# --------------------------------------------------------------------------- the references


def small_hf(distilled: bool):
    kw = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
        attn_implementation="eager",
    )
    if distilled:
        return randomize(transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**kw)))
    return randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**kw)))


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "plain"])
def test_attention_and_rollout_equal_transformers_eager_attention(tmp_path, distilled):
    ref = small_hf(distilled)
    ref.save_pretrained(tmp_path / "hf")
    model = load_model(str(tmp_path / "hf"))
    assert model.config.distilled == distilled and model.config.num_heads == 4
    x = images(3, 32, seed=1)
    with torch.no_grad():
        theirs = [a.numpy() for a in ref(pixel_values=x, output_attentions=True).attentions]
    _, ours = engine.attention_probabilities(model, x)
    assert len(ours) == len(theirs) == 3
    N = 16 + model.config.num_prefix_tokens
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (3, 4, N, N)
        np.testing.assert_allclose(a.numpy(), b, atol=TOL, rtol=0)
    P = model.config.num_prefix_tokens
    rolled = deit_cli.attention_maps(model, x, "rollout")
    np.testing.assert_allclose(rolled.maps.numpy(), as_maps(reference_rollout(theirs), P, 4), atol=TOL, rtol=0)
    last = engine.attention_maps(model, x, "attention")
    np.testing.assert_allclose(last.maps.numpy(), as_maps(theirs[-1].mean(axis=1), P, 4), atol=TOL, rtol=0)
    assert rolled.names == (("cls", "dist") if distilled else ("cls",))
    assert rolled.maps.shape == (3, P, 4, 4) and rolled.maps.dtype == torch.float32


def timm_probabilities(ref, x) -> list[np.ndarray]:
    """timm's own attention probabilities: its unfused path, read at its attention dropout."""
    kept = []
    hooks = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: kept.append(o.detach().numpy())))
    try:
        with torch.no_grad():
            logits = ref(x)
    finally:
        for h in hooks:
            h.remove()
    return kept, logits


@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "plain"])
def test_maps_equal_timm_with_the_same_weights(distilled):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=48, patch_size=16, embed_dim=24, depth=2, num_heads=3, num_classes=4)
    ref = randomize(VisionTransformerDistilled(**kw) if distilled else VisionTransformer(**kw), seed=3)
    model = DeiT(
        DeiTConfig(image_size=48, patch_size=16, embed_dim=24, depth=2, num_heads=3, num_classes=4, distilled=distilled)
    ).eval()
    model.load_state_dict(ref.state_dict())
    x = images(2, 48, seed=2)
    theirs, logits = timm_probabilities(ref, x)
    out = engine.attention_maps(model, x, "rollout", per_head=True)
    P = 2 if distilled else 1
    np.testing.assert_allclose(out.maps.numpy(), as_maps(reference_rollout(theirs), P, 3), atol=TOL, rtol=0)
    heads = theirs[-1][:, :, :P, P:].transpose(0, 2, 1, 3).reshape(2, P, 3, 3, 3)  # (B, tokens, heads, g, g)
    np.testing.assert_allclose(out.heads.numpy(), heads, atol=TOL, rtol=0)
    # the same forward: the classifier reads the explicit forward's tokens and gets timm's logits
    with torch.no_grad():
        np.testing.assert_allclose(model.forward_head(out.tokens).numpy(), logits.numpy(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- known answers


def test_uniform_attention_gives_a_uniform_map(model_path):
    """The colour model's queries and keys are zero: every token attends uniformly, so the
    last block's map is 1/N everywhere and the rollout of L such blocks (1 - 0.5^L)/N."""
    model = load_model(str(model_path))
    x = images(2, 32)
    N = model.config.num_patches + model.config.num_prefix_tokens
    last = engine.attention_maps(model, x, "attention").maps.numpy()
    np.testing.assert_allclose(last, np.full((2, 2, 2, 2), 1 / N), atol=1e-7)
    rolled = engine.attention_maps(model, x, "rollout").maps.numpy()
    np.testing.assert_allclose(rolled, np.full((2, 2, 2, 2), 0.5 / N), atol=1e-7)


CLS_TARGET, DIST_TARGET = (1, 2), (3, 0)  # (row, column) in the 4 x 4 grid


@torch.no_grad()
def looking_model(distilled: bool = True, num_classes: int = 3) -> DeiT:
    """A DeiT (64 px, patch 16: a 4 x 4 grid, 8 dims, 2 heads, 2 blocks) whose class token
    attends to patch CLS_TARGET and distillation token to DIST_TARGET, whatever the image.

    The patch embedding is zero, so a patch token is its position embedding: two patches
    carry a marker pair, the prefix tokens carry their own. Head 0's query reads the class
    (dims 2-3) and distillation (dims 4-5) markers, its key the patch markers (dims 0-1,
    6-7): a score of about 23 against 0 elsewhere. Head 1 sees nothing: uniform. The value,
    projection and MLP weights are zero, so every block sees the same tokens.
    """
    cfg = DeiTConfig(
        image_size=64,
        patch_size=16,
        embed_dim=8,
        depth=2,
        num_heads=2,
        mlp_ratio=1.0,
        num_classes=num_classes,
        distilled=distilled,
    )
    m = DeiT(cfg)
    for p in m.parameters():
        p.zero_()
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.fill_(1)
    P = cfg.num_prefix_tokens
    m.cls_token[0, 0, 2], m.cls_token[0, 0, 3] = 1.0, -1.0
    if distilled:
        m.dist_token[0, 0, 4], m.dist_token[0, 0, 5] = 1.0, -1.0
    a = P + CLS_TARGET[0] * 4 + CLS_TARGET[1]
    b = P + DIST_TARGET[0] * 4 + DIST_TARGET[1]
    m.pos_embed[0, a, 0], m.pos_embed[0, a, 1] = 1.0, -1.0
    m.pos_embed[0, b, 6], m.pos_embed[0, b, 7] = 1.0, -1.0
    c = 4.0
    for blk in m.blocks:
        w = blk.attn.qkv.weight  # rows 0-7 q, 8-15 k, 16-23 v; head 0 is dims 0-3
        w[0, 2], w[1, 4] = c, c  # q0: class marker, q1: distillation marker
        w[8 + 0, 0], w[8 + 1, 6] = c, c  # k0: patch A's marker, k1: patch B's
    if m.head is not None:
        m.head.weight.copy_(torch.arange(num_classes * 8, dtype=torch.float32).view(num_classes, 8).sin())
        if m.head_dist is not None:
            m.head_dist.weight.copy_(torch.arange(num_classes * 8, dtype=torch.float32).view(num_classes, 8).cos())
    m.labels = [f"thing {i}" for i in range(num_classes)]
    m.source = "looking-test"
    return m.eval()


def save(m: DeiT, path):
    save_safetensors(path, m.state_dict(), deit_metadata(m))
    return path


@pytest.fixture(scope="module")
def looking_path(tmp_path_factory):
    return save(looking_model(), tmp_path_factory.mktemp("looking") / "looking.safetensors")


@pytest.fixture(scope="module")
def grey_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grey")
    Image.new("RGB", (80, 64), (128, 128, 128)).save(d / "grey.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(d / "noise.png")
    return d


def argmax2d(a: np.ndarray) -> tuple[int, int]:
    return tuple(int(i) for i in np.unravel_index(np.argmax(a), a.shape))


def test_a_model_built_to_look_at_one_patch_is_mapped_looking_there():
    model = looking_model()
    x = images(2, 64)
    for method in engine.METHODS:
        out = engine.attention_maps(model, x, method, per_head=True)
        for i in range(2):
            assert argmax2d(out.maps[i, 0].numpy()) == CLS_TARGET, method
            assert argmax2d(out.maps[i, 1].numpy()) == DIST_TARGET, method
        assert argmax2d(out.heads[0, 0, 0].numpy()) == CLS_TARGET  # head 0 looks
        np.testing.assert_allclose(out.heads[0, 0, 1].numpy(), 1 / 18, atol=1e-6)  # head 1: uniform over 18 tokens
    last = engine.attention_maps(model, x, "attention").maps[0, 0].numpy()
    assert last[CLS_TARGET] > 0.49  # half from the looking head, half from the uniform one


def panel_cells(png: np.ndarray, box, grid: int) -> np.ndarray:
    """Mean luminance of each patch cell's central pixels in a map panel."""
    x0, y0, x1, _ = box
    cell = (x1 - x0) // grid
    lum = png[..., :3].astype(float) @ [0.299, 0.587, 0.114]
    out = np.empty((grid, grid))
    for r in range(grid):
        for c in range(grid):
            ys, xs = y0 + r * cell, x0 + c * cell
            out[r, c] = lum[ys + cell // 4 : ys + 3 * cell // 4, xs + cell // 4 : xs + 3 * cell // 4].mean()
    return out


def test_png_layout_crop_and_maximum_where_the_model_looks(run_cpu, looking_path, grey_dir, tmp_path):
    out = tmp_path / "maps"
    rc, stdout, err = run_cpu(
        "explain",
        grey_dir / "grey.png",
        grey_dir / "noise.png",
        "-m",
        looking_path,
        "-o",
        out,
        "--top",
        "2",
        "--format",
        "jsonl",
    )
    assert rc == 0, err
    recs = records(stdout)
    assert [r["files"]["png"] for r in recs] == [str(out / "grey.rollout.png"), str(out / "noise.rollout.png")]
    assert sorted(os.listdir(out)) == ["grey.rollout.png", "noise.rollout.png"]  # no .npy without --raw
    S = picture.panel_size(64)
    assert S == 256  # 64 px input, scaled 4x
    png = np.asarray(Image.open(out / "grey.rollout.png").convert("RGB"))
    lay = picture.layout(64, 2, 0, 1 + 2)  # caption: a title line and the top 2
    assert png.shape == (lay.size[1], lay.size[0], 3)
    assert lay.size[0] == 3 * S + 4 * picture.GAP  # input, class token, distillation token side by side
    cls_cells = panel_cells(png, lay.map_boxes[0], 4)
    dist_cells = panel_cells(png, lay.map_boxes[1], 4)
    assert argmax2d(cls_cells) == CLS_TARGET and argmax2d(dist_cells) == DIST_TARGET
    assert not np.array_equal(png[box_slice(lay.map_boxes[0])], png[box_slice(lay.map_boxes[1])])
    # the first panel is the input as the model saw it: the eval transform's crop, scaled 4x
    model = load_model(str(looking_path))
    from deit_cli.images import decode_image, eval_transform

    for name in ("grey", "noise"):
        png = np.asarray(Image.open(out / f"{name}.rollout.png").convert("RGB"))
        crop = eval_transform(model.preprocessing).crop_image(decode_image(str(grey_dir / f"{name}.png")).image)
        expected = np.asarray(crop.resize((S, S), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(png[box_slice(lay.input_box)], expected)
    # the colour bar under each map is the viridis ramp, dark (low) to bright (high)
    bar = png[box_slice(lay.bar_boxes[0])][picture.BAR // 2]
    lum = bar.astype(float) @ [0.299, 0.587, 0.114]
    assert lum[0] < lum[len(lum) // 2] < lum[-1] and np.all(np.diff(lum) > -1.5)


def box_slice(box):
    x0, y0, x1, y1 = box
    return slice(y0, y1), slice(x0, x1)


def test_viridis_table_is_perceptually_ordered():
    lum = picture.VIRIDIS.astype(float) @ [0.299, 0.587, 0.114]
    assert picture.VIRIDIS.shape == (256, 3) and picture.VIRIDIS.dtype == np.uint8
    assert np.all(np.diff(lum) >= 0) and lum[-1] - lum[0] > 150  # never darker: the order reads without a legend
    assert tuple(picture.VIRIDIS[0]) == (68, 1, 84) and tuple(picture.VIRIDIS[-1]) == (253, 231, 37)


def test_raw_and_per_head_files(run_cpu, looking_path, grey_dir, tmp_path):
    out = tmp_path / "maps"
    rc, stdout, err = run_cpu(
        "explain",
        grey_dir / "noise.png",
        "-m",
        looking_path,
        "-o",
        out,
        "--raw",
        "--per-head",
        "--method",
        "attention",
        "--format",
        "jsonl",
    )
    assert rc == 0, err
    (rec,) = records(stdout)
    assert rec["method"] == "attention" and rec["tokens"] == ["cls", "dist"]
    assert rec["trained_by_teacher"] is True and "token_notes" not in rec  # a dist head, no run summary
    assert rec["files"] == {
        "png": str(out / "noise.attention.png"),
        "npy": str(out / "noise.attention.npy"),
        "heads": str(out / "noise.attention.heads.npy"),
    }
    maps = np.load(out / "noise.attention.npy")
    heads = np.load(out / "noise.attention.heads.npy")
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32
    assert heads.shape == (2, 2, 4, 4) and heads.dtype == np.float32
    np.testing.assert_allclose(heads.mean(axis=1), maps, atol=1e-6)  # the map is the heads' mean, unnormalised
    assert argmax2d(maps[0]) == CLS_TARGET and argmax2d(maps[1]) == DIST_TARGET
    png = Image.open(out / "noise.attention.png")
    lay = picture.layout(64, 2, 2, 1 + 3)  # 2 heads; caption: a title line and the model's 3 classes
    assert png.size == lay.size  # per-head rows under the maps
    assert len(lay.head_boxes) == 2 and len(lay.head_boxes[0]) == 2


def test_the_colour_model_through_the_cli_matches_the_library(run_cpu, model_path, colour_dir, tmp_path):
    """Same inputs, decoding and transform as classify: the CLI's maps are the library's
    maps of the images the model sees, and its top classes are classify's."""
    from colours import model_inputs

    files = colour_files(colour_dir)[:3] + [colour_dir / "mixed.png"]
    rc, stdout, _ = run_cpu(
        "explain", *files, "-m", model_path, "-o", tmp_path / "o", "--raw", "-b", "3", "--format", "jsonl", "--top", "3"
    )
    assert rc == 0
    recs = records(stdout)
    model = load_model(str(model_path))
    expected = engine.attention_maps(model, model_inputs(model, files)).maps.numpy()
    for rec, want in zip(recs, expected):
        np.testing.assert_allclose(np.load(rec["files"]["npy"]), want, atol=1e-7)
    rc, cls_out, _ = run_cpu("classify", *files, "-m", model_path, "--format", "jsonl", "--top", "3")
    for rec, c in zip(recs, records(cls_out)):
        assert [p["label"] for p in rec["predictions"]] == [p["label"] for p in c["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in rec["predictions"]], [p["score"] for p in c["predictions"]], atol=1e-6
        )
    assert [r["predictions"][0]["label"] for r in recs[:3]] == LABELS[:3]


# --------------------------------------------------------------------------- files and errors


def test_same_stems_get_unique_names(run_cpu, model_path, tmp_path):
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / sub / "cat.png")
    Image.new("RGB", (40, 40), (10, 10, 200)).save(tmp_path / "a" / "CAT.jpg", format="PNG")
    files = [
        tmp_path / "a" / "cat.png",
        tmp_path / "b" / "cat.png",
        tmp_path / "a" / "CAT.jpg",
        tmp_path / "c" / "cat.png",
    ]
    out = tmp_path / "o"
    rc, stdout, _ = run_cpu("explain", *files, "-m", model_path, "-o", out, "--format", "jsonl")
    assert rc == 0
    pngs = [r["files"]["png"] for r in records(stdout)]
    assert [os.path.basename(p) for p in pngs] == [
        "cat.rollout.png",
        "cat-2.rollout.png",
        "CAT-3.rollout.png",
        "cat-4.rollout.png",
    ]
    assert len(set(os.listdir(out))) == 4
    # the same names when the paths stream from stdin (decided as they come)
    out2 = tmp_path / "o2"
    sys_stdin = sys.stdin
    try:
        import io

        sys.stdin = io.TextIOWrapper(io.BytesIO("\n".join(map(str, files)).encode()))
        rc, stdout, _ = run_cpu("explain", "-", "-m", model_path, "-o", out2, "--format", "jsonl")
    finally:
        sys.stdin = sys_stdin
    assert rc == 0
    assert [os.path.basename(r["files"]["png"]) for r in records(stdout)] == [os.path.basename(p) for p in pngs]
    # streamed inputs cannot be checked up front: the first existing file stops the run (73)
    try:
        sys.stdin = io.TextIOWrapper(io.BytesIO(str(files[0]).encode()))
        rc, stdout, err = run_cpu("explain", "-", "-m", model_path, "-o", out2, "--format", "jsonl")
    finally:
        sys.stdin = sys_stdin
    assert rc == 73 and "cat.rollout.png: already exists" in err and stdout == ""


def test_output_names_from_paths_and_urls():
    names = engine.OutputNames()
    got = [
        names(p)
        for p in [
            "a/bird.jpg",
            "https://example.com/x/bird.JPG?size=2",
            "b/my photo (1).png",
            "c/.hidden.png",
            "https://example.com/",
            "d/bird-2.jpg",
        ]
    ]
    assert got == ["bird", "bird-2", "my_photo_1", "hidden", "example", "bird-2-2"]


def test_bad_inputs_get_records_and_exit_1(run_cpu, model_path, colour_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"%PDF-1.4 not an image")
    files = [colour_dir / "red.png", bad, tmp_path / "missing.png", colour_dir / "blue.png"]
    out = tmp_path / "o"
    rc, stdout, err = run_cpu("explain", *files, "-m", model_path, "-o", out, "--format", "jsonl")
    assert rc == 1
    recs = records(stdout)
    assert [r["path"] for r in recs] == [str(f) for f in files]
    assert "error" not in recs[0] and "error" not in recs[3]
    assert "PDF" in recs[1]["error"] and "no such file" in recs[2]["error"]
    assert sorted(os.listdir(out)) == ["blue.rollout.png", "red.rollout.png"]
    assert f"{bad}: " in err and "2 of 4 inputs failed" in err
    rc, stdout, err = run_cpu("explain", bad, "-m", model_path, "-o", tmp_path / "o3", "--format", "jsonl")
    assert rc == 66 and records(stdout)[0]["error"]


def test_existing_outputs_are_refused_without_force(run_cpu, model_path, colour_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # files we would not write are no obstacle
    files = colour_files(colour_dir)[:2]
    rc, _, err = run_cpu("explain", *files, "-m", model_path, "-o", out, "--format", "jsonl")
    assert rc == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    (out / "green.rollout.png").write_bytes(b"my own picture")
    rc, stdout, err = run_cpu("explain", *files, "-m", model_path, "-o", out, "--format", "jsonl")
    assert rc == 73 and stdout == ""
    assert f"{out}: 2 of the outputs already exist (red.rollout.png, green.rollout.png)" in err
    assert "--force" in err
    assert (out / "green.rollout.png").read_bytes() == b"my own picture"  # nothing touched
    assert (out / "red.rollout.png").read_bytes() == before["red.rollout.png"]
    rc, _, _ = run_cpu("explain", *files, "-m", model_path, "-o", out, "--raw", "--format", "jsonl")
    assert rc == 73  # the png would be overwritten even if the npy would be new
    assert not (out / "red.rollout.npy").exists()
    rc, _, _ = run_cpu("explain", *files, "-m", model_path, "-o", out, "--force", "--format", "jsonl")
    assert rc == 0
    assert (out / "green.rollout.png").read_bytes() == before["green.rollout.png"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in os.listdir(out) if ".tmp-" in p]  # atomic writes leave no temporaries
    rc, _, _ = run_cpu("explain", *files, "-m", model_path, "-o", out, "--method", "attention", "--format", "jsonl")
    assert rc == 0  # another method: other names
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cpu("explain", *files, "-m", model_path, "-o", tmp_path / "file", "--format", "jsonl")
    assert rc == 73 and "not a directory" in err


def test_headless_and_plain_models(run_cpu, grey_dir, tmp_path):
    headless = save(looking_model(num_classes=0), tmp_path / "headless.safetensors")
    rc, stdout, err = run_cpu(
        "explain", grey_dir / "grey.png", "-m", headless, "-o", tmp_path / "h", "--raw", "--format", "jsonl"
    )
    assert rc == 0, err
    (rec,) = records(stdout)
    assert rec["predictions"] == [] and rec["tokens"] == ["cls", "dist"]
    # no classifier and no run summary: nothing says the distillation token went untaught
    assert rec["trained_by_teacher"] is True and "left out" not in err
    assert picture.caption_lines("grey.png", "rollout", [], "m")[1] == "no classifier head: no labels"
    assert Image.open(rec["files"]["png"]).size == picture.layout(64, 2, 0, 2).size  # title + that line
    maps = np.load(rec["files"]["npy"])
    assert argmax2d(maps[0]) == CLS_TARGET and argmax2d(maps[1]) == DIST_TARGET
    plain = save(looking_model(distilled=False), tmp_path / "plain.safetensors")
    rc, stdout, _ = run_cpu(
        "explain", grey_dir / "grey.png", "-m", plain, "-o", tmp_path / "p", "--raw", "--format", "jsonl"
    )
    assert rc == 0
    (rec,) = records(stdout)
    assert rec["tokens"] == ["cls"] and len(rec["predictions"]) == 3
    assert rec["trained_by_teacher"] is None  # no distillation token: nothing to say
    maps = np.load(rec["files"]["npy"])
    assert maps.shape == (1, 4, 4) and argmax2d(maps[0]) == CLS_TARGET
    png = Image.open(rec["files"]["png"])
    assert png.size[0] == 2 * 256 + 3 * picture.GAP  # input and one map


def test_table_on_a_terminal_format(run_cpu, model_path, colour_dir, tmp_path):
    rc, stdout, _ = run_cpu(
        "explain", colour_dir / "red.png", "-m", model_path, "-o", tmp_path / "o", "--format", "table"
    )
    assert rc == 0
    assert "red.rollout.png" in stdout and " red " in stdout
    rc, stdout, _ = run_cpu(
        "explain", colour_dir / "red.png", "-m", model_path, "-o", tmp_path / "o", "--force", "--format", "json"
    )
    assert rc == 0 and json.loads(stdout)[0]["predictions"][0]["label"] == "red"


# --------------------------------------------------------------------------- what was trained


@pytest.fixture(scope="module")
def teacherless_run(tmp_path_factory):
    """A distilled student trained as `deit train` trains without a teacher (one epoch of
    the plain recipe on a few generated images): it keeps its distillation token, loses its
    distillation head, and its model.safetensors carries the run summary (`deit.run`)."""
    from deit_cli.cli.app import main

    tmp = tmp_path_factory.mktemp("teacherless")
    rng = np.random.default_rng(0)
    for c, rgb in enumerate([(220, 40, 40), (40, 40, 220)]):
        d = tmp / "data" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(3):
            a = np.clip(np.array(rgb) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    save(randomize(looking_model(num_classes=2), seed=4), tmp / "student.safetensors")
    args = ["train", tmp / "data", "-o", tmp / "run", "-m", tmp / "student.safetensors", "--recipe", "plain"]
    rc = main([str(a) for a in args] + ["--epochs", "1", "--batch-size", "6", "--device", "cpu", "-q"])
    assert rc == 0
    return tmp / "run"


def test_a_model_trained_without_a_teacher_maps_the_class_token_only(run_cpu, teacherless_run, grey_dir, tmp_path):
    from colours import model_inputs

    path = teacherless_run / "model.safetensors"
    model = load_model(str(path))
    assert model.config.distilled and not model.config.dist_head  # the token stays, its head went
    summary = engine.run_summary(model)
    assert summary["distillation"] == "none" and summary["teacher"] is None
    assert engine.distillation_taught(model) is False and engine.choose_tokens(model) == ("cls",)
    full = engine.attention_maps(model, model_inputs(model, [grey_dir / "noise.png"])).maps[0].numpy()
    for source in (path, teacherless_run):  # the file, or the run directory
        out = tmp_path / source.name
        rc, stdout, err = run_cpu(
            "explain", grey_dir / "noise.png", "-m", source, "-o", out, "--raw", "--per-head", "--format", "jsonl"
        )
        assert rc == 0, err
        (rec,) = records(stdout)
        assert rec["tokens"] == ["cls"] and rec["trained_by_teacher"] is False and "token_notes" not in rec
        assert "distillation token: not trained by a teacher, so its map is left out (--tokens cls,dist" in err
        maps, heads = np.load(rec["files"]["npy"]), np.load(rec["files"]["heads"])
        assert maps.shape == (1, 4, 4) and heads.shape == (1, 2, 4, 4)
        np.testing.assert_allclose(maps, full[:1], atol=1e-7)  # the class token's map, as the library's
        assert Image.open(rec["files"]["png"]).size == picture.layout(64, 1, 2, 1 + 2).size  # input and one map
    rc, _, err = run_cpu("explain", grey_dir / "noise.png", "-m", path, "-o", tmp_path / "q", "-q", "--format", "json")
    assert rc == 0 and err == ""  # -q: no note


def test_tokens_cls_dist_draws_the_untaught_token_marked(run_cpu, teacherless_run, grey_dir, tmp_path):
    from colours import model_inputs

    path = teacherless_run / "model.safetensors"
    model = load_model(str(path))
    out = tmp_path / "o"
    rc, stdout, err = run_cpu(
        "explain", grey_dir / "noise.png", "-m", path, "-o", out, "--tokens", "cls,dist", "--raw", "--format", "jsonl"
    )
    assert rc == 0, err
    (rec,) = records(stdout)
    assert rec["tokens"] == ["cls", "dist"] and rec["trained_by_teacher"] is False
    assert rec["token_notes"] == {"dist": "not trained by a teacher"} and "left out" not in err
    maps = np.load(rec["files"]["npy"])
    full = engine.attention_maps(model, model_inputs(model, [grey_dir / "noise.png"])).maps[0].numpy()
    np.testing.assert_allclose(maps, full, atol=1e-7)  # both rows, in the model's order
    png = np.asarray(Image.open(rec["files"]["png"]).convert("RGB"))
    lay = picture.layout(64, 2, 0, 1 + 2)
    assert png.shape == (lay.size[1], lay.size[0], 3)
    # the distillation panel carries the note on a dark band across its top; the class panel does not
    lum = png.astype(float) @ [0.299, 0.587, 0.114]
    dist_band, cls_band = (lum[box_slice((b[0], b[1] + 1, b[2], b[1] + picture.LINE))] for b in lay.map_boxes[::-1])
    assert np.median(dist_band) < 60 and (dist_band > 200).any()  # dark, with white text
    assert np.median(cls_band) > 60
    # the order given does not matter; one token alone is fine
    rc, stdout, _ = run_cpu(
        "explain", grey_dir / "noise.png", "-m", path, "-o", out, "--tokens", "dist, cls", "--force", "--format", "json"
    )
    assert rc == 0 and json.loads(stdout)[0]["tokens"] == ["cls", "dist"]
    rc, stdout, _ = run_cpu(
        "explain", grey_dir / "noise.png", "-m", path, "-o", out, "--tokens", "dist", "--force", "--raw", "-F", "json"
    )
    (rec,) = json.loads(stdout)
    assert rc == 0 and rec["tokens"] == ["dist"] and rec["token_notes"] == {"dist": "not trained by a teacher"}
    np.testing.assert_allclose(np.load(rec["files"]["npy"]), full[1:], atol=1e-7)


def with_run(m: DeiT, path, **summary):
    """`m` saved as `deit train` saves it: with a run summary under `deit.run`."""
    meta = deit_metadata(m)
    meta["deit.run"] = json.dumps({"recipe": "plain", "epochs": 1, **summary})
    save_safetensors(path, m.state_dict(), meta)
    return path


def test_what_was_trained_decides_the_default(run_cpu, grey_dir, tmp_path):
    no_dist_head = looking_model()
    no_dist_head.config = DeiTConfig(**{**no_dist_head.config.to_dict(), "dist_head": False})
    no_dist_head.head_dist = None
    paths = {
        # a run with a teacher (its head kept): both tokens, as a released distilled model
        "taught": with_run(looking_model(), tmp_path / "taught.safetensors", distillation="hard", teacher="x"),
        # the run summary wins over the head the model still has
        "summary": with_run(looking_model(), tmp_path / "summary.safetensors", distillation="none", teacher=None),
        # no run summary and no distillation head (transformers' DeiTForImageClassification)
        "no-dist-head": save(no_dist_head, tmp_path / "no-dist-head.safetensors"),
    }
    expected = {"taught": True, "summary": False, "no-dist-head": False}
    for name, path in paths.items():
        taught = expected[name]
        assert engine.distillation_taught(load_model(str(path))) is taught, name
        rc, stdout, err = run_cpu("explain", grey_dir / "grey.png", "-m", path, "-o", tmp_path / name, "-F", "json")
        assert rc == 0, err
        (rec,) = json.loads(stdout)
        assert rec["tokens"] == (["cls", "dist"] if taught else ["cls"]) and rec["trained_by_teacher"] is taught, name
        assert ("left out" in err) == (not taught), name
    # headless, no run summary: nothing tells, so the token is mapped as before
    headless = looking_model(num_classes=0)
    headless.config = DeiTConfig(**{**headless.config.to_dict(), "dist_head": False})
    assert engine.distillation_taught(load_model(str(save(headless, tmp_path / "headless.safetensors")))) is True
    # a model that is no local file (a registry name, a hub id) is not read again: its head decides
    model = looking_model()
    assert engine.run_summary(model) is None and engine.distillation_taught(model) is True
    model.run_summary = {"distillation": "none", "teacher": None}  # a library user's own record wins
    assert engine.distillation_taught(model) is False and engine.choose_tokens(model) == ("cls",)
    assert engine.choose_tokens(model, "cls,dist") == ("cls", "dist")


def test_tokens_usage_errors(run_cpu, grey_dir, looking_path, tmp_path):
    plain = save(looking_model(distilled=False), tmp_path / "plain.safetensors")
    rc, stdout, err = run_cpu("explain", grey_dir / "grey.png", "-m", plain, "-o", tmp_path / "o", "--tokens", "dist")
    assert rc == 2 and "this model has no distillation token" in err and stdout == ""
    for bad in ("head", ",", "cls,patch"):
        rc, _, err = run_cpu(
            "explain", grey_dir / "grey.png", "-m", looking_path, "-o", tmp_path / "o", "--tokens", bad
        )
        assert rc == 2 and "--tokens" in err and "use cls, dist or cls,dist" in err, bad
    assert not (tmp_path / "o").exists()  # refused before anything was made
    rc, stdout, err = run_cpu(
        "explain", grey_dir / "grey.png", "-m", looking_path, "-o", tmp_path / "c", "--tokens", "cls", "-F", "json"
    )
    assert rc == 0 and json.loads(stdout)[0]["tokens"] == ["cls"] and "left out" not in err


# --------------------------------------------------------------------------- the fast path


def test_classify_keeps_sdpa_and_its_answers(monkeypatch, model_path, colour_dir, looking_path):
    """classify (and the runner under it) still call SDPA; explain never does; and an
    explain run changes nothing classify answers."""
    from deit_cli.engine.classify import classify
    from deit_cli.images import iter_inputs

    files = [str(f) for f in colour_files(colour_dir)]
    model = load_model(str(model_path))

    def run() -> list:
        return [[(p.index, p.score) for p in r.predictions] for r in classify(model, iter_inputs(files))]

    before = run()
    calls = {"n": 0}
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    list(engine.explain(model, iter_inputs(files), per_head=True))
    engine.attention_maps(load_model(str(looking_path)), images(2, 64))
    assert calls["n"] == 0  # the maps come from the explicit softmax(QK^T/sqrt(d))
    assert run() == before  # bit for bit
    assert calls["n"] > 0  # classify's fast path is SDPA
    with torch.no_grad():  # the model's own forward too
        calls["n"] = 0
        model(images(1, 32))
        assert calls["n"] == len(model.blocks)


def test_the_explicit_forward_is_the_models_forward(model_path):
    model = looking_model()
    randomize(model, seed=5)
    x = images(2, 64)
    tokens, _ = engine.attention_probabilities(model, x)
    with torch.no_grad():
        np.testing.assert_allclose(tokens.numpy(), model.forward_features(x).numpy(), atol=1e-5, rtol=0)


def test_explain_help_does_not_import_torch():
    probe = (
        "import sys; from deit_cli.cli.app import main; rc = main(['explain', '--help']); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().endswith("NO-TORCH")
    text = " ".join(p.stdout.split())
    assert "0.5·A_l + 0.5·I" in text and "R = Â_L···Â_1" in text and "averaged over heads" in text
