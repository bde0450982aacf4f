# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The pMF LoRA adapter format and [`PMFLoraLoaderMixin`], the LoRA loader of [`PMFPipeline`].

Two kinds of things change when pMF is adapted to your own classes:

* **LoRA weights** (low-rank updates of the block linears). They live in a standard diffusers LoRA file,
  `pytorch_lora_weights.safetensors` (keys `transformer.<module>.lora_A/B.weight`, peft config in the safetensors
  header), which any diffusers/peft tool can read.
* **The class-embedding table** (`transformer.class_embedder`, K + 1 rows, the last one the null class). A new label
  set needs a new table, and the table is a full weight, not a low-rank update.

diffusers' `load_lora_weights` rejects a LoRA file with *any* key that does not contain the substring `"lora"`
(`"Invalid LoRA checkpoint"`), so the table cannot travel in the LoRA file without breaking every other reader.
It travels in its own file instead, next to the LoRA file:

    my_adapter/
      pytorch_lora_weights.safetensors   standard LoRA file (only `lora_A` / `lora_B` keys + peft metadata)
      pmf_adapter_config.json            sidecar: the base model's shape, the label set (`id2label`), file names
      class_embeddings.safetensors       only for a new / retrained label set: `class_embedder.weight`, (K + 1, D)

[`PMFLoraLoaderMixin.load_lora_weights`] reads all three: it validates the sidecar against the loaded model, loads
the LoRA through peft, then swaps in the class table and the pipeline's `id2label`. Other tools that only know the
LoRA file still load it, but without the new classes.

This module holds only what loading and saving an adapter needs; the training side (adding adapters, new class
tables, exporting a trained adapter) is `pmf_diffusers.training.lora`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import validate_hf_hub_args
from torch import nn

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, LoraBaseMixin, _fetch_state_dict
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA
from diffusers.utils import logging, require_peft_backend

from ..labels import validate_id2label
from .safe_weights import (
    check_no_pickle_weights,
    is_pickle_weights_file,
    non_finite_tensor_names,
    refuse_pickle_weights,
)

logger = logging.get_logger(__name__)


ADAPTER_CONFIG_NAME = "pmf_adapter_config.json"
CLASS_EMBEDDINGS_NAME = "class_embeddings.safetensors"
CLASS_EMBEDDINGS_KEY = "class_embedder.weight"
ADAPTER_FORMAT = "pmf-lora"
ADAPTER_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# The base model and the class table
# --------------------------------------------------------------------------------------------------------------
_BASE_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "num_layers",
    "num_head_layers",
    "num_attention_heads",
    "attention_head_dim",
    "mlp_hidden_dim",
    "bottleneck_dim",
    "num_classes",
)


def pmf_base_model_info(transformer: nn.Module, **extra: Any) -> dict[str, Any]:
    """The base model's shape as recorded in the adapter sidecar (`num_classes` is the *base* model's count, also
    after [`replace_class_table`]). Extra keys (e.g. `name_or_path="…"`) are stored as given."""
    config = transformer.config
    info = {
        "sample_size": int(config.sample_size),
        "patch_size": int(config.patch_size),
        "in_channels": int(config.in_channels),
        "hidden_size": int(config.num_attention_heads * config.attention_head_dim),
        "num_layers": int(config.num_layers),
        "num_head_layers": int(config.num_head_layers),
        "num_attention_heads": int(config.num_attention_heads),
        "attention_head_dim": int(config.attention_head_dim),
        "mlp_hidden_dim": int(config.mlp_hidden_dim),
        "bottleneck_dim": int(config.bottleneck_dim),
        "num_classes": int(getattr(transformer, "_pmf_base_num_classes", config.num_classes)),
    }
    name_or_path = getattr(config, "_name_or_path", None)
    if name_or_path:
        info["name_or_path"] = str(name_or_path)
    info.update(extra)
    return info



def _install_class_table(transformer: nn.Module, table: torch.Tensor, trainable: bool) -> nn.Embedding:
    """Replace `transformer.class_embedder` by an embedding holding `table` ((K + 1, D), last row null) and set
    `config.num_classes = K`. The base model's class count is remembered (for the adapter sidecar)."""
    old = transformer.class_embedder
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] != old.embedding_dim:
        raise ValueError(
            f"A class table must have shape (num_classes + 1, {old.embedding_dim}) with num_classes ≥ 1, got "
            f"{tuple(table.shape)}."
        )
    if not hasattr(transformer, "_pmf_base_num_classes"):
        transformer._pmf_base_num_classes = int(transformer.config.num_classes)
    new = nn.Embedding(table.shape[0], table.shape[1], device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(table.to(device=old.weight.device, dtype=old.weight.dtype))
    new.weight.requires_grad_(trainable)
    transformer.class_embedder = new
    transformer.register_to_config(num_classes=table.shape[0] - 1)
    return new



# --------------------------------------------------------------------------------------------------------------
# Loader-side validation
# --------------------------------------------------------------------------------------------------------------
def _is_v_head_module(name: str) -> bool:
    name = name.removeprefix("transformer.")
    return name.startswith(("v_head_blocks.", "v_proj_out.", "v_norm_out.")) or name in ("v_proj_out", "v_norm_out")


def _linear_module_names(transformer: nn.Module) -> list[str]:
    """Names of the plain `nn.Linear` modules, seen through peft wrappers (`x.base_layer` → `x`; LoRA A/B skipped)."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in f".{name}":
            continue
        names.append(name.removesuffix(".base_layer"))
    return names


def _block_counts(module_names) -> dict[str, int]:
    """{"transformer_blocks": depth, "u_head_blocks": depth, ...} as seen in a list of module names."""
    counts: dict[str, int] = {}
    for name in module_names:
        match = re.match(r"(\w+_blocks)\.(\d+)\.", name)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def _check_base_model(saved: dict, transformer: nn.Module, source: str) -> None:
    current = pmf_base_model_info(transformer)
    mismatches = [
        f"{key} = {saved[key]} (adapter's base) vs {current[key]} (loaded model)"
        for key in _BASE_FIELDS
        if key in saved and saved[key] != current[key]
    ]
    if mismatches:
        base = f" ({saved['name_or_path']})" if saved.get("name_or_path") else ""
        raise ValueError(
            f"The LoRA adapter {source} was trained on a different base model{base}: {'; '.join(mismatches)}. "
            "Load it into a pipeline built from the same base checkpoint."
        )


def _check_lora_shapes(state_dict: dict[str, torch.Tensor], transformer: nn.Module, prefix: str, source: str):
    """Check every `lora_A` / `lora_B` tensor against the module it adapts (peft would only warn about missing
    modules, and its shape errors name no cause). v-head weights are dropped when the model has no v-head."""
    modules = dict(transformer.named_modules())
    has_v_head = bool(getattr(transformer.config, "with_v_head", True))
    kept, missing, mismatched, dropped = {}, [], [], 0
    for key, value in state_dict.items():
        name = key.removeprefix(f"{prefix}.") if prefix else key
        part = next((p for p in (".lora_A.", ".lora_B.") if p in name), None)
        if part is None:
            kept[key] = value
            continue
        module_name = name.split(part)[0]
        if not has_v_head and _is_v_head_module(module_name):
            dropped += 1
            continue
        kept[key] = value
        module = modules.get(module_name)
        if module is None:
            missing.append(module_name)
            continue
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear) or value.ndim != 2:
            continue
        if part == ".lora_A." and value.shape[1] != base.in_features:
            mismatched.append(f"{module_name}: lora_A in_features {value.shape[1]}, model {base.in_features}")
        if part == ".lora_B." and value.shape[0] != base.out_features:
            mismatched.append(f"{module_name}: lora_B out_features {value.shape[0]}, model {base.out_features}")
    if missing or mismatched:
        details = []
        if mismatched:
            details.append(f"shape mismatches ({len(mismatched)}), e.g. {'; '.join(mismatched[:3])}")
        if missing:
            unique = sorted(dict.fromkeys(missing))
            details.append(f"modules the model does not have ({len(unique)}), e.g. {', '.join(unique[:3])}")
        raise ValueError(
            f"The LoRA adapter {source} does not fit this model's shape — {'; '.join(details)}. It was trained on a "
            "different base model (other hidden size, MLP width or depth)."
        )
    if dropped:
        logger.info(f"Dropped {dropped} v-head LoRA tensors: this model has no v-head (not needed for sampling).")
    return kept


def _check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN / infinite weights (a diverged or corrupted export would otherwise load without a word)."""
    bad = non_finite_tensor_names(tensors.items())
    if bad:
        raise ValueError(
            f"{source} has NaN or infinite values in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}: the file is "
            "corrupt or comes from a diverged training run. Export the adapter again from a good checkpoint."
        )


def _check_adapter_covers_its_targets(
    state_dict: dict[str, torch.Tensor], metadata: dict | None, transformer: nn.Module, prefix: str, source: str
) -> None:
    """Refuse an adapter whose peft config targets layers it has no weights for.

    peft puts a LoRA layer on every module the saved config targets (`target_modules` are name suffixes such as
    `attn.to_q`) and only warns when the file lacks weights for some of them. That happens when the adapter was
    trained on a shallower base of the same width: the extra blocks would silently stay unadapted. v-head layers are
    exempt (sampling never runs them, and `save_pmf_lora(include_v_head=False)` leaves them out on purpose).
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = {
        key.removeprefix(f"{prefix}."): value for key, value in (metadata or {}).items() if key.startswith(f"{prefix}.")
    }
    if not config.get("target_modules"):
        return  # without a saved config diffusers targets exactly the modules in the file
    try:
        lora_config = LoraConfig(**config)
    except (TypeError, ValueError):
        return  # diffusers builds the same config next and reports the problem itself
    covered = {key.removeprefix(f"{prefix}.").split(".lora_")[0] for key in state_dict}
    targeted = [name for name in _linear_module_names(transformer) if check_target_module_exists(lora_config, name)]
    uncovered = [name for name in targeted if name not in covered and not _is_v_head_module(name)]
    if not uncovered:
        return
    adapter_depths, model_depths = _block_counts(covered), _block_counts(targeted)
    depths = "; ".join(
        f"{group}: {adapter_depths.get(group, 0)} in the adapter, {count} in this model"
        for group, count in model_depths.items()
        if adapter_depths.get(group, 0) != count and not _is_v_head_module(f"{group}.0.")
    )
    raise ValueError(
        f"The LoRA adapter {source} has no weights for {len(uncovered)} layer(s) its config targets in this model, "
        f"e.g. {', '.join(uncovered[:3])}"
        + (f" ({depths})" if depths else "")
        + ": it was trained on a different (shallower) base model, and those layers would stay unadapted. Load it "
        "into the base model it was trained on."
    )


def _warn_if_adapter_name_is_ambiguous(transformer: nn.Module, adapter_name: str) -> None:
    """Warn when diffusers' substring key filter will confuse `adapter_name` with other adapters' weights.

    diffusers picks the missing keys of the adapter being loaded with `adapter_name in key`, so a name that occurs
    inside other weights' names ("b" is in "transformer_blocks", "a" in "attn") makes it list every weight of the
    adapters already loaded as missing. The adapter itself loads correctly (peft matches names exactly), so this
    warns with the fix instead of refusing names that work.
    """
    clashes = []
    for name, _ in transformer.named_parameters():
        if ".lora_" in name and adapter_name in name:
            owner = name.split(".lora_", 1)[1].split(".")[1]  # `<module>.lora_A.<adapter>.weight`
            if owner != adapter_name:
                clashes.append(name)
    if not clashes:
        return
    suggestion = next(
        (
            candidate
            for candidate in (f"{adapter_name}_lora", f"adapter_{adapter_name}", f"pmf_adapter_{adapter_name}_")
            if not any(candidate in name for name, _ in transformer.named_parameters())
        ),
        f"{adapter_name}_lora",
    )
    logger.warning(
        f"Adapter name {adapter_name!r} occurs inside the names of other adapters' weights (e.g. {clashes[0]!r}). "
        "diffusers selects an adapter's keys by substring (`adapter_name in key`), so it will list those weights as "
        f"'missing keys' of {adapter_name!r}; that warning is false and the adapter loads correctly. To avoid it, "
        f"use a name that occurs in no parameter name, e.g. adapter_name={suggestion!r}."
    )


# Non-diffusers LoRA layouts (kohya / sd-scripts and similar trainers): how a key ends, and which part it is.
_LORA_KEY_SUFFIXES = {
    ".lora_down.weight": "lora_A",
    ".lora_up.weight": "lora_B",
    ".lora.down.weight": "lora_A",
    ".lora.up.weight": "lora_B",
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".alpha": "alpha",
}
# Prefixes other trainers put before the module name (kohya's flattened `lora_unet_…`, ComfyUI's `diffusion_model.`,
# peft's `base_model.model.`, the official pMF checkpoints' `net.`).
_NON_DIFFUSERS_PREFIXES = ("lora_unet_", "lora_transformer_", "diffusion_model.", "base_model.model.", "net.")


def _is_diffusers_lora(state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    return all(
        key.startswith(f"{prefix}.") and not key.endswith(".alpha") and "lora_down" not in key and "lora_up" not in key
        and ".lora.down" not in key and ".lora.up" not in key
        for key in state_dict
    )


def _convert_non_diffusers_lora(
    state_dict: dict[str, torch.Tensor], transformer: nn.Module, prefix: str, source: str
) -> dict[str, torch.Tensor]:
    """Convert kohya-style keys (`lora_down` / `lora_up` / `alpha`, module names flattened with `_`) and the official
    pMF module names to this model's diffusers keys (`<prefix>.<module>.lora_A/B.weight`); raise naming the keys that
    match no layer of the model.

    The kohya scale alpha / rank is folded into the two factors the way diffusers' kohya converters do (see
    `diffusers.loaders.lora_conversion_utils`), so the adapter loads with peft's default scale 1.
    """
    from ..conversion import official_key_to_diffusers

    linear_names = set(_linear_module_names(transformer))
    flattened = {name.replace(".", "_"): name for name in linear_names}

    def module_for(stem: str) -> str | None:
        prefixes = (f"{prefix}.", *_NON_DIFFUSERS_PREFIXES)
        while stem.startswith(prefixes):
            stem = stem[len(next(p for p in prefixes if stem.startswith(p))) :]
        if stem in linear_names:
            return stem
        if stem in flattened:
            return flattened[stem]
        official = official_key_to_diffusers(f"{stem}.weight")  # a LoRA trained on the official pMF network
        official = official.removesuffix(".weight") if official else None
        return official if official in linear_names else None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        suffix = next((suffix for suffix in _LORA_KEY_SUFFIXES if key.endswith(suffix)), None)
        module = module_for(key[: -len(suffix)]) if suffix else None
        if module is None:
            unknown.append(key)
        else:
            parts.setdefault(module, {})[_LORA_KEY_SUFFIXES[suffix]] = value
    incomplete = sorted(module for module, found in parts.items() if not {"lora_A", "lora_B"} <= found.keys())
    if unknown or incomplete:
        example = sorted(linear_names)[0] if linear_names else "transformer_blocks.0.attn.to_q"
        problem = (
            f"{len(unknown)} key(s) that match no layer of this model, e.g. {', '.join(unknown[:3])}"
            if unknown
            else f"layers with only one of the two LoRA factors, e.g. {', '.join(incomplete[:3])}"
        )
        kohya_example = f"lora_unet_{example.replace('.', '_')}"
        raise ValueError(
            f"The LoRA file {source} has {problem}. Readable layouts: diffusers/peft keys "
            f"(`{prefix}.{example}.lora_A.weight`), kohya keys (`{kohya_example}.lora_down.weight`, `.lora_up.weight`, "
            "`.alpha`) and the official pMF module names."
        )

    converted = {}
    for module, found in parts.items():
        down, up = found["lora_A"], found["lora_B"]
        rank = down.shape[0]
        alpha = float(found["alpha"].item()) if "alpha" in found else float(rank)  # kohya: no alpha means alpha = rank
        # Split alpha / rank between the factors like diffusers' converters, so neither changes much in magnitude.
        scale_down, scale_up = alpha / rank, 1.0
        while scale_down * 2 < scale_up:
            scale_down *= 2
            scale_up /= 2
        converted[f"{prefix}.{module}.lora_A.weight"] = down * scale_down
        converted[f"{prefix}.{module}.lora_B.weight"] = up * scale_up
    logger.info(f"Converted {len(converted) // 2} non-diffusers LoRA layers from {source}.")
    return converted


def _lora_file_description(path_or_repo: str, kwargs: dict) -> str:
    """The LoRA weights file to name in errors: the file itself, or the file inside a folder or Hub repo."""
    if os.path.isfile(path_or_repo):
        return repr(path_or_repo)
    weight_name = kwargs.get("weight_name") or LORA_WEIGHT_NAME_SAFE
    candidate = os.path.join(path_or_repo, kwargs.get("subfolder") or "", weight_name)
    if os.path.isdir(path_or_repo) and not os.path.isfile(candidate):
        return repr(path_or_repo)  # diffusers picked another single .safetensors file of the folder
    return repr(candidate)


def _refuse_pickle_lora_file(path_or_repo: str, weight_name: str | None, subfolder: str | None) -> None:
    """Refuse a pickle LoRA file (`pytorch_lora_weights.bin`, `weight_name="....bin"`) before diffusers reads it."""
    loader = "the pMF LoRA loader"
    if weight_name is not None and is_pickle_weights_file(weight_name):
        local = os.path.join(path_or_repo, subfolder or "", weight_name)
        refuse_pickle_weights(local if os.path.isdir(path_or_repo) else weight_name, loader)
    if os.path.isfile(path_or_repo) and is_pickle_weights_file(path_or_repo):
        refuse_pickle_weights(path_or_repo, loader)
    if weight_name is None and os.path.isdir(path_or_repo):
        check_no_pickle_weights(os.path.join(path_or_repo, subfolder or ""), loader)


def _read_sidecar(path: str) -> dict:
    try:
        sidecar = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"The adapter config {path} is not valid JSON ({error}): export the adapter again.") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != ADAPTER_FORMAT:
        found = sidecar.get("format") if isinstance(sidecar, dict) else type(sidecar).__name__
        raise ValueError(f"{path} is not a pmf-diffusers adapter config (format {found!r}).")
    for field in ("base_model", "class_embeddings", "id2label"):
        if sidecar.get(field) is not None and not isinstance(sidecar[field], dict):
            raise ValueError(f"The adapter config {path}: `{field}` must be an object or null, got {sidecar[field]!r}.")
    return sidecar


def _locate_sidecar_file(path_or_repo: str, filename: str, kwargs: dict) -> str | None:
    """Local path of an adapter sidecar file next to the LoRA file (local folder, file, or Hub repo), or None."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isfile(path_or_repo):
        candidate = os.path.join(os.path.dirname(path_or_repo), filename)
        return candidate if os.path.isfile(candidate) else None
    if os.path.isdir(path_or_repo):
        candidate = os.path.join(path_or_repo, subfolder, filename)
        return candidate if os.path.isfile(candidate) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(
            path_or_repo,
            filename,
            subfolder=subfolder or None,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download", False)),
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _read_adapter_files(path_or_repo: str, kwargs: dict, source: str):
    """(sidecar dict or None, class table or None, id2label or None, new_label_set) — validated, nothing applied."""
    sidecar_path = _locate_sidecar_file(path_or_repo, ADAPTER_CONFIG_NAME, kwargs)
    if sidecar_path is None:
        # The table alone would be ignored: the adapter would silently sample the base model's classes.
        if _locate_sidecar_file(path_or_repo, CLASS_EMBEDDINGS_NAME, kwargs) is not None:
            raise ValueError(
                f"The adapter {source} has {CLASS_EMBEDDINGS_NAME} (a new class table) but no {ADAPTER_CONFIG_NAME}, "
                "which says how to use it (class count, names, base model). Copy the complete adapter folder as "
                f"exported, or delete {CLASS_EMBEDDINGS_NAME} to load the LoRA onto the base model's classes."
            )
        return None, None, None, False
    sidecar = _read_sidecar(sidecar_path)
    table, id2label = None, sidecar.get("id2label")
    table_info = sidecar.get("class_embeddings")
    if table_info:
        table_path = _locate_sidecar_file(path_or_repo, table_info.get("file", CLASS_EMBEDDINGS_NAME), kwargs)
        if table_path is None:
            raise ValueError(
                f"The adapter {source} declares a class table ({table_info.get('file')}) but the file is missing."
            )
        from safetensors.torch import load_file

        tensors = load_file(table_path)
        if CLASS_EMBEDDINGS_KEY not in tensors:
            raise ValueError(f"{table_path} has no `{CLASS_EMBEDDINGS_KEY}` tensor (keys: {sorted(tensors)}).")
        table = tensors[CLASS_EMBEDDINGS_KEY]
        _check_finite(tensors, f"The class table {table_path}")
        declared = table_info.get("num_classes")
        if declared is not None and declared != table.shape[0] - 1:
            raise ValueError(
                f"The adapter {source}: the sidecar declares {declared} classes but {table_path} holds a table for "
                f"{table.shape[0] - 1} classes (+ null)."
            )
        if id2label is not None:
            id2label = validate_id2label(id2label, table.shape[0] - 1, source=f"The label set of adapter {source}")
    elif id2label is not None:
        raise ValueError(f"The adapter {source} has a label set (`id2label`) but no class table.")
    new_label_set = bool(table_info and table_info.get("new_label_set", id2label is not None))
    return sidecar, table, id2label, new_label_set


# --------------------------------------------------------------------------------------------------------------
# The pipeline mixin
# --------------------------------------------------------------------------------------------------------------
# Adapted from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin (diffusers 0.42.1: the generic "single
# `transformer` component, no key conversion" loader), with the pMF sidecar (base-shape check, class table, label
# set) added to `save_lora_weights` / `load_lora_weights`. Mirrored rather than inherited so that changes to the
# Sana class's key handling cannot silently change pMF adapters.
class PMFLoraLoaderMixin(LoraBaseMixin):
    r"""
    Load LoRA layers into [`PMFTransformer2DModel`]. Specific to [`PMFPipeline`].

    On top of diffusers' standard LoRA file, a pMF adapter folder may hold `pmf_adapter_config.json` (the base
    model's shape and the label set) and `class_embeddings.safetensors` (a new class table). See the module
    docstring of `pmf_diffusers.loaders.lora_pmf` for why the table is not in the LoRA file.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    @validate_hf_hub_args
    # Adapted from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin.lora_state_dict (docstring, DoRA message)
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        **kwargs,
    ):
        r"""
        Return the LoRA state dict (`transformer.<module>.lora_A/B.weight` keys) of a file, folder, Hub repo or dict.
        With `return_lora_metadata=True`, return `(state_dict, metadata)` (the peft config from the file header).
        Does not read the pMF sidecar. See [`~loaders.StableDiffusionLoraLoaderMixin.lora_state_dict`].
        """
        cache_dir = kwargs.pop("cache_dir", None)
        force_download = kwargs.pop("force_download", False)
        proxies = kwargs.pop("proxies", None)
        local_files_only = kwargs.pop("local_files_only", None)
        token = kwargs.pop("token", None)
        revision = kwargs.pop("revision", None)
        subfolder = kwargs.pop("subfolder", None)
        weight_name = kwargs.pop("weight_name", None)
        kwargs.pop("use_safetensors", None)  # safetensors only, whatever it says (see below)
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)

        # A pickle LoRA file is refused up front, and diffusers reads safetensors only (never falls back to a `.bin`).
        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            _refuse_pickle_lora_file(str(pretrained_model_name_or_path_or_dict), weight_name, subfolder)

        user_agent = {"file_type": "attn_procs_weights", "framework": "pytorch"}

        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            use_safetensors=True,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            force_download=force_download,
            proxies=proxies,
            token=token,
            revision=revision,
            subfolder=subfolder,
            user_agent=user_agent,
            allow_pickle=False,
        )

        is_dora_scale_present = any("dora_scale" in k for k in state_dict)
        if is_dora_scale_present:
            logger.warning("DoRA checkpoints are not supported: dropping the `dora_scale` keys.")
            state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}

        out = (state_dict, metadata) if return_lora_metadata else state_dict
        return out

    @require_peft_backend
    # Adapted from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin.load_lora_weights (+ the pMF sidecar)
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """
        Load a pMF LoRA adapter (local folder, `.safetensors` file, Hub repo id or state dict) into
        `self.transformer`, as adapter `adapter_name`.

        Before anything is changed, the adapter is validated: the base shape recorded in `pmf_adapter_config.json`
        must match the loaded model (hidden size, patch/sample size, depth, heads, MLP width, base class count), and
        every LoRA tensor must fit the module it adapts (this also catches adapters without a sidecar). A mismatch
        raises `ValueError` naming it. If the adapter carries a class table (`class_embeddings.safetensors`, a new
        or retrained label set), the table replaces `transformer.class_embedder` (and `transformer.config.num_classes`)
        and its `id2label` replaces the pipeline's (`set_id2label`); a label set whose count disagrees with the table
        raises. [`unload_lora_weights`] (or `delete_adapters` of that adapter) restores the base table and names,
        except after `fuse_lora()`, where `unload_lora_weights` bakes the adapter and its classes in.

        diffusers' rule that every key of a LoRA file contains `"lora"` still holds here: the LoRA file is a standard
        one; the table travels in its own file, so other tools can read the LoRA file (without the new classes).

        Only one adapter with its own class table can be loaded at a time; adapters without one can be stacked with
        `set_adapters([...], adapter_weights=[...])`.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        transformer = getattr(self, self.transformer_name) if not hasattr(self, "transformer") else self.transformer
        source = (
            "(state dict)"
            if isinstance(pretrained_model_name_or_path_or_dict, dict)
            else repr(str(pretrained_model_name_or_path_or_dict))
        )

        # if a dict is passed, copy it instead of modifying it inplace
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
            sidecar, table, id2label, new_label_set = None, None, None, False
        else:
            sidecar, table, id2label, new_label_set = _read_adapter_files(
                str(pretrained_model_name_or_path_or_dict), kwargs, source
            )
        if sidecar is not None and sidecar.get("base_model"):
            _check_base_model(sidecar["base_model"], transformer, source)
        installed = getattr(self, "_pmf_label_set", None)
        if table is not None and installed is not None and not (hotswap and installed["adapter"] == adapter_name):
            raise ValueError(
                f"Adapter {installed['adapter']!r} already replaced the class table; the adapter {source} brings its "
                "own class table too. Call `unload_lora_weights()` (or `delete_adapters`) first."
            )

        # First, ensure that the checkpoint is a compatible one and can be successfully loaded.
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            source = _lora_file_description(str(pretrained_model_name_or_path_or_dict), kwargs)
        if not state_dict:
            raise ValueError(f"The LoRA file {source} holds no LoRA weights.")
        if not _is_diffusers_lora(state_dict, self.transformer_name):
            state_dict = _convert_non_diffusers_lora(state_dict, transformer, self.transformer_name, source)
        is_correct_format = all("lora" in key for key in state_dict.keys())
        if not is_correct_format:
            raise ValueError(f"Invalid LoRA checkpoint {source}: every key of a LoRA file must contain 'lora'.")
        _check_finite(state_dict, f"The LoRA file {source}")
        state_dict = _check_lora_shapes(state_dict, transformer, self.transformer_name, source)
        _check_adapter_covers_its_targets(state_dict, metadata, transformer, self.transformer_name, source)
        if not hotswap:
            from diffusers.utils.peft_utils import get_adapter_name

            _warn_if_adapter_name_is_ambiguous(transformer, adapter_name or get_adapter_name(transformer))

        adapters_before = set(getattr(transformer, "peft_config", {}) or {})
        try:
            self.load_lora_into_transformer(
                state_dict,
                transformer=transformer,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
        except RuntimeError as error:
            if "size mismatch" in str(error):
                raise ValueError(
                    f"The LoRA adapter {source} does not fit this model's shape (trained on a different base model): "
                    f"{str(error)[:500]}"
                ) from error
            raise

        if table is not None:
            if adapter_name is None:
                added = sorted(set(getattr(transformer, "peft_config", {}) or {}) - adapters_before)
                adapter_name = added[0] if added else None
            if installed is None:
                self._pmf_label_set = {
                    "adapter": adapter_name,
                    "table": transformer.class_embedder.weight.detach().clone(),
                    "id2label": dict(getattr(self, "id2label", {}) or {}) or None,
                }
            else:
                installed["adapter"] = adapter_name
            _install_class_table(transformer, table, trainable=False)
            if new_label_set and hasattr(self, "set_id2label"):
                self.set_id2label(id2label)

    def _restore_base_class_table(self, adapter_names: list[str] | None = None) -> None:
        installed = getattr(self, "_pmf_label_set", None)
        if installed is None or (adapter_names is not None and installed["adapter"] not in adapter_names):
            return
        transformer = self.transformer
        _install_class_table(transformer, installed["table"], trainable=False)
        del transformer._pmf_base_num_classes
        if hasattr(self, "set_id2label"):
            self.set_id2label(installed["id2label"])
        self._pmf_label_set = None

    def unload_lora_weights(self):
        """Unload all LoRA layers and, if an adapter replaced the class table, restore the base table and names.

        Exception: after `fuse_lora()` of that adapter, `fuse_lora(); unload_lora_weights()` *bakes the adapter in*
        (the diffusers idiom): the fused weights, the new class table and the names stay, and the pipeline becomes
        a standalone model that `save_pretrained` writes with the new classes.
        """
        installed = getattr(self, "_pmf_label_set", None)
        baked_in = installed is not None and installed["adapter"] in set(self.fused_loras)
        super().unload_lora_weights()
        if baked_in:
            self._pmf_label_set = None
            if hasattr(self.transformer, "_pmf_base_num_classes"):
                del self.transformer._pmf_base_num_classes
        else:
            self._restore_base_class_table()

    def delete_adapters(self, adapter_names: list[str] | str):
        """Delete adapters; deleting the one that brought a class table restores the base table and names."""
        super().delete_adapters(adapter_names)
        self._restore_base_class_table([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    @classmethod
    # Copied from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin.load_lora_into_transformer
    def load_lora_into_transformer(
        cls,
        state_dict,
        transformer,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap: bool = False,
        metadata=None,
    ):
        """
        See [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_into_unet`] for more details.
        """
        # Load the layers corresponding to transformer.
        logger.info(f"Loading {cls.transformer_name}.")
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    # Adapted from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin.save_lora_weights (+ the pMF sidecar)
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] = None,
        is_main_process: bool = True,
        weight_name: str = None,
        save_function: Callable = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        class_embeddings: torch.Tensor | nn.Embedding | None = None,
        id2label: dict[int, str] | None = None,
        base_model_info: dict | nn.Module | None = None,
    ):
        r"""
        Save a pMF LoRA adapter: only the adapter, plus what is needed to use it correctly.

        Args:
            save_directory: Output folder.
            transformer_lora_layers: The LoRA state dict (`get_peft_model_state_dict(transformer)`).
            transformer_lora_adapter_metadata: The peft config (`transformer.peft_config[name].to_dict()`), stored
                in the safetensors header so rank/alpha/targets load back exactly.
            class_embeddings: The new (K + 1, D) class table (tensor or `nn.Embedding`), for a new or retrained label
                set; written to `class_embeddings.safetensors` (not into the LoRA file, whose keys must all contain
                "lora").
            id2label: Names of the K classes of a new label set (must agree with the table).
            base_model_info: The base model's shape ([`pmf_base_model_info`] or the transformer itself), written to
                `pmf_adapter_config.json` and checked at load time.
            is_main_process, weight_name, save_function, safe_serialization: As in diffusers.
        """
        lora_layers = {}
        lora_metadata = {}

        if transformer_lora_layers:
            lora_layers[cls.transformer_name] = transformer_lora_layers
            lora_metadata[cls.transformer_name] = transformer_lora_adapter_metadata

        if not lora_layers:
            raise ValueError("You must pass `transformer_lora_layers`.")

        # Validate the extras before writing anything.
        if isinstance(base_model_info, nn.Module):
            base_model_info = pmf_base_model_info(base_model_info)
        table = class_embeddings.weight if isinstance(class_embeddings, nn.Embedding) else class_embeddings
        if table is not None:
            table = table.detach().to("cpu").contiguous()
            if table.ndim != 2 or table.shape[0] < 2:
                raise ValueError(f"`class_embeddings` must be a (num_classes + 1, D) table, got {tuple(table.shape)}.")
            if base_model_info and table.shape[1] != base_model_info.get("hidden_size", table.shape[1]):
                raise ValueError(
                    f"`class_embeddings` has width {table.shape[1]}, the base model's hidden size is "
                    f"{base_model_info['hidden_size']}."
                )
        if id2label is not None:
            if table is None:
                raise ValueError(
                    "`id2label` describes a new label set, which needs its `class_embeddings` table (the (K + 1, D) "
                    "`transformer.class_embedder.weight` after `replace_class_table`)."
                )
            id2label = validate_id2label(id2label, table.shape[0] - 1, source="`id2label`")
        if base_model_info is None:
            logger.warning("No `base_model_info`: the adapter's base shape cannot be checked when it is loaded.")

        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=lora_layers,
            lora_metadata=lora_metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )
        if not is_main_process:
            return

        table_info = None
        if table is not None:
            from safetensors.torch import save_file

            num_classes = table.shape[0] - 1
            new_label_set = id2label is not None or (
                bool(base_model_info) and num_classes != base_model_info.get("num_classes")
            )
            save_file({CLASS_EMBEDDINGS_KEY: table}, os.path.join(save_directory, CLASS_EMBEDDINGS_NAME))
            table_info = {
                "file": CLASS_EMBEDDINGS_NAME,
                "num_classes": num_classes,
                "hidden_size": table.shape[1],
                "new_label_set": new_label_set,
            }
        sidecar = {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "lora_weight_name": weight_name or LORA_WEIGHT_NAME_SAFE,
            "base_model": base_model_info,
            "class_embeddings": table_info,
            "id2label": {str(key): value for key, value in id2label.items()} if id2label is not None else None,
        }
        Path(save_directory, ADAPTER_CONFIG_NAME).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")

    # Copied from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin.fuse_lora
    def fuse_lora(
        self,
        components: list[str] = ["transformer"],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        r"""
        Fuse the LoRA weights into the base weights (faster sampling). The class table, if replaced, is a plain
        weight already. See [`~loaders.StableDiffusionLoraLoaderMixin.fuse_lora`] for more details.
        """
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    # Copied from diffusers.loaders.lora_pipeline.SanaLoraLoaderMixin.unfuse_lora
    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs):
        r"""
        See [`~loaders.StableDiffusionLoraLoaderMixin.unfuse_lora`] for more details.
        """
        super().unfuse_lora(components=components, **kwargs)
