"""Images: find the inputs, decode them safely, apply the evaluation transform, batch them.

    inputs.py     discovery: files, directories, globs, URLs, stdin (no torch, no Pillow)
    labelled.py   labelled sets: class folders, CSV/TSV and JSON-lines lists (train and eval)
    decode.py     safe decoding (files, URLs, bytes): magic bytes, URL fetching, Pillow's guards
    transform.py  the published evaluation transform
    batches.py    decoding in threads, batches in input order

This layer knows nothing about checkpoints, models or the terminal. Every failure of
one input is data (an `InputItem.error`, an `ImageError`, an entry in `Batch.failed`),
never a reason to stop the others. Names are imported lazily, so that importing
`deit_cli.images.inputs` does not import torch or Pillow.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "IMAGE_EXTENSIONS": "inputs",
    "InputItem": "inputs",
    "iter_inputs": "inputs",
    "is_url": "inputs",
    "LabelError": "labelled",
    "ScannedSet": "labelled",
    "scan_set": "labelled",
    "read_label_list": "labelled",
    "ALLOWED_FORMATS": "decode",
    "DEFAULT_MAX_PIXELS": "decode",
    "Decoded": "decode",
    "ImageError": "decode",
    "ImageNotFound": "decode",
    "decode_image": "decode",
    "decode_bytes": "decode",
    "EvalTransform": "transform",
    "eval_transform": "transform",
    "Batch": "batches",
    "iter_batches": "batches",
}

__all__ = list(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
