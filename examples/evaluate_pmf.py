#!/usr/bin/env python
# Copyright 2026 The pmf-diffusers developers. MIT License.
"""FID-50K / Inception Score (/ precision-recall) of a PMFPipeline under the official pMF protocol.

Multi-GPU (each process samples a contiguous shard of image indices with per-image seeds; features are gathered
and the main process computes the metrics and writes the JSON report):

    accelerate launch examples/evaluate_pmf.py --model ./pmf-b-16 \
        --reference-stats jit_in256_stats.npz --inception-weights weights-inception-2015-12-05-6726825d.pth \
        --output results/pmf-b-16.json --grid results/pmf-b-16.png

Other modes:

    # evaluate a folder of already generated images
    python examples/evaluate_pmf.py --images samples/ --reference-stats jit_in256_stats.npz
    # make reference statistics (mu, sigma, resolution) from a folder of real images
    accelerate launch examples/evaluate_pmf.py --compute-stats-from imagenet256_val/ --stats-out in256_val_stats.npz

Every option: `python examples/evaluate_pmf.py --help`; the protocol and where to get the reference statistics and
Inception weights: docs/evaluation.md. The same command is available as `pmf eval`.
"""

import argparse
import sys

from pmf_diffusers.evaluation import add_eval_arguments, run_eval


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Evaluate a pMF pipeline (FID / IS / precision-recall) under the official protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_eval_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"evaluate_pmf.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
