# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Facts about the six released pMF sizes, in one place: where the weights live, the shapes that identify each size,
its sampling settings, its training recipe and the EMA behind the paper's numbers (docs/algorithm.md, "Released
sizes"). Conversion, loading, training presets, the objective's recipes, the Hub model cards and the Space all read
them from here.

This module imports no torch, so command-line parsers and other light code can use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = [
    "OFFICIAL_REPO_ID",
    "OFFICIAL_NUM_CLASSES",
    "IMAGENET_SAMPLE_CLASSES",
    "OfficialPreset",
    "OFFICIAL_PRESETS",
    "OFFICIAL_EVAL_EMA_KIMG",
    "CheckpointConversionError",
    "resolve_preset",
    "official_model_config",
    "match_preset",
    "check_preset",
    "default_cache_dir",
]

OFFICIAL_REPO_ID = "Lyy0725/pMF"
OFFICIAL_NUM_CLASSES = 1000  # ImageNet-1k
# The classes the official torch `evaluate.py --mode sample` draws (207 = golden retriever, the usual example class).
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


@dataclass(frozen=True)
class OfficialPreset:
    """A released size: the shapes that identify it, its sampling settings, the paper's scores, and its training
    recipe.

    Attributes:
        name: `pMF-B/16` … `pMF-H/32`.
        filename: The checkpoint's file name in [`OFFICIAL_REPO_ID`].
        sample_size, patch_size, hidden_size, num_layers: Image size, patch size, transformer width and trunk depth.
        noise_scale: The noise is `noise_scale · ε` (sampling and training).
        guidance_scale, guidance_interval: Default ω and the time interval it applies on.
        fid, inception_score: The paper's scores (FID-50K, one step).
        eval_ema_kimg: EMA half-life (kimg) of the weights behind the paper's numbers.
        recipe: The objective's hyper-parameters that differ from the pMF-B/16 recipe (the defaults of
            `pmf_diffusers.training.PMFLossConfig`); `noise_scale` is taken from the field above.
    """

    name: str
    filename: str
    sample_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    noise_scale: float
    guidance_scale: float
    guidance_interval: tuple[float, float]
    fid: float
    inception_score: float | None = None
    eval_ema_kimg: float | None = None
    recipe: Mapping[str, float | bool] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        # Read-only, so that the shared table cannot be changed by accident.
        object.__setattr__(self, "recipe", MappingProxyType(dict(self.recipe)))


# B/16 uses the JAX evaluation config (ω 8.5, [0.1, 0.7]) behind the paper's FID; the torch README's CLI defaults
# (7.5, [0.1, 0.8]) remain available through `guidance_scale` / `guidance_interval`.
# H recipes: the official config key `convnext_max_t: 0.6` is read as `perceptual_max_t`.
OFFICIAL_PRESETS: dict[str, OfficialPreset] = {
    preset.name: preset
    for preset in (
        OfficialPreset(
            "pMF-B/16", "pMF-B-16.pt", 256, 16, 768, 8, 1.0, 8.5, (0.1, 0.7), 3.12,
            eval_ema_kimg=2000.0,
        ),
        OfficialPreset(
            "pMF-B/32", "pMF-B-32.pt", 512, 32, 768, 8, 2.0, 6.5, (0.1, 0.7), 3.70,
            eval_ema_kimg=2000.0,
        ),
        OfficialPreset(
            "pMF-L/16", "pMF-L-16.pt", 256, 16, 1024, 24, 1.0, 7.0, (0.2, 0.7), 2.52,
            eval_ema_kimg=1000.0, recipe={"cfg_beta": 2.0},
        ),
        OfficialPreset(
            "pMF-L/32", "pMF-L-32.pt", 512, 32, 1024, 24, 4.0, 7.5, (0.2, 0.6), 2.75,
            eval_ema_kimg=2000.0, recipe={"p_mean": 0.0, "perceptual_max_t": 0.6},
        ),
        OfficialPreset(
            "pMF-H/16", "pMF-H-16.pt", 256, 16, 1280, 40, 2.0, 7.0, (0.2, 0.6), 2.22,
            eval_ema_kimg=1000.0, recipe={"p_mean": 0.0, "perceptual_max_t": 0.6, "tr_uniform": True},
        ),
        OfficialPreset(
            "pMF-H/32", "pMF-H-32.pt", 512, 32, 1280, 40, 4.0, 5.5, (0.1, 0.6), 2.48,
            eval_ema_kimg=500.0, recipe={"p_mean": 0.0, "perceptual_max_t": 0.6, "tr_uniform": True},
        ),
    )
}

# EMA half-life (kimg) behind the paper's numbers, per size.
OFFICIAL_EVAL_EMA_KIMG: dict[str, float] = {name: preset.eval_ema_kimg for name, preset in OFFICIAL_PRESETS.items()}


class CheckpointConversionError(ValueError):
    """A checkpoint whose keys or shapes do not form a pMF network, or contradict the size it was said to be (the
    message names every offending key or shape)."""


def resolve_preset(name: str) -> OfficialPreset:
    """The released size called `name`; accepts `pMF-B/16`, `pmf-b-16`, `B/16`, `b16`, `pmfDiT_B_16` and similar
    spellings.

    Raises:
        ValueError: for an unknown size, listing the valid ones.
    """
    match = re.fullmatch(r"(?:pmf(?:dit)?[-_ ]?)?([blh])[-_/ ]?(16|32)(?:\.pt)?", name.strip().lower())
    if match is None:
        raise ValueError(f"Unknown pMF size {name!r}; choose one of {', '.join(OFFICIAL_PRESETS)}.")
    return OFFICIAL_PRESETS[f"pMF-{match.group(1).upper()}/{match.group(2)}"]


def official_model_config(name: str) -> dict:
    """`PMFTransformer2DModel` keyword arguments (all but `num_classes`) of a released size, as the official
    `pmfDiT_*` builds it."""
    preset = resolve_preset(name)
    hidden = preset.hidden_size
    heads = 12 if hidden <= 768 else 16
    mlp_hidden_dim = int(hidden * 8 / 3)
    # The torch branch rounds the SwiGLU width up to a multiple of 8 only above 1024 (H: 3413 → 3416).
    if hidden > 1024:
        mlp_hidden_dim = (mlp_hidden_dim + 7) // 8 * 8
    return {
        "sample_size": preset.sample_size,
        "patch_size": preset.patch_size,
        "num_layers": preset.num_layers,
        "num_head_layers": 8,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "mlp_hidden_dim": mlp_hidden_dim,
        "bottleneck_dim": 128 if hidden <= 1024 else 256,
        "with_v_head": True,
    }


def _identifying_shape(config: Mapping) -> dict[str, int]:
    """The shapes that tell the sizes apart, of a `PMFTransformer2DModel` config."""
    return {
        "image size": config["sample_size"],
        "patch size": config["patch_size"],
        "hidden size": config["num_attention_heads"] * config["attention_head_dim"],
        "trunk depth": config["num_layers"],
    }


def _shape_conflicts(config: Mapping, preset: OfficialPreset) -> list[str]:
    found = _identifying_shape(config)
    wanted = {
        "image size": preset.sample_size,
        "patch size": preset.patch_size,
        "hidden size": preset.hidden_size,
        "trunk depth": preset.num_layers,
    }
    return [f"{name} {found[name]} (preset {wanted[name]})" for name in found if found[name] != wanted[name]]


def match_preset(
    config: Mapping, noise_scale: float | None = None, num_classes: int | None = None
) -> OfficialPreset | None:
    """The released size a `PMFTransformer2DModel` config has the shapes of (image size, patch size, hidden size,
    trunk depth), or `None`.

    Args:
        config: The transformer's config (or the keyword arguments it was built with).
        noise_scale: When given, the preset's noise scale must match too (the whole pipeline is that size).
        num_classes: When given, it must be the official 1000 ImageNet classes.
    """
    if num_classes is not None and num_classes != OFFICIAL_NUM_CLASSES:
        return None
    for preset in OFFICIAL_PRESETS.values():
        if _shape_conflicts(config, preset):
            continue
        if noise_scale is not None and not math.isclose(noise_scale, preset.noise_scale):
            continue
        return preset
    return None


def check_preset(config: Mapping, preset: OfficialPreset) -> None:
    """Refuse a model whose shapes contradict the size it is said to be.

    Raises:
        CheckpointConversionError: naming every shape that differs.
    """
    conflicts = _shape_conflicts(config, preset)
    if conflicts:
        raise CheckpointConversionError(
            f"The checkpoint contradicts preset {preset.name}: {', '.join(conflicts)}. Pick the matching preset, or "
            "give no preset and set noise_scale / guidance_scale / guidance_interval instead."
        )


def default_cache_dir() -> Path:
    """Where `load_official` keeps the converted pipeline folders: `$HF_HOME/pmf-diffusers/converted`."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "pmf-diffusers" / "converted"
