# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The files of a training checkpoint: written durably, recorded by sha256, verified, and safe to load.

* [`record_files`] fsyncs every file and folder of a checkpoint and returns its manifest (size and sha256 of each
  file), which the completion marker keeps; [`verify_files`] checks a checkpoint against it before anything is loaded.
* [`check_pickles`] proves that every pickle a resume would read (accelerate's `optimizer.bin`, `scheduler.bin`,
  `random_states_*.pkl`, `scaler.pt`; a DCP folder's `.metadata` and its pickled non-tensor entries under FSDP2)
  holds nothing but tensors, numbers, strings and containers, by reading it with `torch.load(weights_only=True)` or an
  allowlist unpickler first. accelerate's own loaders then only meet data that cannot run code, even where they use a
  full unpickler (DCP) or hide a failure (accelerate's RNG-state loader logs it at info level and carries on).
* [`is_disk_full`] recognises the forms a full disk takes while saving (`OSError(ENOSPC)`, torch's zip writer
  `RuntimeError`, safetensors' `SafetensorError`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointError",
    "CheckpointSaveError",
    "check_pickles",
    "is_disk_full",
    "read_marker",
    "record_files",
    "sha256_file",
    "verify_files",
    "write_json_durably",
]

CHECKPOINT_MARKER = "pmf_checkpoint.json"
# Files that a resume unpickles: accelerate's torch.save files and torch.distributed.checkpoint (DCP) folders.
_TORCH_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
_DCP_METADATA = ".metadata"
_LOADABLE_SUFFIXES = _TORCH_PICKLE_SUFFIXES + (".distcp", _DCP_METADATA, ".safetensors", ".json")
_DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded", "PytorchStreamWriter failed",
                    "enforce fail at inline_container")


class CheckpointError(ValueError):
    """A folder that is not a usable training checkpoint for this run (the message names the file)."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoints are untouched."""


# ------------------------------------------------------------------------------------------------ writing durably


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk. Folders cannot be opened for syncing on Windows."""
    if directory and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # a file system without fsync (some network mounts) is not an error
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    _fsync_path(Path(path), directory=True)


def write_json_durably(path: Path, value) -> None:
    """Write `value` as JSON and fsync the file (the caller fsyncs the folder)."""
    with open(path, "w") as handle:
        handle.write(json.dumps(value, indent=2, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def record_files(folder: Path, exclude: Iterable[str] = (CHECKPOINT_MARKER,)) -> dict[str, dict]:
    """fsync every file and sub-folder of `folder` and return `{relative path: {"size", "sha256"}}` (POSIX paths)."""
    folder, exclude = Path(folder), set(exclude)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            fsync_directory(path)
            continue
        relative = path.relative_to(folder).as_posix()
        if relative in exclude:
            continue
        _fsync_path(path)
        files[relative] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def is_disk_full(error: BaseException) -> bool:
    """Whether an exception raised while writing a checkpoint means that the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in _DISK_FULL_TEXTS)


# ---------------------------------------------------------------------------------------------------- verifying


def read_marker(path: Path) -> dict:
    """The completion marker of checkpoint `path`; [`CheckpointError`] naming it when it is empty or not JSON."""
    marker = Path(path) / CHECKPOINT_MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        size = marker.stat().st_size if marker.is_file() else None
        detail = "is empty" if size == 0 else f"cannot be read ({type(err).__name__}: {err})"
        raise CheckpointError(f"Checkpoint {path} is damaged: its completion marker {CHECKPOINT_MARKER} {detail}.") from None
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise CheckpointError(f"Checkpoint {path} is damaged: {CHECKPOINT_MARKER} holds no global_step.")
    return meta


def verify_files(path: Path, manifest: dict[str, dict]) -> None:
    """Check every file of checkpoint `path` against the manifest its marker recorded (presence, size, sha256), and
    refuse loadable files that were not written with it. Raises [`CheckpointError`] naming the first broken file."""
    path = Path(path)
    for relative, expected in manifest.items():
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: {relative} is missing.")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {relative} has {size} bytes, {expected['size']} were written "
                "(truncated or replaced)."
            )
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {relative} does not match the sha256 recorded when it was saved."
            )
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).as_posix()
        if file.is_file() and relative != CHECKPOINT_MARKER and relative not in manifest and (
            file.suffix in _LOADABLE_SUFFIXES or file.name == _DCP_METADATA
        ):
            raise CheckpointError(
                f"Checkpoint {path} holds {relative}, which was not written with it: refusing to resume from it "
                "(a loaded foreign file could change the run, and a pickle can run code). Remove that file."
            )


# --------------------------------------------------------------------------------------------- pickles, checked


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file allowing only the classes such a file is made of."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as dcp_metadata

            if isinstance(getattr(dcp_metadata, name, None), type):  # its dataclasses and enums
                return getattr(dcp_metadata, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's DCP metadata")


def _unsafe(path: Path, relative: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path} is refused: {relative} holds pickled objects other than tensors, numbers, strings and "
        f"containers ({reason}). Loading it could run code; use a checkpoint written by train_pmf.py."
    )


def _check_torch_pickle(path: Path, relative: str) -> None:
    """`torch.load(weights_only=True)` with accelerate's allowlist (numpy RNG states); mmap: tensors are not read."""
    from accelerate.utils import load as accelerate_load

    file = path / relative
    try:
        try:
            accelerate_load(file, map_location="cpu", mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            accelerate_load(file, map_location="cpu")  # the legacy (non-zip) format cannot be mapped
    except pickle.UnpicklingError as err:
        raise _unsafe(path, relative, str(err).splitlines()[0]) from None
    except Exception as err:  # a damaged archive; without a manifest (legacy checkpoints) this is where it shows
        raise CheckpointError(f"Checkpoint {path} is damaged: {relative} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}).") from None


def _check_dcp_folder(path: Path, relative: str) -> None:
    """A DCP folder's `.metadata` (allowlist unpickler) and every pickled non-tensor entry it points to."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = (path / relative).parent
    try:
        with open(path / relative, "rb") as handle:
            metadata = _DCPMetadataUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        raise _unsafe(path, relative, str(err)) from None
    except Exception as err:
        raise CheckpointError(f"Checkpoint {path} is damaged: {relative} cannot be read ({type(err).__name__}).") from None
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        item = f"{Path(relative).parent.as_posix()}/{info.relative_path} (entry {index.fqn})"
        if info.transform_descriptors:
            raise CheckpointError(f"Checkpoint {path}: {item} is stored with transforms {info.transform_descriptors}, "
                                  "which this check cannot read; refusing to unpickle it.")
        with open(folder / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            data = handle.read(info.length)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _unsafe(path, item, str(err).splitlines()[0]) from None
        except Exception as err:
            raise CheckpointError(f"Checkpoint {path} is damaged: {item} cannot be read ({type(err).__name__}).") from None


def check_pickles(path: Path) -> None:
    """Raise [`CheckpointError`] unless every pickle a resume from `path` would read is plain data (see the module
    docstring)."""
    path = Path(path)
    for file in sorted(path.rglob("*")):
        if not file.is_file():
            continue
        relative = file.relative_to(path).as_posix()
        if file.name == _DCP_METADATA:
            _check_dcp_folder(path, relative)
        elif file.suffix in _TORCH_PICKLE_SUFFIXES:
            _check_torch_pickle(path, relative)
