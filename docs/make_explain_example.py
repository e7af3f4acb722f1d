"""Make docs/explain-example.png: a real `deit explain` map of a model trained here.

    PYTHONPATH=. python docs/make_explain_example.py            # about a minute on a laptop CPU

A small DeiT (48-px images, patch 8: a 6 x 6 grid; 32 dims, 2 blocks) is trained from
scratch with `deit train --recipe plain` (no teacher) on generated pictures: one shape (a
square, a disc or a cross) of a random size and place, red, green or blue (its class), on
grey clutter. Only the shape's patches tell the classes apart. Then `deit explain` maps an
image the model never saw. The model was trained without a teacher, so the picture holds
the class token's map only.

What the map shows is where the class token looks, which need not be the object: for
green and red shapes it is the shape; for blue ones this model looks at the background
(it seems to tell blue by the absence of the other two). Run it with --work DIR and
`deit explain` more of DIR/shapes/val to see both.

Everything is seeded (the images, the initial weights, the data order); the numbers in
the picture can differ in the last digits from one machine or torch build to another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("cross", "disc", "square")
COLOURS = {"blue": (40, 70, 220), "green": (40, 190, 60), "red": (220, 40, 40)}
SIZE = 48
ARCH = {
    "image_size": SIZE,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "distilled": True,  # a DeiT: trained without a teacher, its distillation token is never taught
    "num_classes": len(COLOURS),
}


def background(rng: np.random.Generator) -> Image.Image:
    """Grey clutter: blurred noise and a few dim rectangles, different in every image."""
    a = rng.normal(110, 40, (SIZE // 4, SIZE // 4, 1)).repeat(3, axis=2)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rng.integers(0, SIZE, 2)
        w, h = rng.integers(4, 14, 2)
        g = int(rng.integers(60, 170))
        draw.rectangle((x, y, x + w, y + h), fill=(g, g, g))
    return im.filter(ImageFilter.GaussianBlur(0.8))


def picture(name: str, rng: np.random.Generator) -> Image.Image:
    im = background(rng)
    draw = ImageDraw.Draw(im)
    shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
    r = int(rng.integers(5, 9))  # half the shape's size
    cx, cy = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, 2))
    colour = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in COLOURS[name])
    if shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        t = max(2, r // 3)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    return im


def make_set(root: Path, per_class: dict[str, int], seed: int) -> None:
    for split, n in per_class.items():
        for c, name in enumerate(COLOURS):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, c, len(split)])
            for i in range(n):
                picture(name, rng).save(d / f"{i:03d}.png")


def deit(*args) -> int:
    from deit_cli.cli.app import main

    return main([str(a) for a in args])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "explain-example.png")
    p.add_argument("--work", type=Path, help="keep the data, run and maps here (default: a temporary directory)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # a tiny model: one thread is faster, and the same on every machine
    out = args.out.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="deit-explain-example-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # short, relative paths in the picture's caption
    t0 = time.perf_counter()
    make_set(Path("shapes"), {"train": 60, "val": 10}, args.seed)
    Path("arch.json").write_text(json.dumps(ARCH))
    rc = deit(
        "train",
        "shapes",
        "-o",
        "run",
        "--config",
        "arch.json",
        "--recipe",
        "plain",
        "--epochs",
        args.epochs,
        "--batch-size",
        30,
        "--lr",
        "3e-3",
        "--warmup-epochs",
        1,
        "--seed",
        args.seed,
        "--device",
        "cpu",
        "--force",
    )
    if rc:
        return rc
    final = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()][-1]
    print(f"trained in {time.perf_counter() - t0:.0f} s: validation top-1 {final['val_top1']:.1f}%", file=sys.stderr)
    Path("examples").mkdir(exist_ok=True)
    example = Path("examples/green.png")
    picture("green", np.random.default_rng([args.seed, 99])).save(example)  # an image the model never saw
    rc = deit("explain", example, "-m", "run/model.safetensors", "-o", "maps", "--top", "3", "--force", "-F", "json")
    if rc:
        return rc
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path("maps") / "green.rollout.png", out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
