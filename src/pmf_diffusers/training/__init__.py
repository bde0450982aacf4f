"""Training utilities for pixel MeanFlow: the objective, the official optimizer and EMA, perceptual losses, toy data."""

from .ema import MultiEMA, PowerEMA
from .objective import LOSS_PRESETS, PMFDraws, PMFLossConfig, PMFLossOutput, adaptive_weight, pmf_loss, sample_draws
from .optimizer import Muon, muon_param_groups
from .perceptual import ConvNeXtV2Features, LPIPSVGG, PerceptualLoss, PerceptualWeightsNotFoundError

__all__ = [
    "LOSS_PRESETS",
    "ConvNeXtV2Features",
    "LPIPSVGG",
    "PerceptualLoss",
    "PerceptualWeightsNotFoundError",
    "Muon",
    "MultiEMA",
    "PMFDraws",
    "PMFLossConfig",
    "PMFLossOutput",
    "PowerEMA",
    "adaptive_weight",
    "muon_param_groups",
    "pmf_loss",
    "sample_draws",
]
