"""deit: Data-efficient Image Transformers (DeiT) as a command-line tool and a small library.

    import deit_cli
    model = deit_cli.load_model("deit-tiny-distilled")
    logits = model(x)
    maps = deit_cli.attention_maps(model, x, method="rollout").maps  # (B, tokens, grid, grid)

Importing this package does not import torch; the first use of `load_model`, `DeiT`
or `DeiTConfig` does (so `deit --help` stays fast).
"""

from ._version import __version__

_LAZY = {
    "load_model": "deit_cli.checkpoints",
    "read_checkpoint": "deit_cli.checkpoints",
    "DeiT": "deit_cli.model",
    "DeiTConfig": "deit_cli.config",
    "attention_maps": "deit_cli.engine.explain",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deit_cli' has no attribute {name!r}")
