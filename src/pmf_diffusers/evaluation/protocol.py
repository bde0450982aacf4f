# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The official evaluation protocol and [`run_evaluation`], which applies it (docs/algorithm.md, "Official noise
seeding and evaluation protocol"; the how-to is docs/evaluation.md).

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

A run works in one process or under ``accelerate launch``: each process handles a contiguous shard of image indices,
features are gathered with ``gather_for_metrics``, and the main process computes the metrics and writes the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from ..commands.generate import GRID_FILENAME
from ..image_grid import image_grid
from .config import DEFAULT_NUM_IMAGES, DEFAULT_SAMPLE_SEED, EvalConfig
from .inception import FeatureExtractor, build_feature_extractor, feature_extractor_dims
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall, resolve_fid_method
from .reference import ReferenceStats, load_reference_stats, save_reference_stats

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "class_balanced_labels",
    "image_seed",
    "images_per_class",
    "list_images",
    "make_generators",
    "run_evaluation",
    "shard_indices",
    "to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SEED_RULE = "(index XOR sample_seed) mod 2**32, one CPU torch.Generator per image"
LABEL_RULE = "index // images_per_class"


# ----------------------------------------------------------------------------------------------------------------
# Protocol rules: labels, seeds, sharding, uint8
# ----------------------------------------------------------------------------------------------------------------
def images_per_class(num_images: int, num_classes: int) -> int:
    """Images per class of a class-balanced run; `num_images` must be a positive multiple of `num_classes`."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}.")
    if num_images < 1 or num_images % num_classes:
        suggestion = max(1, num_images // num_classes)
        raise ValueError(
            f"The official protocol samples every class equally: the number of images ({num_images}) must be a "
            f"positive multiple of the number of classes ({num_classes}); use `per_class=N` instead "
            f"(e.g. `per_class={suggestion}` for {suggestion * num_classes} images)."
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
# Image files
# ----------------------------------------------------------------------------------------------------------------
def list_images(folder: str | Path, exclude: Sequence[str] = ()) -> list[Path]:
    """Image files under `folder` (recursively), sorted by relative path (so `00000.png` … keep sample order);
    files named in `exclude` are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {str(folder)!r} not found.")
    files = sorted(
        (p for p in folder.rglob("*")
         if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in exclude),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(folder)!r}.")
    return files


def _load_image(path: Path) -> torch.Tensor:
    with PIL.Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _image_size(path: Path) -> tuple[int, int]:
    with PIL.Image.open(path) as image:
        return image.size  # (W, H)


def _save_png(image: torch.Tensor, path: Path) -> None:
    PIL.Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)


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
    """Features and logits of one process's batches, concatenated on demand."""

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


def _progress(accelerator, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not accelerator.is_local_main_process, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """Everything a run needs once its inputs have been checked (before any sampling or feature extraction)."""

    config: EvalConfig
    accelerator: Any
    device: torch.device
    extractor: FeatureExtractor
    extractor_name: str
    feature_dim: int
    num_logits: int
    num_images: int
    resolution: int | None  # of the evaluated images (None: the real images of compute_stats_from are not square)
    pipe: Any = None  # the pipeline (model source)
    num_classes: int | None = None  # model source
    per_class: int | None = None  # model source
    files: list[Path] | None = None  # images / compute_stats_from source
    reference: ReferenceStats | None = None
    reference_files: list[Path] | None = None

    @property
    def dims(self) -> tuple[int, int]:
        return self.feature_dim, self.num_logits


def run_evaluation(config: EvalConfig, feature_extractor: FeatureExtractor | None = None) -> dict[str, Any] | None:
    """Run the evaluation `config` describes and return its report (on the main process; None on the others).

    With `config.compute_stats_from` the statistics are written to `config.stats_out` and the report says where;
    otherwise the JSON report (FID, IS, precision/recall, provenance) is written to `config.output`. User errors (an
    inconsistent configuration, missing or mismatched reference statistics or weights) raise `ValueError` /
    `FileNotFoundError` on every process before any sampling. `feature_extractor` overrides
    `config.feature_extractor` with any callable ``uint8 (B, 3, H, W) -> (features, logits)``.
    """
    from accelerate import Accelerator

    from ..pipelines.pipeline_pmf import check_guidance_settings

    config.validate()
    check_guidance_settings(config.guidance_scale, config.guidance_interval)
    accelerator = Accelerator(cpu=config.device == "cpu")
    if config.device and config.device != "cpu" and accelerator.num_processes > 1:
        raise ValueError("`device` is for single-process runs; under accelerate launch each process uses its own GPU.")
    device = torch.device(config.device) if config.device else accelerator.device
    with _tf32(config.tf32):
        run = _prepare(config, accelerator, device, feature_extractor)
        if config.source == "compute_stats_from":
            report = _compute_reference_stats(run)
        else:
            report = _evaluate(run)
    accelerator.wait_for_everyone()
    return report


@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _prepare(config: EvalConfig, accelerator, device, feature_extractor) -> _Run:
    """Check every input that can fail (model, image folders, reference statistics, feature extractor) in that
    order, so that a wrong file is reported before any sampling or feature extraction."""
    if config.source == "model":
        source = _prepare_model(config, device)
    else:
        source = _prepare_image_folder(config)
    if config.source != "compute_stats_from" and not (config.reference_stats or config.reference_images):
        logger.warning("No `reference_stats` or `reference_images`: only the Inception Score is computed.")
    reference, reference_files = _prepare_reference(config, source["resolution"])
    if feature_extractor is None:
        feature_extractor = build_feature_extractor(
            config.feature_extractor, weights_path=config.inception_weights, download=config.download_inception,
            device=device,
        )
    feature_dim, num_logits = feature_extractor_dims(feature_extractor, device)
    extractor_name = getattr(feature_extractor, "name", type(feature_extractor).__name__)
    if reference is not None and reference.feature_dim != feature_dim:
        raise ValueError(
            f"Reference statistics {reference.path!r} are {reference.feature_dim}-dimensional but the feature extractor "
            f"({extractor_name}) gives {feature_dim}-dimensional features: they were computed with a different network."
        )
    return _Run(
        config=config, accelerator=accelerator, device=device, extractor=feature_extractor,
        extractor_name=extractor_name, feature_dim=feature_dim, num_logits=num_logits, reference=reference,
        reference_files=reference_files, **source,
    )


def _prepare_model(config: EvalConfig, device) -> dict[str, Any]:
    from ..loading import load_pipeline

    pipe = load_pipeline(config.model, dtype=getattr(torch, config.dtype), device=device)
    pipe.set_progress_bar_config(disable=True)
    num_classes = int(pipe.transformer.config.num_classes)
    if config.per_class is not None:
        num_images = config.per_class * num_classes
    else:
        num_images = DEFAULT_NUM_IMAGES if config.num_images is None else config.num_images
    return {
        "pipe": pipe,
        "num_classes": num_classes,
        "per_class": images_per_class(num_images, num_classes),
        "num_images": num_images,
        "resolution": int(pipe.transformer.config.sample_size),
    }


def _prepare_image_folder(config: EvalConfig) -> dict[str, Any]:
    generated = config.source == "images"
    # The sample grids `pmf generate` writes next to its images are not samples.
    if generated:
        files = list_images(config.images, exclude=(GRID_FILENAME,))
    else:
        files = list_images(config.compute_stats_from)
    if config.num_images is not None:
        if config.num_images > len(files):
            raise ValueError(f"`num_images={config.num_images}` but only {len(files)} images were found.")
        files = files[: config.num_images]
    width, height = _image_size(files[0])
    if width != height and generated:
        raise ValueError(f"Generated images must be square, got {width}×{height} ({files[0]}).")
    return {"files": files, "num_images": len(files), "resolution": width if width == height else None}


def _prepare_reference(config: EvalConfig, resolution: int | None):
    reference = None
    if config.reference_stats:
        reference = load_reference_stats(config.reference_stats, resolution, resolution=config.reference_resolution)
    reference_files = None
    if config.reference_images:
        reference_files = list_images(config.reference_images)
        width, height = _image_size(reference_files[0])
        if resolution is not None and (width, height) != (resolution, resolution):
            raise ValueError(
                f"The `reference_images` are {width}×{height} but the evaluated images are "
                f"{resolution}×{resolution}: use real images at the same resolution."
            )
    return reference, reference_files


def _compute_reference_stats(run: _Run) -> dict[str, Any] | None:
    gathered = _folder_features(run, run.files, "features")
    if not run.accelerator.is_main_process:
        return None
    mu, sigma = feature_statistics(gathered["features"])
    out = save_reference_stats(
        run.config.stats_out, mu, sigma, resolution=run.resolution, num_images=run.num_images,
        feature_extractor=run.extractor_name,
    )
    run.accelerator.print(
        f"Wrote statistics of {run.num_images} images ({run.feature_dim}-d, {run.resolution}px) to {out}"
    )
    return {"stats_out": str(out), "num_images": run.num_images, "feature_dim": run.feature_dim,
            "resolution": run.resolution, "feature_extractor": run.extractor_name}


def _evaluate(run: _Run) -> dict[str, Any] | None:
    started = time.perf_counter()
    config = run.config
    sampling_seconds = None
    if config.source == "model":
        gathered, sampling_seconds = _sample_features(run)
    else:
        gathered = _folder_features(run, run.files, "features")
    reference_gathered = None
    if run.reference_files is not None and (config.precision_recall or run.reference is None):
        reference_gathered = _folder_features(run, run.reference_files, "reference features")
    if not run.accelerator.is_main_process:
        return None

    if run.reference is None and reference_gathered is not None:
        mu, sigma = feature_statistics(reference_gathered["features"])
        run.reference = ReferenceStats(
            mu, sigma, run.resolution, "images", config.reference_images, len(run.reference_files)
        )
    report = _metrics(run, gathered, reference_gathered)
    report.update(_provenance(run, {"sampling_s": sampling_seconds, "total_s": time.perf_counter() - started}))
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    run.accelerator.print(_summary(report) + f"  → {output}")
    if config.source == "model" and config.grid:
        _write_grid(run)
        run.accelerator.print(f"Sample grid → {config.grid}")
    return report


def _metrics(run: _Run, gathered, reference_gathered) -> dict[str, Any]:
    config = run.config
    report: dict[str, Any] = dict.fromkeys(("fid", "inception_score", "inception_score_std", "precision", "recall"))
    features, logits = gathered["features"], gathered["logits"]
    if run.reference is not None:
        mu, sigma = feature_statistics(features)
        report["fid"] = frechet_distance(
            mu, sigma, run.reference.mu, run.reference.sigma, method=resolve_fid_method(config.fid_method)
        )
    if run.num_logits:
        report["inception_score"], report["inception_score_std"] = inception_score(
            logits, splits=min(config.is_splits, run.num_images)
        )
    if config.precision_recall:
        pr = precision_recall(reference_gathered["features"].to(run.device), features.to(run.device), k=config.pr_k)
        report.update(precision=pr["precision"], recall=pr["recall"])
    return report


def _provenance(run: _Run, timing: dict[str, float | None]) -> dict[str, Any]:
    """What was evaluated, against what, with which network and settings (the report beside the numbers)."""
    import diffusers

    from .. import __version__

    config, reference = run.config, run.reference
    provenance: dict[str, Any] = {
        "num_images": run.num_images,
        "source": {"model": config.model} if config.source == "model" else {"images": config.images},
        "reference": {
            "stats": reference.path if reference is not None else None,
            "resolution": reference.resolution if reference is not None else None,
            "resolution_source": reference.resolution_source if reference is not None else None,
            "images": config.reference_images,
            "num_reference_images": len(run.reference_files) if run.reference_files is not None else None,
        },
        "feature_extractor": {
            "name": run.extractor_name,
            "weights": getattr(run.extractor, "weights_path", None),
            "weights_sha256": getattr(run.extractor, "weights_sha256", None),
            "feature_dim": run.feature_dim,
            "num_logits": run.num_logits,
        },
        "fid_method": resolve_fid_method(config.fid_method) if reference is not None else None,
        "is_splits": min(config.is_splits, run.num_images),
        "precision_recall_k": config.pr_k if config.precision_recall else None,
        "num_processes": run.accelerator.num_processes,
        "device": str(run.device),
        "timing": timing,
        "versions": {"pmf_diffusers": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    if config.source == "model":
        pipe = run.pipe
        provenance["sampling"] = {
            "num_classes": run.num_classes,
            "images_per_class": run.per_class,
            "num_inference_steps": config.steps,
            "guidance_scale": config.guidance_scale if config.guidance_scale is not None
            else pipe.config.default_guidance_scale,
            "guidance_interval": list(config.guidance_interval or pipe.config.default_guidance_interval),
            "sample_seed": config.sample_seed,
            "seed_rule": SEED_RULE,
            "label_rule": LABEL_RULE,
            "dtype": config.dtype,
            "batch_size_per_process": config.batch_size,
            "tf32": bool(config.tf32),
            "resolution": run.resolution,
        }
        if config.save_images:
            provenance["saved_images"] = config.save_images
    return provenance


def _summary(report: dict[str, Any]) -> str:
    summary = [f"{report['num_images']} images"]
    if report["fid"] is not None:
        summary.append(f"FID {report['fid']:.4f}")
    if report["inception_score"] is not None:
        summary.append(f"IS {report['inception_score']:.2f} ± {report['inception_score_std']:.2f}")
    if report["precision"] is not None:
        summary.append(f"precision {report['precision']:.4f} recall {report['recall']:.4f}")
    return " | ".join(summary)


# ----------------------------------------------------------------------------------------------------------------
# Features: of sampled images, of image files
# ----------------------------------------------------------------------------------------------------------------
def _generate_uint8(run: _Run, indices: Sequence[int]) -> torch.Tensor:
    config = run.config
    output = run.pipe(
        class_labels=[index // run.per_class for index in indices],
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        guidance_interval=tuple(config.guidance_interval) if config.guidance_interval else None,
        generator=make_generators(indices, config.sample_seed),
        output_type="latent",  # the raw sample in [-1, 1]; quantised below exactly as the official evaluate.py
    )
    return to_uint8(output.images)


@torch.no_grad()
def _sample_features(run: _Run) -> tuple[dict[str, torch.Tensor], float]:
    """Sample this process's shard in batches (optionally saving every image) and gather the features."""
    accelerator, batch_size = run.accelerator, run.config.batch_size
    shard = shard_indices(run.num_images, accelerator.num_processes, accelerator.process_index)
    save_dir = Path(run.config.save_images) if run.config.save_images else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(run.num_images - 1)))
    collected = _Features()
    progress = _progress(accelerator, len(shard), "sampling")
    started = time.perf_counter()
    try:
        for start in range(0, len(shard), batch_size):
            indices = shard[start : start + batch_size]
            images = _generate_uint8(run, indices)
            if save_dir:
                for index, image in zip(indices, images.cpu()):
                    _save_png(image, save_dir / f"{index:0{digits}d}.png")
            collected.add(run.extractor(images.to(run.device)))
            progress.update(len(indices))
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    gathered = _gather_in_order(accelerator, shard, collected.stacked(*run.dims, run.device), run.num_images, run.device)
    return gathered, seconds


@torch.no_grad()
def _folder_features(run: _Run, files: list[Path], desc: str) -> dict[str, torch.Tensor]:
    """Features of image files, sharded over processes and gathered in file order."""
    accelerator, batch_size, num_workers = run.accelerator, run.config.batch_size, run.config.num_workers
    shard = shard_indices(len(files), accelerator.num_processes, accelerator.process_index)
    collected = _Features()
    progress = _progress(accelerator, len(shard), desc)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
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
            collected.add(run.extractor(torch.stack(images).to(run.device)))
            progress.update(len(batch_files))
    finally:
        progress.close()
        if pool:
            pool.shutdown()
    return _gather_in_order(accelerator, shard, collected.stacked(*run.dims, run.device), len(files), run.device)


def _write_grid(run: _Run) -> None:
    # The first image of each class, then the second of each, ... — resampled with the same per-image seeds.
    order = [c * run.per_class + j for j in range(run.per_class) for c in range(run.num_classes)]
    order = order[: run.config.grid_size]
    images = _generate_uint8(run, order).cpu()
    path = Path(run.config.grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, background="black").save(path)
