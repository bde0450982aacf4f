# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The evaluation protocol's constants and the run configuration [`EvalConfig`].

Torch-free on purpose: `pmf eval --help` shows these defaults without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_NUM_IMAGES",
    "DEFAULT_SAMPLE_SEED",
    "DEFAULT_IS_SPLITS",
    "DEFAULT_PR_NEIGHBORHOOD",
    "DTYPES",
    "FEATURE_EXTRACTORS",
    "FID_METHODS",
    "INCEPTION_WEIGHTS_FILENAME",
    "IS_SHUFFLE_SEED",
    "EvalConfig",
]

# The official protocol (torch `evaluate.py`): FID-50K, class-balanced, per-image seeds derived from 42.
DEFAULT_SAMPLE_SEED = 42
DEFAULT_NUM_IMAGES = 50_000
DEFAULT_IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's `rng_seed` default for the IS shuffle
DEFAULT_PR_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019; torch-fidelity `prc_neighborhood`)

# The standard FID Inception-v3 weight file (torch-fidelity's release; pytorch-fid's copy is accepted too).
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"

DTYPES = ("float32", "bfloat16", "float16")
FID_METHODS = ("auto", "scipy", "eig")
FEATURE_EXTRACTORS = ("inception", "torch-fidelity", "random")
SOURCES = ("model", "images", "compute_stats_from")


@dataclass
class EvalConfig:
    """What [`run_evaluation`] does. Exactly one source: `model`, `images` or `compute_stats_from`.

    Source:
        model: A model string as [`pmf_diffusers.loading.load_pipeline`] reads it ("bundled", a PMFPipeline folder,
            an official size name or a Hub repo id); images are sampled under the official protocol.
        images: A folder of generated images to evaluate instead of sampling.
        compute_stats_from: A folder of real images whose reference statistics are written to `stats_out` (.npz).

    Sampling (with `model`): `num_images` (default 50,000) or `per_class` images, class-balanced; `batch_size` per
    process; `steps`; `guidance_scale` / `guidance_interval` (None: the pipeline's defaults); `sample_seed` (image i
    uses seed `(i XOR sample_seed) mod 2**32`); `dtype` of the transformer; `device` for a single-process run (None:
    accelerate's); `tf32` allows TF32 on CUDA, as the official evaluate.py.

    Reference: `reference_stats` (.npz with mu, sigma), `reference_resolution` (states the statistics' resolution
    when neither the file nor its name does), `reference_images` (real images: for precision/recall, and for FID
    when there are no reference statistics).

    Metrics: `precision_recall` (needs `reference_images`) with k = `pr_k`; `is_splits`; `fid_method` ("auto",
    "scipy", "eig"); `feature_extractor` ("inception", "torch-fidelity", "random"), `inception_weights`,
    `download_inception`; `num_workers` threads decode image files.

    Output: `output` (JSON report), `save_images` (folder for every generated image), `grid` (a PNG of the first
    `grid_size` samples).
    """

    model: str | None = None
    images: str | None = None
    compute_stats_from: str | None = None
    stats_out: str | None = None
    # sampling
    num_images: int | None = None
    per_class: int | None = None
    batch_size: int = 64
    steps: int = 1
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    sample_seed: int = DEFAULT_SAMPLE_SEED
    dtype: str = "float32"
    device: str | None = None
    tf32: bool = True
    # reference
    reference_stats: str | None = None
    reference_resolution: int | None = None
    reference_images: str | None = None
    # metrics and feature extractor
    precision_recall: bool = False
    pr_k: int = DEFAULT_PR_NEIGHBORHOOD
    is_splits: int = DEFAULT_IS_SPLITS
    fid_method: str = "auto"
    feature_extractor: str = "inception"
    inception_weights: str | None = None
    download_inception: bool = False
    num_workers: int = 4
    # output
    output: str = "pmf_eval.json"
    save_images: str | None = None
    grid: str | None = None
    grid_size: int = 16

    @property
    def source(self) -> str:
        """Which source is set: "model", "images" or "compute_stats_from" (call [`validate`] first)."""
        return next(name for name in SOURCES if getattr(self, name))

    def validate(self) -> None:
        """Raise a one-line `ValueError` for an inconsistent configuration (before any work is done)."""
        sources = [name for name in SOURCES if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError("Give exactly one of `model`, `images` or `compute_stats_from`.")
        source = sources[0]
        if source == "compute_stats_from" and not self.stats_out:
            raise ValueError("`compute_stats_from` needs `stats_out=PATH` (.npz).")
        if self.stats_out and source != "compute_stats_from":
            raise ValueError("`stats_out` only applies to `compute_stats_from`.")
        if self.num_images is not None and self.per_class is not None:
            raise ValueError("Give `num_images` or `per_class`, not both.")
        if source != "model":
            for name in ("per_class", "save_images", "grid", "guidance_scale", "guidance_interval"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` only applies when sampling from `model`.")
        for name in ("batch_size", "steps", "is_splits", "pr_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be ≥ 1, got {getattr(self, name)}.")
        for name in ("num_images", "per_class"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be ≥ 1, got {getattr(self, name)}.")
        for name, value, allowed in (("dtype", self.dtype, DTYPES), ("fid_method", self.fid_method, FID_METHODS),
                                     ("feature_extractor", self.feature_extractor, FEATURE_EXTRACTORS)):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}: use one of {', '.join(allowed)}.")
        if self.precision_recall and not self.reference_images:
            raise ValueError("`precision_recall` needs real images: pass `reference_images=DIR`.")
        if self.reference_resolution is not None and not self.reference_stats:
            raise ValueError("`reference_resolution` describes `reference_stats`, which is missing.")
