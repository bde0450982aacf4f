# Copyright 2026 The pmf-diffusers developers. MIT License.
"""A training preset (`pmf_diffusers.training.presets`) resolved for one launch: the model shape with its overrides,
the batch sizes over the processes, the step budget and the EMA behind the samples and the export.

Errors are `ValueError`s naming the setting (`global_batch_size`, ...) as the training script's flags do.
"""

from __future__ import annotations

import math

from ..official import IMAGENET_SAMPLE_CLASSES, OFFICIAL_NUM_CLASSES
from .ema import MultiEMA
from .presets import TrainingPreset

__all__ = [
    "resolve_batch_sizes",
    "resolve_export_ema",
    "resolve_max_train_steps",
    "resolve_model_config",
    "resolve_validation_classes",
]


def resolve_model_config(preset: TrainingPreset, num_classes: int, **overrides) -> dict:
    """`PMFTransformer2DModel` kwargs: the preset's shape with the given (non-None) `overrides`, `num_classes`
    classes and a v-head (training needs it)."""
    config = {**preset.model, **{key: value for key, value in overrides.items() if value is not None}}
    config.update(num_classes=num_classes, with_v_head=True)
    if config["sample_size"] % config["patch_size"]:
        raise ValueError(f"resolution {config['sample_size']} is not a multiple of patch_size {config['patch_size']}.")
    if config["attention_head_dim"] % 4:
        raise ValueError(f"attention_head_dim {config['attention_head_dim']} must be a multiple of 4 (2-D RoPE).")
    return config


def resolve_batch_sizes(
    preset: TrainingPreset,
    num_processes: int,
    gradient_accumulation_steps: int = 1,
    global_batch_size: int | None = None,
    train_batch_size: int | None = None,
) -> tuple[int, int]:
    """(per-device micro-batch, global batch per optimizer step) from either batch size, else the preset's global
    batch. The global batch counts every process and accumulation step, as the official recipe does."""
    accumulation = gradient_accumulation_steps
    divisor = num_processes * accumulation
    if global_batch_size is not None:
        if global_batch_size % divisor:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the process count × gradient "
                f"accumulation = {num_processes} × {accumulation} = {divisor}. Choose a multiple of {divisor}, or set "
                "train_batch_size (per device) instead."
            )
        per_device = global_batch_size // divisor
        if train_batch_size is not None and train_batch_size != per_device:
            raise ValueError(
                f"train_batch_size {train_batch_size} contradicts global_batch_size {global_batch_size} over "
                f"{num_processes} process(es) × {accumulation} accumulation step(s) (= {per_device} per device)."
            )
        return per_device, global_batch_size
    if train_batch_size is not None:
        return train_batch_size, train_batch_size * divisor
    if preset.global_batch_size % divisor:
        raise ValueError(
            f"The preset's global batch {preset.global_batch_size} is not divisible by the process count × gradient "
            f"accumulation = {divisor}. Set global_batch_size (a multiple of {divisor}) or train_batch_size."
        )
    return preset.global_batch_size // divisor, preset.global_batch_size


def resolve_max_train_steps(
    preset: TrainingPreset,
    *,
    max_train_steps: int | None,
    num_train_epochs: int | None,
    num_examples: int | None,
    per_device_batch: int,
    num_processes: int,
    gradient_accumulation_steps: int = 1,
) -> int:
    """Optimizer steps to train: `max_train_steps`, else the preset's step budget (unless epochs are asked for), else
    epochs over `num_examples` (None: a stream of unknown length, which needs a step budget)."""
    if max_train_steps is not None:
        return max_train_steps
    if num_train_epochs is None and preset.max_train_steps is not None:
        return preset.max_train_steps
    if num_examples is None:
        raise ValueError("A streamed dataset has no known epoch length: set max_train_steps.")
    epochs = num_train_epochs or preset.num_train_epochs
    batches_per_epoch = math.ceil((num_examples // per_device_batch) / num_processes)
    return epochs * math.ceil(batches_per_epoch / gradient_accumulation_steps)


def resolve_export_ema(preset: TrainingPreset, half_lives_kimg: list[float], requested: float | str | None = "preset"):
    """Half-life (kimg) of the EMA behind the validation samples and the export, None for the raw weights.

    `requested="preset"`: the EMA of the official evaluation for an official preset when it is trained, else the
    smallest half-life; a number must be one of `half_lives_kimg`."""
    keys = [MultiEMA.key_for(half_life) for half_life in half_lives_kimg]
    if requested != "preset":
        if requested is not None and MultiEMA.key_for(requested) not in keys:
            raise ValueError(f"export_ema {requested:g} is not one of the EMA half-lives {list(half_lives_kimg)}.")
        return requested
    smallest = min(half_lives_kimg) if half_lives_kimg else None
    if preset.official and MultiEMA.key_for(preset.export_ema_kimg) in keys:
        return preset.export_ema_kimg
    return smallest


def resolve_validation_classes(requested: list[int] | None, num_classes: int, label_index: list[int] | None) -> list[int]:
    """The class ids of the validation grid's rows: `requested` (checked against `num_classes`), else the classes of
    the data (`label_index`: model class of each dataset class), the official sample classes for ImageNet, or the
    first 10 classes."""
    if requested is not None:
        bad = [c for c in requested if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"validation_classes {bad} outside [0, {num_classes}).")
        return list(requested)
    if label_index is not None:
        return sorted(set(label_index))[:10]
    if num_classes == OFFICIAL_NUM_CLASSES:
        return list(IMAGENET_SAMPLE_CLASSES)
    return list(range(min(num_classes, 10)))
