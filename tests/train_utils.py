"""Test support for `examples/train_pmf.py`: the tiny model the tests train, and what a run trained.

* `TINY_TEST_PRESET` ("tiny-test": 16×16, patch 4, ~50k parameters, global batch 8) is not in the public preset
  table; `add_tiny_test_preset(monkeypatch)` adds it in-process, `tests/launch_train_pmf.py` in launched processes.
* The script returns a summary, not its model: `recording_accelerator` records the trained (unwrapped) model and the
  `MultiEMA` of each run when the script calls `accelerator.end_training()`; launched processes write the hashes of
  their weights (`weights_hash_lines`) at that point.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from pmf_diffusers.toy.shapes import TOY_CLASS_FOLDERS, make_toy_dataset
from pmf_diffusers.training import MultiEMA, PMFLossConfig
from pmf_diffusers.training.checkpointing import TrainingState
from pmf_diffusers.training.distributed import full_tensor, unwrap_model
from pmf_diffusers.training.presets import TRAINING_PRESETS, TrainingPreset

TINY_TEST_PRESET = TrainingPreset(
    name="tiny-test",
    description="16px, patch 4, hidden 32, trunk 1 + heads 1: for tests only",
    model={
        "sample_size": 16,
        "patch_size": 4,
        "num_layers": 1,
        "num_head_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "mlp_hidden_dim": 64,
        "bottleneck_dim": 16,
        "frequency_embedding_dim": 32,
        "num_class_tokens": 2,
        "num_guidance_tokens": 1,
        "num_interval_tokens": 1,
        "num_time_tokens": 1,
        "with_v_head": True,
    },
    loss=PMFLossConfig(p_mean=0.0, p_std=1.0, lpips_lambda=0.0, convnext_lambda=0.0, noise_scale=1.0),
    global_batch_size=8,
    learning_rate=3e-3,
    export_ema_kimg=500.0,
    guidance_scale=1.0,
    guidance_interval=(0.0, 1.0),
    num_train_epochs=1,
    max_train_steps=20,
    validation_steps=1000,
    checkpointing_steps=1000,
)


def add_tiny_test_preset(monkeypatch) -> None:
    monkeypatch.setitem(TRAINING_PRESETS, TINY_TEST_PRESET.name, TINY_TEST_PRESET)


def trained_objects(accelerator) -> dict:
    """{"model": the prepared model, unwrapped; "ema": the `MultiEMA` of the run's `TrainingState` (registered through
    the accelerator's save-state hook)} (None when not created yet)."""
    models = getattr(accelerator, "_models", [])
    states = [getattr(hook, "__self__", None) for hook in getattr(accelerator, "_save_model_state_pre_hook", {}).values()]
    ema = next((s.objects.get("ema") for s in states if isinstance(s, TrainingState)), None)
    return {"model": unwrap_model(accelerator, models[0]) if models else None, "ema": ema}


def recording_accelerator(base: type, runs: list) -> type:
    """A subclass of the accelerate `Accelerator` class `base` that appends `trained_objects` to `runs` when the
    script ends training."""

    class RecordingAccelerator(base):
        def end_training(self):
            runs.append(trained_objects(self))
            super().end_training()

    return RecordingAccelerator


def weights_sha256(tensors) -> str:
    """Hash of the full tensors (collective under FSDP: call it on every process)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(full_tensor(tensor.detach()).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_hash_lines(model, ema: MultiEMA | None) -> str:
    """`model <sha256>` and one `<ema key> <sha256>` line per EMA."""
    lines = [f"model {weights_sha256(model.parameters())}"]
    if ema is not None:
        lines += [f"{key} {weights_sha256(ema[key].shadow_params)}" for key in ema.keys()]
    return "\n".join(lines) + "\n"


def make_toy_subset(root: Path, images_per_class: int, size: int, num_classes: int = 4) -> Path:
    """The first `num_classes` toy-shape classes as an image folder (seed 0)."""
    make_toy_dataset(root, images_per_class=images_per_class, size=size, seed=0)
    for folder in TOY_CLASS_FOLDERS[num_classes:]:
        shutil.rmtree(root / folder)
    return root
