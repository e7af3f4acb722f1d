"""The model card (README.md) that `deit push` writes: the form of the Hub's DeiT cards
(facebook/deit-*), filled from what the weights carry, never from guesses.

    card = model_card(model, repo_id="me/flowers-deit", run=read_run(weights_path))

Its YAML front matter holds `license`, `library_name`, `tags`, `pipeline_tag` and, when the
run validated, a `model-index` with the validation metrics (written by huggingface_hub's
own ModelCardData, so the Hub reads it as it writes it). The body follows the facebook
cards: model description, intended uses and limitations, how to use, training data,
training procedure, evaluation results, citation. A model without a run summary (`deit
train` stores one in model.safetensors under `deit.run`) gets a card that says what is
not known.

No torch here: the card is text about a model, made from plain values.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CITATION", "RunRecord", "model_card", "read_run", "validation_metrics"]

META_RUN = "deit.run"  # the run summary in model.safetensors (engine/train/run_dir.py)
PAPER = "https://arxiv.org/abs/2012.12877"
CITATION = """@InProceedings{pmlr-v139-touvron21a,
  title     = {Training data-efficient image transformers & distillation through attention},
  author    = {Touvron, Hugo and Cord, Matthieu and Douze, Matthijs and Massa, Francisco and Sablayrolles, Alexandre and Jegou, Herve},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning},
  pages     = {10347--10357},
  year      = {2021},
  volume    = {139},
  month     = {July}
}"""
PAPER_DEIT3 = "https://arxiv.org/abs/2204.07118"
CITATION_DEIT3 = """@InProceedings{touvron2022deitiii,
  title     = {DeiT III: Revenge of the ViT},
  author    = {Touvron, Hugo and Cord, Matthieu and Jegou, Herve},
  booktitle = {Computer Vision -- ECCV 2022},
  pages     = {516--533},
  year      = {2022}
}"""
_UNKNOWN = "Not recorded in these weights"
# Per-epoch rows shown in the card's training results table (all of them up to this many).
_MAX_ROWS = 20


@dataclass
class RunRecord:
    """What a `deit train` run left about these weights.

    summary: the run summary stored with the weights (`deit.run`); history: metrics.jsonl
    beside them (one record per epoch); recipe: the recipe the run used, every override
    applied, when the run directory's checkpoint.pt is the same run (`recipe_exact`), else
    the named recipe's defaults; args: the run's other options (teacher, alpha, tau...).
    """

    summary: dict
    history: list[dict] = field(default_factory=list)
    recipe: dict | None = None
    recipe_exact: bool = False
    args: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int | None:
        return self.summary.get("epochs")

    def record(self) -> dict:
        """The validation record of the epoch these weights come from."""
        final = self.summary.get("final")
        if isinstance(final, dict) and final.get("epoch", self.epochs) == self.epochs:
            return final
        for r in reversed(self.history):
            if r.get("epoch") == self.epochs:
                return r
        return {}


def read_run(weights: Path, metadata: dict[str, str]) -> RunRecord | None:
    """The run record of a weights file (None when its metadata holds no run summary)."""
    raw = metadata.get(META_RUN)
    if not raw:
        return None
    try:
        summary = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(summary, dict):
        return None
    run = RunRecord(summary=summary, history=_read_history(weights.parent / "metrics.jsonl", summary))
    recipe = summary.get("recipe")
    if isinstance(recipe, dict):  # a summary that carries the whole recipe
        run.recipe, run.recipe_exact = recipe, True
    args = _run_args(weights.parent / "checkpoint.pt", summary)
    if args is not None:
        run.args = args
        if isinstance(args.get("recipe"), dict) and not run.recipe_exact:
            run.recipe, run.recipe_exact = args["recipe"], True
    if run.recipe is None and isinstance(recipe, str):
        from .train.recipes import RECIPES

        if recipe in RECIPES:
            run.recipe = RECIPES[recipe].to_dict()
    return run


def _read_history(path: Path, summary: dict) -> list[dict]:
    """metrics.jsonl, when it belongs to this run (its classes and epochs agree)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("epoch"), int)]
    epochs = summary.get("epochs")
    if not records or (isinstance(epochs, int) and records[-1]["epoch"] < epochs):
        return []  # another run's, or cut short
    return [r for r in records if not isinstance(epochs, int) or r["epoch"] <= epochs]


def _run_args(path: Path, summary: dict) -> dict | None:
    """The options of the run in checkpoint.pt, when it is this run's (same classes, and it
    got at least as far as these weights)."""
    if not path.is_file():
        return None
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint only means fewer facts
        return None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        return None
    if ckpt.get("classes") != summary.get("classes") or ckpt.get("epoch", -1) < (summary.get("epochs") or 0):
        return None
    return ckpt["args"]


# --------------------------------------------------------------------------- metrics


def validation_metrics(run: RunRecord | None, *, multi_label: bool) -> list[dict]:
    """[{key, type, name, value, args}] of the run's validation of these weights (the `*_ema`
    keys for EMA weights); empty when the run did not validate."""
    if run is None:
        return []
    record = run.record()
    suffix = "_ema" if run.summary.get("weights") == "ema" else ""
    out = []

    def add(key: str, mtype: str, name: str, args: dict | None = None) -> None:
        value = record.get(key + suffix)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append({"key": key, "type": mtype, "name": name, "value": float(value), "args": args})

    if multi_label:
        add("val_map", "mean_average_precision", "mAP")
        add("val_f1_micro", "f1", "F1 (micro)", {"average": "micro"})
        add("val_f1_macro", "f1", "F1 (macro)", {"average": "macro"})
    else:
        add("val_top1", "accuracy", "Top-1 accuracy (%)")
        ks = sorted(int(k[7:]) for k in record if k.startswith("val_top") and k[7:].isdigit() and k[7:] != "1")
        for k in ks:
            add(f"val_top{k}", "top_k_accuracy", f"Top-{k} accuracy (%)", {"k": k})
    add("val_loss", "loss", "Validation loss")
    return out


# --------------------------------------------------------------------------- the card


def model_card(
    model: Any,
    *,
    repo_id: str,
    run: RunRecord | None,
    architecture: str,
    license: str = "apache-2.0",
) -> str:
    """README.md for a model folder: YAML front matter, then the card. `model` is a loaded
    DeiT (config, labels, preprocessing, source, multi_label); `architecture` the
    transformers class the folder's config.json names, or for DeiT III (timm's layout) timm's
    `deit3_*` name."""
    cfg, pre = model.config, model.preprocessing
    deit3 = _is_deit3(cfg)
    multi = bool(getattr(model, "multi_label", False))
    metrics = validation_metrics(run, multi_label=multi)
    params = sum(p.numel() for p in model.parameters())
    name = repo_id.split("/")[-1]
    data = _data_name(run)
    return "\n".join(
        [
            _front_matter(name, license, cfg.distilled, metrics, data, _base_model(run), deit3=deit3),
            _title(name, cfg),
            _description(model, params, architecture, run),
            _intended_uses(model, run),
            _how_to_use_timm(model, repo_id, architecture) if deit3 else _how_to_use(model, repo_id, architecture),
            _training_data(model, run, data),
            _training_procedure(model, run, pre),
            _evaluation(model, run, metrics, data),
            "## Citation\n\n"
            + (
                "The DeiT III paper:\n\n```bibtex\n" + CITATION_DEIT3
                if deit3
                else "The DeiT paper:\n\n```bibtex\n" + CITATION
            )
            + "\n```\n",
        ]
    )


def _base_model(run: RunRecord | None) -> str | None:
    """The hub repo a run fine-tuned, for the Hub's model tree (None from scratch or a local file)."""
    start = run.summary.get("source") if run else None
    if not isinstance(start, str) or not start or Path(start).expanduser().exists():
        return None
    from ..checkpoints.hub import parse_repo_id
    from ..variants import find_variant

    variant = find_variant(start)
    if variant is not None:
        return variant.hub_repo
    parsed = parse_repo_id(start)
    return parsed[0] if parsed else None


def _is_deit3(cfg) -> bool:
    return cfg.layer_scale_init is not None or not cfg.pos_embed_prefix


def _front_matter(
    name: str,
    license: str,
    distilled: bool,
    metrics: list[dict],
    data: str | None,
    base_model: str | None,
    *,
    deit3: bool = False,
) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["image-classification", "vision", "deit", "deit-cli"] + (["distillation"] if distilled else [])
    tags += ["deit3", "timm"] if deit3 else []
    results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type="imagefolder",
            dataset_name=f"{data} (validation)" if data else "the run's validation set",
            dataset_split="validation",
            metric_type=m["type"],
            metric_name=m["name"],
            metric_value=round(m["value"], 4),
            metric_args=m["args"],
        )
        for m in metrics
    ]
    card = ModelCardData(
        license=license,
        base_model=base_model,
        library_name="timm" if deit3 else "transformers",
        tags=tags,
        pipeline_tag="image-classification",
        model_name=name if results else None,
        eval_results=results or None,
    )
    return f"---\n{card.to_yaml()}\n---\n"


def _title(name: str, cfg) -> str:
    if _is_deit3(cfg):
        return (
            f"# {name}\n\nDeiT III Vision Transformer, {cfg.image_size}x{cfg.image_size}, published with `deit push`.\n"
        )
    kind = "Distilled data-efficient Image Transformer" if cfg.distilled else "Data-efficient Image Transformer"
    return f"# {name}\n\n{kind} (DeiT), {cfg.image_size}x{cfg.image_size}, published with `deit push`.\n"


def _size_name(cfg) -> str:
    return {192: "tiny", 384: "small", 768: "base"}.get(cfg.embed_dim, "custom")


def _description(model, params: int, architecture: str, run: RunRecord | None) -> str:
    cfg = model.config
    lines = ["## Model description", ""]
    if _is_deit3(cfg):
        lines.append(
            f"A Vision Transformer of the DeiT III family ([Touvron et al., 2022]({PAPER_DEIT3})): "
            f"{cfg.depth} blocks, width {cfg.embed_dim}, {cfg.num_heads} attention heads, MLP width {cfg.mlp_dim}, "
            f"{params:,} parameters. Images are cut into {cfg.patch_size}x{cfg.patch_size} patches "
            f"({cfg.grid_size}x{cfg.grid_size} of them at {cfg.image_size}x{cfg.image_size}), each linearly "
            "embedded, with a position embedding on the patches only; a class token is prepended. Both residual "
            "branches of every block are scaled per channel by a learned LayerScale."
        )
        layout = (
            f"The class token alone is classified. The folder is timm's layout (timm: `{architecture}` with the "
            "`model_args` config.json gives): transformers has no class for DeiT III."
        )
        lines += ["", layout, ""]
        head = "multi-label (a sigmoid per class" if getattr(model, "multi_label", False) else "single-label (softmax"
        extra = f", threshold {model.threshold:g})" if getattr(model, "multi_label", False) else ")"
        lines.append(f"The head classifies into {cfg.num_classes} classes, {head}{extra}: {_label_list(model.labels)}.")
        lines.append("")
        return "\n".join(lines)
    lines.append(
        f"A Vision Transformer trained the DeiT way ([Touvron et al., 2021]({PAPER})): "
        f"{cfg.depth} blocks, width {cfg.embed_dim}, {cfg.num_heads} attention heads, MLP width {cfg.mlp_dim} "
        f"({_size_name(cfg)}-sized), {params:,} parameters. Images are cut into {cfg.patch_size}x{cfg.patch_size} "
        f"patches ({cfg.grid_size}x{cfg.grid_size} of them at {cfg.image_size}x{cfg.image_size}), "
        "each linearly embedded; a class token is prepended."
    )
    lines.append("")
    if cfg.distilled:
        lines.append(
            "It is a distilled DeiT: besides the class token it has a distillation token, which learns from a "
            "teacher's predictions through the self-attention layers. "
            + (
                "Each token has its own classifier; at inference the model predicts the mean of the two "
                f"(transformers: `{architecture}`)."
                if cfg.has_dist_head
                else f"Only the class token is classified (transformers: `{architecture}`)."
            )
        )
    else:
        lines.append(f"It is not distilled: the class token alone is classified (transformers: `{architecture}`).")
    lines.append("")
    head = "multi-label (a sigmoid per class" if getattr(model, "multi_label", False) else "single-label (softmax"
    extra = f", threshold {model.threshold:g})" if getattr(model, "multi_label", False) else ")"
    lines.append(f"The head classifies into {cfg.num_classes} classes, {head}{extra}: {_label_list(model.labels)}.")
    lines.append("")
    return "\n".join(lines)


def _label_list(labels: list[str], n: int = 20) -> str:
    shown = ", ".join(f"`{label}`" for label in labels[:n])
    return shown + (f" and {len(labels) - n} more (config.json's `id2label` has them all)" if len(labels) > n else "")


def _intended_uses(model, run: RunRecord | None) -> str:
    lines = ["## Intended uses & limitations", ""]
    lines.append(
        "Use the model to classify images into the classes above, or as a feature extractor "
        "(`deit extract-features`). It knows only these classes: every image gets one of them, "
        "whatever it shows."
    )
    lines.append("")
    if run is None:
        lines.append(
            "What data it was trained on, and how well it does, is not recorded in these weights: "
            "evaluate it on data like yours (`deit eval`) before relying on it."
        )
    else:
        n = run.summary.get("train_images")
        lines.append(
            f"It was trained on {n:,} images" if isinstance(n, int) else "It was trained on a small labelled set"
        )
        lines[-1] += (
            "; expect it to do well only on images like those. Its validation results below are on "
            "the run's own validation set: evaluate it on data like yours (`deit eval`) before relying on it."
        )
    lines.append("")
    return "\n".join(lines)


def _how_to_use(model, repo_id: str, architecture: str) -> str:
    multi = getattr(model, "multi_label", False)
    post = (
        "scores = outputs.logits.sigmoid()[0]\n"
        f"print([model.config.id2label[i] for i, s in enumerate(scores.tolist()) if s >= {model.threshold:g}])"
        if multi
        else "predicted = outputs.logits.argmax(-1).item()\nprint(model.config.id2label[predicted])"
    )
    return f"""### How to use

With the `deit` command line (the `deit-cli` package):

```bash
deit classify image.jpg -m {repo_id} --top 5
```

With transformers, on its own (no code of deit's):

```python
from PIL import Image
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_id}")
model = AutoModelForImageClassification.from_pretrained("{repo_id}")  # {architecture}

image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
{post}
```
"""


def _how_to_use_timm(model, repo_id: str, architecture: str) -> str:
    multi = getattr(model, "multi_label", False)
    post = (
        "scores = logits.sigmoid()[0]\n"
        f"print([labels[i] for i, s in enumerate(scores.tolist()) if s >= {model.threshold:g}])"
        if multi
        else "print(labels[logits.argmax(-1).item()])"
    )
    return f"""### How to use

With the `deit` command line (the `deit-cli` package):

```bash
deit classify image.jpg -m {repo_id} --top 5
```

With timm, on its own (no code of deit's; transformers has no class for DeiT III):

```python
from PIL import Image
import timm
import torch

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()  # {architecture}
config = timm.data.resolve_data_config(model=model)  # config.json's pretrained_cfg
transform = timm.data.create_transform(**config)
labels = model.pretrained_cfg["label_names"]

image = Image.open("image.jpg").convert("RGB")
with torch.no_grad():
    logits = model(transform(image).unsqueeze(0))
{post}
```
"""


def _data_name(run: RunRecord | None) -> str | None:
    data = run.args.get("data") if run else None
    return _public(data) if isinstance(data, str) and data else None


def _public(value: str) -> str:
    """A name fit for a public card: a local path becomes its last part (no home directories);
    a hub repo id or a registry name stays as it is."""
    from ..checkpoints.hub import parse_repo_id

    path = Path(value).expanduser()
    if path.exists() or value.startswith(("/", "~", ".")) or (os.sep in value and parse_repo_id(value) is None):
        return path.name or value
    return value


def _training_data(model, run: RunRecord | None, data: str | None) -> str:
    lines = ["## Training data", ""]
    if run is None:
        lines.append(f"{_UNKNOWN}: this model has no `deit train` run summary, so its training data is not known.")
        origin = getattr(model, "origin", None) or getattr(model, "source", None)
        if origin:
            lines.append(f"The weights were read from `{_public(str(origin))}`.")
        lines.append("")
        return "\n".join(lines)
    s = run.summary
    where = f" `{data}`" if data else ""
    n_train, n_val = s.get("train_images"), s.get("val_images")
    classes = s.get("classes") or model.labels
    sentence = f"Trained on the labelled set{where}: "
    sentence += f"{n_train:,} training images" if isinstance(n_train, int) else "training images"
    sentence += f" in {len(classes)} classes"
    if isinstance(n_val, int) and n_val:
        val = run.args.get("val")
        split = run.args.get("val_split")
        how = f" (`{_public(val)}`)" if isinstance(val, str) else f" (a {split:g} split)" if split else ""
        sentence += f", validated on {n_val:,} held-out images{how}"
    lines.append(sentence + ".")
    if s.get("multi_label"):
        lines.append("Images may carry several labels (multi-label training).")
    lines.append("")
    return "\n".join(lines)


def _training_procedure(model, run: RunRecord | None, pre) -> str:
    lines = ["## Training procedure", "", "### Preprocessing", ""]
    lines.append(_eval_preprocessing(pre))
    lines.append("")
    if run is None:
        lines += [
            "### Training",
            "",
            (
                f"{_UNKNOWN}: the recipe, epochs, batch size, learning rate, teacher and augmentation "
                "of these weights are not known."
            ),
            "",
        ]
        return "\n".join(lines)
    s, r, args = run.summary, run.recipe or {}, run.args
    lines += ["### Training", ""]
    start = s.get("source")
    if isinstance(start, str) and start:
        if start.startswith("config"):
            init = (
                f"the DeiT III release's models_v2, LayerScale at {model.config.layer_scale_init:g}"
                if _is_deit3(model.config) and model.config.layer_scale_init is not None
                else "timm's"
            )
            lines.append(f"Trained from scratch (random initialisation, {init}).")
        else:
            lines.append(f"Fine-tuned from `{_public(start)}`.")
        lines.append("")
    rows: list[tuple[str, str]] = []
    rows.append(("recipe", f"`{s.get('recipe', r.get('name', '?'))}`"))
    rows.append(("epochs", str(s.get("epochs", "?"))))
    if isinstance(s.get("steps"), int):
        rows.append(("optimizer steps", f"{s['steps']:,}"))
    if r:
        # Without the run's checkpoint.pt only the recipe's name is known: its defaults say so.
        d = (lambda v: v) if run.recipe_exact else (lambda v: f"{v} (the recipe's default)")
        rows.append(("batch size (global)", d(str(r.get("batch_size")))))
        rows.append(("optimizer", d(_optimizer(r))))
        rows.append(("learning rate schedule", d(_schedule(r))))
        rows.append(("label smoothing", d(f"{r.get('smoothing', 0):g}")))
        if r.get("bce"):
            rows.append(("loss", d("binary cross-entropy on binarized targets (DeiT III's)")))
        rows.append(("augmentation", d(_augmentation(r))))
        dp = r.get("drop_path")
        where = " in every block" if r.get("drop_path_schedule") == "uniform" else ""
        rows.append(("stochastic depth (drop path)", d("by the model's width" if dp is None else f"{dp:g}{where}")))
        rows.append(("repeated augmentation", d(str(r.get("repeated_aug", 1)))))
        ema = f"on (decay {r.get('ema_decay'):g})" if r.get("model_ema") else "off"
        rows.append(("EMA of the weights", d(ema)))
        clip = r.get("clip_grad")
        rows.append(("gradient clipping", d(f"{clip:g}" if clip else "none")))
    size = args.get("image_size") or r.get("image_size") or model.config.image_size
    rows.append(("image size", f"{size}x{size}"))
    rows.append(("distillation", _distillation(s, args)))
    if args.get("dtype"):
        rows.append(("precision", f"`{args['dtype']}`"))
    if isinstance(args.get("seed"), int):
        rows.append(("seed", str(args["seed"])))
    weights = s.get("weights", "raw")
    rows.append(("weights published", "the EMA of the weights" if weights == "ema" else "the weights at the end"))
    lines.append("| setting | value |")
    lines.append("| --- | --- |")
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    if r and not run.recipe_exact:
        lines.append(
            f"These weights came without their run's checkpoint.pt, which records every option: the rows marked "
            f"as defaults are the `{r.get('name')}` recipe's, and flags that overrode them are not known."
        )
        lines.append("")
    elif not r:
        lines.append(f"{_UNKNOWN}: the recipe's settings (batch size, learning rate, augmentation).")
        lines.append("")
    return "\n".join(lines)


def _eval_preprocessing(pre) -> str:
    if pre is None:
        return f"{_UNKNOWN}: the evaluation preprocessing."
    r = pre.resize_size
    resize = (
        f"the shorter side is resized to {r} pixels (aspect ratio kept)"
        if pre.resize_mode == "shorter"
        else f"the image is resized to {r}x{r}"
    )
    mean = ", ".join(f"{v:g}" for v in pre.mean)
    std = ", ".join(f"{v:g}" for v in pre.std)
    return (
        f"At inference, {resize} with {pre.interpolation} interpolation, center-cropped to "
        f"{pre.image_size}x{pre.image_size} (crop ratio {pre.crop_pct:g}) and normalised with mean ({mean}) and "
        f"standard deviation ({std}). The folder's preprocessing config says the same (transformers' "
        "preprocessor_config.json, or for DeiT III timm's pretrained_cfg in config.json)."
    )


def _optimizer(r: dict) -> str:
    betas = r.get("betas") or (0.9, 0.999)
    name = "AdamW"
    if r.get("optimizer") == "lamb":
        name = (
            "LAMB (apex FusedLAMB's: the global gradient norm clipped to 1 in the step; no trust ratio without decay)"
        )
    return f"{name} (betas {betas[0]:g}, {betas[1]:g}; eps {r.get('opt_eps', 1e-8):g}; weight decay {r.get('weight_decay', 0):g})"


def _schedule(r: dict) -> str:
    lr, base = r.get("lr"), r.get("base_lr")
    if lr is None and base is None:  # a DeiT III recipe's default, sized by the model
        peak, how = None, ""
    elif lr is not None:
        peak, how = lr, ""
    elif r.get("unscale_lr"):
        peak, how = base, " (not scaled by the batch)"
    else:
        peak, how = base * r.get("batch_size", 512) / 512, f" (base {base:g} x batch / 512)"
    warm = r.get("warmup_epochs") or 0
    text = f"peak {peak:.3g}{how}, " if peak is not None else "peak by the model's width (the recipe's table), "
    if warm:
        text += f"linear warm-up from {r.get('warmup_lr'):g} over {warm:g} epochs, then "
    return text + f"cosine decay to {r.get('min_lr'):g}, per step"


def _augmentation(r: dict) -> str:
    if not r.get("augment", True):
        return "none (the evaluation transform)"
    crop = "simple crop (resize, reflect-padded 4-pixel random crop)" if r.get("simple_crop") else "random resized crop"
    parts = [f"{crop}, horizontal flip"]
    if r.get("three_augment"):
        jitter = f", then colour jitter {r['color_jitter']:g}" if r.get("color_jitter") else ""
        parts.append(f"3-Augment (one of grayscale, solarization, Gaussian blur{jitter})")
    if r.get("rand_augment") and not r.get("three_augment"):
        parts.append(f"RandAugment `{r['rand_augment']}`")
    mixup, cutmix = r.get("mixup") or 0, r.get("cutmix") or 0
    if mixup or cutmix:
        parts.append(f"mixup {mixup:g} / cutmix {cutmix:g} (switch {r.get('mixup_switch_prob', 0.5):g})")
    if r.get("reprob"):
        parts.append(f"random erasing {r['reprob']:g}")
    return ", ".join(parts)


def _distillation(s: dict, args: dict) -> str:
    kind = s.get("distillation") or "none"
    teacher = s.get("teacher") or args.get("teacher")
    if kind == "none" or not teacher:
        return "none"
    text = f"{kind}, teacher `{_public(str(teacher))}`"
    if kind == "soft" and "tau" in args:
        text += f", temperature {args['tau']:g}"
    if "alpha" in args and args.get("alpha") is not None:
        text += f", alpha {args['alpha']:g}"
    return text


def _evaluation(model, run: RunRecord | None, metrics: list[dict], data: str | None) -> str:
    lines = ["## Evaluation results", ""]
    if run is None:
        lines += [f"{_UNKNOWN}: no evaluation of this model is known. `deit eval DATA -m MODEL` measures one.", ""]
        return "\n".join(lines)
    if not metrics:
        lines += ["The run had no validation set: no evaluation of this model is known.", ""]
        return "\n".join(lines)
    record = run.record()
    n = record.get("val_images") or run.summary.get("val_images")
    where = f"`{data}`'s validation images" if data else "the run's validation images"
    epoch = record.get("epoch", run.epochs)
    lines.append(
        f"On {where} ({n:,} images), after epoch {epoch}"
        + (", the EMA weights" if run.summary.get("weights") == "ema" else "")
        + ":"
        if isinstance(n, int)
        else f"On {where}, after epoch {epoch}:"
    )
    lines.append("")
    lines.append("| metric | value |")
    lines.append("| --- | --- |")
    lines += [f"| {m['name']} | {m['value']:.4g} |" for m in metrics]
    lines.append("")
    best_key = "best_val_map" if getattr(model, "multi_label", False) else "best_val_top1"
    best, best_epoch = run.summary.get(best_key), run.summary.get("best_epoch")
    if isinstance(best, (int, float)) and best_epoch is not None and best_epoch != epoch:
        lines.append(f"The best epoch was {best_epoch} ({best:.4g}); its weights are best.safetensors in the run.")
        lines.append("")
    if run.history:
        lines += _history_table(run.history, multi=getattr(model, "multi_label", False))
    return "\n".join(lines)


def _history_table(history: list[dict], *, multi: bool) -> list[str]:
    key, title = ("val_map", "val mAP") if multi else ("val_top1", "val top-1 (%)")
    rows = history
    if len(rows) > _MAX_ROWS:  # every k-th epoch, and the last
        step = -(-len(rows) // _MAX_ROWS)
        rows = rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, (int, float)) else "-"

    lines = ["### Training results", "", f"| epoch | learning rate | train loss | {title} | val loss |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| {r.get('epoch')} | {fmt(r.get('lr'))} | {fmt(r.get('train_loss'))} | {fmt(r.get(key))} "
            f"| {fmt(r.get('val_loss'))} |"
        )
    lines.append("")
    return lines
