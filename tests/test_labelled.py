"""The one labelled-set reader (`deit_cli.images.labelled`): `deit train` and `deit eval`
read every format the same way, and refuse the same malformed files with the same message.

Each case writes one set in one format; training reads it (the library's `find_sets`, and
`deit train` for a tiny epoch), evaluation reads it (`deit eval --predictions`), and the
two must name the same images with the same labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize
from PIL import Image
from training import ARCH, config_file

from deit_cli.checkpoints.writing import deit_metadata, save_safetensors
from deit_cli.engine.train.data import DatasetError, find_sets
from deit_cli.model import DeiT, DeiTConfig

NAMES = ["blue", "green", "red"]
RGB = {"blue": (30, 40, 220), "green": (30, 190, 40), "red": (220, 30, 30)}
# (file, labels) of the set: two images a class; for multi-label sets, some with two
# labels and one with none (a negative example).
SINGLE = [(f"{i}.png", [NAMES[i % 3]]) for i in range(6)]
MULTI = [("0.png", ["blue"]), ("1.png", ["green", "red"]), ("2.png", ["red"]), ("3.png", []), ("4.png", ["blue"])]

pytestmark = pytest.mark.usefixtures("one_thread")


def model(path: Path, *, multi_label: bool) -> Path:
    m = randomize(DeiT(DeiTConfig(**ARCH, distilled=False, num_classes=3)), 1)
    m.labels = list(NAMES)
    if multi_label:
        m.multi_label, m.threshold = True, 0.5
    save_safetensors(path, m.state_dict(), deit_metadata(m))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[bool, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        False: model(d / "single.safetensors", multi_label=False),
        True: model(d / "multi.safetensors", multi_label=True),
    }


def images(root: Path, rows) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, (name, labels) in enumerate(rows):
        rgb = RGB[labels[0]] if labels else (128, 128, 128)
        Image.new("RGB", (36 + i, 32), rgb).save(root / "img" / name)


def jsonl(root: Path, rows, name: str, *, single: bool) -> Path:
    """JSON lines: `image_url` as a file:// URL and as a relative path, and a `path` key."""
    lines = []
    for i, (file, labels) in enumerate(rows):
        key = "path" if i % 3 == 2 else "image_url"
        ref = (root / "img" / file).resolve().as_uri() if i % 3 == 0 else f"img/{file}"
        lines.append(json.dumps({key: ref, "label": labels[0] if single else labels}))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def delimited(root: Path, rows, name: str, *, sep: str, header: bool) -> Path:
    lines = ["# written by the test", "path,label" if header else ""]
    lines += [f"img/{file}{sep}{'|'.join(labels)}" for file, labels in rows]
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def folders(root: Path, rows) -> Path:
    for i, (file, labels) in enumerate(rows):
        (root / "tree" / labels[0]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36 + i, 32), RGB[labels[0]]).save(root / "tree" / labels[0] / file)
    return root / "tree"


SINGLE_FORMATS = {
    "class folders": lambda root: folders(root, SINGLE),
    "csv with a header and a comment": lambda root: delimited(root, SINGLE, "set.csv", sep=",", header=True),
    "tsv": lambda root: delimited(root, SINGLE, "set.tsv", sep="\t", header=False),
    "whitespace .txt": lambda root: delimited(root, SINGLE, "set.txt", sep=" ", header=False),
    "jsonl": lambda root: jsonl(root, SINGLE, "set.jsonl", single=True),
    ".json": lambda root: jsonl(root, SINGLE, "set.json", single=True),
    "JSON lines named .txt": lambda root: jsonl(root, SINGLE, "lines.txt", single=True),
}
MULTI_FORMATS = {
    "jsonl lists": lambda root: jsonl(root, MULTI, "set.jsonl", single=False),
    "csv a|b": lambda root: delimited(root, MULTI, "set.csv", sep=",", header=True),
}


def train(run_cpu, data: Path, tmp_path: Path, *extra) -> tuple[int, dict, str]:
    rc, out, err = run_cpu(
        "train",
        data,
        "-o",
        tmp_path / "run",
        "--config",
        config_file(tmp_path / "cfg.json", num_classes=3),
        "--recipe",
        "plain",
        "--epochs",
        "1",
        "--json",
        *extra,
    )
    return rc, (json.loads(out) if rc == 0 else {}), err


def evaluate(run_cpu, data: Path, model: Path, tmp_path: Path, *extra) -> tuple[int, dict, list[dict], str]:
    predictions = tmp_path / "predictions.jsonl"
    rc, out, err = run_cpu(
        "eval", data, "-m", model, "--json", "--predictions", predictions, "--force", *(extra or ("--topk", "1"))
    )
    if rc != 0:
        return rc, {}, [], err
    return rc, json.loads(out), [json.loads(line) for line in predictions.read_text().splitlines()], err


def both_read(run_cpu, models, data: Path, tmp_path: Path, *, multi: bool) -> None:
    """Training and evaluation read `data` as the same images with the same labels."""
    sets = find_sets(str(data), multi_label=None)
    train_set = sets.train
    assert train_set.multi_label is multi and train_set.classes == NAMES
    read_by_train = [
        (item.path, sorted(train_set.classes[t] for t in (target if multi else [target])))
        for item, target in zip(train_set.items, train_set.targets)
    ]

    rc, s, records, err = evaluate(run_cpu, data, models[multi], tmp_path)
    assert rc == 0, err
    assert s.get("multi_label", False) is multi and s["images"] == len(read_by_train) and s["failed"] == 0
    read_by_eval = [(r["path"], sorted(r["targets"]) if multi else [r["target_label"]]) for r in records]
    assert read_by_eval == read_by_train

    rc, t, err = train(run_cpu, data, tmp_path)
    assert rc == 0, err
    assert t["classes"] == NAMES and t["multi_label"] is multi and t["train_images"] == len(read_by_train)


@pytest.mark.parametrize("fmt", SINGLE_FORMATS)
def test_train_and_eval_read_a_single_label_set_alike(tmp_path, run_cpu, models, fmt):
    images(tmp_path, SINGLE)
    both_read(run_cpu, models, SINGLE_FORMATS[fmt](tmp_path), tmp_path, multi=False)


@pytest.mark.parametrize("fmt", MULTI_FORMATS)
def test_train_and_eval_read_a_multi_label_set_alike(tmp_path, run_cpu, models, fmt):
    images(tmp_path, MULTI)
    both_read(run_cpu, models, MULTI_FORMATS[fmt](tmp_path), tmp_path, multi=True)


BAD = {
    "a '|' in a JSON label": (
        "set.jsonl",
        '{"image_url": "img/0.png", "label": "red|blue"}\n',
        ["line 1: the label \"red|blue\" holds '|'", '"label": ["a", "b"]'],
    ),
    "not JSON": ("set.jsonl", '{"image_url": "img/0.png", "label": "red"\n', ["line 1: not JSON"]),
    "no label": ("set.jsonl", '{"image_url": "img/0.png"}\n', ['line 1: no "label"']),
    "a label that is no name": ("set.json", '{"path": "img/0.png", "label": {"x": 1}}\n', ["line 1: a label must be"]),
    "no image": ("set.jsonl", '{"label": "red"}\n', ['line 1: no image (an "image_url" or "path" string)']),
    "a CSV line without a label": ("set.csv", "path,label\nimg/0.png,red\nimg/1.png\n", ["line 3: expected a path"]),
}


@pytest.mark.parametrize("case", BAD)
def test_train_and_eval_refuse_a_bad_list_alike(tmp_path, run_cpu, models, case):
    name, text, wanted = BAD[case]
    images(tmp_path, SINGLE)
    (tmp_path / name).write_text(text)
    rc_train, _, err_train = train(run_cpu, tmp_path / name, tmp_path)
    rc_eval, _, _, err_eval = evaluate(run_cpu, tmp_path / name, models[False], tmp_path)
    assert rc_train == rc_eval == 65
    assert err_eval.strip().splitlines()[-1] in err_train  # the same one-line message
    for part in wanted:
        assert part in err_eval, err_eval
    assert not (tmp_path / "run").exists()


def test_a_list_in_a_single_label_run_names_its_line(tmp_path, run_cpu):
    images(tmp_path, MULTI)
    data = jsonl(tmp_path, MULTI, "set.jsonl", single=False)
    # line 1's ["blue"] is a list too: in JSON a list is what says "labels", whatever its length
    with pytest.raises(DatasetError, match=r"set.jsonl, line 1: several labels for one image in a single-label run"):
        find_sets(str(data), multi_label=False)


def test_urls_and_file_urls_in_a_list(tmp_path):
    from deit_cli.images.labelled import scan_set

    (tmp_path / "set.csv").write_text(
        "path,label\nhttps://example.com/a.png,red\nfile:///data/b.png,blue\nimg/c.png,green\ns3://bucket/d.png,red\n"
    )
    items = [e.item for e in scan_set(tmp_path / "set.csv").entries]
    assert [(i.path, i.url) for i in items] == [
        ("https://example.com/a.png", True),
        ("/data/b.png", False),
        (str(tmp_path / "img" / "c.png"), False),
        ("s3://bucket/d.png", False),  # kept as written: it fails as an image, alone
    ]


def test_the_reader_does_not_import_torch():
    code = "import sys, deit_cli.images.labelled; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    )


def test_a_runs_validation_is_what_eval_says_of_its_model(tmp_path, run_cpu):
    """Training validates with engine.metrics, as `deit eval` counts: the same numbers."""
    images(tmp_path, SINGLE)
    data = delimited(tmp_path, SINGLE, "set.csv", sep=",", header=True)
    rc, _, err = train(run_cpu, data, tmp_path, "--val", data)
    assert rc == 0, err
    val = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    rc, s, _, err = evaluate(run_cpu, data, tmp_path / "run" / "model.safetensors", tmp_path, "--topk", "1,3")
    assert rc == 0, err
    assert (val["val_images"], val["val_top1"], val["val_top3"]) == (s["images"], s["top1"], s["top3"])
