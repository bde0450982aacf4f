#!/usr/bin/env python
# Copyright 2026 The pmf-diffusers developers. MIT License.
"""FID-50K / Inception Score (/ precision-recall) of a PMFPipeline under the official pMF protocol.

The same command as `pmf eval` (options, errors and all); this script exists so that `accelerate launch` can start
it by path. Multi-GPU (each process samples a contiguous shard of image indices with per-image seeds; features are
gathered and the main process computes the metrics and writes the JSON report):

    accelerate launch examples/evaluate_pmf.py --model ./pmf-b-16 \
        --reference-stats jit_in256_stats.npz --inception-weights weights-inception-2015-12-05-6726825d.pth \
        --output results/pmf-b-16.json --grid results/pmf-b-16.png

Other modes:

    # evaluate a folder of already generated images
    python examples/evaluate_pmf.py --images samples/ --reference-stats jit_in256_stats.npz
    # make reference statistics (mu, sigma, resolution) from a folder of real images
    accelerate launch examples/evaluate_pmf.py --compute-stats-from imagenet256_val/ --stats-out in256_val_stats.npz

Every option: `python examples/evaluate_pmf.py --help`; the protocol and where to get the reference statistics and
Inception weights: docs/evaluation.md. From Python: `pmf_diffusers.evaluation.run_evaluation(EvalConfig(...))`.
"""

import sys

from pmf_diffusers.cli import main as pmf_main


def main(argv=None) -> int:
    return pmf_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
