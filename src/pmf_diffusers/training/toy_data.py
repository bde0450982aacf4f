# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Compatibility path of the toy dataset, which now lives in `pmf_diffusers.toy.shapes` (the grid helper in
`pmf_diffusers.image_grid`). `python -m pmf_diffusers.training.toy_data OUT ...` runs `pmf toy-data OUT ...`."""

import sys

from ..image_grid import save_image_grid
from ..toy import shapes
from ..toy.shapes import *  # noqa: F403 - this path re-exports the module's public names

__all__ = [*shapes.__all__, "save_image_grid", "main"]


def main(argv=None) -> int:
    """`pmf toy-data ...` (`argv` defaults to the command line)."""
    from ..cli import main as pmf_main

    return pmf_main(["toy-data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
