# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Compatibility path of the toy dataset, which now lives in `pmf_diffusers.toy.shapes` (the grid helper in
`pmf_diffusers.image_grid`). `python -m pmf_diffusers.training.toy_data OUT ...` runs `pmf toy-data OUT ...`."""

import sys

from ..image_grid import save_image_grid
from ..toy.shapes import (
    TOY_CLASS_COLORS,
    TOY_CLASS_FOLDERS,
    TOY_CLASS_NAMES,
    TOY_DATASET_NAME,
    generate_toy_arrays,
    make_toy_dataset,
    render_toy_image,
    toy_class_folder_name,
)

__all__ = [
    "TOY_CLASS_NAMES",
    "TOY_CLASS_COLORS",
    "TOY_CLASS_FOLDERS",
    "TOY_DATASET_NAME",
    "toy_class_folder_name",
    "render_toy_image",
    "generate_toy_arrays",
    "make_toy_dataset",
    "save_image_grid",
    "main",
]


def main(argv=None) -> int:
    """`pmf toy-data ...` (`argv` defaults to the command line)."""
    from ..cli import main as pmf_main

    return pmf_main(["toy-data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
