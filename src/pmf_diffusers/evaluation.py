# Copyright 2026 The pmf-diffusers developers. MIT License.
"""FID, Inception Score and precision/recall for pMF under the official evaluation protocol (pmf_spec.md §4).

Protocol (official torch `evaluate.py`)
---------------------------------------
* Class-balanced labels: ``N = per_class · num_classes`` images, image ``i`` has class ``i // per_class``
  (``np.arange(num_classes).repeat(per_class)``; 50 per class for FID-50K).
* Per-image noise: a CPU ``torch.Generator`` seeded with ``(i XOR sample_seed) mod 2**32`` (default seed 42) per image,
  so an image does not depend on the batch size, the number of processes or the shard it lands in.
* uint8 conversion: ``round(clip((x + 1) / 2 · 255, 0, 255))`` (round half to even, as ``np.round``).
* FID on the 2048-d pool features and IS (10 splits, samples shuffled with ``RandomState(2020)``) on the 1008-way
  *unbiased* logits (``features @ fc.weight.T``, no bias) of the FID Inception-v3, as torch-fidelity computes them;
  FID against JiT's reference statistics ``jit_in{256,512}_stats.npz`` (keys ``mu``, ``sigma``).

Feature extractor: why a built-in Inception-v3
----------------------------------------------
Every maintained FID package on the registry declares torchvision as a hard requirement, and torchvision cannot be
used with the CPU torch wheel this project pins (the registry torchvision is a CUDA build whose import fails there
and breaks transformers/peft imports; details and evidence in docs/evaluation.md):

* ``torch-fidelity`` 0.4.0 and 0.3.0 (the metric the official code calls): ``Requires-Dist: torchvision``;
  ``pip install --dry-run torch-fidelity`` would replace torch 2.13+cpu by torch 2.15 + torchvision 0.29 + 15 nvidia
  packages; ``import torch_fidelity.feature_extractor_inceptionv3`` runs the package ``__init__``, which imports the
  CLIP/DINOv2/VGG extractors and fails with ``ModuleNotFoundError: No module named 'torchvision'``.
* ``pytorch-fid`` 0.3.0 (``inception.py`` imports torchvision at the top) and ``clean-fid`` 0.1.35 (``cleanfid.fid``
  imports torchvision via ``cleanfid.utils``): same.
* ``torchmetrics``' FID wraps torch-fidelity's extractor (extra ``image`` = torch-fidelity + torchvision).

So this module carries a plain-torch implementation of the FID Inception-v3 (the TensorFlow 2015-12-05 graph as
ported by pytorch-fid / torch-fidelity: TF-style average pools without padded zeros, max pool in the last block,
TF1 bilinear resize to 299, ``(x - 128) / 128`` input scaling, 1008-way classifier). Its parameter names follow
torch-fidelity's module, so it loads the standard weight file unchanged: torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` carries the same
sha256 prefix). Where torch-fidelity *is* importable (a machine with a working torchvision),
``--feature-extractor torch-fidelity`` runs its own module instead; ``tests/test_evaluation.py`` compares the two
there. No weights are downloaded unless ``--download-inception`` is given; a missing file is a clear error naming
the file and its URL.

The extractor is pluggable: any callable ``uint8 (B, 3, H, W) -> (features (B, D), logits (B, C))`` works;
:class:`RandomFeatureExtractor` is a tiny seeded random network that runs the same code path (used by the tests and
for ``--feature-extractor random`` smoke runs; its numbers mean nothing).

Fréchet distance: ``scipy.linalg.sqrtm`` with the usual ``eps · I`` retry when scipy is installed (what
torch-fidelity 0.3 / pytorch-fid / JiT's torch-fidelity fork do), otherwise the eigenvalues of ``Σ1 Σ2`` (what
torch-fidelity 0.4 does: ``tr sqrt(Σ1 Σ2) = Σ sqrt(λ_i)``); both in float64.

Entry points: :func:`add_eval_arguments` / :func:`run_eval` (``examples/evaluate_pmf.py`` under
``accelerate launch``, and ``pmf eval``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DEFAULT_NUM_IMAGES",
    "DEFAULT_SAMPLE_SEED",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "JIT_STATS_URL",
    "InceptionV3FeatureExtractor",
    "RandomFeatureExtractor",
    "ReferenceStats",
    "TorchFidelityFeatureExtractor",
    "add_eval_arguments",
    "build_feature_extractor",
    "class_balanced_labels",
    "feature_statistics",
    "frechet_distance",
    "image_seed",
    "images_per_class",
    "inception_score",
    "infer_resolution_from_filename",
    "list_images",
    "load_reference_stats",
    "make_generators",
    "precision_recall",
    "resolve_inception_weights",
    "run_eval",
    "save_reference_stats",
    "shard_indices",
    "tf1_bilinear_resize",
    "to_uint8",
]

DEFAULT_SAMPLE_SEED = 42
DEFAULT_NUM_IMAGES = 50_000
DEFAULT_IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's `rng_seed` default for the IS shuffle
DEFAULT_PR_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019; torch-fidelity `prc_neighborhood`)

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
# The same network as converted by pytorch-fid (same sha256 prefix; accepted too).
INCEPTION_WEIGHTS_ALT_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ALT_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_WEIGHTS_ENV = "PMF_INCEPTION_WEIGHTS"
JIT_STATS_URL = "https://raw.githubusercontent.com/LTH14/JiT/refs/heads/main/fid_stats/jit_in{resolution}_stats.npz"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Square sizes a stats file name may carry (`jit_in256_stats.npz`, `VIRTUAL_imagenet512_labeled.npz`).
_FILENAME_RESOLUTIONS = (32, 64, 128, 256, 512, 1024)
_RESOLUTION_KEYS = ("resolution", "image_size", "img_size", "size")
_STATS_KEY_PAIRS = (("mu", "sigma"), ("mean", "cov"), ("mu_r", "sigma_r"))


# ----------------------------------------------------------------------------------------------------------------
# Protocol: labels, seeds, sharding, uint8
# ----------------------------------------------------------------------------------------------------------------
def images_per_class(num_images: int, num_classes: int) -> int:
    """Images per class of a class-balanced run; `num_images` must be a positive multiple of `num_classes`."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}.")
    if num_images < 1 or num_images % num_classes:
        raise ValueError(
            f"The official protocol samples every class equally: the number of images ({num_images}) must be a "
            f"positive multiple of the number of classes ({num_classes}); use --per-class N instead "
            f"(e.g. --per-class {max(1, num_images // num_classes)} for {max(1, num_images // num_classes) * num_classes} images)."
        )
    return num_images // num_classes


def class_balanced_labels(num_images: int, num_classes: int) -> np.ndarray:
    """`np.arange(num_classes).repeat(per_class)`: image i has class i // per_class (official `evaluate.py`)."""
    return np.arange(num_classes, dtype=np.int64).repeat(images_per_class(num_images, num_classes))


def image_seed(index: int, sample_seed: int = DEFAULT_SAMPLE_SEED) -> int:
    """The noise seed of image `index`: (index XOR sample_seed) mod 2**32."""
    return (int(index) ^ int(sample_seed)) % 2**32


def make_generators(indices: Sequence[int], sample_seed: int = DEFAULT_SAMPLE_SEED) -> list[torch.Generator]:
    """One CPU `torch.Generator` per image, seeded with :func:`image_seed` (pass as `generator=` to the pipeline)."""
    return [torch.Generator("cpu").manual_seed(image_seed(index, sample_seed)) for index in indices]


def shard_indices(num_items: int, num_processes: int, process_index: int) -> range:
    """The contiguous block of `range(num_items)` that process `process_index` of `num_processes` handles.

    Blocks differ in length by at most one (the first `num_items % num_processes` are longer); together they cover
    every index exactly once, in order.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"Invalid process {process_index} of {num_processes}.")
    if num_items < 0:
        raise ValueError(f"num_items must be ≥ 0, got {num_items}.")
    base, extra = divmod(num_items, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (1 if process_index < extra else 0))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] (B, C, H, W) → uint8: round(clip((x + 1) / 2 · 255, 0, 255)) in fp32."""
    x = (images.float() + 1) / 2
    return (x * 255).clamp(0, 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N − 1) covariance of (N, D) features, in float64."""
    feats = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    feats = feats.astype(np.float64, copy=False)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"Need (N ≥ 2, D) features for statistics, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _has_scipy() -> bool:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    import scipy.linalg

    def sqrtm(matrix):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check finiteness ourselves
            root = scipy.linalg.sqrtm(matrix)
        return root[0] if isinstance(root, tuple) else root

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: the usual eps offset on both diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(Σ1 Σ2) has a large imaginary component ({np.abs(covmean.imag).max():.3g}); "
                "are both covariances symmetric positive semi-definite?"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eig(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    if not np.isfinite(eigenvalues).all():
        offset = np.eye(sigma1.shape[0]) * eps
        eigenvalues = np.linalg.eigvals((sigma1 + offset) @ (sigma2 + offset))
    # Σ1 Σ2 is similar to the PSD matrix Σ1^½ Σ2 Σ1^½, so its eigenvalues are real and ≥ 0 up to rounding: tiny
    # negative or complex ones contribute (almost) nothing through the real part of the complex square root.
    return float(np.sqrt(eigenvalues.astype(np.complex128)).real.sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, method: str = "auto", eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 − mu2|² + tr(Σ1) + tr(Σ2) − 2 tr sqrt(Σ1 Σ2)``. `method`: ``"scipy"`` (``scipy.linalg.sqrtm``; retried
    with ``eps · I`` added to both covariances if the product is singular; a tiny imaginary part is dropped, a large
    one is an error), ``"eig"`` (sum of square roots of the eigenvalues of Σ1 Σ2, same eps retry) or ``"auto"``
    (scipy if installed, else eig).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"Mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}.")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"Covariances must be {dim}×{dim} to match the means, got {sigma1.shape} and {sigma2.shape}.")
    if method == "auto":
        method = "scipy" if _has_scipy() else "eig"
    if method == "scipy":
        tr_covmean = _trace_sqrt_product_scipy(sigma1, sigma2, eps)
    elif method == "eig":
        tr_covmean = _trace_sqrt_product_eig(sigma1, sigma2, eps)
    else:
        raise ValueError(f"Unknown Fréchet distance method {method!r}: use 'auto', 'scipy' or 'eig'.")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(
    logits: torch.Tensor | np.ndarray | None = None,
    *,
    probs: torch.Tensor | np.ndarray | None = None,
    splits: int = DEFAULT_IS_SPLITS,
    shuffle: bool = True,
    shuffle_seed: int = IS_SHUFFLE_SEED,
) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) from classifier logits or class probabilities (N, C).

    Matches torch-fidelity: rows shuffled with ``np.random.RandomState(shuffle_seed).permutation(N)`` (disable with
    ``shuffle=False``), float64, split ``i`` = rows ``[i·N//splits, (i+1)·N//splits)``, score
    ``exp(mean_x KL(p(y|x) ‖ p(y)))``, std is the population std (``np.std``). Zero probabilities are allowed.
    """
    if (logits is None) == (probs is None):
        raise ValueError("Pass exactly one of `logits` or `probs`.")
    values = logits if logits is not None else probs
    values = torch.as_tensor(values).detach().cpu().double()
    if values.ndim != 2:
        raise ValueError(f"Expected (N, C) {'logits' if logits is not None else 'probabilities'}, got {tuple(values.shape)}.")
    num = values.shape[0]
    if not 1 <= splits <= num:
        raise ValueError(f"Need 1 ≤ splits ≤ number of samples, got splits={splits} for {num} samples.")
    if shuffle:
        values = values[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(num))]
    if logits is not None:
        log_p = values.log_softmax(dim=1)
        p = log_p.exp()
    else:
        if (values < 0).any():
            raise ValueError("Probabilities must be ≥ 0.")
        p = values / values.sum(dim=1, keepdim=True)
        log_p = p.log()
    scores = []
    for i in range(splits):
        lo, hi = i * num // splits, (i + 1) * num // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        log_q = p_chunk.mean(dim=0, keepdim=True).log()
        kl = torch.where(p_chunk > 0, p_chunk * (log_p_chunk - log_q), torch.zeros_like(p_chunk))
        scores.append(kl.sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # Distance to the k-th nearest *other* point (the point itself is the 1st, at distance 0).
    return torch.cat([torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)])


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = [(torch.cdist(chunk, centres) <= radii.unsqueeze(0)).any(dim=1) for chunk in queries.split(batch_size)]
    return torch.cat(inside).double().mean().item()


@torch.no_grad()
def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    k: int = DEFAULT_PR_NEIGHBORHOOD,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds on (N, D) features.

    precision = fraction of generated samples inside some real sample's k-NN ball; recall = fraction of real
    samples inside some generated sample's k-NN ball (torch-fidelity's `prc` convention). Runs on the tensors'
    device in float32, `batch_size` rows of the distance matrix at a time.
    """
    real = torch.as_tensor(real_features).float()
    fake = torch.as_tensor(fake_features).float().to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"Need (N, D) feature matrices of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if min(real.shape[0], fake.shape[0]) < k + 1:
        raise ValueError(f"Precision/recall with k={k} needs at least {k + 1} real and generated samples.")
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    f_score = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f_score": f_score}


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceStats:
    """FID reference statistics (float64) and the image resolution they were computed at (None = unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    resolution: int | None = None
    resolution_source: str | None = None  # "file", "filename" or "user"
    path: str | None = None
    num_images: int | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])


def infer_resolution_from_filename(path: str | Path) -> int | None:
    """The image size a stats file name states (`jit_in256_stats.npz` → 256), or None if absent or ambiguous.

    Only standalone numbers among 32, 64, 128, 256, 512, 1024 count (so a feature dimension such as 2048 does not).
    """
    numbers = {int(n) for n in re.findall(r"(?<!\d)(\d+)(?!\d)", Path(path).name)}
    found = numbers.intersection(_FILENAME_RESOLUTIONS)
    return found.pop() if len(found) == 1 else None


def load_reference_stats(
    path: str | Path,
    expected_resolution: int | None = None,
    *,
    resolution: int | None = None,
    feature_dim: int | None = None,
) -> ReferenceStats:
    """Read FID reference statistics from an ``.npz`` and check that they fit the run.

    Keys: ``mu`` and ``sigma`` (also accepted: ``mean``/``cov``, ``mu_r``/``sigma_r``). The statistics' resolution
    comes from, in order: a ``resolution`` (or ``image_size``/``img_size``/``size``) entry in the file, `resolution`
    (what the user states, ``--reference-resolution``), or the file name (``jit_in256_stats.npz`` → 256). If
    `expected_resolution` (the model's ``sample_size``) is given, a different resolution is an error, and so is an
    unknown one (state it with ``--reference-resolution``). `feature_dim` checks the statistics' dimension.
    Errors are ``FileNotFoundError`` / ``ValueError`` with a message naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Reference statistics file {str(path)!r} not found. The official ImageNet statistics are JiT's "
            f"jit_in256_stats.npz / jit_in512_stats.npz ({JIT_STATS_URL.format(resolution='{256,512}')}); "
            "or make your own with --compute-stats-from DIR --stats-out PATH."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as error:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"Cannot read reference statistics {str(path)!r} as an .npz file: {error}") from error

    pair = next(((m, s) for m, s in _STATS_KEY_PAIRS if m in contents and s in contents), None)
    if pair is None:
        raise ValueError(
            f"Reference statistics {str(path)!r} lack the keys 'mu' and 'sigma' (found: {sorted(contents) or 'none'}). "
            "Expected an .npz with the feature mean 'mu' (D,) and covariance 'sigma' (D, D), as written by "
            "torch-fidelity/pytorch-fid, JiT's fid_stats or --compute-stats-from."
        )
    mu = np.asarray(contents[pair[0]], dtype=np.float64)
    sigma = np.asarray(contents[pair[1]], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"Reference statistics {str(path)!r} have inconsistent shapes: {pair[0]} {mu.shape}, {pair[1]} {sigma.shape} "
            "(expected (D,) and (D, D))."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"Reference statistics {str(path)!r} contain NaN or infinite values.")
    if feature_dim is not None and mu.shape[0] != feature_dim:
        raise ValueError(
            f"Reference statistics {str(path)!r} are {mu.shape[0]}-dimensional but the feature extractor gives "
            f"{feature_dim}-dimensional features: they were computed with a different network or layer."
        )

    stated_in_file = next((key for key in _RESOLUTION_KEYS if key in contents), None)
    if stated_in_file is not None:
        value = np.asarray(contents[stated_in_file]).reshape(-1)
        if value.size not in (1, 2) or (value.size == 2 and value[0] != value[1]):
            raise ValueError(f"Reference statistics {str(path)!r}: unreadable {stated_in_file!r} entry {value.tolist()}.")
        found, source = int(value[0]), "file"
        if resolution is not None and int(resolution) != found:
            raise ValueError(
                f"Reference statistics {str(path)!r} were computed at {found}×{found} (their {stated_in_file!r} entry), "
                f"but --reference-resolution says {resolution}."
            )
    elif resolution is not None:
        found, source = int(resolution), "user"
    else:
        found = infer_resolution_from_filename(path)
        source = "filename" if found is not None else None

    if expected_resolution is not None:
        if found is None:
            raise ValueError(
                f"Cannot tell which resolution the reference statistics {str(path)!r} belong to: the file has no "
                f"'resolution' entry and its name states none. The model generates {expected_resolution}×"
                f"{expected_resolution} images; if the statistics were computed at that size, say so with "
                f"--reference-resolution {expected_resolution}."
            )
        if found != int(expected_resolution):
            where = {"file": "their 'resolution' entry", "user": "--reference-resolution", "filename": "the file name"}[source]
            raise ValueError(
                f"Wrong reference statistics: {str(path)!r} are for {found}×{found} images ({where}), but the model "
                f"generates {expected_resolution}×{expected_resolution} images. Use the matching file, e.g. "
                f"jit_in{expected_resolution}_stats.npz."
            )
    num_images = int(np.asarray(contents["num_images"]).reshape(-1)[0]) if "num_images" in contents else None
    return ReferenceStats(mu, sigma, found, source, str(path), num_images)


def save_reference_stats(
    path: str | Path,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    resolution: int | None = None,
    num_images: int | None = None,
    feature_extractor: str | None = None,
) -> Path:
    """Write ``mu``/``sigma`` (float64) plus ``resolution``, ``num_images`` and the extractor name to an ``.npz``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"Statistics are written as .npz; got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if resolution is not None:
        extra["resolution"] = np.int64(resolution)
    if num_images is not None:
        extra["num_images"] = np.int64(num_images)
    if feature_extractor is not None:
        extra["feature_extractor"] = np.array(feature_extractor)
    np.savez(path, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64), **extra)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------
def tf1_bilinear_resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float (B, C, H, W) tensor as TensorFlow 1.x does it (align_corners=False, no half-pixel
    centres): output pixel j samples input coordinate j · (in / out); the +1 neighbour is clamped at the border.

    This is the resize inside the FID Inception graph (torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`,
    "slow" method; same arithmetic order, so bit-identical on CPU).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"Expected a float (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}.")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = images.shape[-2:]

    def axis(in_size: int, out_size: int):
        coords = torch.arange(out_size, dtype=images.dtype, device=images.device)
        coords = coords * torch.tensor(in_size / out_size, dtype=torch.float32, device=images.device)
        lo = coords.long()
        hi = (lo + 1).clamp_max(in_size - 1)
        return lo, hi, coords - lo.to(coords.dtype)

    y_lo, y_hi, dy = axis(in_h, out_h)
    x_lo, x_hi, dx = axis(in_w, out_w)
    top, bottom = images[:, :, y_lo, :], images[:, :, y_hi, :]
    top_left, top_right = top[..., x_lo], top[..., x_hi]
    bottom_left, bottom_right = bottom[..., x_lo], bottom[..., x_hi]
    dx = dx.view(1, 1, 1, out_w)
    upper = top_left + (top_right - top_left) * dx
    lower = bottom_left + (bottom_right - bottom_left) * dx
    return upper + (lower - upper) * dy.view(1, 1, out_h, 1)


class ImageFeatureExtractor(nn.Module):
    """Base class: uint8 images (B, 3, H, W) → (features (B, feature_dim), logits (B, num_logits)), both float32.

    Subclasses set `name`, `feature_dim`, `num_logits`, `input_size` and implement `forward_float(x)` on the
    preprocessed input (resized to `input_size` with :func:`tf1_bilinear_resize`, scaled to (x − 128) / 128).
    """

    name = "base"
    feature_dim = 0
    num_logits = 0
    input_size = 299

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}.")
        weight = next(self.parameters())
        x = images.to(device=weight.device, dtype=weight.dtype)
        x = tf1_bilinear_resize(x, self.input_size)
        x = (x - 128) / 128
        features, logits = self.forward_float(x)
        return features.float(), logits.float()

    def forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps=1e-3) → ReLU, with the parameter names of the FID Inception checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3×3 "SAME" average pool ignores the padded zeros.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35×35 blocks (Mixed_5b/5c/5d)
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedB(nn.Module):  # 35 → 17 reduction (Mixed_6a)
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _MixedC(nn.Module):  # 17×17 blocks with factorised 7×7 convolutions (Mixed_6b..6e)
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedD(nn.Module):  # 17 → 8 reduction (Mixed_7a)
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        tower = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1
        )


class _MixedE(nn.Module):  # 8×8 blocks with split 1×3 / 3×1 outputs (Mixed_7b: TF avg pool, Mixed_7c: max pool)
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TF graph's last block max-pools where the paper average-pools; the FID network keeps that quirk.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_inception_weights(path: str | Path | None = None, *, download: bool = False) -> Path:
    """Locate the FID Inception-v3 weight file.

    Order: `path` (``--inception-weights``), ``$PMF_INCEPTION_WEIGHTS``, then torch-fidelity's or pytorch-fid's
    file in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). If none exists, ``download=True`` fetches
    torch-fidelity's file there (hash-checked); otherwise a ``FileNotFoundError`` names the file and its URL.
    """
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {str(path)!r} not found. Fetch {INCEPTION_WEIGHTS_FILENAME} on a connected machine "
                f"from {INCEPTION_WEIGHTS_URL} (or {INCEPTION_WEIGHTS_ALT_FILENAME} from {INCEPTION_WEIGHTS_ALT_URL}) "
                "and pass its path with --inception-weights."
            )
        return path
    candidates = []
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidates.append(Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser())
    candidates += [hub_dir / INCEPTION_WEIGHTS_FILENAME, hub_dir / INCEPTION_WEIGHTS_ALT_FILENAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if download:
        hub_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            INCEPTION_WEIGHTS_URL, str(hub_dir / INCEPTION_WEIGHTS_FILENAME), hash_prefix=INCEPTION_WEIGHTS_SHA256_PREFIX
        )
        return hub_dir / INCEPTION_WEIGHTS_FILENAME
    raise FileNotFoundError(
        f"The FID Inception-v3 weights are not available offline. On a connected machine download "
        f"{INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL} (95 MB; pytorch-fid's "
        f"{INCEPTION_WEIGHTS_ALT_FILENAME} from {INCEPTION_WEIGHTS_ALT_URL} also works), then pass it with "
        f"--inception-weights PATH, set ${INCEPTION_WEIGHTS_ENV}, or put it in {hub_dir}. "
        "(--download-inception fetches it when the machine has internet access.)"
    )


class InceptionV3FeatureExtractor(ImageFeatureExtractor):
    """The FID Inception-v3 (TF 2015-12-05 graph) in plain torch: 2048-d pool features and 1008 unbiased logits.

    Loads torch-fidelity's / pytorch-fid's weight file (`weights_path`; ``None`` keeps random weights, for tests
    only). Logits are ``features @ fc.weight.T`` without the bias, as torch-fidelity feeds them to the IS.
    """

    name = "inception-v3-fid"
    feature_dim = 2048
    num_logits = 1008
    input_size = 299

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_path = None
        self.weights_sha256 = None
        if weights_path is not None:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, weights_path: str | Path) -> None:
        weights_path = Path(weights_path)
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"Cannot read Inception weights {str(weights_path)!r}: {error}") from error
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("AuxLogits.")}
        result = self.load_state_dict(state_dict, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{str(weights_path)!r} is not an FID Inception-v3 checkpoint ({len(missing)} missing keys, e.g. "
                f"{missing[:3]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]}). "
                f"Expected {INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}."
            )
        self.weights_path = str(weights_path)
        self.weights_sha256 = _file_sha256(weights_path)
        if not self.weights_sha256.startswith(INCEPTION_WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{str(weights_path)!r} loads into the FID Inception-v3 but its sha256 ({self.weights_sha256[:12]}…) does "
                f"not start with {INCEPTION_WEIGHTS_SHA256_PREFIX} like the standard file: FIDs will not be comparable.",
                stacklevel=2,
            )

    def forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147×147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 73×73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71×71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 35×35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)
        return features, features @ self.fc.weight.T


class RandomFeatureExtractor(ImageFeatureExtractor):
    """A tiny, seeded random conv net with the Inception extractor's interface and preprocessing (tests, smoke runs).

    Deterministic for a given `seed` and independent of the global RNG. Its FID/IS values are meaningless.
    """

    name = "random-test"

    def __init__(self, feature_dim: int = 16, num_logits: int = 10, input_size: int = 32, seed: int = 0):
        super().__init__()
        self.feature_dim, self.num_logits, self.input_size = feature_dim, num_logits, input_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, feature_dim, 3, stride=2, padding=1)
            self.fc = nn.Linear(feature_dim, num_logits)
        self.weights_path = None
        self.weights_sha256 = None
        self.requires_grad_(False)
        self.eval()

    def forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tanh(self.conv2(F.relu(self.conv1(x))))
        features = x.mean(dim=(2, 3))
        return features, features @ self.fc.weight.T


class TorchFidelityFeatureExtractor(nn.Module):
    """torch-fidelity's own `FeatureExtractorInceptionV3` ('2048' and 'logits_unbiased'), where it is importable.

    Needs torch-fidelity with a working torchvision (not available in this project's CPU environment).
    """

    name = "torch-fidelity-inception-v3-compat"
    feature_dim = 2048
    num_logits = 1008

    def __init__(self, weights_path: str | Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError on a broken install
            raise ValueError(
                "--feature-extractor torch-fidelity needs the torch-fidelity package with a working torchvision "
                f"(import failed: {type(error).__name__}: {error}); the default built-in extractor needs neither."
            ) from error
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
        )
        self.weights_path = str(weights_path)
        self.weights_sha256 = _file_sha256(Path(weights_path))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.model(images.to(next(self.model.parameters()).device))
        return features.float(), logits.float()


FeatureExtractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_feature_extractor(
    kind: str = "inception", *, weights_path: str | Path | None = None, download: bool = False, device="cpu"
) -> nn.Module:
    """``"inception"`` (built-in FID Inception-v3), ``"torch-fidelity"`` (its module) or ``"random"`` (tests)."""
    if kind == "random":
        extractor = RandomFeatureExtractor()
    elif kind == "inception":
        extractor = InceptionV3FeatureExtractor(resolve_inception_weights(weights_path, download=download))
    elif kind == "torch-fidelity":
        extractor = TorchFidelityFeatureExtractor(resolve_inception_weights(weights_path, download=download))
    else:
        raise ValueError(f"Unknown feature extractor {kind!r}: use 'inception', 'torch-fidelity' or 'random'.")
    return extractor.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Image files
# ----------------------------------------------------------------------------------------------------------------
def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by relative path (so `00000.png` … keep sample order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {str(folder)!r} not found.")
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(folder)!r}.")
    return files


def _load_image(path: Path) -> torch.Tensor:
    import PIL.Image

    with PIL.Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _image_size(path: Path) -> tuple[int, int]:
    import PIL.Image

    with PIL.Image.open(path) as image:
        return image.size  # (W, H)


def _save_png(image: torch.Tensor, path: Path) -> None:
    import PIL.Image

    PIL.Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)


def _grid(images: torch.Tensor, columns: int):
    import PIL.Image

    count, _, height, width = images.shape
    rows = math.ceil(count / columns)
    canvas = torch.zeros(3, rows * height, columns * width, dtype=torch.uint8)
    for k in range(count):
        r, c = divmod(k, columns)
        canvas[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = images[k]
    return PIL.Image.fromarray(canvas.permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------------------------------------------
# Distributed collection
# ----------------------------------------------------------------------------------------------------------------
def _gather_in_order(accelerator, indices: Sequence[int], columns: dict[str, torch.Tensor], total: int, device):
    """Gather per-process rows (with their global indices) to every process, in global index order.

    Shards differ in length, so each process pads to the longest shard with index −1 before
    `accelerator.gather_for_metrics`; the padding is dropped and the result checked to hold every index once.
    """
    pad_to = math.ceil(total / accelerator.num_processes)
    local_index = torch.full((pad_to,), -1, dtype=torch.long, device=device)
    local_index[: len(indices)] = torch.as_tensor(list(indices), dtype=torch.long, device=device)
    all_index = accelerator.gather_for_metrics(local_index).cpu()
    keep = all_index >= 0
    order = torch.argsort(all_index[keep])
    if not torch.equal(all_index[keep][order], torch.arange(total)):
        raise RuntimeError("Gathered sample indices do not cover every image exactly once.")
    out = {}
    for name, value in columns.items():
        padded = torch.zeros((pad_to, *value.shape[1:]), dtype=value.dtype, device=device)
        padded[: value.shape[0]] = value.to(device)
        out[name] = accelerator.gather_for_metrics(padded).cpu()[keep][order]
    return out


class _Features:
    def __init__(self):
        self.features: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def add(self, pair):
        features, logits = pair
        self.features.append(features.float())
        self.logits.append(logits.float())

    def stacked(self, feature_dim: int, num_logits: int, device) -> dict[str, torch.Tensor]:
        empty = (torch.zeros(0, feature_dim, device=device), torch.zeros(0, num_logits, device=device))
        return {
            "features": torch.cat(self.features) if self.features else empty[0],
            "logits": torch.cat(self.logits) if self.logits else empty[1],
        }


def _extractor_dims(extractor, device) -> tuple[int, int]:
    feature_dim, num_logits = getattr(extractor, "feature_dim", None), getattr(extractor, "num_logits", None)
    if feature_dim and num_logits is not None:
        return int(feature_dim), int(num_logits)
    with torch.no_grad():
        features, logits = extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device))
    return features.shape[1], logits.shape[1]


@torch.no_grad()
def _folder_features(accelerator, files: list[Path], extractor, batch_size, device, num_workers, desc):
    """Features of image files, sharded over processes and gathered in file order."""
    shard = shard_indices(len(files), accelerator.num_processes, accelerator.process_index)
    collected = _Features()
    progress = _progress(accelerator, len(shard), desc)
    pool = ThreadPoolExecutor(max(1, num_workers)) if num_workers > 0 else None
    try:
        for start in range(0, len(shard), batch_size):
            batch_files = [files[i] for i in shard[start : start + batch_size]]
            images = list(pool.map(_load_image, batch_files)) if pool else [_load_image(f) for f in batch_files]
            sizes = {tuple(image.shape) for image in images}
            if len(sizes) > 1:
                raise ValueError(
                    f"Images under one folder must share one size for FID (found {sorted(sizes)} in "
                    f"{batch_files[0].parent}); resize/crop them first."
                )
            collected.add(extractor(torch.stack(images).to(device)))
            progress.update(len(batch_files))
    finally:
        progress.close()
        if pool:
            pool.shutdown()
    dims = _extractor_dims(extractor, device)
    return _gather_in_order(accelerator, shard, collected.stacked(*dims, device), len(files), device)


def _progress(accelerator, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not accelerator.is_local_main_process, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the evaluation options (shared by `examples/evaluate_pmf.py` and `pmf eval`)."""
    source = parser.add_argument_group("what to evaluate (one of)")
    source.add_argument("--model", metavar="DIR", help="PMFPipeline folder (or Hub id) to sample from")
    source.add_argument("--images", metavar="DIR", help="evaluate existing generated images instead of sampling")
    source.add_argument(
        "--compute-stats-from", metavar="DIR", help="only compute reference statistics of a folder of images (see --stats-out)"
    )
    source.add_argument("--stats-out", metavar="PATH", help="where --compute-stats-from writes its .npz")

    sampling = parser.add_argument_group("sampling (official protocol: class-balanced, per-image seeds)")
    sampling.add_argument("--num-images", type=int, metavar="N", help=f"images to generate (default {DEFAULT_NUM_IMAGES}; a multiple of the number of classes)")
    sampling.add_argument("--per-class", type=int, metavar="K", help="images per class (instead of --num-images)")
    sampling.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per process per batch (default 64)")
    sampling.add_argument("--steps", type=int, default=1, metavar="T", help="sampling steps (default 1)")
    sampling.add_argument("--guidance-scale", type=float, metavar="W", help="ω (default: the pipeline's default_guidance_scale)")
    sampling.add_argument(
        "--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="[t_min, t_max] (default: the pipeline's)"
    )
    sampling.add_argument("--sample-seed", type=int, default=DEFAULT_SAMPLE_SEED, help="image i uses seed (i XOR this) mod 2^32 (default 42)")
    sampling.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="transformer dtype (noise and sample stay fp32)")
    sampling.add_argument("--device", help="device for a single-process run (default: accelerate's; 'cpu' forces CPU)")
    sampling.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=True, help="allow TF32 matmul/cuDNN on CUDA, as the official evaluate.py (default on)"
    )

    reference = parser.add_argument_group("reference")
    reference.add_argument("--reference-stats", metavar="PATH", help="FID statistics .npz (mu, sigma), e.g. jit_in256_stats.npz")
    reference.add_argument(
        "--reference-resolution", type=int, metavar="S", help="state the resolution of --reference-stats when neither the file nor its name does"
    )
    reference.add_argument("--reference-images", metavar="DIR", help="real images: for --precision-recall, and for FID when --reference-stats is absent")

    metrics = parser.add_argument_group("metrics and feature extractor")
    metrics.add_argument("--precision-recall", action="store_true", help="also compute improved precision/recall (needs --reference-images)")
    metrics.add_argument("--pr-k", type=int, default=DEFAULT_PR_NEIGHBORHOOD, metavar="K", help="k of the k-NN manifolds (default 3)")
    metrics.add_argument("--is-splits", type=int, default=DEFAULT_IS_SPLITS, help="Inception Score splits (default 10)")
    metrics.add_argument("--fid-method", choices=("auto", "scipy", "eig"), default="auto", help="matrix square root: scipy sqrtm or eigenvalues (default: scipy if installed)")
    metrics.add_argument(
        "--feature-extractor",
        choices=("inception", "torch-fidelity", "random"),
        default="inception",
        help="inception: built-in FID Inception-v3 (default); torch-fidelity: its module, if importable; random: tiny random net for smoke tests",
    )
    metrics.add_argument("--inception-weights", metavar="PATH", help=f"FID Inception-v3 weights ({INCEPTION_WEIGHTS_FILENAME})")
    metrics.add_argument("--download-inception", action="store_true", help="download the Inception weights if not found (needs internet)")
    metrics.add_argument("--num-workers", type=int, default=4, help="threads decoding image files (default 4)")

    output = parser.add_argument_group("output")
    output.add_argument("--output", metavar="PATH", default="pmf_eval.json", help="JSON report (default pmf_eval.json)")
    output.add_argument("--save-images", metavar="DIR", help="also write every generated image as DIR/<index>.png")
    output.add_argument("--grid", metavar="PATH", help="write a sample grid PNG (first image of the first classes)")
    output.add_argument("--grid-size", type=int, default=16, help="images in --grid (default 16)")
    return parser


def _check_args(args) -> str:
    sources = [name for name in ("model", "images", "compute_stats_from") if getattr(args, name, None)]
    if len(sources) != 1:
        raise ValueError("Give exactly one of --model, --images or --compute-stats-from.")
    mode = sources[0]
    if mode == "compute_stats_from" and not args.stats_out:
        raise ValueError("--compute-stats-from needs --stats-out PATH (.npz).")
    if args.stats_out and mode != "compute_stats_from":
        raise ValueError("--stats-out only applies to --compute-stats-from.")
    if args.num_images is not None and args.per_class is not None:
        raise ValueError("Give --num-images or --per-class, not both.")
    if mode != "model":
        for flag, value in (("--per-class", args.per_class), ("--save-images", args.save_images), ("--grid", args.grid),
                            ("--guidance-scale", args.guidance_scale), ("--guidance-interval", args.guidance_interval)):
            if value is not None:
                raise ValueError(f"{flag} only applies when sampling from --model.")
    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps), ("--is-splits", args.is_splits),
                        ("--pr-k", args.pr_k)):
        if value < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {value}.")
    for flag, value in (("--num-images", args.num_images), ("--per-class", args.per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {value}.")
    if args.guidance_scale is not None and not args.guidance_scale >= 1.0:
        raise ValueError(f"--guidance-scale (ω) must be ≥ 1 (1 = no guidance), got {args.guidance_scale}.")
    if args.guidance_interval is not None and not 0.0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1.0:
        raise ValueError(f"--guidance-interval A B needs 0 ≤ A ≤ B ≤ 1, got {args.guidance_interval}.")
    if args.precision_recall and not args.reference_images:
        raise ValueError("--precision-recall needs real images: pass --reference-images DIR.")
    if args.reference_resolution is not None and not args.reference_stats:
        raise ValueError("--reference-resolution describes --reference-stats, which is missing.")
    return mode


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"pmf_diffusers": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def run_eval(args: argparse.Namespace, feature_extractor: FeatureExtractor | None = None) -> int:
    """Run an evaluation described by :func:`add_eval_arguments` options; returns 0.

    Works in one process or under ``accelerate launch`` (each process handles a contiguous shard of image indices;
    features are gathered with ``gather_for_metrics``; the main process computes the metrics and writes the report).
    User errors (bad flags, missing/mismatched reference statistics or weights) raise ``ValueError`` /
    ``FileNotFoundError`` on every process before any sampling. `feature_extractor` overrides
    ``--feature-extractor`` with any callable ``uint8 (B, 3, H, W) -> (features, logits)``.
    """
    mode = _check_args(args)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    if args.device and args.device != "cpu" and accelerator.num_processes > 1:
        raise ValueError("--device is for single-process runs; under accelerate launch each process uses its own GPU.")
    device = torch.device(args.device) if args.device else accelerator.device
    with _tf32(args.tf32):
        return _run(args, mode, accelerator, device, feature_extractor)


def _run(args, mode, accelerator, device, feature_extractor) -> int:
    started = time.perf_counter()
    say = accelerator.print

    # ---- everything that can fail on user input, before any heavy work
    pipe = None
    expected_resolution = None
    if mode == "model":
        from .models.transformer_pmf import PMFTransformer2DModel

        # The transformer config alone (cheap) decides the image count and the resolution check; the weights are
        # loaded only once the reference statistics and the feature extractor are known to be usable.
        config = PMFTransformer2DModel.load_config(args.model, subfolder="transformer")
        expected_resolution = int(config["sample_size"])
        num_classes = int(config["num_classes"])
        if args.per_class is not None:
            num_images = args.per_class * num_classes
        else:
            num_images = DEFAULT_NUM_IMAGES if args.num_images is None else args.num_images
        per_class = images_per_class(num_images, num_classes)
    else:
        files = list_images(args.images if mode == "images" else args.compute_stats_from)
        if args.num_images is not None:
            if args.num_images > len(files):
                raise ValueError(f"--num-images {args.num_images} but only {len(files)} images were found.")
            files = files[: args.num_images]
        width, height = _image_size(files[0])
        if width != height and mode == "images":
            raise ValueError(f"Generated images must be square, got {width}×{height} ({files[0]}).")
        expected_resolution = width if width == height else None
        num_images = len(files)

    if mode != "compute_stats_from" and not (args.reference_stats or args.reference_images):
        warnings.warn("No --reference-stats or --reference-images: only the Inception Score is computed.", stacklevel=2)

    reference = None
    if args.reference_stats:
        reference = load_reference_stats(args.reference_stats, expected_resolution, resolution=args.reference_resolution)
    reference_files = None
    if args.reference_images:
        reference_files = list_images(args.reference_images)
        width, height = _image_size(reference_files[0])
        if expected_resolution is not None and (width, height) != (expected_resolution, expected_resolution):
            raise ValueError(
                f"--reference-images are {width}×{height} but the evaluated images are "
                f"{expected_resolution}×{expected_resolution}: use real images at the same resolution."
            )

    if feature_extractor is None:
        feature_extractor = build_feature_extractor(
            args.feature_extractor, weights_path=args.inception_weights, download=args.download_inception, device=device
        )
    feature_dim, num_logits = _extractor_dims(feature_extractor, device)
    extractor_name = getattr(feature_extractor, "name", type(feature_extractor).__name__)
    if reference is not None and reference.feature_dim != feature_dim:
        raise ValueError(
            f"Reference statistics {reference.path!r} are {reference.feature_dim}-dimensional but the feature extractor "
            f"({extractor_name}) gives {feature_dim}-dimensional features: they were computed with a different network."
        )

    if mode == "model":
        from .pipelines.pipeline_pmf import PMFPipeline

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        pipe = PMFPipeline.from_pretrained(args.model, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)

    # ---- reference statistics only
    if mode == "compute_stats_from":
        gathered = _folder_features(
            accelerator, files, feature_extractor, args.batch_size, device, args.num_workers, "features"
        )
        if accelerator.is_main_process:
            mu, sigma = feature_statistics(gathered["features"])
            out = save_reference_stats(
                args.stats_out, mu, sigma, resolution=expected_resolution, num_images=num_images, feature_extractor=extractor_name
            )
            say(f"Wrote statistics of {num_images} images ({feature_dim}-d, {expected_resolution}px) to {out}")
        accelerator.wait_for_everyone()
        return 0

    # ---- features of the evaluated images
    sampling_seconds = None
    if mode == "model":
        gathered, sampling_seconds = _sample_features(
            args, accelerator, pipe, feature_extractor, num_images, per_class, device, (feature_dim, num_logits)
        )
    else:
        gathered = _folder_features(
            accelerator, files, feature_extractor, args.batch_size, device, args.num_workers, "features"
        )
    reference_gathered = None
    if reference_files is not None and (args.precision_recall or reference is None):
        reference_gathered = _folder_features(
            accelerator, reference_files, feature_extractor, args.batch_size, device, args.num_workers, "reference features"
        )

    # ---- metrics (main process)
    if accelerator.is_main_process:
        features, logits = gathered["features"], gathered["logits"]
        report: dict[str, Any] = dict.fromkeys(("fid", "inception_score", "inception_score_std", "precision", "recall"))
        fid_method = args.fid_method if args.fid_method != "auto" else ("scipy" if _has_scipy() else "eig")
        if reference is None and reference_gathered is not None:
            mu_ref, sigma_ref = feature_statistics(reference_gathered["features"])
            reference = ReferenceStats(mu_ref, sigma_ref, expected_resolution, "images", args.reference_images, len(reference_files))
        if reference is not None:
            mu, sigma = feature_statistics(features)
            report["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma, method=fid_method)
        if num_logits:
            splits = min(args.is_splits, num_images)
            report["inception_score"], report["inception_score_std"] = inception_score(logits, splits=splits)
        if args.precision_recall:
            pr = precision_recall(reference_gathered["features"].to(device), features.to(device), k=args.pr_k)
            report.update(precision=pr["precision"], recall=pr["recall"])
        report.update(
            num_images=num_images,
            source={"model": args.model} if mode == "model" else {"images": args.images},
            reference={
                "stats": reference.path if reference is not None else None,
                "resolution": reference.resolution if reference is not None else None,
                "resolution_source": reference.resolution_source if reference is not None else None,
                "images": args.reference_images,
                "num_reference_images": len(reference_files) if reference_files is not None else None,
            },
            feature_extractor={
                "name": extractor_name,
                "weights": getattr(feature_extractor, "weights_path", None),
                "weights_sha256": getattr(feature_extractor, "weights_sha256", None),
                "feature_dim": feature_dim,
                "num_logits": num_logits,
            },
            fid_method=fid_method if reference is not None else None,
            is_splits=min(args.is_splits, num_images),
            precision_recall_k=args.pr_k if args.precision_recall else None,
            num_processes=accelerator.num_processes,
            device=str(device),
            timing={"sampling_s": sampling_seconds, "total_s": time.perf_counter() - started},
            versions=_versions(),
        )
        if mode == "model":
            report["sampling"] = {
                "num_classes": pipe.transformer.config.num_classes,
                "images_per_class": per_class,
                "num_inference_steps": args.steps,
                "guidance_scale": args.guidance_scale if args.guidance_scale is not None else pipe.config.default_guidance_scale,
                "guidance_interval": list(args.guidance_interval or pipe.config.default_guidance_interval),
                "sample_seed": args.sample_seed,
                "seed_rule": "(index XOR sample_seed) mod 2**32, one CPU torch.Generator per image",
                "label_rule": "index // images_per_class",
                "dtype": args.dtype,
                "batch_size_per_process": args.batch_size,
                "tf32": bool(args.tf32),
                "resolution": expected_resolution,
            }
            if args.save_images:
                report["saved_images"] = args.save_images
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        summary = [f"{num_images} images"]
        if report["fid"] is not None:
            summary.append(f"FID {report['fid']:.4f}")
        if report["inception_score"] is not None:
            summary.append(f"IS {report['inception_score']:.2f} ± {report['inception_score_std']:.2f}")
        if args.precision_recall:
            summary.append(f"precision {report['precision']:.4f} recall {report['recall']:.4f}")
        say(" | ".join(summary) + f"  → {output}")
        if mode == "model" and args.grid:
            _write_grid(args, pipe, num_classes, per_class)
            say(f"Sample grid → {args.grid}")
    accelerator.wait_for_everyone()
    return 0


def _generate_uint8(args, pipe, indices: Sequence[int], per_class: int) -> torch.Tensor:
    output = pipe(
        class_labels=[index // per_class for index in indices],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        generator=make_generators(indices, args.sample_seed),
        output_type="latent",  # the raw sample in [-1, 1]; quantised below exactly as the official evaluate.py
    )
    return to_uint8(output.images)


@torch.no_grad()
def _sample_features(args, accelerator, pipe, extractor, num_images, per_class, device, dims):
    shard = shard_indices(num_images, accelerator.num_processes, accelerator.process_index)
    save_dir = Path(args.save_images) if args.save_images else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(num_images - 1)))
    collected = _Features()
    progress = _progress(accelerator, len(shard), "sampling")
    started = time.perf_counter()
    try:
        for start in range(0, len(shard), args.batch_size):
            indices = shard[start : start + args.batch_size]
            images = _generate_uint8(args, pipe, indices, per_class)
            if save_dir:
                for index, image in zip(indices, images.cpu()):
                    _save_png(image, save_dir / f"{index:0{digits}d}.png")
            collected.add(extractor(images.to(device)))
            progress.update(len(indices))
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    return _gather_in_order(accelerator, shard, collected.stacked(*dims, device), num_images, device), seconds


def _write_grid(args, pipe, num_classes: int, per_class: int) -> None:
    # The first image of each class, then the second of each, ... — resampled with the same per-image seeds.
    order = [c * per_class + j for j in range(per_class) for c in range(num_classes)][: args.grid_size]
    images = _generate_uint8(args, pipe, order, per_class).cpu()
    path = Path(args.grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    _grid(images, columns=min(len(order), max(1, math.ceil(math.sqrt(len(order)))))).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pmf_diffusers.evaluation ...` (same options as `examples/evaluate_pmf.py`)."""
    import sys

    parser = add_eval_arguments(argparse.ArgumentParser(description="Evaluate pMF: FID / IS / precision-recall."))
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
