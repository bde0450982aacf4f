# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`from_single_file` for pMF: load a released official checkpoint (`.pt`) or a `.safetensors` file straight into a
[`PMFTransformer2DModel`] or a [`PMFPipeline`], without a `pmf convert` step.

diffusers' own `FromSingleFileMixin` / `FromOriginalModelMixin` only know the classes inside diffusers, so these
mixins follow their conventions (the argument names `config`, `torch_dtype`, `cache_dir`, `token`, `revision`,
`local_files_only`, `force_download`, and the Hub file forms `https://huggingface.co/<repo>/blob/main/<file>` and
`<repo>/<file>`) on top of the same strict, safe conversion as `pmf convert` (`pmf_diffusers.conversion`): the file
is read with `torch.load(weights_only=True)`, every key and shape is checked, and NaN/inf weights are refused.

The conversion modules import the model and pipeline modules, so they are imported inside the methods.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote

from diffusers.utils import logging

from ..official import (
    OFFICIAL_REPO_ID,
    CheckpointConversionError,
    OfficialPreset,
    check_preset,
    match_preset,
    resolve_preset,
)

if TYPE_CHECKING:
    import torch

logger = logging.get_logger(__name__)

__all__ = [
    "AUTO_PRESET",
    "HubFileReference",
    "PMFFromOriginalModelMixin",
    "PMFFromSingleFileMixin",
    "parse_hub_file_reference",
    "resolve_single_file",
]

# `preset="auto"`: use the released size whose shapes the checkpoint has (and 1000 classes), if any.
AUTO_PRESET = "auto"
# Hosts of Hub file URLs (diffusers' VALID_URL_PREFIXES without the scheme).
HUB_HOSTS = ("huggingface.co", "hf.co")


class HubFileReference(NamedTuple):
    """A file on the Hub: repo id, path of the file in the repo, and the revision the reference names (or `None`)."""

    repo_id: str
    filename: str
    revision: str | None


def parse_hub_file_reference(reference: str) -> HubFileReference | None:
    """The Hub file a string names, or `None` if it names none.

    Accepted forms (diffusers' single-file forms, plus any revision and `resolve/` links):
    `https://huggingface.co/<namespace>/<repo>/blob/<revision>/<path>`, the same with `resolve/` instead of `blob/`,
    `hf.co` instead of `huggingface.co` or without `https://`, and the short form `<namespace>/<repo>/<path>`.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = reference.strip()
    is_url = False
    for scheme in ("https://", "http://"):
        if text.startswith(scheme):
            text, is_url = text[len(scheme) :], True
    host, _, rest = text.partition("/")
    if host in HUB_HOSTS:
        text, is_url = rest, True
    elif is_url:
        return None  # a link to another site
    if is_url:  # a browser link may carry `?download=true` or an anchor
        text = text.split("?")[0].split("#")[0]
    parts = text.split("/")
    if is_url:  # and %-escapes, e.g. in the revision refs%2Fpr%2F1
        parts = [unquote(part) for part in parts]
    if len(parts) < 3 or "" in parts:
        return None
    repo_id, path_parts, revision = "/".join(parts[:2]), parts[2:], None
    if path_parts[0] in ("blob", "resolve") and len(path_parts) >= 3:
        revision, path_parts = path_parts[1], path_parts[2:]
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubFileReference(repo_id, "/".join(path_parts), revision)


def resolve_single_file(
    pretrained_model_link_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
) -> Path:
    """The local path of a checkpoint given as a local file or a Hub file (downloaded into the huggingface_hub cache,
    or `cache_dir`, with `hf_hub_download`; offline mode and `local_files_only` use the cache only).

    Raises:
        ValueError: for a folder, or a Hub link whose revision differs from `revision`.
        FileNotFoundError: for something that is neither a local file nor a Hub file, or a Hub file that is not
            cached while the Hub cannot be reached.
        OSError: when the Hub refuses the download (unknown repo or revision, gated repo without a token).
    """
    path = Path(pretrained_model_link_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a folder; from_single_file loads one checkpoint file (load a PMFPipeline folder with "
            "PMFPipeline.from_pretrained)."
        )
    reference = parse_hub_file_reference(str(pretrained_model_link_or_path))
    if reference is None:
        raise FileNotFoundError(_not_a_file_message(str(pretrained_model_link_or_path)))
    if revision is not None and reference.revision is not None and revision != reference.revision:
        raise ValueError(
            f"The link names revision {reference.revision!r} but revision={revision!r} was given; give one of them."
        )

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = revision or reference.revision
    where = f"{reference.repo_id}/{reference.filename}" + (f" (revision {revision})" if revision else "")
    try:
        downloaded = hf_hub_download(
            reference.repo_id,
            reference.filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=bool(local_files_only),
            force_download=force_download,
        )
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass
        raise FileNotFoundError(
            f"{str(pretrained_model_link_or_path)!r} is not a local file, and the Hub file {where} is not in the "
            "cache while the Hub cannot be used (offline, or local_files_only=True); download it on a connected "
            "machine, or pass the path of a local copy."
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"The Hub repo {reference.repo_id} has no file {reference.filename!r}.") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        reason = str(error).strip().splitlines()[0]
        raise OSError(f"Could not download {where}: {reason} (a private or gated repo needs token=...).") from None
    return Path(downloaded)


def _not_a_file_message(text: str) -> str:
    message = (
        f"{text!r} is neither a local file nor a Hub file; give a checkpoint path, "
        "https://huggingface.co/<namespace>/<repo>/blob/main/<file> or <namespace>/<repo>/<file>."
    )
    try:
        preset = resolve_preset(text)
    except ValueError:
        return message
    return (
        f"{message} The released {preset.name} is {OFFICIAL_REPO_ID}/{preset.filename} "
        f"(or use pmf_diffusers.load_official({preset.name!r}))."
    )


def _read_checkpoint(pretrained_model_link_or_path_or_dict, **hub_kwargs) -> tuple[str, dict, dict]:
    """(name of the source for messages, converted config, converted weights)."""
    from ..conversion import convert_official_state_dict, load_official_checkpoint

    if isinstance(pretrained_model_link_or_path_or_dict, Mapping):
        return ("The checkpoint", *convert_official_state_dict(pretrained_model_link_or_path_or_dict))
    if not isinstance(pretrained_model_link_or_path_or_dict, (str, os.PathLike)):
        raise TypeError(
            "from_single_file expects a checkpoint path, a Hub file link or a state dict, got "
            f"{type(pretrained_model_link_or_path_or_dict).__name__}."
        )
    path = resolve_single_file(pretrained_model_link_or_path_or_dict, **hub_kwargs)
    state_dict = load_official_checkpoint(path)
    try:
        config, weights = convert_official_state_dict(state_dict)
    except CheckpointConversionError as error:  # name the file the error is about
        raise CheckpointConversionError(f"{path}: {error}") from None
    return str(path), config, weights


def _checked_dtype(torch_dtype, dtype):
    import torch

    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"Give torch_dtype or dtype, not both (got {torch_dtype} and {dtype}).")
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is not None and not isinstance(chosen, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype such as torch.bfloat16, got {chosen!r}.")
    return chosen


def _cast_weights(weights: dict, torch_dtype) -> dict:
    """The weights in `torch_dtype`, cast before the model is built, as `from_pretrained(torch_dtype=...)` does (the
    complex RoPE table is rebuilt by the model and stays complex64)."""
    if torch_dtype is None:
        return weights
    return {name: tensor.to(torch_dtype) if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def _load_transformer_config(config, subfolder: str | None, **hub_kwargs) -> dict:
    """A `PMFTransformer2DModel` config given as a dict, or as a model / pipeline folder or Hub repo id (`config.json`
    at the top, else in `transformer/`)."""
    from ..models.transformer_pmf import PMFTransformer2DModel

    if isinstance(config, Mapping):
        loaded = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        loaded, subfolders = None, [subfolder] if subfolder is not None else [None, "transformer"]
        for candidate in subfolders:
            try:
                loaded = PMFTransformer2DModel.load_config(str(config), subfolder=candidate, **hub_kwargs)
                break
            except OSError:
                continue
        if loaded is None:
            looked_in = " or ".join(f"{name}/config.json" if name else "config.json" for name in subfolders)
            raise OSError(f"No PMFTransformer2DModel config found in {str(config)!r} (looked for {looked_in}).")
    else:
        raise TypeError(f"config must be a dict, a folder or a Hub repo id, got {type(config).__name__}.")
    class_name = loaded.get("_class_name")
    if class_name is not None and class_name != PMFTransformer2DModel.__name__:
        raise ValueError(f"config {str(config)!r} is a {class_name} config, not a PMFTransformer2DModel config.")
    return loaded


def _merge_transformer_config(source: str, inferred: dict, given: dict) -> dict:
    """The checkpoint's inferred architecture plus the settings of `given` that shapes cannot tell (e.g. `rope_theta`,
    `norm_eps`); a shape that `given` contradicts is an error."""
    from ..models.transformer_pmf import PMFTransformer2DModel

    conflicts = [
        f"{name} {given[name]!r} (the checkpoint has {value!r})"
        for name, value in inferred.items()
        if name in given and given[name] != value
    ]
    if conflicts:
        raise CheckpointConversionError(
            f"{source} contradicts the given config: {', '.join(conflicts)}. Give the config that belongs to this "
            "checkpoint, or none (the architecture is read from the checkpoint's shapes)."
        )
    parameters = set(inspect.signature(PMFTransformer2DModel.__init__).parameters) - {"self"}
    ignored = sorted(name for name in given if name not in parameters and not name.startswith("_"))
    if ignored:
        logger.warning(f"Ignoring config entries that PMFTransformer2DModel does not take: {', '.join(ignored)}.")
    return {**inferred, **{name: value for name, value in given.items() if name in parameters and name not in inferred}}


class PMFFromOriginalModelMixin:
    """Adds [`~PMFFromOriginalModelMixin.from_single_file`] to [`PMFTransformer2DModel`] (diffusers'
    `FromOriginalModelMixin` counterpart)."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path_or_dict: str | os.PathLike | Mapping,
        *,
        config: str | os.PathLike | Mapping | None = None,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
    ):
        r"""
        Load the transformer from an official pMF checkpoint (the released `.pt`, a training-mode state dict or a
        `.safetensors` file with the official names). The architecture is read from the tensor shapes; the model is
        in evaluation mode.

        Args:
            pretrained_model_link_or_path_or_dict (`str`, `os.PathLike` or `dict`):
                A local file, a Hub file (`https://huggingface.co/<namespace>/<repo>/blob/main/<file>` or
                `<namespace>/<repo>/<file>`), or an already loaded state dict.
            config (`str`, `os.PathLike` or `dict`, *optional*):
                A `PMFTransformer2DModel` config: a dict, or a model or pipeline folder / Hub repo id (`config.json`,
                else `transformer/config.json`, or `subfolder`). Its shapes must agree with the checkpoint's; its
                other settings (`rope_theta`, `norm_eps`) are used.
            subfolder (`str`, *optional*): Where the config lies inside `config`.
            torch_dtype (`torch.dtype`, *optional*): Cast the weights to this dtype (default: float32). `dtype` is
                accepted as an alias, as in diffusers.
            cache_dir, token, revision, local_files_only, force_download: As for `hf_hub_download`, for a Hub file
                (and a Hub `config`). A revision in the link (`blob/<revision>/`) is used when `revision` is not
                given.

        Raises:
            CheckpointConversionError (a `ValueError`): for a file that is not plain weights or not a pMF checkpoint,
                missing, unexpected or mis-shaped keys (named as we name them and as the file spells them), NaN/inf
                weights, or a contradicting `config`.
            FileNotFoundError, OSError: for a file that cannot be found or downloaded.

        Example:
            ```py
            >>> from pmf_diffusers import PMFTransformer2DModel

            >>> transformer = PMFTransformer2DModel.from_single_file(
            ...     "https://huggingface.co/Lyy0725/pMF/blob/main/pMF-B-16.pt", torch_dtype=torch.bfloat16
            ... )
            ```
        """
        from ..conversion import build_transformer

        torch_dtype = _checked_dtype(torch_dtype, dtype)
        hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        source, model_config, weights = _read_checkpoint(
            pretrained_model_link_or_path_or_dict, revision=revision, force_download=force_download, **hub_kwargs
        )
        if config is not None:
            given = _load_transformer_config(config, subfolder, **hub_kwargs)
            model_config = _merge_transformer_config(source, model_config, given)
        return build_transformer(model_config, _cast_weights(weights, torch_dtype))


def _chosen_preset(source: str, preset: str | OfficialPreset | None, config: dict) -> OfficialPreset | None:
    if preset == AUTO_PRESET:
        matched = match_preset(config, num_classes=config["num_classes"])
        if matched is not None:
            logger.info(f"{source} has the shapes of {matched.name}: using its sampling settings (preset=None for none).")
        return matched
    if preset is None:
        return None
    preset = resolve_preset(preset) if isinstance(preset, str) else preset
    check_preset(config, preset)
    return preset


def _folder_sampling_settings(config, **hub_kwargs) -> tuple[dict, dict, dict]:
    """(sampling settings, scheduler config, transformer config) of a PMFPipeline folder or Hub repo id."""
    from ..pipelines.pipeline_pmf import PMFPipeline
    from ..schedulers.scheduling_pmf import PMFScheduler

    try:
        pipeline_config = PMFPipeline.load_config(str(config), **hub_kwargs)
        scheduler_config = PMFScheduler.load_config(str(config), subfolder="scheduler", **hub_kwargs)
    except OSError:
        raise OSError(
            f"{str(config)!r} is not a PMFPipeline folder or Hub repo (model_index.json and scheduler/ are needed)."
        ) from None
    settings = {
        "noise_scale": scheduler_config.get("noise_scale"),
        "guidance_scale": pipeline_config.get("default_guidance_scale"),
        "guidance_interval": pipeline_config.get("default_guidance_interval"),
        "id2label": pipeline_config.get("id2label"),
    }
    transformer_config = _load_transformer_config(config, "transformer", **hub_kwargs)
    return settings, scheduler_config, transformer_config


class PMFFromSingleFileMixin:
    """Adds [`~PMFFromSingleFileMixin.from_single_file`] to [`PMFPipeline`] (diffusers' `FromSingleFileMixin`
    counterpart)."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike | Mapping,
        *,
        preset: str | OfficialPreset | None = AUTO_PRESET,
        noise_scale: float | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        id2label: dict[int, str] | None = None,
        config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
    ):
        r"""
        Build a pipeline from an official pMF checkpoint, as `pmf convert` does, without writing a folder: same strict
        key checks, same safe loading, same weights, config and images.

        Args:
            pretrained_model_link_or_path (`str`, `os.PathLike` or `dict`):
                A local file, a Hub file (`https://huggingface.co/<namespace>/<repo>/blob/main/<file>` or
                `<namespace>/<repo>/<file>`), or an already loaded state dict.
            preset (`str`, `OfficialPreset` or `None`, defaults to `"auto"`):
                The released size whose sampling settings (noise scale, default ω and guidance interval) to use, as
                `pmf convert --preset`; its shapes must match the checkpoint's. `"auto"`: the size whose shapes the
                checkpoint has (1000 classes), if any. `None`: no preset (noise scale 1, ω 1, interval [0, 1] unless
                set below).
            noise_scale, guidance_scale, guidance_interval (*optional*): Set or override the sampling settings.
            id2label (`dict[int, str]`, *optional*): Class names (default: the ImageNet names for 1000 classes).
            config (`str` or `os.PathLike`, *optional*):
                A PMFPipeline folder or Hub repo id whose configs to use instead of a preset: the transformer config
                (its shapes must agree with the checkpoint's), the scheduler and the sampling defaults and class names
                of `model_index.json`.
            torch_dtype (`torch.dtype`, *optional*): dtype of the transformer (default: float32); `dtype` is an alias.
            cache_dir, token, revision, local_files_only, force_download: As for `hf_hub_download`, for a Hub file.

        Raises:
            CheckpointConversionError (a `ValueError`): for a file that is not plain weights or not a pMF checkpoint,
                missing, unexpected or mis-shaped keys (named as we name them and as the file spells them), NaN/inf
                weights, or a preset or config whose shapes contradict the checkpoint.
            ValueError: for invalid sampling settings or `torch_dtype`.
            FileNotFoundError, OSError: for a file that cannot be found or downloaded.

        Example:
            ```py
            >>> from pmf_diffusers import PMFPipeline

            >>> pipe = PMFPipeline.from_single_file("Lyy0725/pMF/pMF-B-16.pt", preset="pMF-B/16")
            >>> image = pipe(class_labels="golden retriever").images[0]
            ```
        """
        from ..conversion import build_pipeline
        from ..pipelines.pipeline_pmf import check_guidance_settings
        from ..schedulers.scheduling_pmf import PMFScheduler, check_noise_scale

        # The cheap checks first, before any download or conversion.
        torch_dtype = _checked_dtype(torch_dtype, dtype)
        if noise_scale is not None:
            check_noise_scale(noise_scale)
        check_guidance_settings(guidance_scale, guidance_interval)
        if config is not None and not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"config must be a PMFPipeline folder or Hub repo id, got {type(config).__name__}.")
        if config is not None and preset not in (AUTO_PRESET, None):
            raise ValueError("Give preset or config, not both: both set the sampling settings.")

        hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        source, model_config, weights = _read_checkpoint(
            pretrained_model_link_or_path, revision=revision, force_download=force_download, **hub_kwargs
        )
        settings, scheduler_config = {}, None
        if config is not None:
            settings, scheduler_config, given = _folder_sampling_settings(config, **hub_kwargs)
            model_config = _merge_transformer_config(source, model_config, given)
        else:
            chosen = _chosen_preset(source, preset, model_config)
            if chosen is not None:
                settings = {
                    "noise_scale": chosen.noise_scale,
                    "guidance_scale": chosen.guidance_scale,
                    "guidance_interval": chosen.guidance_interval,
                }
            elif preset == AUTO_PRESET and None in (noise_scale, guidance_scale, guidance_interval):
                logger.warning(
                    f"{source} does not have the shapes of a released pMF size, so no preset applies: unless set, the "
                    "noise scale is 1, ω 1 (no guidance) and the interval [0, 1]. Pass noise_scale=, guidance_scale= "
                    "and guidance_interval=, or preset=None to silence this."
                )
        explicit = {
            "noise_scale": noise_scale,
            "guidance_scale": guidance_scale,
            "guidance_interval": guidance_interval,
            "id2label": id2label,
        }
        settings.update({name: value for name, value in explicit.items() if value is not None})
        settings = {name: value for name, value in settings.items() if value is not None}
        if "guidance_interval" in settings:
            settings["guidance_interval"] = tuple(settings["guidance_interval"])

        pipe = build_pipeline(model_config, _cast_weights(weights, torch_dtype), **settings)
        if scheduler_config is not None:  # the folder's whole scheduler config, not only its noise scale
            pipe.scheduler = PMFScheduler.from_config(scheduler_config, noise_scale=pipe.scheduler.config.noise_scale)
        return pipe
