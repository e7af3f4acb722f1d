"""Engine: every job `deit` does, as functions and generators of result dataclasses.

    runner.py    the fast inference paths (prepare)
    results.py   ImageOptions, the per-image Result, the batched loop the jobs share
    classify.py  classify: the top classes of each image
    features.py  extract_features, pools, and the .npy/.safetensors/.jsonl writers
    labels.py    a labelled set's names matched to a model's classes (WordNet id, index, label)
    metrics.py   top-k and multi-label metrics (mAP, F1, IoU), merged across processes
    predictions.py  the eval predictions file (one JSON line per image)
    evaluate.py  evaluate_set: the whole of `deit eval` (labels, run, metrics, summary)
    bench.py     throughput, latency, memory; peers.py: timm and transformers beside it
    explain.py   attention maps (last block, rollout) per image, and their files; picture.py draws them
    export.py    export / export_model: an ONNX file, checked with onnxruntime; read_metadata

Nothing here prints or parses flags: the CLI (and the server) render what these return.
A library user can do from here whatever the CLI does. Names are imported lazily; the
job functions are in their modules (`from deit_cli.engine.classify import classify`);
`resolve_device` and `resolve_dtype` are deit_cli.devices'.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "prepare": "runner",
    "resolve_device": "deit_cli.devices",
    "resolve_dtype": "deit_cli.devices",
    "ImageOptions": "results",
    "Result": "results",
    "Prediction": "classify",
    "Classification": "classify",
    "default_head": "classify",
    "check_head": "classify",
    "Features": "features",
    "extract_features": "features",
    "default_pool": "features",
    "pool_tokens": "features",
    "feature_shape": "features",
    "write_features": "features",
    "scan_set": "deit_cli.images.labelled",
    "labelled_set": "labels",
    "EvalMetrics": "metrics",
    "MultiLabelMetrics": "metrics",
    "evaluate_set": "evaluate",
    "BenchSpec": "bench",
    "run_bench": "bench",
    "Explanation": "explain",
    "attention_maps": "explain",
    "export_model": "export",
    "read_metadata": "export",
}

__all__ = list(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
