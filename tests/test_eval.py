"""`deit eval`: exact top-k accuracy on labelled sets the tests make, with a model whose
weights are built to be right on some images and wrong on others by a known rank.

The model ("colour model") reads the mean grey level of an image and ranks the classes
by how near each class's prototype level is: class j's prototype is LEVELS[j], and an
image drawn for colour class j is painted LEVELS[j] + 6, so its ranking is j, j+1, j-1,
j+2, ... (distances 6, 16, 28, 38, ...). Label such an image t and its rank is known.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.config import imagenet_classes, imagenet_wnids
from deit_cli.model import DeiT, DeiTConfig
from deit_cli.variants import IMAGENET_MEAN, IMAGENET_STD

LEVELS = [20 + 22 * j for j in range(10)]
LABELS = [
    "apple",
    "banana",
    "cherry pie",
    "date",
    "elderberry",
    "fig, common fig",
    "grape",
    "hazelnut",
    "iris",
    "juniper",
]
# The 1000-class model puts colour class j at ImageNet class IMAGENET_IDX[j].
IMAGENET_IDX = [0, 1, 2, 100, 281, 400, 500, 700, 900, 999]
# (true class, colour class) of each image: 7 right at top-1; (5, 6) is rank 3, (8, 9)
# rank 2 and (7, 2) rank 8, so top-1 70 %, top-2 80 %, top-3 and top-5 90 %.
SET = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (6, 6), (7, 2), (8, 9), (9, 9)]
# File names: mixed-case extensions, one nested two folders deep, one JPEG.
FILES = ["a.png", "b.PNG", "c.Png", "sub/deeper/d.png", "e.JPEG", "f.png", "g.png", "h.png", "i.png", "j.png"]


def rank(true: int, colour: int) -> int:
    level = LEVELS[colour] + 6
    order = sorted(range(len(LEVELS)), key=lambda m: abs(level - LEVELS[m]))
    return order.index(true) + 1


def expected(ks=(1, 5), pairs=SET) -> dict[int, float]:
    return {k: 100 * sum(rank(t, c) <= k for t, c in pairs) / len(pairs) for k in ks}


def test_the_designed_ranks():
    assert [rank(t, c) for t, c in SET] == [1, 1, 1, 1, 1, 3, 1, 8, 2, 1]
    assert expected((1, 2, 3, 5)) == {1: 70.0, 2: 80.0, 3: 90.0, 5: 90.0}


# --------------------------------------------------------------------------- fixtures

D, ANCHOR_CLS, ANCHOR_PATCH = 8, 10.0, 100.0


def _norm(level: float) -> float:
    return (level / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]


@torch.no_grad()
def colour_model(labels: list[str], prototypes: dict[int, int]) -> DeiT:
    """A DeiT (32 px, one 32 px patch, one block) that ranks classes by how near the
    image's mean red level is to each class's prototype level; classes without one last.

    The patch token carries [f, -f, B, -B] (f: normalised mean red); uniform attention
    (q = k = 0) copies ±f into the class and distillation tokens, which carry [0, 0, A, -A];
    every token has mean 0, so the final norm only divides by a positive scale, and the
    head's logit_j = 2 p_j f - p_j² (no bias) orders classes by -(f - p_j)².
    """
    cfg = DeiTConfig(image_size=32, patch_size=32, embed_dim=D, depth=1, num_heads=1, num_classes=len(labels))
    m = DeiT(cfg)
    for p in m.parameters():
        p.zero_()
    m.patch_embed.proj.weight[0, 0] = 1 / 32**2  # mean of the red channel
    m.patch_embed.proj.weight[1, 0] = -1 / 32**2
    m.pos_embed[0, 2, 2], m.pos_embed[0, 2, 3] = ANCHOR_PATCH, -ANCHOR_PATCH
    for token in (m.cls_token, m.dist_token):
        token[0, 0, 2], token[0, 0, 3] = ANCHOR_CLS, -ANCHOR_CLS
    for norm in (m.blocks[0].norm1, m.blocks[0].norm2, m.norm):
        norm.weight.fill_(1)
    attn = m.blocks[0].attn
    attn.qkv.weight[2 * D, 0] = 1  # v = the normalised f
    scale = 3 * ANCHOR_PATCH * math.sqrt(2 / D)  # undo the mean over 3 tokens and norm1's scale
    attn.proj.weight[0, 0], attn.proj.weight[1, 0] = scale, -scale
    for j in range(len(labels)):
        p = _norm(prototypes[j]) if j in prototypes else 50 + 0.01 * j  # far behind, no ties
        for head in (m.head, m.head_dist):
            head.weight[j, 0] = 2 * p
            head.weight[j, 2] = -p * p / ANCHOR_CLS
    m.labels, m.source = list(labels), "colour-model"
    return m


def _save(model: DeiT, path: Path) -> str:
    save_safetensors(path, model.state_dict(), deit_metadata(model))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    ten = dict(enumerate(LEVELS))
    return {
        "names": _save(colour_model(LABELS, ten), d / "names.safetensors"),
        "imagenet": _save(
            colour_model(list(imagenet_classes()), {IMAGENET_IDX[j]: lv for j, lv in ten.items()}),
            d / "imagenet.safetensors",
        ),
        # labels that are digits, in reverse: folder "0" reads as class 0 and as class 9
        "digits": _save(colour_model([str(9 - j) for j in range(10)], ten), d / "digits.safetensors"),
    }


def paint(path: Path, colour: int, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    level = LEVELS[colour] + 6
    fmt = "JPEG" if path.suffix.lower() in (".jpeg", ".jpg") else "PNG"
    Image.new("RGB", size, (level, level, level)).save(path, format=fmt)
    return path


def make_folders(root: Path, name_of=lambda t: LABELS[t], pairs=SET) -> Path:
    for (t, c), f in zip(pairs, FILES):
        paint(root / name_of(t) / f, c)
    return root


def make_list(root: Path, name: str, label_of, *, header: str | None = None, sep: str = ",") -> Path:
    lines = [header] if header else []
    for i, ((t, c), f) in enumerate(zip(SET, FILES)):
        rel = f"img/{i}_{f}"
        paint(root / rel, c)
        lines.append(f"{rel}{sep}{label_of(t)}")
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def wnid(t: int) -> str:
    return imagenet_wnids()[IMAGENET_IDX[t]]


def eval_json(run_cli, *args) -> tuple[int, dict, str]:
    rc, out, err = run_cli("eval", *args, "--json", "--device", "cpu", "--workers", "2")
    return rc, (json.loads(out) if out.strip() else {}), err


# --------------------------------------------------------------------------- label formats

LAYOUTS = {
    "folders by name": lambda tmp: ([make_folders(tmp / "set")], "names", "name"),
    "folders by index": lambda tmp: ([make_folders(tmp / "set", str)], "names", "index"),
    "folders by WordNet id": lambda tmp: ([make_folders(tmp / "set", wnid)], "imagenet", "wnid"),
    "csv with header, names": lambda tmp: (
        [make_list(tmp, "val.csv", lambda t: f'"{LABELS[t]}"', header="path,label")],
        "names",
        "name",
    ),
    "tsv, indices": lambda tmp: ([make_list(tmp, "val.tsv", str, sep="\t")], "names", "index"),
    "whitespace list, WordNet ids": lambda tmp: ([make_list(tmp, "val.txt", wnid, sep=" ")], "imagenet", "wnid"),
    "SET with --labels": lambda tmp: (
        [tmp, "--labels", make_list(tmp, "../labels.csv", lambda t: IMAGENET_IDX[t], header="file,class")],
        "imagenet",
        "index",
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_label_format_gives_the_exact_fractions(tmp_path, run_cli, models, layout):
    args, model, kind = LAYOUTS[layout](tmp_path / "data")
    rc, s, err = eval_json(run_cli, *args, "--model", models[model])
    assert rc == 0, err
    assert (s["images"], s["failed"], s["total"]) == (10, 0, 10)
    assert s["top1"] == 70.0 and s["top5"] == 90.0
    assert s["correct"] == {"top1": 7, "top5": 9}
    assert s["label_by"] == kind and s["classes"] == 10
    assert s["images_per_s"] > 0


def test_any_top_list_per_class_and_confusions(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    rc, s, err = eval_json(run_cli, tmp_path / "set", "--model", models["names"], "--topk", "3,1,2", "--per-class")
    assert rc == 0, err
    assert s["top"] == [1, 2, 3]
    assert {k: s[f"top{k}"] for k in (1, 2, 3)} == expected((1, 2, 3)) == {1: 70.0, 2: 80.0, 3: 90.0}
    assert "top5" not in s
    by_class = {r["index"]: r for r in s["per_class"]}
    assert len(by_class) == 10 and by_class[5]["name"] == LABELS[5] and by_class[5]["label"] == LABELS[5]
    assert (by_class[5]["top1"], by_class[5]["top2"], by_class[5]["top3"]) == (0.0, 0.0, 100.0)
    assert (by_class[8]["top1"], by_class[8]["top2"]) == (0.0, 100.0)
    assert by_class[7]["top3"] == 0.0 and by_class[0]["top1"] == 100.0
    pairs = {(c["true"], c["predicted"]): c["count"] for c in s["confused"]}
    assert pairs == {(5, 6): 1, (7, 2): 1, (8, 9): 1}
    assert s["confused"][0]["true_label"] == LABELS[5] and s["confused"][0]["predicted_label"] == LABELS[6]


def test_the_library_api(tmp_path, models):
    import deit_cli
    from deit_cli.engine.evaluate import evaluate
    from deit_cli.engine.labels import labelled_set
    from deit_cli.images.labelled import scan_set

    model = deit_cli.load_model(models["imagenet"])
    lset = labelled_set(scan_set(make_folders(tmp_path / "set", wnid)), model.labels)
    assert lset.label_by == "wnid" and sorted(set(lset.targets)) == IMAGENET_IDX
    metrics = evaluate(model, lset, ks=(1, 5))
    assert (metrics.images, metrics.accuracy(1), metrics.accuracy(5), metrics.failed) == (10, 70.0, 90.0, [])


def test_heads_agree_and_dist_head_is_accepted(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    for head in ("cls", "dist"):
        rc, s, err = eval_json(run_cli, tmp_path / "set", "--model", models["names"], "--head", head)
        assert rc == 0, err
        assert (s["top1"], s["top5"], s["head"]) == (70.0, 90.0, head)


# --------------------------------------------------------------------------- the set's edge cases


def test_unknown_class_folder_is_an_error(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    paint(tmp_path / "set" / "kumquat" / "x.png", 0)
    rc, out, err = run_cli("eval", tmp_path / "set", "--model", models["names"])
    assert rc == 65 and out == ""
    assert "1 class folder is not a class of this model: 'kumquat'" in err
    assert "the other 10 matched as the model's labels; its labels begin 'apple'" in err


def test_unknown_wordnet_id_and_list_label_name_their_line(tmp_path, run_cli, models):
    make_folders(tmp_path / "set", wnid)
    paint(tmp_path / "set" / "n99999999" / "x.png", 0)
    rc, _, err = run_cli("eval", tmp_path / "set", "--model", models["imagenet"])
    assert rc == 65 and "'n99999999'" in err and "WordNet ids" in err

    lst = make_list(tmp_path, "val.csv", lambda t: LABELS[t] if t != 3 else "durian")
    rc, _, err = run_cli("eval", lst, "--model", models["names"])
    assert rc == 65 and "'durian' (line 4)" in err


def test_wordnet_ids_need_a_1000_class_model(tmp_path, run_cli, models):
    make_folders(tmp_path / "set", wnid)
    rc, _, err = run_cli("eval", tmp_path / "set", "--model", models["names"])
    assert rc == 65 and "WordNet ids" in err and "10 classes" in err


def test_ambiguous_folder_names_need_label_by(tmp_path, run_cli, models):
    make_folders(tmp_path / "set", str)  # "0".."9": class indices, and also the digits model's labels
    rc, _, err = run_cli("eval", tmp_path / "set", "--model", models["digits"])
    assert rc == 65 and "ambiguous" in err and "--label-by" in err
    rc, s, err = eval_json(run_cli, tmp_path / "set", "--model", models["digits"], "--label-by", "index")
    assert rc == 0, err
    assert (s["top1"], s["top5"], s["label_by"]) == (70.0, 90.0, "index")


def test_empty_class_folder_is_reported_not_failed(tmp_path, run_cli, models):
    make_folders(tmp_path / "set", pairs=[p for p in SET if p[0] != 4])
    (tmp_path / "set" / LABELS[4]).mkdir()
    rc, s, err = eval_json(run_cli, tmp_path / "set", "--model", models["names"], "--per-class")
    assert rc == 0, err
    assert f"class folder '{LABELS[4]}' has no images" in err
    pairs = [p for p in SET if p[0] != 4]
    assert (s["images"], s["failed"], s["classes"]) == (9, 0, 10)
    assert s["top1"] == expected((1,), pairs)[1] == 600 / 9
    empty = next(r for r in s["per_class"] if r["index"] == 4)
    assert (empty["images"], empty["top1"]) == (0, None)


def test_bad_images_are_counted_and_listed_not_dropped(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    (tmp_path / "set" / LABELS[2] / "broken.jpg").write_text("not a picture")
    paint(tmp_path / "set" / "stray.png", 0)  # beside the class folders: it has no label
    predictions = tmp_path / "p.jsonl"
    rc, s, err = eval_json(run_cli, tmp_path / "set", "--model", models["names"], "--predictions", predictions)
    assert rc == 1
    # accuracy is over the decoded images; the failed ones sit next to it
    assert (s["images"], s["failed"], s["total"]) == (10, 2, 12)
    assert (s["top1"], s["top5"]) == (70.0, 90.0)
    failed = {Path(f["path"]).name: f["error"] for f in s["failed_images"]}
    assert set(failed) == {"broken.jpg", "stray.png"}
    assert "not an image" in failed["broken.jpg"] and "not inside a class folder" in failed["stray.png"]
    assert "broken.jpg" in err and "stray.png" in err  # a line on stderr each
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 12
    bad = next(r for r in records if r["path"].endswith("broken.jpg"))
    assert bad["target"] == 2 and "error" in bad and "predictions" not in bad


def test_missing_file_in_a_list_fails_alone(tmp_path, run_cli, models):
    lst = make_list(tmp_path, "val.csv", str)
    with lst.open("a") as f:
        f.write("img/gone.png,3\n")
    rc, s, _ = eval_json(run_cli, lst, "--model", models["names"])
    assert rc == 1 and (s["images"], s["failed"], s["top1"]) == (10, 1, 70.0)
    assert "no such file" in s["failed_images"][0]["error"]


@pytest.mark.parametrize("case", ["missing", "flat folder", "only empty classes", "empty list", "nothing decodes"])
def test_nothing_to_evaluate_exits_66(tmp_path, run_cli, models, case):
    spec = tmp_path / "set"
    if case == "flat folder":
        paint(spec / "a.png", 0)
    elif case == "only empty classes":
        (spec / LABELS[0]).mkdir(parents=True)
    elif case == "empty list":
        spec = tmp_path / "val.csv"
        spec.write_text("path,label\n")
    elif case == "nothing decodes":
        (spec / LABELS[0]).mkdir(parents=True)
        (spec / LABELS[0] / "a.png").write_bytes(b"")
    rc, _, err = run_cli("eval", spec, "--model", models["names"])
    assert rc == 66, err
    if case == "flat folder":
        assert "no class folders" in err and "--labels" in err


# --------------------------------------------------------------------------- output


def test_predictions_jsonl_in_set_order_and_never_overwritten(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    out = tmp_path / "p.jsonl"
    rc, _, err = eval_json(
        run_cli, tmp_path / "set", "--model", models["names"], "--predictions", out, "--batch-size", "3"
    )
    assert rc == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["target"] for r in records] == [t for t, _ in SET]  # class folders sorted, as found
    for r, (t, c) in zip(records, SET):
        assert r["target_label"] == LABELS[t]
        assert r["target_rank"] == (rank(t, c) if rank(t, c) <= 5 else None)  # among the 5 predictions
        assert r["correct"] == (t == c) and r["predictions"][0]["index"] == c
        assert [p["rank"] for p in r["predictions"]] == [1, 2, 3, 4, 5]
        assert abs(sum(p["score"] for p in r["predictions"])) <= 1.0 + 1e-6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.jsonl")]  # no temporary left

    before = out.read_bytes()
    rc, _, err = run_cli("eval", tmp_path / "set", "--model", models["names"], "--predictions", out)
    assert rc == 73 and "--force" in err and out.read_bytes() == before
    rc, _, err = run_cli("eval", tmp_path / "set", "--model", models["names"], "--predictions", out, "--force", "-q")
    assert rc == 0, err


def test_summary_for_people_goes_to_stdout_without_codes(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    rc, out, err = run_cli("eval", tmp_path / "set", "--model", models["names"], "--device", "cpu", "--format", "table")
    assert rc == 0, err
    assert "top-1" in out and "70.00%" in out and "90.00%" in out and "\x1b[" not in out
    assert f"5 {LABELS[5]}" in out  # a most-confused pair
    assert err == ""  # no progress bar off a terminal


def test_bad_top_is_a_usage_error(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    for top in ("one", "0", "1,20"):
        rc, _, err = run_cli("eval", tmp_path / "set", "--model", models["names"], "--topk", top)
        assert rc == 2, (top, err)


def test_help_names_the_options(run_cli):
    rc, out, _ = run_cli("eval", "--help")
    assert rc == 0
    for opt in (
        "--topk",
        "--per-class",
        "--predictions",
        "--labels",
        "--label-by",
        "--head",
        "--crop-pct",
        "--resize",
        "--batch-size",
        "--device",
        "--dtype",
        "--workers",
        "--json",
        "--quiet",
    ):
        assert opt in out, opt


# --------------------------------------------------------------------------- torchrun


def test_torchrun_two_cpu_processes_equal_one(tmp_path, run_cli, models):
    make_folders(tmp_path / "set")
    (tmp_path / "set" / LABELS[2] / "broken.jpg").write_text("not a picture")  # failures merge too
    args = [
        "eval",
        str(tmp_path / "set"),
        "--model",
        models["names"],
        "--json",
        "--per-class",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--topk",
        "1,2,5",
    ]
    rc, out, err = run_cli(*args, "--predictions", tmp_path / "one.jsonl")
    assert rc == 1, err
    one = json.loads(out)

    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "deit_cli",
            *args,
            "--predictions",
            str(tmp_path / "two.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # rank 0 exits 1 (one image failed); torchrun passes it on
    two = json.loads(proc.stdout)
    timing = ("seconds", "images_per_s", "predictions")
    assert {k: v for k, v in two.items() if k not in timing} == {k: v for k, v in one.items() if k not in timing}
    assert (two["images"], two["failed"], two["top1"], two["top2"], two["top5"]) == (10, 1, 70.0, 80.0, 90.0)

    a = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 11
    for x, y in zip(a, b):  # same records in the same order; scores up to float rounding
        xs = [p.pop("score") for p in x.get("predictions", [])]
        ys = [p.pop("score") for p in y.get("predictions", [])]
        assert x == y and xs == pytest.approx(ys, abs=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two.jsonl")]  # shards cleaned up
