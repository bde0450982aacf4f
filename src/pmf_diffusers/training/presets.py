# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Training presets: model shape + training recipe + sampling defaults, by name.

* ``pMF-B/16`` … ``pMF-H/32`` — the six released sizes, built from :mod:`pmf_diffusers.official`: shapes of the
  official ``pmfDiT_*`` (:func:`~pmf_diffusers.official.official_model_config`), recipe of
  :meth:`PMFLossConfig.from_preset`, global batch 1024, lr 1e-3 constant, EMA half-lives 500/1000/2000 kimg,
  320 epochs, sampling ω and interval of the release, and the EMA the official evaluation used for that size
  (docs/algorithm.md, "Released sizes").
* ``toy-cpu`` — a 32×32 model sized for a short CPU run on the toy shapes dataset.

Every value can be overridden (the training script exposes one flag per field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# OFFICIAL_EVAL_EMA_KIMG and official_model_config live in `official.py`; importable from here, where they used to be.
from ..official import OFFICIAL_EVAL_EMA_KIMG, OFFICIAL_PRESETS, official_model_config, resolve_preset
from .ema import OFFICIAL_RAMPUP_RATIO
from .objective import PMFLossConfig

__all__ = [
    "TrainingPreset",
    "TRAINING_PRESETS",
    "OFFICIAL_EVAL_EMA_KIMG",
    "official_model_config",
    "get_training_preset",
    "preset_names",
]


@dataclass(frozen=True)
class TrainingPreset:
    """A named training setup.

    Attributes:
        name: preset name.
        description: one line for ``--help``.
        model: keyword arguments of :class:`PMFTransformer2DModel` (all but ``num_classes``).
        loss: the objective's :class:`PMFLossConfig`.
        global_batch_size: images per optimizer step over all processes (official 1024).
        learning_rate: constant learning rate (official 1e-3).
        adam_beta2: b2 of the Adam part of Muon (official 0.95).
        ema_half_lives_kimg: EMA half-lives (official 500, 1000, 2000).
        ema_ref_batch: the EMA schedule's reference batch (official 1024, hard-coded).
        ema_rampup_ratio: the EMA half-life ramp-up: at most this share of the steps taken so far (official 0.05).
        export_ema_kimg: the EMA exported into the pipeline and used for validation samples.
        guidance_scale, guidance_interval: sampling defaults written into the exported pipeline.
        num_train_epochs: default training length when ``--max_train_steps`` is not given.
        max_train_steps: default step budget (overrides epochs) or None.
        validation_steps, checkpointing_steps: default frequencies.
        official: whether this is one of the released sizes.
    """

    name: str
    description: str
    model: dict
    loss: PMFLossConfig
    global_batch_size: int = 1024
    learning_rate: float = 1e-3
    adam_beta2: float = 0.95
    ema_half_lives_kimg: tuple[float, ...] = (500.0, 1000.0, 2000.0)
    ema_ref_batch: int = 1024
    ema_rampup_ratio: float = OFFICIAL_RAMPUP_RATIO
    export_ema_kimg: float = 500.0
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    num_train_epochs: int = 320
    max_train_steps: int | None = None
    validation_steps: int = 5000
    checkpointing_steps: int = 5000
    official: bool = False
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "TrainingPreset":
        return dataclasses.replace(self, **changes)


def _official(name: str) -> TrainingPreset:
    preset = OFFICIAL_PRESETS[name]
    return TrainingPreset(
        name=name,
        description=(
            f"official {name}: {preset.sample_size}px, patch {preset.patch_size}, hidden {preset.hidden_size}, "
            f"batch 1024, lr 1e-3, 320 epochs (paper FID {preset.fid})"
        ),
        model=official_model_config(name),
        loss=PMFLossConfig.from_preset(name),
        export_ema_kimg=preset.eval_ema_kimg,
        guidance_scale=preset.guidance_scale,
        guidance_interval=tuple(preset.guidance_interval),
        official=True,
    )


# Small presets. The perceptual losses are off (their VGG16 / ConvNeXt-V2 nets cost more than the model on CPU and
# need downloaded weights); set --lpips_lambda / --convnext_lambda to enable them. With few images per step the EMA
# stays in its ramp-up (half-life = 5 % of the images seen so far), which suits short runs.
_SMALL_LOSS = dict(lpips_lambda=0.0, convnext_lambda=0.0, noise_scale=1.0)

TRAINING_PRESETS: dict[str, TrainingPreset] = {name: _official(name) for name in OFFICIAL_PRESETS}
TRAINING_PRESETS["toy-cpu"] = TrainingPreset(
    name="toy-cpu",
    description="32px, patch 4, hidden 128 (2 heads × 64), trunk 4 + heads 2, batch 32, lr 3e-3, 1500 steps: the "
    "toy-shapes CPU demo (~20-25 min on 2 idle cores)",
    model={
        "sample_size": 32,
        "patch_size": 4,
        "num_layers": 4,
        "num_head_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 64,
        "mlp_hidden_dim": 344,
        "bottleneck_dim": 48,
        "frequency_embedding_dim": 128,
        "with_v_head": True,
    },
    loss=PMFLossConfig(p_mean=0.0, p_std=1.0, **_SMALL_LOSS),
    global_batch_size=32,
    learning_rate=3e-3,  # small models tolerate (and need) a larger step than the official 1e-3
    ema_half_lives_kimg=(500.0, 1000.0, 2000.0),
    export_ema_kimg=500.0,
    guidance_scale=2.0,
    guidance_interval=(0.0, 1.0),
    num_train_epochs=1000,
    max_train_steps=1500,
    validation_steps=250,
    checkpointing_steps=500,
)
# Real 8×8 digits upscaled to 32 px (examples/train_digits.py; measurements in docs/results/digits_experiments.md):
# toy-cpu's width, depth and recipe with patch 8 and one token per condition, which make a step ~4× cheaper, and ω
# drawn on [1, 3] instead of [1, 8]: the guidance scales worth sampling at, where a small model's capacity pays.
TRAINING_PRESETS["digits-cpu"] = TRAINING_PRESETS["toy-cpu"].replace(
    name="digits-cpu",
    description="32px, patch 8, hidden 128, trunk 4 + heads 2, 1 token per condition, batch 32, lr 3e-3, ω on [1, 3], "
    "3600 steps: real 8x8 digits upscaled (examples/train_digits.py; ~20 min as 2 CPU processes)",
    model={
        **TRAINING_PRESETS["toy-cpu"].model,
        "patch_size": 8,
        "num_class_tokens": 2,
        "num_guidance_tokens": 1,
        "num_interval_tokens": 1,
        "num_time_tokens": 1,
    },
    loss=dataclasses.replace(TRAINING_PRESETS["toy-cpu"].loss, cfg_max=2.0),
    guidance_scale=1.4,  # meets every held-out target (docs/real_data.md); ω = 2 trades recall and FD for accuracy
    max_train_steps=3600,
)


def preset_names() -> list[str]:
    return list(TRAINING_PRESETS)


def get_training_preset(name: str) -> TrainingPreset:
    """The preset called ``name`` (official sizes also accept spellings like ``B/16`` or ``pmf-b-16``).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name in TRAINING_PRESETS:
        return TRAINING_PRESETS[name]
    try:
        return TRAINING_PRESETS[resolve_preset(name).name]
    except ValueError:
        raise ValueError(f"Unknown preset {name!r}. Valid presets: {', '.join(TRAINING_PRESETS)}.") from None
