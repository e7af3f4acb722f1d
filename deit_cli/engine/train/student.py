"""The student: the model to train (pretrained or random, heads for the data's classes) and
`TrainingHeads`, the forward that training runs."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ...errors import UsageError
from ...model import DeiT
from ...variants import Preprocessing, find_variant, variant_for_config
from .options import Events, TrainOptions

__all__ = ["TrainingHeads", "architecture", "build_student", "rebuild"]


class TrainingHeads(nn.Module):
    """The student as training sees it: (class logits, distillation logits or None).

    The same function as `DeiT.forward_features` + the heads, except that the last block
    runs its queries, projection and MLP on the class/distillation tokens only
    (`Block.forward_prefix`): the heads read nothing else, so the gradient is exactly the
    same and the work about 7% less, as in the inference runner.
    """

    def __init__(self, model: DeiT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        x = m.embed(x)  # (B, prefix + patches, D)
        for block in m.blocks[:-1]:
            x = block(x)
        tokens = m.norm(m.blocks[-1].forward_prefix(x, m.config.num_prefix_tokens))  # (B, prefix, D)
        cls = m.head(tokens[:, 0])
        dist = m.head_dist(tokens[:, 1]) if m.head_dist is not None else None
        return cls, dist


def architecture(opts: TrainOptions):
    """The config of the model a run starts from (what a recipe's by-size values read), without
    building it: --config, a released name, or the checkpoint's own."""
    if opts.config is not None:
        return opts.config
    variant = find_variant(opts.model)
    if variant is not None:
        return variant.config
    from ...checkpoints import read_checkpoint

    return read_checkpoint(opts.model).config


def build_student(opts: TrainOptions, classes: list[str], events: Events) -> DeiT:
    """The model to train: pretrained (fine-tuning) or random (--scratch), with heads for
    `classes`; a distilled model keeps its distillation head only when there is a teacher."""
    n = len(classes)
    if opts.scratch:
        if opts.config is not None:
            config, pre = opts.config, None
        else:
            variant = find_variant(opts.model)
            if variant is not None:
                config, pre = variant.config, variant.preprocessing
            else:
                from ...checkpoints import read_checkpoint

                config, pre = read_checkpoint(opts.model).config, None
        config = replace(config, num_classes=n, dist_head=True)
        if opts.image_size or opts.recipe.image_size:
            config = replace(config, image_size=opts.image_size or opts.recipe.image_size)
        model = DeiT(config)
        model.init_weights(opts.seed)
        model.preprocessing = replace(pre, image_size=config.image_size) if pre else Preprocessing(config.image_size)
        model.source = model.origin = f"{opts.model if opts.config is None else 'config'} (scratch)"
    else:
        from ...checkpoints import load_model

        model = load_model(opts.model, image_size=opts.image_size or opts.recipe.image_size)
        if model.config.num_classes != n:
            events.note(
                f"{opts.model} has {model.config.num_classes} classes, the data {n}: classifier heads re-initialised"
            )
            model = rebuild(model, replace(model.config, num_classes=n), opts.seed)
    cfg = model.config
    if opts.teacher is not None:
        if not cfg.distilled:
            raise UsageError(
                f"--teacher needs a distilled student, and {opts.model} has no distillation token",
                "use a distilled architecture (e.g. -m deit-tiny-distilled) or train without --teacher",
            )
        if not cfg.dist_head:
            events.note("the student has no distillation head: a new one is initialised")
            model = rebuild(model, replace(cfg, dist_head=True), opts.seed)
    elif cfg.has_dist_head:
        events.note("no teacher: the class head alone is trained, and the model is saved without a distillation head")
        model = rebuild(model, replace(cfg, dist_head=False), opts.seed)
    if opts.recipe.sizes == "deit3" and cfg.layer_scale_init is None:
        events.note(f"{opts.model} is a DeiT (no LayerScale): the deit3 recipe trains it as it is, not a DeiT III")
    if opts.recipe.eval_crop_pct is not None:  # DeiT III's recipes validate uncropped, as the release evaluates
        model.preprocessing = replace(model.preprocessing, crop_pct=opts.recipe.eval_crop_pct)
    model.labels = list(classes)
    if model.variant is None:
        model.variant = variant_for_config(model.config)
    return model


def rebuild(model: DeiT, config, seed: int) -> DeiT:
    """`model`'s weights in a DeiT of `config` (heads that changed shape start afresh)."""
    new = DeiT(config)
    own = new.state_dict()
    keep = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
    new.load_state_dict(keep, strict=False)
    for name in ("head", "head_dist"):
        layer = getattr(new, name)
        if layer is not None and f"{name}.weight" not in keep:
            _init_head(layer, seed + (name == "head_dist"))
    new.preprocessing, new.source, new.origin, new.variant = model.preprocessing, model.source, model.origin, None
    return new


@torch.no_grad()
def _init_head(linear: nn.Linear, seed: int) -> None:
    """A new classifier as timm (and the release's --finetune) initialises one: N(0, 0.02)
    truncated at +-2, zero bias."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(linear.weight.shape)
    nn.init.trunc_normal_(t, std=0.02, a=-2.0, b=2.0, generator=g)
    linear.weight.copy_(t)
    linear.bias.zero_()
