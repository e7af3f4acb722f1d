"""deit: Data-efficient Image Transformers (DeiT) as a command-line tool and a small library.

    import deit_cli
    model = deit_cli.load_model("deit-tiny-distilled")
    logits = model(x)
    maps = deit_cli.attention_maps(model, x, method="rollout").maps  # (B, tokens, grid, grid)

Importing this package does not import torch; the first use of `load_model`, `DeiT`
or `DeiTConfig` does (so `deit --help` stays fast).
"""

from ._lazy import lazy_getattr
from ._version import __version__

_LAZY = {
    "load_model": "deit_cli.checkpoints",
    "read_checkpoint": "deit_cli.checkpoints",
    "DeiT": "deit_cli.model",
    "DeiTConfig": "deit_cli.config",
    "attention_maps": "deit_cli.engine.explain",
}

__all__ = ["__version__", *_LAZY]
__getattr__ = lazy_getattr(__name__, _LAZY)
