# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`pmf eval` (and `examples/evaluate_pmf.py`): FID / IS / precision-recall under the official protocol.

The options map one to one onto the fields of `pmf_diffusers.evaluation.EvalConfig`; the work is done by
`pmf_diffusers.evaluation.run_evaluation`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..evaluation.config import (
    DEFAULT_IS_SPLITS,
    DEFAULT_NUM_IMAGES,
    DEFAULT_PR_NEIGHBORHOOD,
    DEFAULT_SAMPLE_SEED,
    DTYPES,
    FEATURE_EXTRACTORS,
    FID_METHODS,
    INCEPTION_WEIGHTS_FILENAME,
    EvalConfig,
)
from . import EXIT_OK, add_command_parser, check_guidance_options, options_in_errors, parser_options

__all__ = ["add_eval_arguments", "add_parser", "config_from_args", "run", "run_eval"]

EPILOG = """\
--model is read like every pmf command reads it: bundled, a PMFPipeline folder, an official size name
(pMF-B/16, b16, ...) or a Hub repo id. Where to get the reference statistics and the Inception weights, and what
the numbers mean: docs/evaluation.md.

examples:
  # FID-50K of a converted official model (50 images per class, per-image seeds from 42)
  pmf eval --model ./pmf-b-16 --reference-stats jit_in256_stats.npz \\
      --inception-weights weights-inception-2015-12-05-6726825d.pth --output results/b16.json --grid results/b16.png

  # the same on every GPU of the machine (each process samples a shard)
  accelerate launch -m pmf_diffusers.cli eval --model ./pmf-b-16 --reference-stats jit_in256_stats.npz

  # evaluate a folder of generated images (e.g. pmf generate output: the grids it writes are skipped)
  pmf eval --images samples/ --reference-stats jit_in256_stats.npz

  # reference statistics (mu, sigma, resolution) of a folder of real images
  pmf eval --compute-stats-from imagenet256_val/ --stats-out in256_val_stats.npz

  # a smoke run of the whole path on a CPU (tiny random feature network: the numbers mean nothing)
  pmf eval --model bundled --per-class 2 --feature-extractor random --device cpu
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the evaluation options (one per `EvalConfig` field) to `parser` and return it."""
    source = parser.add_argument_group("what to evaluate (one of)")
    source.add_argument(
        "--model", metavar="MODEL", help="model to sample from: bundled | FOLDER | pMF-B/16 ... | namespace/name"
    )
    source.add_argument("--images", metavar="DIR", help="evaluate existing generated images instead of sampling")
    source.add_argument(
        "--compute-stats-from", metavar="DIR",
        help="only compute reference statistics of a folder of images (see --stats-out)",
    )
    source.add_argument("--stats-out", metavar="PATH", help="where --compute-stats-from writes its .npz")

    sampling = parser.add_argument_group("sampling (official protocol: class-balanced, per-image seeds)")
    sampling.add_argument(
        "--num-images", type=int, metavar="N",
        help=f"images to generate (default {DEFAULT_NUM_IMAGES}; a multiple of the number of classes)",
    )
    sampling.add_argument("--per-class", type=int, metavar="K", help="images per class (instead of --num-images)")
    sampling.add_argument(
        "--batch-size", type=int, default=64, metavar="B", help="images per process per batch (default 64)"
    )
    sampling.add_argument("--steps", type=int, default=1, metavar="T", help="sampling steps (default 1)")
    sampling.add_argument(
        "--guidance-scale", type=float, metavar="W", help="ω (default: the pipeline's default_guidance_scale)"
    )
    sampling.add_argument(
        "--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="[t_min, t_max] (default: the pipeline's)"
    )
    sampling.add_argument(
        "--sample-seed", type=int, default=DEFAULT_SAMPLE_SEED,
        help=f"image i uses seed (i XOR this) mod 2^32 (default {DEFAULT_SAMPLE_SEED})",
    )
    sampling.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="transformer dtype (noise and sample stay fp32)"
    )
    sampling.add_argument("--device", help="device for a single-process run (default: accelerate's; 'cpu' forces CPU)")
    sampling.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=True,
        help="allow TF32 matmul/cuDNN on CUDA, as the official evaluate.py (default on)",
    )

    reference = parser.add_argument_group("reference")
    reference.add_argument(
        "--reference-stats", metavar="PATH", help="FID statistics .npz (mu, sigma), e.g. jit_in256_stats.npz"
    )
    reference.add_argument(
        "--reference-resolution", type=int, metavar="S",
        help="state the resolution of --reference-stats when neither the file nor its name does",
    )
    reference.add_argument(
        "--reference-images", metavar="DIR",
        help="real images: for --precision-recall, and for FID when --reference-stats is absent",
    )

    metrics = parser.add_argument_group("metrics and feature extractor")
    metrics.add_argument(
        "--precision-recall", action="store_true",
        help="also compute improved precision/recall (needs --reference-images)",
    )
    metrics.add_argument(
        "--pr-k", type=int, default=DEFAULT_PR_NEIGHBORHOOD, metavar="K",
        help=f"k of the k-NN manifolds (default {DEFAULT_PR_NEIGHBORHOOD})",
    )
    metrics.add_argument(
        "--is-splits", type=int, default=DEFAULT_IS_SPLITS, help=f"Inception Score splits (default {DEFAULT_IS_SPLITS})"
    )
    metrics.add_argument(
        "--fid-method", choices=FID_METHODS, default="auto",
        help="matrix square root: scipy sqrtm or eigenvalues (default: scipy if installed)",
    )
    metrics.add_argument(
        "--feature-extractor", choices=FEATURE_EXTRACTORS, default="inception",
        help="inception: built-in FID Inception-v3 (default); torch-fidelity: its module, if importable; "
        "random: tiny random net for smoke tests",
    )
    metrics.add_argument(
        "--inception-weights", metavar="PATH", help=f"FID Inception-v3 weights ({INCEPTION_WEIGHTS_FILENAME})"
    )
    metrics.add_argument(
        "--download-inception", action="store_true", help="download the Inception weights if not found (needs internet)"
    )
    metrics.add_argument("--num-workers", type=int, default=4, help="threads decoding image files (default 4)")

    output = parser.add_argument_group("output")
    output.add_argument("--output", metavar="PATH", default="pmf_eval.json", help="JSON report (default pmf_eval.json)")
    output.add_argument("--save-images", metavar="DIR", help="also write every generated image as DIR/<index>.png")
    output.add_argument("--grid", metavar="PATH", help="write a sample grid PNG (first image of the first classes)")
    output.add_argument("--grid-size", type=int, default=16, help="images in --grid (default 16)")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command_parser(
        subparsers,
        "eval",
        help="FID / IS / precision-recall with the official protocol",
        description="Evaluate a pMF pipeline (FID / IS / precision-recall) under the official protocol.",
        epilog=EPILOG,
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The `EvalConfig` that parsed evaluation options describe (other attributes of `args` are ignored)."""
    values = {field.name: getattr(args, field.name) for field in fields(EvalConfig) if hasattr(args, field.name)}
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    return EvalConfig(**values)


def run_eval(args: argparse.Namespace, feature_extractor=None) -> int:
    """Run the evaluation that parsed options describe; returns 0. `feature_extractor` overrides
    `--feature-extractor` with any callable ``uint8 (B, 3, H, W) -> (features, logits)``."""
    from ..evaluation.protocol import run_evaluation

    check_guidance_options(args.guidance_scale, args.guidance_interval)
    # The library's errors name `EvalConfig` fields; these options are named after them.
    with options_in_errors(parser_options(add_eval_arguments(argparse.ArgumentParser()))):
        run_evaluation(config_from_args(args), feature_extractor)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return run_eval(args)
