# Copyright 2026 The pmf-diffusers developers. MIT License.
"""FID reference statistics (``mu``, ``sigma`` of the Inception features of real images): reading them with the
checks that catch a wrong file (keys, shapes, resolution, feature dimension), and writing them.

The official ImageNet statistics are JiT's ``jit_in256_stats.npz`` / ``jit_in512_stats.npz`` (`JIT_STATS_URL`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JIT_STATS_URL", "ReferenceStats", "infer_resolution_from_filename", "load_reference_stats", "save_reference_stats"]

JIT_STATS_URL = "https://raw.githubusercontent.com/LTH14/JiT/refs/heads/main/fid_stats/jit_in{resolution}_stats.npz"

# Square sizes a stats file name may carry (`jit_in256_stats.npz`, `VIRTUAL_imagenet512_labeled.npz`).
_FILENAME_RESOLUTIONS = (32, 64, 128, 256, 512, 1024)
_RESOLUTION_KEYS = ("resolution", "image_size", "img_size", "size")
_STATS_KEY_PAIRS = (("mu", "sigma"), ("mean", "cov"), ("mu_r", "sigma_r"))


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
    (what the user states: `EvalConfig.reference_resolution`), or the file name (``jit_in256_stats.npz`` → 256). If
    `expected_resolution` (the model's ``sample_size``) is given, a different resolution is an error, and so is an
    unknown one (state it with `resolution`). `feature_dim` checks the statistics' dimension.
    Errors are ``FileNotFoundError`` / ``ValueError`` with a message naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Reference statistics file {str(path)!r} not found. The official ImageNet statistics are JiT's "
            f"jit_in256_stats.npz / jit_in512_stats.npz ({JIT_STATS_URL.format(resolution='{256,512}')}); "
            "or make your own with `compute_stats_from=DIR` `stats_out=PATH`."
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
            "torch-fidelity/pytorch-fid, JiT's fid_stats or `compute_stats_from`."
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
                f"but `reference_resolution` says {resolution}."
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
                f"`reference_resolution={expected_resolution}`."
            )
        if found != int(expected_resolution):
            where = {"file": "their 'resolution' entry", "user": "`reference_resolution`", "filename": "the file name"}[source]
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
