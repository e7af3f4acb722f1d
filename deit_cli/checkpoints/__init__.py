"""Checkpoints: format detection, safe reading, layout mapping, hub access, writing."""

from .loading import (
    Checkpoint,
    DeiTWarning,
    build_model,
    default_labels,
    load_model,
    random_model,
    read_checkpoint,
)

__all__ = [
    "Checkpoint",
    "DeiTWarning",
    "build_model",
    "default_labels",
    "load_model",
    "random_model",
    "read_checkpoint",
]
