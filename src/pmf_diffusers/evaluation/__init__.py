# Copyright 2026 The pmf-diffusers developers. MIT License.
"""FID, Inception Score and precision/recall of pMF under the official evaluation protocol.

| module         | what it holds                                                                              |
|----------------|--------------------------------------------------------------------------------------------|
| `config`       | the protocol's constants and [`EvalConfig`] (torch-free)                                  |
| `protocol`     | labels, seeds, sharding, uint8 rules and [`run_evaluation`], which applies them           |
| `metrics`      | feature statistics, Fréchet distance, Inception Score, precision/recall                    |
| `reference`    | reading and writing FID reference statistics                                               |
| `inception`    | the FID Inception-v3 in plain torch and the other feature extractors                       |

The command line (`pmf eval`, `examples/evaluate_pmf.py`) lives in `pmf_diffusers.commands.eval`.

Example::

    from pmf_diffusers.evaluation import EvalConfig, run_evaluation

    report = run_evaluation(EvalConfig(model="pMF-B/16", reference_stats="jit_in256_stats.npz", output="b16.json"))

Names are imported on first use (as in the top-level package), so `pmf eval --help` reads the defaults in `config`
without importing torch.
"""

import importlib

_EXPORTS = {
    "DEFAULT_IS_SPLITS": "config",
    "DEFAULT_NUM_IMAGES": "config",
    "DEFAULT_PR_NEIGHBORHOOD": "config",
    "DEFAULT_SAMPLE_SEED": "config",
    "IS_SHUFFLE_SEED": "config",
    "EvalConfig": "config",
    "INCEPTION_WEIGHTS_ENV": "inception",
    "INCEPTION_WEIGHTS_FILENAME": "inception",
    "INCEPTION_WEIGHTS_URL": "inception",
    "FeatureExtractor": "inception",
    "ImageFeatureExtractor": "inception",
    "InceptionV3FeatureExtractor": "inception",
    "RandomFeatureExtractor": "inception",
    "TorchFidelityFeatureExtractor": "inception",
    "build_feature_extractor": "inception",
    "feature_extractor_dims": "inception",
    "resolve_inception_weights": "inception",
    "tf1_bilinear_resize": "inception",
    "feature_statistics": "metrics",
    "frechet_distance": "metrics",
    "inception_score": "metrics",
    "precision_recall": "metrics",
    "resolve_fid_method": "metrics",
    "JIT_STATS_URL": "reference",
    "ReferenceStats": "reference",
    "infer_resolution_from_filename": "reference",
    "load_reference_stats": "reference",
    "save_reference_stats": "reference",
    "IMAGE_EXTENSIONS": "protocol",
    "class_balanced_labels": "protocol",
    "image_seed": "protocol",
    "images_per_class": "protocol",
    "list_images": "protocol",
    "make_generators": "protocol",
    "run_evaluation": "protocol",
    "shard_indices": "protocol",
    "to_uint8": "protocol",
}
# The command-line half of the old single-module `evaluation`, now in `commands/eval.py` (kept importable from here).
_COMMAND_LINE = {"add_eval_arguments", "run_eval"}

__all__ = sorted([*_EXPORTS, *_COMMAND_LINE])


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    elif name in _COMMAND_LINE:
        module = importlib.import_module("..commands.eval", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def __dir__():
    return __all__
