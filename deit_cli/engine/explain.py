"""Explain: where the class and distillation tokens look, as maps over the patch grid.

    model = load_model("deit-small-distilled")
    for r in explain(model, iter_inputs(["bird.jpg"]), method="rollout"):
        print(r.path, r.tokens, r.maps.shape)           # ("cls", "dist") (2, 14, 14)
    write_explanations(results, Path("maps"), method="rollout", raw=True)

Which tokens are mapped: the class token always; the distillation token when a teacher
trained it (`distillation_taught`): a released distilled model, or a `deit train` run with
--teacher. A model trained without one (its run summary, the safetensors metadata
`deit.run`, says `"teacher": null`), or a classifier without a distillation head, still
has the token, but nothing trained it to look anywhere: its map is left out unless asked
for (`tokens=("cls", "dist")`), and then it is marked "not trained by a teacher".

The maps come from an attention-returning forward of the model's own modules, with the
attention probabilities computed explicitly, softmax(QKᵀ/√d) per head; classify, bench
and the rest keep the fused SDPA path, which never materialises them. Two methods:

- `attention`: the last block's attention probabilities from the class token (and, for
  a distilled model, separately from the distillation token) to the patch tokens,
  averaged over the heads, as a (grid, grid) map.
- `rollout` (Abnar & Zuidema 2020, "Quantifying attention flow in transformers"): for
  each block l, A_l = the attention probabilities averaged over the heads (N x N);
  Â_l = 0.5·A_l + 0.5·I with each row renormalised to sum 1 (the residual connection);
  R = Â_L · … · Â_1; the map is R's row for the class (or distillation) token over the
  patch columns, as (grid, grid).

Maps are float32 and unnormalised (the attention values themselves); the pictures scale
each to its own range. Inputs go through the same reading, decoding, eval transform and
batches as classify; one bad input is a result with an `error`, never an exception.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..devices import resolve_device, resolve_dtype
from ..errors import DeiTError, OutputExists, UsageError
from ..files import atomic_path
from ..images.inputs import InputItem
from ..model import DeiT
from .classify import Prediction, default_head
from .results import ImageOptions, Result, reason, run_batches

__all__ = [
    "METHODS",
    "TOKEN_NAMES",
    "AttentionMaps",
    "Explanation",
    "attention_probabilities",
    "forward_with_attention",
    "rollout",
    "last_attention",
    "attention_maps",
    "run_summary",
    "distillation_taught",
    "parse_tokens",
    "choose_tokens",
    "explain",
    "OutputNames",
    "output_paths",
    "write_explanation",
    "write_explanations",
]

METHODS = ("rollout", "attention")
DEFAULT_METHOD = "rollout"
TOKEN_NAMES = ("cls", "dist")  # the prefix tokens, in the model's order
TOKEN_TITLES = {"cls": "class token", "dist": "distillation token"}
UNTAUGHT = "not trained by a teacher"  # the note on a distillation token no teacher trained


# --------------------------------------------------------------------------- the maths


def _attend(attn, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's attention module (its qkv and proj weights) with the probabilities
    computed explicitly: (output (B, N, D), probabilities (B, heads, N, N) float32)."""
    B, N, C = h.shape
    H = attn.num_heads
    qkv = attn.qkv(h).view(B, N, 3, H, C // H)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, head_dim)
    # Scores and softmax in float32 whatever the compute dtype: the probabilities are the output.
    scores = (q.float() @ k.float().transpose(-2, -1)) * (C // H) ** -0.5  # (B, H, N, N)
    probs = scores.softmax(dim=-1)
    out = probs.to(v.dtype) @ v  # (B, H, N, head_dim)
    return attn.proj(out.transpose(1, 2).reshape(B, N, C)), probs


def forward_with_attention(
    model: DeiT, x: torch.Tensor, on_attention: Callable[[int, torch.Tensor], None]
) -> torch.Tensor:
    """`model.forward_features(x)`, with explicit attention: calls on_attention(block
    index, probabilities (B, heads, N, N) float32) for each block, in order, and returns
    the tokens after the final norm (B, prefix + patches, D)."""
    x = model.embed(x)
    for i, block in enumerate(model.blocks):
        a, probs = _attend(block.attn, block.norm1(x))
        on_attention(i, probs)
        x = x + block.ls1(a)  # LayerScale (DeiT III); the identity for DeiT
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.norm(x)


@torch.no_grad()
def attention_probabilities(model: DeiT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tokens after the final norm, [each block's attention probabilities (B, heads, N, N)]).
    Every block's N x N matrices are kept: for a few images (tests, notebooks)."""
    kept: list[torch.Tensor] = []
    tokens = forward_with_attention(model, x, lambda i, p: kept.append(p))
    return tokens, kept


def rollout(attentions: Iterable[torch.Tensor]) -> torch.Tensor:
    """Attention rollout R = Â_L · … · Â_1 (B, N, N) from the blocks' probabilities
    (B, heads, N, N), first block first; Â = 0.5·mean over heads + 0.5·I, rows renormalised."""
    r = None
    for probs in attentions:
        r = _rollout_step(r, probs)
    if r is None:
        raise ValueError("rollout needs at least one block's attention")
    return r


def _rollout_step(r: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
    a = probs.float().mean(dim=1)  # (B, N, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye
    a = a / a.sum(dim=-1, keepdim=True)
    return a if r is None else a @ r  # Â_l · R_(l-1)


def last_attention(probs: torch.Tensor) -> torch.Tensor:
    """The last block's probabilities (B, heads, N, N) averaged over heads: (B, N, N)."""
    return probs.float().mean(dim=1)


def _grid(rows: torch.Tensor, prefix: int, gh: int, gw: int) -> torch.Tensor:
    """Rows (..., N) over all tokens -> the patch columns as (..., gh, gw)."""
    return rows[..., prefix:].reshape(*rows.shape[:-1], gh, gw)


class AttentionMaps(NamedTuple):
    """What `attention_maps` returns, float32 on the model's device."""

    maps: torch.Tensor  # (B, tokens, grid, grid): one map per prefix token (cls[, dist])
    heads: torch.Tensor | None  # (B, tokens, heads, grid, grid): the last block per head, or None
    tokens: torch.Tensor  # (B, prefix + patches, D) after the final norm (what the heads read)
    names: tuple[str, ...]  # ("cls",) or ("cls", "dist")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; use {' or '.join(METHODS)}")


@torch.no_grad()
def attention_maps(
    model: DeiT, images: torch.Tensor, method: str = DEFAULT_METHOD, *, per_head: bool = False
) -> AttentionMaps:
    """Maps of where the class (and distillation) token look, for preprocessed images
    (B, 3, H, W) on the model's device and dtype (they are moved and cast). `method`:
    rollout (default) or attention; see this module's docstring for the definitions."""
    _check_method(method)
    cfg = model.config
    P, p = cfg.num_prefix_tokens, cfg.patch_size
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    x = images.to(device=model.device, dtype=model.dtype)
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    depth = len(model.blocks)
    state: dict[str, torch.Tensor | None] = {"r": None, "last": None}

    def on_attention(i: int, probs: torch.Tensor) -> None:
        if method == "rollout":
            state["r"] = _rollout_step(state["r"], probs)
        if i == depth - 1:
            state["last"] = probs

    tokens = forward_with_attention(model, x, on_attention)
    last = state["last"]
    full = state["r"] if method == "rollout" else last_attention(last)  # (B, N, N)
    maps = _grid(full[:, :P], P, gh, gw)  # (B, P, gh, gw)
    heads = _grid(last[:, :, :P].transpose(1, 2), P, gh, gw) if per_head else None  # (B, P, H, gh, gw)
    return AttentionMaps(maps.contiguous(), None if heads is None else heads.contiguous(), tokens, TOKEN_NAMES[:P])


# --------------------------------------------------------------------------- which tokens


def run_summary(model: DeiT) -> dict | None:
    """The run summary `deit train` saved with the model (safetensors metadata `deit.run`),
    or None: not a local safetensors file, or not made by `deit train`. A dict already set
    as `model.run_summary` wins (a library user's own record); nothing is downloaded."""
    own = getattr(model, "run_summary", None)
    if isinstance(own, dict):
        return own
    source = getattr(model, "source", None)
    if not source or not Path(str(source)).expanduser().exists():
        return None  # registry names and hub ids: released models, no run summary
    from safetensors import safe_open

    from ..checkpoints.formats import SAFETENSORS, detect_format
    from ..checkpoints.loading import resolve_source
    from .train.run_dir import META_RUN

    try:
        weights, _, _ = resolve_source(str(source))
        if detect_format(weights) != SAFETENSORS:
            return None
        with safe_open(str(weights), framework="pt") as f:  # the header only
            raw = (f.metadata() or {}).get(META_RUN)
        summary = json.loads(raw) if raw else None
    except (DeiTError, OSError, ValueError, RuntimeError):  # the model loaded; a bad summary is no summary
        return None
    return summary if isinstance(summary, dict) else None


def distillation_taught(model: DeiT) -> bool | None:
    """Whether a teacher trained the model's distillation token: None when it has none.
    False only on evidence: a run summary (`deit train` made it) without a teacher or with
    distillation "none", or a classifier without a distillation head (transformers'
    DeiTForImageClassification). True otherwise: a teacher's run, a released distilled
    model (it has the head), or a headless model with no summary (nothing tells)."""
    cfg = model.config
    if not cfg.distilled:
        return None
    summary = run_summary(model)
    if summary is not None:
        return summary.get("teacher") is not None and summary.get("distillation", "none") not in (None, "none")
    return bool(cfg.dist_head) or cfg.num_classes == 0


def parse_tokens(tokens: str | Iterable[str]) -> tuple[str, ...]:
    """Token names from "cls,dist" (or an iterable of names), in the model's order, each
    once; UsageError (2) for an unknown name or none."""
    wanted = tokens.split(",") if isinstance(tokens, str) else [str(t) for t in tokens]
    wanted = [t.strip() for t in wanted if t.strip()]
    unknown = [t for t in wanted if t not in TOKEN_NAMES]
    if unknown or not wanted:
        what = f"unknown token {unknown[0]!r}" if unknown else "no token named"
        raise UsageError(f"--tokens: {what}; use cls, dist or cls,dist")
    return tuple(t for t in TOKEN_NAMES if t in wanted)


def choose_tokens(model: DeiT, tokens: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The tokens to map, in the model's order: `tokens` (see `parse_tokens`) checked
    against the model's; None: the class token, and the distillation token when a teacher
    trained it (`distillation_taught`). UsageError (2) for an unknown or absent token."""
    have = TOKEN_NAMES[: model.config.num_prefix_tokens]
    if tokens is None:
        return have if distillation_taught(model) is not False else have[:1]
    wanted = parse_tokens(tokens)
    if "dist" in wanted and "dist" not in have:
        raise UsageError("--tokens dist: this model has no distillation token", "use --tokens cls")
    return wanted


# --------------------------------------------------------------------------- per image


@dataclass
class Explanation(Result):
    """One image's maps. `maps` (tokens, grid, grid) float32, unnormalised, one per name in
    `tokens`; `heads` (tokens, heads, grid, grid) with per_head; `image` the crop the model
    saw (S, S, 3) uint8; `files` what was written for it (kind -> path), once written.
    `taught`: whether a teacher trained the distillation token (None: the model has none);
    `token_notes`: a note per mapped token that needs one ("dist": UNTAUGHT)."""

    method: str = DEFAULT_METHOD
    tokens: tuple[str, ...] = ()
    taught: bool | None = None
    token_notes: dict[str, str] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)  # best first; empty: no classifier
    maps: np.ndarray | None = None
    heads: np.ndarray | None = None
    image: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_record(self, **extra: Any) -> dict[str, Any]:
        """{"path", "method", "tokens", "token_notes"?, "trained_by_teacher", "files": {"png",
        "npy"?, "heads"?}, "predictions", **extra, "notes"?} or {"path", "error"}.
        trained_by_teacher: whether a teacher trained the distillation token (null: none)."""
        if not self.ok:
            return {"path": self.path, "error": self.error}
        rec: dict[str, Any] = {"path": self.path, "method": self.method, "tokens": list(self.tokens)}
        if self.token_notes:
            rec["token_notes"] = dict(self.token_notes)
        rec["trained_by_teacher"] = self.taught
        if self.files:
            rec["files"] = dict(self.files)
        rec["predictions"] = [p.to_record() for p in self.predictions]
        rec.update(extra)
        if self.notes:
            rec["notes"] = list(self.notes)
        return rec


def _on(model: DeiT, device: str | torch.device | None, dtype: str | torch.dtype | None) -> DeiT:
    """The model on `device` in `dtype`: itself when it is already there, else a copy (the
    caller's model is never changed)."""
    dev = resolve_device(device) if device is not None else model.device
    dt = resolve_dtype(dtype) if dtype is not None else model.dtype
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if model.device == dev and model.dtype == dt:
        return model
    moved = copy.deepcopy(model).to(device=dev, dtype=dt)
    for name in ("labels", "preprocessing", "source", "origin", "variant", "layout"):
        setattr(moved, name, getattr(model, name))
    return moved


def _pixels(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised images (B, 3, S, S) back to the uint8 crops (B, S, S, 3) the transform
    made. Exact: every byte v was stored as (v/255 - mean)/std in float32, so inverting and
    rounding recovers v (tests check it against EvalTransform.crop_image)."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    v = ((x.double() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    return v.permute(0, 2, 3, 1).contiguous().numpy()


def explain(
    model: DeiT,
    items: Iterable[InputItem],
    *,
    method: str = DEFAULT_METHOD,
    per_head: bool = False,
    top: int = 5,
    tokens: str | Iterable[str] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    options: ImageOptions = ImageOptions(),
) -> Iterator[Explanation]:
    """Each input's maps (and its top classes, when the model has a classifier), in input
    order. Predictions are the model's default head's probabilities (avg for distilled).
    `tokens`: which tokens to map (see `choose_tokens`; None: those a teacher trained)."""
    _check_method(method)
    if top < 1:
        raise UsageError("--top must be at least 1")
    cfg = model.config
    chosen = choose_tokens(model, tokens)
    taught = distillation_taught(model)
    token_notes = {"dist": UNTAUGHT} if "dist" in chosen and taught is False else {}
    pick = [TOKEN_NAMES.index(t) for t in chosen]  # rows of attention_maps' output
    net = _on(model, device, dtype)
    classifier = cfg.num_classes > 0 and model.head is not None
    head = default_head(cfg)
    k = min(top, cfg.num_classes) if classifier else 0
    labels = list(model.labels)
    pre = model.preprocessing
    if pre is None:
        raise UsageError("this model has no preprocessing record; load it with load_model")

    def compute(x: torch.Tensor) -> list[tuple]:
        out = attention_maps(net, x, method, per_head=per_head)
        maps = out.maps[:, pick].float().cpu().numpy()
        heads = out.heads[:, pick].float().cpu().numpy() if out.heads is not None else None
        crops = _pixels(x, pre.mean, pre.std)
        if classifier:
            with torch.no_grad():
                probs = net.forward_head(out.tokens, head).float().softmax(dim=-1)
            best = probs.topk(k, dim=-1)
            tops = list(zip(best.values.cpu().tolist(), best.indices.cpu().tolist()))
        else:
            tops = [([], [])] * len(x)
        return [(maps[i], None if heads is None else heads[i], crops[i], tops[i]) for i in range(len(x))]

    def results() -> Iterator[Explanation]:
        for pos, item, row, err, notes in run_batches(net, items, options, compute):
            if err is not None:
                yield Explanation(pos, item.path, reason(item.path, err), method=method)
                continue
            maps, heads, crop, (vals, idxs) = row
            preds = [Prediction(r, i, labels[i], v) for r, (v, i) in enumerate(zip(vals, idxs), 1)]
            yield Explanation(
                pos,
                item.path,
                None,
                list(notes),
                method=method,
                tokens=chosen,
                taught=taught,
                token_notes=dict(token_notes),
                predictions=preds,
                maps=maps,
                heads=heads,
                image=crop,
            )

    return results()  # a generator, but the checks above run at the call


# --------------------------------------------------------------------------- files


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class OutputNames:
    """A file-name stem per input, in input order, unique within one run: the input's
    stem, then stem-2, stem-3, ... for the next inputs with the same one (compared without
    case, for case-insensitive file systems). Characters other than letters, digits and
    . _ - become _."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    @staticmethod
    def stem(path: str) -> str:
        base = path.split("?", 1)[0].rstrip("/") if "://" in path else path
        name = os.path.basename(base.rstrip(os.sep)) or "image"
        stem = os.path.splitext(name)[0]
        stem = _UNSAFE.sub("_", stem).strip("._") or "image"
        return stem[:100]

    def __call__(self, path: str) -> str:
        stem = self.stem(path)
        name, n = stem, 1
        while name.lower() in self._used:
            n += 1
            name = f"{stem}-{n}"
        self._used.add(name.lower())
        return name


def output_paths(directory: Path, name: str, method: str, *, raw: bool, per_head: bool) -> dict[str, Path]:
    """The files written for one image: png always, npy with raw, heads with raw and per_head."""
    paths = {"png": directory / f"{name}.{method}.png"}
    if raw:
        paths["npy"] = directory / f"{name}.{method}.npy"
        if per_head:
            paths["heads"] = directory / f"{name}.{method}.heads.npy"
    return paths


def _refuse_existing(paths: Iterable[Path], directory: Path) -> None:
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    hint = "pass --force to replace them, or choose another -o"
    if len(existing) == 1:
        raise OutputExists(f"{existing[0]}: already exists", hint.replace("them", "it"))
    if existing:
        few = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise OutputExists(f"{directory}: {len(existing)} of the outputs already exist ({few})", hint)


def check_directory(directory: Path, *, create: bool = True) -> None:
    """The output directory, created if missing (with `create`); OutputExists (73) when it
    is not a directory or cannot be created."""
    if directory.exists() and not directory.is_dir():
        raise OutputExists(f"{directory}: not a directory")
    if not create:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputExists(f"{directory}: cannot create directory ({e.strerror or e})") from None
    if not os.access(directory, os.W_OK):
        raise OutputExists(f"{directory}: directory is not writable")


def check_outputs(paths: Iterable[str], directory: Path, method: str, *, raw: bool, per_head: bool) -> list[str]:
    """The names the inputs `paths` will get; OutputExists (73) if any of their files is
    already in `directory` (call it before the work, when the inputs are known)."""
    namer = OutputNames()
    names = [namer(p) for p in paths]
    targets = [t for n in names for t in output_paths(directory, n, method, raw=raw, per_head=per_head).values()]
    _refuse_existing(targets, directory)
    return names


def write_explanation(
    r: Explanation, directory: Path, name: str, *, raw: bool = False, force: bool = False, model: str | None = None
) -> dict[str, str]:
    """Write one explanation's files (each atomically); returns and sets `r.files`."""
    from .picture import render

    paths = output_paths(directory, name, r.method, raw=raw, per_head=r.heads is not None)
    if not force:
        _refuse_existing(paths.values(), directory)
    picture = render(
        r.image,
        r.maps,
        r.tokens,
        r.method,
        r.predictions,
        heads=r.heads,
        title=r.path,
        model=model,
        notes=r.token_notes,
    )
    with atomic_path(paths["png"]) as tmp:
        picture.save(tmp, format="PNG")
    if "npy" in paths:
        with atomic_path(paths["npy"]) as tmp:
            np.save(tmp, np.ascontiguousarray(r.maps, dtype=np.float32))
    if "heads" in paths:
        with atomic_path(paths["heads"]) as tmp:
            np.save(tmp, np.ascontiguousarray(r.heads, dtype=np.float32))
    r.files = {k: str(v) for k, v in paths.items()}
    return r.files


def write_explanations(
    results: Iterable[Explanation],
    directory: Path,
    *,
    raw: bool = False,
    force: bool = False,
    names: list[str] | None = None,
    model: str | None = None,
) -> Iterator[Explanation]:
    """Write each good result's files into `directory` as it comes, and pass it on.
    `names`: one per input position (from check_outputs); otherwise assigned in order."""
    namer = OutputNames()
    for r in results:
        name = names[r.position] if names is not None else namer(r.path)
        if r.ok:
            write_explanation(r, directory, name, raw=raw, force=force, model=model)
        yield r
