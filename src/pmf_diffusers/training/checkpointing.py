# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Exact, safe resumes of a training run (`examples/train_pmf.py`): checkpoint folders (layout, saving, discovery,
verification, resume checks), the run's own resumable state, the objective's random source and the data position.

A checkpoint is a folder `output_dir/checkpoint-STEP/` holding the accelerate state (`Accelerator.save_state`: model,
optimizer, scheduler, RNG states), the run's own state (the EMAs and the objective's seed, [`TrainingState`]) as
`training_state.safetensors` + `training_state.json` — never a pickle —, one `data_state_rank{r}.json` per process
(the data position, for exact resumes), optional exports, and — written last — the marker `pmf_checkpoint.json` with
the settings the run was trained with and the size and sha256 of every other file. The folder is written as
`.tmp-checkpoint-STEP`, every file and folder is fsynced, and it is renamed when complete, so a folder with the marker
is always usable and an interrupted save never is. A resume verifies the files against the marker and checks that
every pickle accelerate will read holds plain data (`checkpoint_files.py`) before anything is loaded; `latest` falls
back to the previous complete checkpoint when the newest is damaged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers.utils import logging

from .checkpoint_files import (
    CHECKPOINT_MARKER,
    CheckpointError,
    CheckpointSaveError,
    check_pickles,
    fsync_directory,
    is_disk_full,
    read_marker,
    record_files,
    verify_files,
    write_json_durably,
)

logger = logging.get_logger(__name__)

__all__ = [
    "CHECKPOINT_MARKER",
    "CHECKPOINT_MODEL_FILES",
    "CheckpointError",
    "CheckpointSaveError",
    "ObjectiveRNG",
    "TrainingState",
    "resumable_batches",
    "check_checkpoint_compatible",
    "checkpoint_step",
    "complete_checkpoints",
    "find_resume_checkpoint",
    "prune_checkpoints",
    "read_data_state",
    "remove_interrupted_saves",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "upgrade_checkpoint",
    "verify_checkpoint",
]

# The model weights in an accelerate checkpoint: DDP / one process, FSDP sharded (a DCP folder), FSDP full state dict.
CHECKPOINT_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"
_LEGACY_STATE = re.compile(r"custom_checkpoint_(\d+)\.pkl")
_TMP_PREFIX = ".tmp-"


class ObjectiveRNG:
    """The dedicated random source of the objective (times, ω, interval, class dropout, noise, perceptual crops).

    The generator is re-seeded at every micro-step from (seed, step, micro-step, process index) — the official
    `fold_in(fold_in(key, step), device)` pattern — so every process draws differently and a resumed run draws exactly
    what the uninterrupted run would have drawn, whatever the checkpoint frequency. Register it with
    `accelerator.register_for_checkpointing`: a resume then keeps the original seed.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)

    def for_step(self, step: int, micro_step: int, process_index: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, step, micro_step, process_index]).generate_state(2, np.uint32)
        self.generator.manual_seed((int(words[0]) << 31) ^ int(words[1]))
        return self.generator

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


def resumable_batches(
    accelerator,
    data_state: dict,
    *,
    dataloader=None,
    stream=None,
    batch_size: int | None = None,
    collate_fn=None,
    num_workers: int = 0,
    source: str = "the dataset",
):
    """Yield `(batch, epoch)` forever (the caller stops), from a prepared map-style `dataloader` (whose sampler
    reshuffles per epoch) or from this process's part of a shuffled streaming dataset `stream` (batched here).

    `data_state` (`{"epoch": e, "batches_in_epoch": b}`) is updated in place as batches are read; saved with a
    checkpoint and passed back on resume, the iteration continues with the batch the interrupted run would have read
    next. Raises `DatasetError` when a fresh epoch yields no batch (of `source`)."""
    from .data import DatasetError

    while True:
        epoch, skip = data_state["epoch"], data_state["batches_in_epoch"]
        if stream is not None:
            source = stream.skip(skip * batch_size) if skip else stream
            source.set_epoch(epoch)  # the shuffle buffer's seed is seed + epoch
            loader = torch.utils.data.DataLoader(
                source, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers, drop_last=True
            )
        else:
            dataloader.set_epoch(epoch)  # sets the sampler's epoch (accelerate re-applies it on __iter__)
            loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        yielded = 0
        for batch in loader:
            yielded += 1
            data_state["batches_in_epoch"] += 1
            yield batch, epoch
        if yielded == 0 and skip == 0:
            raise DatasetError(f"No batch of {batch_size} images could be read from {source}.")
        data_state["epoch"], data_state["batches_in_epoch"] = epoch + 1, 0


def checkpoint_step(path: Path) -> int | None:
    """STEP of a `checkpoint-STEP` folder, None for any other name."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-STEP` folders with a completion marker, oldest first."""
    found = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if checkpoint_step(path) is not None and (path / CHECKPOINT_MARKER).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def remove_interrupted_saves(output_dir: Path) -> list[Path]:
    """Delete the `.tmp-checkpoint-*` folders of interrupted saves (never renamed, so never used). Main process only."""
    stale = sorted(Path(output_dir).glob(f"{_TMP_PREFIX}checkpoint-*"))
    for path in stale:
        logger.warning(f"Removing {path}: an interrupted checkpoint save (never renamed, so never used).")
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_resume_checkpoint(value: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: `"latest"` is the newest complete checkpoint in `output_dir` (None when
    there is none), any other value a checkpoint folder. Raises [`CheckpointError`] for a folder that is not one."""
    if value is None:
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a folder.")
    if not (path / CHECKPOINT_MARKER).is_file() or not any((path / name).exists() for name in CHECKPOINT_MODEL_FILES):
        inside = [p.name for p in complete_checkpoints(path)]
        hint = f" It contains the checkpoints {', '.join(inside)}: pass one of them." if inside else ""
        raise CheckpointError(
            f"{path} is not a train_pmf.py checkpoint (no {CHECKPOINT_MARKER} next to the accelerate state). Pass a "
            f"complete output_dir/checkpoint-STEP folder or 'latest'; interrupted saves (.tmp-checkpoint-*) are never "
            f"valid.{hint}"
        )
    return path


def _public_config(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def check_checkpoint_compatible(
    path: Path, model_config: dict, ema_keys: list[str], lora_config: dict | None = None
) -> dict:
    """Refuse to resume from a checkpoint trained with another model shape, other EMAs or other LoRA settings;
    return its marker (the recorded settings)."""
    meta = json.loads((Path(path) / CHECKPOINT_MARKER).read_text())
    saved_lora = meta.get("lora")
    if saved_lora != lora_config:

        def describe(config):
            return "full fine-tuning (no LoRA)" if config is None else json.dumps(config)

        raise CheckpointError(
            f"Cannot resume from {path}: it was trained with {describe(saved_lora)}, this run asks for "
            f"{describe(lora_config)}. Resume with the LoRA settings of the original run (rank, alpha, target, "
            "class table)."
        )
    saved, current = meta.get("transformer_config", {}), _public_config(model_config)
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"Cannot resume from {path}: the model differs from this run ({'; '.join(diffs)}). Use the model shape of "
            f"the original run (recorded in {Path(path) / CHECKPOINT_MARKER})."
        )
    if sorted(meta.get("ema_keys", [])) != sorted(ema_keys):
        raise CheckpointError(
            f"Cannot resume from {path}: it holds the EMAs {meta.get('ema_keys')} but this run asks for {ema_keys}. "
            "Use the EMA half-lives of the original run."
        )
    return meta


def read_data_state(path: Path, process_index: int) -> dict | None:
    """The data position a process saved in checkpoint `path` (None when it saved none)."""
    state_file = Path(path) / f"data_state_rank{process_index}.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else None


def prune_checkpoints(output_dir: Path, total_limit: int) -> list[Path]:
    """Delete all but the newest `total_limit` (at least 1) complete checkpoints; return the deleted folders."""
    old = complete_checkpoints(output_dir)[: -max(total_limit, 1)]
    for path in old:
        logger.info(f"Removing old checkpoint {path} (keeping the newest {total_limit})")
        (path / CHECKPOINT_MARKER).unlink(missing_ok=True)  # first: a half-deleted folder is never "complete"
        shutil.rmtree(path, ignore_errors=True)
    return old


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    metadata: dict,
    data_state: dict,
    write_extras: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write `output_dir/checkpoint-{step}`: the accelerate state, this process's `data_state`, whatever
    `write_extras(folder)` adds (e.g. an export), then the marker (`{"global_step": step, **metadata}`); written to a
    temporary folder and renamed when complete. Keeps at most `total_limit` checkpoints.

    Collective: call it on every process (`save_state` and `write_extras` may gather sharded weights)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{_TMP_PREFIX}checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(data_state))
    if write_extras is not None:
        write_extras(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"global_step": step, **metadata}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")  # written last
        if final.exists():
            (final / CHECKPOINT_MARKER).unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final
