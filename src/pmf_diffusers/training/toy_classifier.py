# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Compatibility path of the toy judge classifier, which now lives in `pmf_diffusers.toy.judge`.
`python -m pmf_diffusers.training.toy_classifier FOLDER OUT ...` runs `pmf train-judge FOLDER OUT ...`."""

import sys

from ..toy import judge
from ..toy.judge import *  # noqa: F403 - this path re-exports the module's public names

__all__ = [*judge.__all__, "main"]


def main(argv=None) -> int:
    """`pmf train-judge ...` (`argv` defaults to the command line)."""
    from ..cli import main as pmf_main

    return pmf_main(["train-judge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
