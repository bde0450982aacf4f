# Copyright 2026 The pmf-diffusers developers. MIT License.
"""One meaning of "a model" everywhere: [`load_pipeline`] turns a source string into a `PMFPipeline` for the CLI, the
Space, the evaluation and the training script.

A source is one of
* `"bundled"` (or `None`): the default model shipped inside the package, the small toy-shapes model (works offline);
* the name of a bundled model: `"toy-shapes"` or `"digits"` (real handwritten digits; see `pmf_diffusers.bundled`).
  A bundled name wins over a local folder of the same name: write `./digits` for the folder;
* an existing folder: a saved `PMFPipeline` (`save_pretrained`, `pmf convert`, `examples/train_pmf.py` output);
* an official size name (`pMF-B/16`, `b16`, `pmf-b-16`, …): the released weights, downloaded and converted once by
  [`load_official`], then served from the cache;
* a Hub repo id (`namespace/name`) of a `PMFPipeline`.

torch and diffusers are imported only when a pipeline is loaded, so light code can use the helpers here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .bundled import bundled_model_names
from .official import OFFICIAL_PRESETS, OFFICIAL_REPO_ID, OfficialPreset, default_cache_dir, resolve_preset

if TYPE_CHECKING:
    import torch

    from .pipelines.pipeline_pmf import PMFPipeline

__all__ = [
    "BUNDLED",
    "load_pipeline",
    "load_official",
    "converted_official_folder",
    "hub_offline",
    "looks_like_repo_id",
    "is_official_size_name",
]

BUNDLED = "bundled"


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (`HF_HUB_OFFLINE`), read at call time."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def looks_like_repo_id(text: object) -> bool:
    """Whether `text` is a valid Hub repo id `namespace/name` and not an existing local path."""
    if not isinstance(text, str) or text.count("/") != 1 or Path(text).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def is_official_size_name(text: object) -> bool:
    """Whether `text` names one of the released sizes (any spelling [`resolve_preset`] accepts)."""
    if not isinstance(text, str):
        return False
    try:
        resolve_preset(text)
    except ValueError:
        return False
    return True


def converted_official_folder(size: str | OfficialPreset, cache_dir: str | Path | None = None) -> Path:
    """The folder where [`load_official`] keeps the converted pipeline of `size` (under [`default_cache_dir`] unless
    `cache_dir` is given); it holds a `model_index.json` once the size has been converted."""
    preset = resolve_preset(size) if isinstance(size, str) else size
    return Path(cache_dir or default_cache_dir()) / preset.name.replace("/", "-")


def load_official(
    size: str | OfficialPreset = "pMF-B/16",
    cache_dir: str | Path | None = None,
    repo_id: str = OFFICIAL_REPO_ID,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
) -> PMFPipeline:
    """The released pMF weights in one line: download the official `.pt` of `size` from the Hub (`Lyy0725/pMF`),
    convert it once, cache the converted pipeline folder (under [`default_cache_dir`]) and return the pipeline.

    Example: `pipe = pmf_diffusers.load_official("pMF-B/16")`, then `pipe(class_labels="golden retriever")`.

    Raises:
        ConnectionError: when the size is not cached and the Hub is unreachable.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .conversion import convert_checkpoint
    from .pipelines.pipeline_pmf import PMFPipeline

    preset = resolve_preset(size) if isinstance(size, str) else size
    folder = converted_official_folder(preset, cache_dir)
    if not (folder / "model_index.json").is_file():
        try:
            checkpoint_path = hf_hub_download(repo_id, preset.filename, revision=revision)
        except LocalEntryNotFoundError:
            raise ConnectionError(
                f"{preset.name} is not cached and the Hub is unreachable (offline). On a connected machine run "
                f"`pmf convert {preset.name} OUTPUT_DIR`, or download {repo_id}/{preset.filename} and run "
                f"`pmf convert {preset.filename} {folder} --preset {preset.name}`."
            ) from None
        # convert_checkpoint saves next to the folder and moves model_index.json in last, so an interrupted conversion
        # never looks like a cached one; overwrite replaces only the files of an earlier, interrupted conversion.
        convert_checkpoint(checkpoint_path, folder, preset=preset, overwrite=True)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return PMFPipeline.from_pretrained(folder, **kwargs)


def _unknown_source(source: str) -> ValueError:
    return ValueError(
        f"unknown model {source!r}: use 'bundled', a bundled model ({', '.join(bundled_model_names())}), a "
        f"PMFPipeline folder, an official size ({', '.join(OFFICIAL_PRESETS)}) or a Hub repo id namespace/name"
    )


def load_pipeline(
    source: str | Path | None = BUNDLED,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> PMFPipeline:
    """Load a `PMFPipeline` from `source` (see the module docstring for what a source can be).

    Args:
        source: `"bundled"`/`None`, a bundled model's name, a folder, an official size name or a Hub repo id.
        dtype: dtype of the weights (default: as saved).
        device: device to move the pipeline to (default: stay on the CPU).

    Raises:
        ValueError: for a source that is none of the above (e.g. a checkpoint file, which needs converting first),
            or a device that cannot be used.
        FileNotFoundError: for a `Path` that does not exist, or a missing bundled model.
        ConnectionError: for an official size that is not cached while the Hub is unreachable.
        OSError: when a Hub repo cannot be loaded as a `PMFPipeline`.
    """
    from .bundled import load_bundled_pipeline
    from .pipelines.pipeline_pmf import PMFPipeline

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if source is None or source == BUNDLED:
        pipe = load_bundled_pipeline(**kwargs)
    elif isinstance(source, str) and source in bundled_model_names():
        pipe = load_bundled_pipeline(source, **kwargs)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            pipe = PMFPipeline.from_pretrained(path, **kwargs)
        elif path.exists():
            raise ValueError(
                f"{str(path)!r} is a file; a PMFPipeline folder is expected (convert an official checkpoint with "
                "`pmf convert` or pmf_diffusers.conversion.convert_checkpoint)"
            )
        elif isinstance(source, Path):
            raise FileNotFoundError(f"no PMFPipeline folder at {str(path)!r}")
        elif is_official_size_name(source):
            pipe = load_official(source, dtype=dtype)
        elif looks_like_repo_id(source):
            try:
                pipe = PMFPipeline.from_pretrained(source, **kwargs)
            except OSError as error:
                raise OSError(
                    f"could not load {source!r} from the Hub as a PMFPipeline: {' '.join(str(error).split())[:300]}"
                ) from error
        else:
            raise _unknown_source(str(source))
    if device is None:
        return pipe
    try:
        return pipe.to(device)
    except (RuntimeError, AssertionError) as error:  # e.g. CUDA requested on a machine without it
        raise ValueError(f"cannot use device {str(device)!r}: {' '.join(str(error).split())[:200]}") from None
