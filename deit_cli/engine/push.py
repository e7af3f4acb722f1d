"""`deit push`: a model as a Hub repository, card included, in one commit.

    result = push("runs/flowers", "me/flowers-deit")                     # build, upload
    result = push("runs/flowers", "me/flowers-deit", out=Path("hf"), upload=False)

The folder is the transformers layout `deit convert --to hf` writes (config.json with
id2label/label2id, model.safetensors), with a preprocessor_config.json that states the
model's own evaluation preprocessing (size, crop, interpolation, mean, std) and a README.md
model card (engine/card.py). transformers has no class for DeiT III (LayerScale, the
patch-only position embedding), so a DeiT III is written in timm's hub layout instead
(`timm.create_model("hf-hub:REPO_ID")` loads it): config.json with `architecture` (timm's
`deit3_*` name of its width), `model_args` (the rest of the architecture), `num_classes`,
`label_names` and a `pretrained_cfg` holding the model's evaluation preprocessing, and
model.safetensors in timm's keys (our canonical keys are timm's). It is checked before anything is uploaded: read back, its
logits equal the source model's. The upload is huggingface_hub's `create_repo(exist_ok=True)`
then `upload_folder`, with the token huggingface_hub finds (HF_TOKEN, or `hf auth login`).

Errors: a REPO_ID that is not `owner/name` (2); no token, or the hub refuses it (77); the
hub unreachable (69); an existing --out without force (73).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AccessDenied, CheckpointError, DeiTError, HubUnavailable, UsageError, first_line
from ..files import atomic_path, check_destination, write_error

__all__ = [
    "FOLDER_FILES",
    "TIMM_FOLDER_FILES",
    "PushResult",
    "check_repo_id",
    "preprocessor_config",
    "push",
    "timm_config",
    "write_folder",
]

FOLDER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
TIMM_FOLDER_FILES = ("config.json", "model.safetensors", "README.md")  # DeiT III: timm reads config.json alone
# timm's deit3_* name for each released width (its model_args carry the rest)
_TIMM_DEIT3 = {384: "deit3_small_patch16_224", 512: "deit3_medium_patch16_224", 768: "deit3_base_patch16_224",
               1024: "deit3_large_patch16_224", 1280: "deit3_huge_patch14_224"}  # fmt: skip
# PIL's resampling numbers, which transformers' `resample` takes.
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_TOKEN_HINT = "set HF_TOKEN to a token with write access, or run `hf auth login`"


@dataclass
class PushResult:
    repo_id: str
    url: str | None  # the repository's page; None with upload=False
    commit_url: str | None
    revision: str
    private: bool
    folder: str | None  # the kept folder (--out), else None
    files: list[str] = field(default_factory=list)
    architecture: str = ""
    has_run: bool = False  # the card was filled from a run summary
    max_abs_diff: float = 0.0  # read-back logit check


def check_repo_id(repo_id: str) -> str:
    """`owner/name`, as the hub accepts it; else UsageError (exit 2)."""
    from ..checkpoints.hub import parse_repo_id

    parsed = parse_repo_id(repo_id)
    if parsed is None or parsed[1] is not None:
        raise UsageError(
            f"{repo_id!r} is not a hub repository id",
            "give it as owner/name (letters, digits, '-', '_', '.'); the branch goes in --revision",
        )
    return parsed[0]


def push(
    source: str,
    repo_id: str,
    *,
    out: Path | None = None,
    upload: bool = True,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str = "apache-2.0",
    force: bool = False,
) -> PushResult:
    """Write `source` as a Hub model folder with its card and upload it to `repo_id`
    (with upload=False, only write it: `out` is then required)."""
    repo_id = check_repo_id(repo_id)
    if not upload and out is None:
        raise UsageError("--no-upload needs --out DIR: the folder would be thrown away", "add --out DIR")
    if revision is not None and not revision.strip():
        raise UsageError("--revision must not be empty")
    if out is not None:
        src = Path(source).expanduser()
        check_destination(out, force=force, sources=(src,) if src.exists() else ())
    token = _token() if upload else None  # before the model is read: fail fast

    from ..checkpoints.loading import build_model, read_checkpoint
    from .card import read_run

    ckpt = read_checkpoint(source)
    model = build_model(ckpt)
    run = read_run(ckpt.path, _metadata(ckpt.path))
    result = PushResult(
        repo_id=repo_id,
        url=None,
        commit_url=None,
        revision=revision or "main",
        private=private,
        folder=str(out) if out is not None else None,
        has_run=run is not None,
    )

    def build(folder: Path) -> None:
        result.architecture, result.max_abs_diff = write_folder(
            model, folder, repo_id=repo_id, run=run, license=license
        )
        result.files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    if out is not None:
        with atomic_path(out, directory=True) as tmp:
            build(tmp)
        if upload:
            _upload(result, out, token, commit_message)
    else:
        with tempfile.TemporaryDirectory(prefix="deit-push-") as tmp:
            try:
                build(Path(tmp))
            except OSError as e:
                raise write_error(Path(tmp), e) from None
            _upload(result, Path(tmp), token, commit_message)
    return result


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (where `deit train` keeps the run summary); {} for other formats."""
    from ..checkpoints.formats import SAFETENSORS, detect_format

    if detect_format(path) != SAFETENSORS:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def write_folder(model, folder: Path, *, repo_id: str, run=None, license: str = "apache-2.0") -> tuple[str, float]:
    """config.json, model.safetensors, preprocessor_config.json and README.md in `folder`
    (which exists), checked by reading it back. Returns (architecture, largest logit difference)."""
    import torch

    from ..checkpoints.writing import check_logits, write_hf
    from .card import model_card

    if timm_layout(model.config):
        arch = _write_timm(folder, model, license)
    else:
        arch = write_hf(folder, model, torch.float32)
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model), indent=2) + "\n")
    card = model_card(model, repo_id=repo_id, run=run, architecture=arch, license=license)
    (folder / "README.md").write_text(card, encoding="utf-8")
    diff, tol = check_logits(model, str(folder), torch.float32, None)
    if not diff <= tol:  # NaN fails too
        raise CheckpointError(f"the written model's logits differ from the source's by {diff:.3g}; nothing pushed")
    return arch, diff


def timm_layout(config) -> bool:
    """DeiT III (LayerScale or the patch-only position embedding): timm's hub layout, which
    transformers cannot hold."""
    return config.layer_scale_init is not None or not config.pos_embed_prefix


def timm_config(model, license: str = "apache-2.0") -> dict:
    """timm's hub config.json for a DeiT III: what `timm.create_model("hf-hub:...")` reads
    (architecture, model_args, num_classes, label_names, pretrained_cfg)."""
    from ..variants import Preprocessing

    cfg = model.config
    if cfg.distilled:
        raise UsageError(
            "timm has no DeiT III with a distillation token, and transformers no DeiT III: nothing could load "
            "this folder",
            "publish it with `deit convert --to deit` and share the file",
        )
    pre = model.preprocessing or Preprocessing(image_size=cfg.image_size)
    args = {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "no_embed_class": not cfg.pos_embed_prefix,
        "init_values": cfg.layer_scale_init,  # None: no LayerScale
    }
    return {
        "architecture": _TIMM_DEIT3.get(cfg.embed_dim, "deit3_small_patch16_224"),
        "num_classes": cfg.num_classes,
        "num_features": cfg.embed_dim,
        "global_pool": "token",
        "model_args": args,
        "label_names": list(model.labels),
        "pretrained_cfg": {
            "tag": "deit",
            "custom_load": False,
            "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
            "fixed_input_size": True,
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
            "crop_mode": "squash" if pre.resize_mode == "squash" else "center",  # our "shorter" is timm's "center"
            "mean": list(pre.mean),
            "std": list(pre.std),
            "num_classes": cfg.num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": license,
        },
    }


def _write_timm(folder: Path, model, license: str) -> str:
    import torch

    from ..checkpoints.writing import canonical_tensors, save_safetensors

    if model.config.layer_norm_eps != 1e-6:  # timm's deit3 LayerNorms; model_args cannot say another
        raise UsageError(f"timm's deit3 has LayerNorm eps 1e-6, this model {model.config.layer_norm_eps:g}")
    config = timm_config(model, license)
    save_safetensors(folder / "model.safetensors", canonical_tensors(model, torch.float32), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config["architecture"]


def preprocessor_config(model) -> dict:
    """transformers' DeiTImageProcessor settings for the model's evaluation transform: the
    shorter side to int(size / crop_pct) (aspect kept; "squash": both sides), a center crop
    to the model's size, its interpolation, mean and std."""
    from ..variants import Preprocessing

    cfg = model.config
    pre = model.preprocessing or Preprocessing(image_size=cfg.image_size)
    r = pre.resize_size
    size = {"shortest_edge": r} if pre.resize_mode == "shorter" else {"height": r, "width": r}
    return {
        "image_processor_type": "DeiTImageProcessor",
        "do_resize": True,
        "size": size,
        "resample": _RESAMPLE.get(pre.interpolation, 3),
        "do_center_crop": True,
        "crop_size": {"height": pre.image_size, "width": pre.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }


# --------------------------------------------------------------------------- the hub


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise AccessDenied("no Hugging Face token: pushing needs one", _TOKEN_HINT)
    return token


def _upload(result: PushResult, folder: Path, token: str, commit_message: str | None) -> None:
    from huggingface_hub import HfApi

    from ..checkpoints import hub

    api = HfApi(token=token)
    repo_id, revision = result.repo_id, result.revision
    message = commit_message or f"Upload {repo_id.split('/')[-1]} with deit push"
    try:
        with hub.quiet_hub_logger():
            url = api.create_repo(repo_id, private=result.private or None, exist_ok=True)
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except DeiTError:
        raise
    except ValueError as e:  # the hub's verdict on README.md's front matter (e.g. a license it does not know)
        if "metadata" not in str(e):
            raise _hub_error(repo_id, e) from None
        why = " ".join(line.strip("- ") for line in str(e).splitlines()[1:] if line.strip()) or str(e).strip()
        raise UsageError(f"{repo_id}: the hub refused the card's metadata: {why}", "check --license") from None
    except Exception as e:  # noqa: BLE001 - mapped below, else re-raised
        raise _hub_error(repo_id, e) from None
    result.url = str(url)
    result.commit_url = getattr(info, "commit_url", None)


def _hub_error(repo_id: str, error: BaseException) -> BaseException:
    """huggingface_hub's errors on the way up, as the project's (hub.py's mapping for downloads)."""
    from ..checkpoints import hub

    E = hub.hub_errors()
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, E.RepositoryNotFound) or status in (401, 403):
        return AccessDenied(
            f"{repo_id}: the hub refused the push (HTTP {status})",
            f"set HF_TOKEN to a token with write access to {repo_id}'s owner, or run `hf auth login`",
        )
    if isinstance(error, E.RevisionNotFound):
        return UsageError(f"{repo_id}: {first_line(error)}")
    if isinstance(error, E.HTTP):
        return hub.from_http_error(repo_id, error)
    if isinstance(error, E.Offline) or hub.offline():
        return HubUnavailable(f"{repo_id}: cannot push while offline (HF_HUB_OFFLINE is set)", "unset HF_HUB_OFFLINE")
    if isinstance(error, (*E.Transport, ConnectionError, TimeoutError)):
        return hub.unavailable(repo_id, error)
    return error
