"""deit_cli.images on files the tests make: discovery, safe decoding, the eval transform
(against torchvision and transformers as references), batching."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

sys.path.insert(0, str(Path(__file__).parent))

from imagegen import (  # noqa: E402
    PDF_BYTES,
    PSD_BYTES,
    noise,
    orient,
    png_header,
    save,
    save_with_orientation,
    serve_directory,
    silent_server,
    smooth,
    truncated_jpeg,
)

from deit_cli.images import (  # noqa: E402
    ImageError,
    ImageNotFound,
    InputItem,
    decode_image,
    eval_transform,
    iter_batches,
    iter_inputs,
)
from deit_cli.variants import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: E402

P224 = Preprocessing(image_size=224)
P384 = Preprocessing(image_size=384)


def pixels(path, **kw) -> np.ndarray:
    return np.asarray(decode_image(path, **kw).image)


def paths(items) -> list[str]:
    return [i.path for i in items]


# --------------------------------------------------------------------------- transform


def torchvision_reference(pre: Preprocessing):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(pre.image_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


@pytest.mark.parametrize("pre", [P224, P384], ids=["224", "384"])
@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (224, 224), (1000, 100), (37, 61)])
def test_shorter_mode_is_torchvision_pixel_for_pixel(pre, w, h):
    img = noise(w, h, seed=w * h)
    ours, ref = eval_transform(pre)(img), torchvision_reference(pre)(img)
    assert ours.shape == ref.shape == (3, pre.image_size, pre.image_size)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-6


def test_crop_pct_override_is_torchvision():
    img = noise(300, 200, seed=1)
    ours = eval_transform(P224, crop_pct=1.0)(img)
    ref = torchvision_reference(Preprocessing(image_size=224, crop_pct=1.0))(img)
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (37, 61), (1000, 100)])
def test_squash_mode_is_transformers_deit_image_processor(w, h):
    pytest.importorskip("transformers")
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    # transformers 5 ships two DeiT processors; the PIL one resamples exactly as PIL does.
    processor = DeiTImageProcessorPil(
        size={"height": 256, "width": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    img = noise(w, h, seed=7)
    ref = torch.as_tensor(processor(images=img, return_tensors="np")["pixel_values"][0])
    ours = eval_transform(P224, resize_mode="squash")(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_squash_mode_is_close_to_transformers_default_processor():
    pytest.importorskip("transformers")
    from transformers import DeiTImageProcessor

    # The default processor (torchvision tensor backend) resamples in float, so it is
    # within a level or two of PIL on a photo-like image, not bit-identical.
    processor = DeiTImageProcessor(
        size={"height": 256, "width": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    img = smooth(500, 375)
    ref = processor(images=img, return_tensors="pt")["pixel_values"][0]
    ours = eval_transform(P224, resize_mode="squash")(img)
    assert (ours - ref).abs().max().item() < 0.05  # 0.0175 is one 8-bit level


@pytest.mark.parametrize("w,h", [(1, 1), (1, 10000), (10000, 1), (3, 1000)])
def test_tiny_and_extreme_images_give_the_model_shape(w, h):
    out = eval_transform(P224)(smooth(w, h))
    assert out.shape == (3, 224, 224)
    assert torch.isfinite(out).all()


def test_transform_rejects_bad_settings():
    with pytest.raises(ValueError):
        eval_transform(P224, resize_mode="stretch")
    with pytest.raises(ValueError):
        eval_transform(P224, crop_pct=0.0)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_gives_the_pre_rotated_image(tmp_path, orientation):
    raw = np.asarray(noise(40, 30, seed=orientation))  # not square, so 5-8 swap the sides
    stored = save_with_orientation(Image.fromarray(raw), tmp_path / "o.png", orientation)
    upright = save(Image.fromarray(np.ascontiguousarray(orient(raw, orientation))), tmp_path / "upright.png")

    assert np.array_equal(pixels(stored), orient(raw, orientation))
    tf = eval_transform(P224)
    assert torch.equal(tf(decode_image(stored).image), tf(decode_image(upright).image))
    assert np.array_equal(pixels(stored, exif_transpose=False), raw)  # when disabled


def test_exif_orientation_in_jpeg(tmp_path):
    raw = np.asarray(smooth(64, 48))
    stored = save_with_orientation(Image.fromarray(raw), tmp_path / "o.jpg", 6, quality=95)
    got = pixels(stored).astype(int)
    want = orient(raw, 6).astype(int)
    assert got.shape == want.shape == (64, 48, 3)
    assert np.abs(got - want).mean() < 3  # JPEG is lossy; a wrong rotation is ~100 off


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageNotFound, match="nope.jpg: no such file"):
        decode_image(tmp_path / "nope.jpg")
    assert ImageNotFound.exit_code == 66 and ImageError.exit_code == 65


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="running as root: chmod 000 does not stop root reading"
)
def test_unreadable_file_names_the_path(tmp_path):
    p = save(smooth(8, 8), tmp_path / "secret.png")
    p.chmod(0)
    try:
        with pytest.raises(ImageNotFound, match="secret.png: permission denied"):
            decode_image(p)
    finally:
        p.chmod(0o644)


def test_permission_denied_message_even_as_root(tmp_path, monkeypatch):
    # Root reads anything, so the chmod test above skips there; this checks the message.
    def denied(path, mode="r"):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("deit_cli.images.decode.open", denied, raising=False)
    with pytest.raises(ImageNotFound, match="secret.png: permission denied"):
        decode_image(tmp_path / "secret.png")


@pytest.fixture
def pillow_must_not_open(monkeypatch):
    """Fails the test if Pillow is asked to parse the file at all."""

    def refuse(*args, **kwargs):
        raise AssertionError("Pillow was given a file the sniffer should have refused")

    monkeypatch.setattr(Image, "open", refuse)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty file"),
        (b"hello, I am a text file\n", r"not an image \(looks like text\)"),
        (PDF_BYTES, r"not an allowed image format \(PDF\)"),
        (PSD_BYTES, r"not an allowed image format \(PSD\)"),
        (b"\x00\x01\x02\x03garbage\xff\xfe", r"not an allowed image format \(unrecognised\)"),
    ],
    ids=["zero-byte", "text", "pdf", "psd", "garbage"],
)
def test_non_images_are_refused_before_pillow_parses_them(tmp_path, pillow_must_not_open, data, message):
    p = tmp_path / "photo.jpg"
    p.write_bytes(data)
    with pytest.raises(ImageError, match=message) as info:
        decode_image(p)
    assert "photo.jpg" in info.value.message and "\n" not in info.value.one_line()


def test_decompression_bombs_are_errors_without_warnings(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(100_000, 100_000))  # past Pillow's own hard limit
    big = tmp_path / "big.png"
    big.write_bytes(png_header(10_000, 9_000))  # past Pillow's warning limit only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(ImageError, match="decompression bomb"):
            decode_image(huge)
        with pytest.raises(ImageError, match="90000000 pixels, over the limit"):
            decode_image(big)


def test_max_pixels_limits_small_images_too(tmp_path):
    p = save(smooth(100, 100), tmp_path / "a.png")
    with pytest.raises(ImageError, match="10000 pixels, over the limit of 5000"):
        decode_image(p, max_pixels=5000)
    assert decode_image(p, max_pixels=10_000).image.size == (100, 100)


def test_truncated_jpeg_is_an_error_unless_allowed(tmp_path):
    p = truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(p)
    assert decode_image(p, allow_truncated=True).image.size == (128, 128)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # scoped, not left switched on
    with pytest.raises(ImageError, match="truncated"):
        decode_image(p)


def test_corrupt_png_is_an_error(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(png_header(16, 16)[:-12] + b"\x00\x00\x00\x04IDATjunk\x00\x00\x00\x00")
    with pytest.raises(ImageError, match="bad.png"):
        decode_image(p)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 1000, 32768, 32896, 65535]], dtype=np.uint16)
    p = save(Image.fromarray(a), tmp_path / "deep.png")
    assert Image.open(p).mode.startswith("I")  # a real 16-bit PNG
    got = pixels(p)
    assert got.shape == (1, 5, 3)
    assert list(got[0, :, 0]) == [0, 4, 128, 128, 255]  # mid-grey is ~128, not 255
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half: mid-grey
    p = save(Image.fromarray(rgba), tmp_path / "rgba.png")
    got = pixels(p)
    assert tuple(got[0, 0]) == (10, 20, 30)
    assert tuple(got[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in got[1, 0])

    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    got = pixels(save(la, tmp_path / "la.png"))
    assert tuple(got[0, 0]) == (50, 50, 50) and tuple(got[0, 1]) == (255, 255, 255)

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    for ext in ("png", "gif"):
        p = save(pal, tmp_path / f"pal.{ext}", transparency=1)
        got = pixels(p)
        assert tuple(got[0, 0]) == (255, 0, 0) and tuple(got[0, 1]) == (255, 255, 255), ext


def test_cmyk_grayscale_and_bilevel_become_rgb(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    got = pixels(save(cmyk, tmp_path / "cmyk.tif"))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == (0, 0, 0)

    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    got = pixels(save(gray, tmp_path / "gray.png"))
    assert [tuple(px) for px in got[0]] == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]

    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    got = pixels(save(bilevel, tmp_path / "bw.bmp"))
    assert tuple(got[0, 0]) == (0, 0, 0) and tuple(got[0, 1]) == (255, 255, 255)


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_animation_gives_first_frame_with_a_note(tmp_path, ext):
    if ext == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (16, 16), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    p = tmp_path / f"anim.{ext}"
    frames[0].save(
        p,
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
        **({"lossless": True} if ext == "webp" else {}),
    )
    decoded = decode_image(p)
    assert decoded.notes == ["first frame of 3"]
    r, g, b = np.asarray(decoded.image)[8, 8]
    assert r > 150 and g < 50 and b < 50


def test_every_allowed_format_decodes(tmp_path):
    img = smooth(20, 10)
    for fmt, ext in [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("GIF", "gif")] + (
        [("WEBP", "webp")] if features.check("webp") else []
    ):
        decoded = decode_image(save(img, tmp_path / f"x.{ext}", format=fmt))
        assert decoded.format == fmt and decoded.image.mode == "RGB"
        assert decoded.image.size == (20, 10)


# --------------------------------------------------------------------------- discovery


def test_odd_file_names(tmp_path, monkeypatch):
    names = ["with space.png", "new\nline.png", "-leading-dash.png"]
    for n in names:
        save(smooth(8, 8), tmp_path / n)
    specs = [str(tmp_path / n) for n in names]
    items = list(iter_inputs(specs))
    assert paths(items) == specs and all(i.error is None for i in items)
    assert all(decode_image(i).image.size == (8, 8) for i in items)

    monkeypatch.chdir(tmp_path)  # a relative "-leading-dash.png" is a file, not stdin
    assert list(iter_inputs(["-leading-dash.png"])) == [InputItem("-leading-dash.png")]


def test_stdin_lists(tmp_path):
    a = str(save(smooth(8, 8), tmp_path / "a.png"))
    b = str(save(smooth(8, 8), tmp_path / "new\nline.png"))
    text = io.StringIO(f"{a}\n\n{a}\r\n{tmp_path / 'missing.png'}\n")
    items = list(iter_inputs(["-", a], stdin=text))
    assert paths(items) == [a, a, str(tmp_path / "missing.png"), a]
    assert [i.error is None for i in items] == [True, True, False, True]

    nul = io.BytesIO(os.fsencode(a) + b"\0" + os.fsencode(b) + b"\0")
    assert paths(iter_inputs(["-"], stdin=nul, null_separated=True)) == [a, b]
    # Without -0 the same name is two (missing) lines: that is why -0 exists.
    lines = io.BytesIO(os.fsencode(b) + b"\n")
    assert all(i.error for i in iter_inputs(["-"], stdin=lines))


def test_stdin_paths_stream_before_eof(tmp_path):
    a = str(save(smooth(8, 8), tmp_path / "a.png"))
    for null_separated in (False, True):
        r, w = os.pipe()
        with os.fdopen(r, "rb") as reader, os.fdopen(w, "wb") as writer:
            writer.write(os.fsencode(a) + (b"\0" if null_separated else b"\n"))
            writer.flush()  # the writer stays open, like a `find` still running
            got = []
            thread = threading.Thread(
                target=lambda: got.append(next(iter_inputs(["-"], stdin=reader, null_separated=null_separated))),
                daemon=True,
            )
            thread.start()
            thread.join(timeout=5)
            assert got == [InputItem(a)], f"waited for EOF (null_separated={null_separated})"


def test_directory_recursion_order_and_filtering(tmp_path):
    root = tmp_path / "photos"
    for rel in [
        "b.png",
        "a.JPG",
        "sub/z.webp",
        "sub/deeper/y.TIFF",
        "c.jpeg",
        "notes.txt",
        ".hidden.png",
        "._a.JPG",
        "sub/.git/x.png",
        "aa/x.gif",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    got = [os.path.relpath(p, root) for p in paths(iter_inputs([str(root)]))]
    assert got == ["a.JPG", "aa/x.gif", "b.png", "c.jpeg", "sub/deeper/y.TIFF", "sub/z.webp"]


def test_directory_without_images_and_missing_spec_are_error_items(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    good = str(save(smooth(8, 8), tmp_path / "good.png"))
    items = list(iter_inputs([str(empty), str(tmp_path / "nope.jpg"), good]))
    assert items[0].error == f"no images in {empty}"
    assert items[1].error == f"{tmp_path / 'nope.jpg'}: no such file or directory"
    assert items[2] == InputItem(good)
    with pytest.raises(ImageNotFound, match="no images in"):
        decode_image(items[0])


def test_globs(tmp_path):
    for n in ["a2.png", "a1.png", "b.png", "a10.png"]:
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "x[1].png").write_bytes(b"")  # exists: taken literally, not as a pattern
    got = paths(iter_inputs([str(tmp_path / "a*.png"), str(tmp_path / "x[1].png")]))
    assert [os.path.basename(p) for p in got] == ["a1.png", "a10.png", "a2.png", "x[1].png"]
    (item,) = iter_inputs([str(tmp_path / "*.jpeg")])
    assert item.error and "no files match" in item.error


# --------------------------------------------------------------------------- URLs


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def test_urls(tmp_path, no_proxy):
    save(smooth(30, 20), tmp_path / "cat.png")
    with serve_directory(tmp_path) as base:
        (item,) = iter_inputs([f"{base}/cat.png"])
        assert item.url and item.error is None
        assert decode_image(item).image.size == (30, 20)
        with pytest.raises(ImageNotFound, match=r"/missing.png: HTTP 404"):
            decode_image(InputItem(f"{base}/missing.png", url=True))
        with pytest.raises(ImageError, match="too large"):
            decode_image(item, max_bytes=100)


def test_url_timeout(no_proxy):
    with silent_server() as base:
        t0 = time.monotonic()
        with pytest.raises(ImageError, match=r"timed out after 0.5 s"):
            decode_image(InputItem(f"{base}/slow.jpg", url=True), timeout=0.5)
        assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- batching


def make_mixed(tmp_path) -> list[InputItem]:
    """Good images with every kind of bad input between them."""
    good = [save(smooth(40 + i, 30), tmp_path / f"good{i}.png") for i in range(5)]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "doc.jpg").write_bytes(PDF_BYTES)
    truncated_jpeg(tmp_path / "cut.jpg")
    specs = [
        good[0],
        tmp_path / "missing.jpg",
        good[1],
        tmp_path / "zero.jpg",
        good[2],
        tmp_path / "text.jpg",
        tmp_path / "doc.jpg",
        good[3],
        tmp_path / "cut.jpg",
        good[4],
    ]
    return list(iter_inputs([str(s) for s in specs]))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_keep_input_order_with_failures_interleaved(tmp_path, workers):
    items = make_mixed(tmp_path)
    tf = eval_transform(P224)
    batches = list(iter_batches(items, tf, 3, workers=workers))
    assert [b.count for b in batches] == [3, 3, 3, 1]
    assert [b.start for b in batches] == [0, 3, 6, 9]

    records = [e for b in batches for e in b.entries()]
    assert [pos for pos, *_ in records] == list(range(10))
    assert [item for _, item, *_ in records] == items
    ok = [err is None for _, _, _, err, _ in records]
    assert ok == [True, False, True, False, True, False, False, True, False, True]
    errors = [err for *_, err, _ in records if err]
    for err, expected in zip(errors, ["no such file", "empty file", "looks like text", "(PDF)", "truncated JPEG"]):
        assert expected in err

    rows = {pos: batches[pos // 3].tensor[row] for pos, _, row, err, _ in records if not err}
    for pos, tensor in rows.items():
        assert torch.equal(tensor, tf(decode_image(items[pos]).image))
    assert all(b.tensor.shape[1:] == (3, 224, 224) for b in batches)
    assert [b.tensor.shape[0] for b in batches] == [2, 1, 1, 1]


def test_allow_truncated_in_batches(tmp_path):
    items = make_mixed(tmp_path)
    batches = list(iter_batches(items, eval_transform(P224), 10, workers=2, allow_truncated=True))
    assert len(batches[0].items) == 6  # the cut JPEG now decodes
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_all_failed_batch_has_zero_rows(tmp_path):
    items = [InputItem(str(tmp_path / "a.jpg"), error="gone"), InputItem("b", error="gone")]
    (batch,) = iter_batches(items, eval_transform(P384), 8, workers=2)
    assert batch.tensor.shape == (0, 3, 384, 384) and len(batch.failed) == 2


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("deit-decode")]


def test_closing_early_leaves_no_threads_and_reads_ahead_boundedly(tmp_path):
    img = save(smooth(64, 48), tmp_path / "x.png")
    consumed = 0

    def endless():  # a million inputs, e.g. `find / | deit classify -`
        nonlocal consumed
        for _ in range(1_000_000):
            consumed += 1
            yield InputItem(str(img))

    gen = iter_batches(endless(), eval_transform(P224), 4, workers=2, prefetch=2)
    first = next(gen)
    assert first.tensor.shape == (4, 3, 224, 224)
    assert consumed <= 4 * 4  # the batch taken, the next one queued, two more ahead
    assert decode_threads()
    gen.close()  # what `deit classify ... | head -1` does when the pipe closes
    assert decode_threads() == []
