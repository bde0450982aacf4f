# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The rules the pipeline and LoRA loaders apply to weight files before and after reading them.

* **safetensors only.** diffusers falls back to pickle weights (`diffusion_pytorch_model.bin`,
  `pytorch_lora_weights.bin`) when a folder has no safetensors. It reads them with `torch.load(weights_only=True)`,
  but a refused pickle then surfaces as a generic "Unable to load weights" error, and a pickle is never needed for a
  pMF model: every folder this package writes holds safetensors. So a pickle weights file is refused before anything
  reads it, with the command that converts it.
* **finite values.** A NaN or infinite weight gives black or noise images without a word.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..hub import PICKLE_SUFFIXES

__all__ = ["check_no_pickle_weights", "is_pickle_weights_file", "non_finite_tensor_names", "refuse_pickle_weights"]


def is_pickle_weights_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle_weights(path: str | os.PathLike, loader: str) -> None:
    """Raise a one-line `ValueError` for the pickle weights file `path`, which `loader` was about to read."""
    path = Path(path)
    converted = path.with_suffix(".safetensors").name
    raise ValueError(
        f"{path} is a pickle weights file: {loader} loads weights only from safetensors, because unpickling a file can "
        f"run code. Convert it once with `safetensors.torch.save_file(torch.load('{path}', weights_only=True), "
        f"'{path.with_name(converted)}')` (weights_only=True refuses pickled code) and load again."
    )


def check_no_pickle_weights(folder: str | os.PathLike, loader: str) -> None:
    """Refuse a local folder whose weights exist only as pickles (where diffusers would fall back to them)."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(path for path in folder.iterdir() if path.is_file() and is_pickle_weights_file(path))
    if pickles:
        refuse_pickle_weights(pickles[0], loader)


def non_finite_tensor_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinite value (meta tensors hold no values)."""
    return [
        name
        for name, tensor in named_tensors
        if tensor.device.type != "meta" and tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
