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

    The generators are re-seeded at every micro-step from (seed, step, micro-step, process index) — the official
    `fold_in(fold_in(key, step), device)` pattern — so every process draws differently and a resumed run draws exactly
    what the uninterrupted run would have drawn, whatever the checkpoint frequency. `generator` lives on the training
    device (the draws); `host_generator` on the CPU, for what the host needs as numbers (the perceptual crop boxes),
    so that no draw has to be copied back from the device. Keep it in the [`TrainingState`]: a resume then keeps the
    original seed.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)
        self.host_generator = torch.Generator()

    def for_step(self, step: int, micro_step: int, process_index: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, step, micro_step, process_index]).generate_state(4, np.uint32)
        self.generator.manual_seed((int(words[0]) << 31) ^ int(words[1]))
        self.host_generator.manual_seed((int(words[2]) << 31) ^ int(words[3]))
        return self.generator

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


def _to_storable(value, key: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able copy of a nested state dict; tensors go to `tensors` and are referenced as {"__tensor__": key}."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(name, str) for name in value) or "__tensor__" in value:
            raise TypeError(f"Cannot store {key}: only dicts with string keys (other than '__tensor__') are supported.")
        return {name: _to_storable(item, f"{key}.{name}", tensors) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_storable(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"Cannot store {key} of type {type(value).__name__} in a checkpoint.")


def _from_storable(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {name: _from_storable(item, tensors) for name, item in value.items()}
    if isinstance(value, list):
        return [_from_storable(item, tensors) for item in value]
    return value


def write_training_state(folder: Path, states: dict[str, dict]) -> None:
    """Write `{name: state_dict}` as `training_state.safetensors` (the tensors) + `training_state.json` (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = {name: _to_storable(state, name, tensors) for name, state in states.items()}
    save_file(tensors, str(Path(folder) / TRAINING_STATE_TENSORS))
    write_json_durably(Path(folder) / TRAINING_STATE_JSON, tree)


def read_training_state(folder: Path) -> dict[str, dict]:
    """The states written by [`write_training_state`] (tensors on the CPU); no pickle is involved."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TRAINING_STATE_JSON).is_file():
        raise CheckpointError(f"Checkpoint {folder} has no {TRAINING_STATE_JSON} (the EMA and objective state).")
    tree = json.loads((folder / TRAINING_STATE_JSON).read_text())
    return _from_storable(tree, load_file(str(folder / TRAINING_STATE_TENSORS), device="cpu"))


class TrainingState:
    """The run's own resumable objects (e.g. `objective_rng=ObjectiveRNG(...)`, `ema=MultiEMA(...)`: anything with
    `state_dict()` / `load_state_dict()` holding tensors, numbers, strings and containers), saved and loaded with the
    accelerate state through its save/load hooks, as safetensors + JSON.

    This replaces `accelerator.register_for_checkpointing`, whose `custom_checkpoint_*.pkl` files accelerate loads
    with a full unpickler (`weights_only=False`): a tampered checkpoint would run code on resume.
    """

    def __init__(self, accelerator, **objects):
        self.accelerator = accelerator
        self.objects = {name: obj for name, obj in objects.items() if obj is not None}
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models, weights, output_dir) -> None:
        states = {name: obj.state_dict() for name, obj in self.objects.items()}  # collective under FSDP (the EMAs)
        if self.accelerator.is_main_process:
            write_training_state(Path(output_dir), states)

    def _load_hook(self, models, input_dir) -> None:
        states = read_training_state(Path(input_dir))
        missing = sorted(set(self.objects) - set(states))
        if missing:
            raise CheckpointError(f"Checkpoint {input_dir} holds no state for {missing} (it has {sorted(states)}).")
        for name, obj in self.objects.items():
            obj.load_state_dict(states[name])


def resumable_batches(
    accelerator,
    data_state: dict,
    *,
    dataloader=None,
    stream=None,
    batch_size: int | None = None,
    collate_fn=None,
    num_workers: int = 0,
    pin_memory: bool = False,
    source: str = "the dataset",
):
    """Yield `(batch, epoch)` forever (the caller stops), from a prepared map-style `dataloader` (whose sampler
    reshuffles per epoch) or from this process's part of a shuffled streaming dataset `stream` (batched here).

    `data_state` (`{"epoch": e, "batches_in_epoch": b}`) is updated in place as batches are read; saved with a
    checkpoint and passed back on resume, the iteration continues with the batch the interrupted run would have read
    next. `pin_memory` (on CUDA) lets the stream's batches be copied to the device asynchronously. Raises
    `DatasetError` when a fresh epoch yields no batch (of `source`)."""
    from .data import DatasetError

    while True:
        epoch, skip = data_state["epoch"], data_state["batches_in_epoch"]
        if stream is not None:
            source = stream.skip(skip * batch_size) if skip else stream
            source.set_epoch(epoch)  # the shuffle buffer's seed is seed + epoch
            loader = torch.utils.data.DataLoader(
                source, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers, drop_last=True,
                pin_memory=pin_memory,
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


def verify_checkpoint(path: Path) -> dict:
    """Check checkpoint `path` before anything of it is loaded, and return its marker: every file against the size and
    sha256 the marker recorded, and every pickle accelerate will read for plain data. Raises [`CheckpointError`] with
    one line naming the checkpoint and the broken file (or how to upgrade a checkpoint of an older version)."""
    path = Path(path)
    meta = read_marker(path)
    if "files" not in meta:
        legacy = sorted(p.name for p in path.iterdir() if _LEGACY_STATE.fullmatch(p.name))
        raise CheckpointError(
            f"Checkpoint {path} was written by an older train_pmf.py: it records no checksums"
            + (f" and keeps its EMA and sampler state as pickles ({', '.join(legacy)}), which are no longer unpickled"
               if legacy else "")
            + ". Upgrade it once (its pickles are read with torch.load(weights_only=True), which runs no code): python "
            f"-c \"from pmf_diffusers.training.checkpointing import upgrade_checkpoint; upgrade_checkpoint('{path}')\""
        )
    verify_files(path, meta["files"])
    check_pickles(path)
    return meta


def resolve_resume_checkpoint(value: str | None, output_dir: Path) -> Path | None:
    """The verified checkpoint folder to resume from ([`verify_checkpoint`]): `"latest"` is the newest complete
    checkpoint in `output_dir` that passes the checks — a damaged newer one is skipped with a warning — and None when
    there is none; any other value is a checkpoint folder. Raises [`CheckpointError`] for a folder that is not a
    usable checkpoint, and when every complete checkpoint of `output_dir` is damaged."""
    if value is None:
        return None
    if value == "latest":
        found, damaged = complete_checkpoints(output_dir), []
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                damaged.append(str(err))
                logger.warning(f"{err} Falling back to the previous complete checkpoint.")
                continue
            return path
        if damaged:
            raise CheckpointError(f"Every checkpoint in {output_dir} is damaged; the newest: {damaged[0]}")
        return None
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
    verify_checkpoint(path)
    return path


def find_resume_checkpoint(accelerator, value: str | None, output_dir: Path) -> Path | None:
    """[`resolve_resume_checkpoint`] on the main process (the files are read once), its answer — or its error —
    shared with every process. Collective."""
    answer = [None, None]
    if accelerator.is_main_process:
        try:
            answer[0] = resolve_resume_checkpoint(value, output_dir)
        except CheckpointError as err:
            answer[1] = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    if answer[1] is not None:
        raise CheckpointError(answer[1])
    return answer[0]


def _public_config(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def check_checkpoint_compatible(
    path: Path, model_config: dict, ema_keys: list[str], lora_config: dict | None = None
) -> dict:
    """Refuse to resume from a checkpoint trained with another model shape, other EMAs or other LoRA settings;
    return its marker (the recorded settings)."""
    meta = read_marker(path)
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


def _first_error(accelerator, message: str | None) -> str | None:
    """The first process's error message, or None when every process succeeded. Collective."""
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import gather_object

    return next((m for m in gather_object([message]) if m is not None), None)


def _disk_full_message(error: BaseException, folder: Path, step: int, previous: Path | None) -> str:
    free = shutil.disk_usage(folder.parent).free / 2**30
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"Cannot save checkpoint-{step}: the disk is full ({reason}) while writing {folder} ({free:.2f} GiB free "
            f"on that disk). The incomplete save was removed; {kept}. Free some space and resume from it.")


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    metadata: dict,
    data_state: dict,
    write_extras: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write `output_dir/checkpoint-{step}`: the accelerate state (with the [`TrainingState`] registered on
    `accelerator`), this process's `data_state`, whatever `write_extras(folder)` adds (e.g. an export), then the marker
    (`{"global_step": step, **metadata, "files": <size and sha256 of every file>}`); written to a temporary folder,
    fsynced, and renamed when complete. Keeps at most `total_limit` checkpoints.

    A full disk raises [`CheckpointSaveError`] on every process (saying where, and that the previous checkpoint is
    intact) after removing the incomplete folder. Collective: call it on every process (`save_state` and
    `write_extras` may gather sharded weights)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{_TMP_PREFIX}checkpoint-{step}"
    previous = next((p for p in reversed(complete_checkpoints(output_dir)) if p != final), None)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        write_json_durably(tmp / f"data_state_rank{accelerator.process_index}.json", data_state)
        if write_extras is not None:
            write_extras(tmp)
    except Exception as err:
        if not is_disk_full(err):
            raise
        error = _disk_full_message(err, tmp, step, previous)
    if error is None and accelerator.is_main_process:
        try:
            _finish_save(tmp, final, {"global_step": step, **metadata})
        except Exception as err:
            if not is_disk_full(err):
                raise
            error = _disk_full_message(err, tmp, step, previous)
    error = _first_error(accelerator, error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(error)
    if accelerator.is_main_process:
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def _finish_save(tmp: Path, final: Path, marker: dict) -> None:
    """Record and fsync the files, write the marker last, rename `tmp` to `final` and fsync the parent folder."""
    marker["files"] = record_files(tmp)
    write_json_durably(tmp / CHECKPOINT_MARKER, marker)
    fsync_directory(tmp)
    if final.exists():
        (final / CHECKPOINT_MARKER).unlink(missing_ok=True)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_directory(final.parent)


def upgrade_checkpoint(path: Path) -> Path:
    """Convert a checkpoint of an older train_pmf.py in place: its pickled EMA / sampler state
    (`custom_checkpoint_*.pkl`, read with `torch.load(weights_only=True)`, which runs no code: anything else is refused)
    becomes `training_state.safetensors` + `.json`, and the marker gets the checksums of the files as they are now."""
    from .checkpoint_files import _check_torch_pickle

    path = Path(path)
    meta = read_marker(path)
    if "files" in meta:
        return path
    pickles = sorted((p for p in path.iterdir() if _LEGACY_STATE.fullmatch(p.name)),
                     key=lambda p: int(_LEGACY_STATE.fullmatch(p.name).group(1)))
    states = {}
    for file in pickles:
        _check_torch_pickle(path, file.name)
        state = torch.load(file, map_location="cpu", weights_only=True)
        states["objective_rng" if set(state) == {"seed"} else "ema"] = state
    check_pickles(path)
    write_training_state(path, states)
    for file in pickles:
        file.unlink()
    meta["files"] = record_files(path)
    write_json_durably(path / CHECKPOINT_MARKER, meta)
    fsync_directory(path)
    logger.info(f"Upgraded {path}: {len(pickles)} pickled state file(s) now in {TRAINING_STATE_TENSORS}.")
    return path
