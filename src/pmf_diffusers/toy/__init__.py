# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The toy-shapes demo: a self-generated 10-class image dataset and an independent judge classifier.

| module    | what it holds                                                                                 |
|-----------|-----------------------------------------------------------------------------------------------|
| `classes` | the ten classes: names, colours, folder names (standard library only)                         |
| `shapes`  | rendering the dataset: `render_toy_image`, `generate_toy_arrays`, `make_toy_dataset` (numpy, PIL) |
| `judge`   | the judge CNN: `train_toy_classifier`, `evaluate_per_class_accuracy`, save/load (torch)         |

Import what you need from its module (`from pmf_diffusers.toy.shapes import make_toy_dataset`), so that using the
dataset does not import torch. Command line: `pmf toy-data` and `pmf train-judge`.
"""

from .classes import TOY_CLASS_FOLDERS, TOY_CLASS_NAMES, TOY_DATASET_NAME

__all__ = ["TOY_CLASS_FOLDERS", "TOY_CLASS_NAMES", "TOY_DATASET_NAME"]
