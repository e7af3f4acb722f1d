"""Cold start: the wall time of classifying one image from a local checkpoint, as a
fresh process, against `python -c "import torch"` and the peers' usual scripts.

    python benchmarks/cold_start.py [--runs 7]

Prints medians and ratios to `import torch` (interleaved runs; the machine is shared).
Needs timm and transformers (the test extra) for the peer rows.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMM = """
import timm, torch
from PIL import Image
from timm.data import resolve_data_config, create_transform
m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, checkpoint_path="{ckpt}").eval()
t = create_transform(**resolve_data_config({{}}, model=m))
with torch.inference_mode():
    p = m(t(Image.open("{img}").convert("RGB"))[None]).softmax(-1)
print(p.topk(5))
"""
PIPELINE = """
from transformers import pipeline
p = pipeline("image-classification", model="{hf}", device="cpu")
print(p("{img}", top_k=5))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image

    from deit_cli.checkpoints import random_model
    from deit_cli.checkpoints.writing import canonical_tensors, deit_metadata, save_safetensors, write_hf

    tmp = Path(tempfile.mkdtemp(prefix="deit-cold-"))
    model = random_model("deit-tiny-distilled")
    save_safetensors(tmp / "tiny.safetensors", canonical_tensors(model, torch.float32), deit_metadata(model))
    (tmp / "hf").mkdir()
    write_hf(tmp / "hf", model, torch.float32)
    img = tmp / "one.jpg"
    Image.fromarray((np.random.default_rng(0).random((375, 500, 3)) * 255).astype("uint8")).save(img)
    deit = shutil.which("deit") or str(Path(sys.executable).parent / "deit")
    cmds = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "deit classify one.jpg --model local.safetensors": [
            deit,
            "classify",
            str(img),
            "--model",
            str(tmp / "tiny.safetensors"),
        ],
        "timm script": [sys.executable, "-c", TIMM.format(ckpt=tmp / "tiny.safetensors", img=img)],
        "transformers pipeline": [sys.executable, "-c", PIPELINE.format(hf=tmp / "hf", img=img)],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<50} {'median s':>9} {'min s':>7} {'x import torch':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<50} {med:>9.3f} {min(ts):>7.3f} {med / base:>15.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
