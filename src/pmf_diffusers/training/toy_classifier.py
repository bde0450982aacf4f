# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Compatibility path of the toy judge classifier, which now lives in `pmf_diffusers.toy.judge`.
`python -m pmf_diffusers.training.toy_classifier FOLDER OUT ...` runs `pmf train-judge FOLDER OUT ...`."""

import sys

from ..toy.judge import (
    ToyClassifier,
    evaluate_per_class_accuracy,
    load_image_folder,
    load_toy_classifier,
    save_toy_classifier,
    train_toy_classifier,
)

__all__ = [
    "ToyClassifier",
    "load_image_folder",
    "train_toy_classifier",
    "evaluate_per_class_accuracy",
    "save_toy_classifier",
    "load_toy_classifier",
    "main",
]


def main(argv=None) -> int:
    """`pmf train-judge ...` (`argv` defaults to the command line)."""
    from ..cli import main as pmf_main

    return pmf_main(["train-judge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
