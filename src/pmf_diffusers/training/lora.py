# Copyright 2026 The pmf-diffusers developers. MIT License.
"""LoRA fine-tuning of pixel MeanFlow with peft: adding adapters, new label sets, exporting and resuming.

Typical order: load the pretrained transformer with a v-head, [`init_v_head_from_u_head`] for a checkpoint without
one, [`replace_class_table`] for a new label set, [`add_pmf_lora`], train, then [`save_pmf_lora`] (the adapter folder
that `PMFPipeline.load_lora_weights` reads; its format is described in `pmf_diffusers.loaders.lora_pmf`).
[`load_pmf_lora_state`] resumes training from such a folder. The target presets are [`PMF_LORA_TARGETS`]; label-set
files are read by `pmf_diffusers.labels.read_label_set`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffusers.utils import logging

from ..loaders.lora_pmf import (
    CLASS_EMBEDDINGS_KEY,
    CLASS_EMBEDDINGS_NAME,
    PMFLoraLoaderMixin,
    _check_lora_shapes,
    _install_class_table,
    _is_v_head_module,
    _linear_module_names,
    pmf_base_model_info,
)

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Target sets
# --------------------------------------------------------------------------------------------------------------
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out"]
_MLP = ["ff.gate_proj", "ff.up_proj", "ff.down_proj"]
_CONDITIONING = ["embedder.linear_1", "embedder.linear_2"]  # the ω, t_min, t_max and h = t − r embedders
_OUTPUT = ["u_proj_out", "v_proj_out"]

PMF_LORA_TARGETS: dict[str, list[str]] = {
    # q/k/v/out of every block: the smallest adapter; good for style / domain shifts.
    "attention": list(_ATTENTION),
    # + the SwiGLU projections: the default; what new classes need (the MLPs hold most of the "content").
    "attention+mlp": _ATTENTION + _MLP,
    # + the scalar-condition embedders and the two output projections (patch → pixels).
    "all-linear": _ATTENTION + _MLP + _CONDITIONING + _OUTPUT,
}
"""peft `target_modules` presets for [`PMFTransformer2DModel`].

Entries are module-name *suffixes* (peft matches `name == target or name.endswith("." + target)`), so each preset
covers the trunk (`transformer_blocks.{i}`), the u-head (`u_head_blocks.{i}`) **and the v-head**
(`v_head_blocks.{i}`). The v-head is included on purpose: the training objective builds its guidance target from the
model's own v-head, which must learn the new data/classes too. Sampling only runs the u-head, so the v-head LoRA
weights are ignored at inference (and dropped when the adapter is loaded into a model built without a v-head, such
as the released checkpoints). The patch-embedding convolutions and the class table are never LoRA targets (the
table is trained in full when needed, see [`replace_class_table`]).
"""


def _generic_name(name: str) -> str:
    return re.sub(r"(?<=_blocks)\.\d+\.", ".{i}.", name)


def resolve_lora_targets(transformer: nn.Module, targets: str | Sequence[str] = "attention+mlp") -> list[str]:
    """Turn a preset name (`"attention"`, `"attention+mlp"`, `"all-linear"`), a comma-separated string of module-name
    suffixes (`"to_q,to_v,ff.down_proj"`) or a list of them into a validated peft `target_modules` list.

    Raises `ValueError` when a user-given name matches no `nn.Linear` of the model, listing the available names.
    Preset entries that do not exist in this model (`v_proj_out` without a v-head) are dropped silently.
    """
    is_preset = isinstance(targets, str) and targets in PMF_LORA_TARGETS
    if is_preset:
        names = list(PMF_LORA_TARGETS[targets])
    elif isinstance(targets, str):
        names = [name.strip() for name in targets.split(",") if name.strip()]
    else:
        names = [str(name).strip() for name in targets if str(name).strip()]
    if not names:
        raise ValueError(f"No LoRA target modules given ({targets!r}). Use a preset: {sorted(PMF_LORA_TARGETS)}.")

    linear_names = _linear_module_names(transformer)

    def matches(target: str) -> bool:
        return any(name == target or name.endswith("." + target) for name in linear_names)

    unmatched = [name for name in names if not matches(name)]
    if is_preset:
        names = [name for name in names if name not in unmatched]
    elif unmatched:
        available = sorted(dict.fromkeys(_generic_name(name) for name in linear_names))
        raise ValueError(
            f"LoRA target(s) {unmatched} match no nn.Linear module of {type(transformer).__name__}. Targets are "
            f"module-name suffixes (e.g. 'to_q' or 'attn.to_q') or a preset {sorted(PMF_LORA_TARGETS)}. "
            f"Available Linear modules ({{i}} = block index): {', '.join(available)}."
        )
    return names


# --------------------------------------------------------------------------------------------------------------
# Training-side helpers
# --------------------------------------------------------------------------------------------------------------
def add_pmf_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = "attention+mlp",
    adapter_name: str = "default",
    init: str | bool = "gaussian",
    dropout: float = 0.0,
    train_class_embeddings: bool = False,
) -> list[str]:
    """Freeze the base model and add a peft LoRA adapter; return the names of the trainable parameters.

    Call it right after loading the pretrained transformer and before `accelerator.prepare` (the optimizer must only
    get the returned, `requires_grad` parameters).

    Args:
        transformer: A [`PMFTransformer2DModel`] (unwrapped).
        rank: LoRA rank r > 0.
        alpha: LoRA alpha (the update is scaled by alpha / r). Defaults to `rank` (scale 1).
        targets: A key of [`PMF_LORA_TARGETS`], a comma-separated string or a list of module-name suffixes.
        adapter_name: peft adapter name.
        init: peft `init_lora_weights` (`"gaussian"`: A ~ N(0, 1/r), B = 0, so the adapter starts as a no-op).
        dropout: LoRA dropout.
        train_class_embeddings: Also train the full class table. A table installed by
            [`replace_class_table`] is trainable regardless of the call order.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}: pass e.g. `rank=16`.")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout!r}.")
    target_modules = resolve_lora_targets(transformer, targets)
    _check_v_head_trainable(transformer)

    table_was_replaced = hasattr(transformer, "_pmf_base_num_classes")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=target_modules, lora_dropout=dropout
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    if train_class_embeddings or table_was_replaced:
        transformer.class_embedder.weight.requires_grad_(True)
    return [name for name, param in transformer.named_parameters() if param.requires_grad]


def init_v_head_from_u_head(transformer: nn.Module) -> None:
    """Give a model whose checkpoint has no v-head (the released pMF checkpoints) a v-head copied from its u-head.

    The objective trains the v-head on the guided velocity v_g, and the u-head at h = t − r = 0 (the flow-matching
    half of every batch, V = u) on the same target with the same inputs, so u-head(z, t, r = t) is what the v-head
    should output: the copy makes the guidance targets right from step 0. Without it the v-head starts from the
    official init (zero output layer: v_c = v_u, so the guidance term vanishes and the u-head drifts towards
    unguided targets until the v-head has learned), or, when loaded with `from_pretrained(..., with_v_head=True)`
    and the default `low_cpu_mem_usage=True`, as meta tensors that cannot be trained at all.

    Call it right after loading the pretrained transformer, before [`add_pmf_lora`].
    """
    if not getattr(transformer.config, "with_v_head", False):
        raise ValueError("The transformer has no v-head: load it with `with_v_head=True` for training.")
    if getattr(transformer, "peft_config", None):
        raise ValueError("Call `init_v_head_from_u_head` before adding LoRA adapters (`add_pmf_lora`).")
    transformer.v_head_blocks = copy.deepcopy(transformer.u_head_blocks)
    transformer.v_norm_out = copy.deepcopy(transformer.u_norm_out)
    transformer.v_proj_out = copy.deepcopy(transformer.u_proj_out)


def _check_v_head_trainable(transformer: nn.Module) -> None:
    if not getattr(transformer.config, "with_v_head", False):
        return
    v_params = [param for name, param in transformer.named_parameters() if _is_v_head_module(name)]
    if any(param.is_meta for param in v_params):
        raise ValueError(
            "The v-head has meta (unloaded) weights: the checkpoint has no v-head and was loaded with "
            "`low_cpu_mem_usage=True`. Call `init_v_head_from_u_head(transformer)` first."
        )
    if not transformer.v_proj_out.weight.detach().abs().max() > 0:
        logger.warning(
            "The v-head output layer is zero (an untrained v-head): the objective's guidance targets will be "
            "unguided until it learns. For a released checkpoint, call `init_v_head_from_u_head(transformer)` first."
        )


def replace_class_table(
    transformer: nn.Module,
    num_new_classes: int,
    init: str | Sequence[int | None] = "null",
    generator: torch.Generator | None = None,
    noise_scale: float = 0.02,
) -> nn.Embedding:
    """Give the model a new label set of `num_new_classes` classes: a fresh (K + 1, D) class table, trainable.

    Row K is the pretrained null-class row, copied unchanged, so unconditional sampling (and the guidance
    distilled into the network) keep working from step 0. Each new class row starts as follows:

    * `init="null"` (default): the pretrained null row plus N(0, (noise_scale · std(null row))²) noise. Every new
      class starts as the base model's *unconditional* distribution and the noise breaks the symmetry between
      classes; the training data then pulls each row to its class.
    * `init=[id_0, …, id_{K−1}]`: new class k copies pretrained class row `id_k` exactly (say "husky" → 250 when
      adapting to dog breeds); `None` in the list means "null init" for that class. Samples start as the chosen
      pretrained classes.

    Updates `transformer.config.num_classes` to K (via `register_to_config`, so `save_pretrained` writes it) and
    returns the new `nn.Embedding`. Call it after [`add_pmf_lora`] (or with `train_class_embeddings=True`) and
    before `accelerator.prepare`.
    """
    if isinstance(num_new_classes, bool) or not isinstance(num_new_classes, int) or num_new_classes < 1:
        raise ValueError(f"`num_new_classes` must be a positive integer, got {num_new_classes!r}.")
    old_table = transformer.class_embedder.weight.detach().float().cpu()
    old_num_classes = old_table.shape[0] - 1
    null_row = old_table[old_num_classes]
    noise = torch.randn((num_new_classes, old_table.shape[1]), generator=generator, dtype=torch.float32)
    null_init = null_row + noise * (noise_scale * null_row.std())

    if isinstance(init, str):
        if init != "null":
            raise ValueError(f"`init` must be 'null' or a list of pretrained class ids, got {init!r}.")
        rows = null_init
    else:
        ids = list(init)
        if len(ids) != num_new_classes:
            raise ValueError(f"`init` lists {len(ids)} pretrained class ids for {num_new_classes} new classes.")
        rows = null_init.clone()
        for k, class_id in enumerate(ids):
            if class_id is None:
                continue
            if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < old_num_classes:
                raise ValueError(
                    f"`init[{k}]` = {class_id!r} is not a pretrained class id in [0, {old_num_classes})."
                )
            rows[k] = old_table[class_id]
    table = torch.cat([rows, null_row[None]], dim=0)
    return _install_class_table(transformer, table, trainable=True)



def save_pmf_lora(
    transformer: nn.Module,
    save_directory: str | os.PathLike,
    base_model_info: dict | None = None,
    id2label: dict | None = None,
    adapter_name: str = "default",
    save_class_embeddings: bool | None = None,
    include_v_head: bool = True,
    is_main_process: bool = True,
) -> None:
    """Export an adapter trained with [`add_pmf_lora`] (and optionally [`replace_class_table`]).

    Writes the LoRA file, the sidecar and, when the class table was replaced or trained, `class_embeddings.safetensors`
    (`save_class_embeddings=None` decides this automatically). Pass the unwrapped transformer
    (`accelerator.unwrap_model`). `base_model_info` defaults to [`pmf_base_model_info`]`(transformer)`.
    `include_v_head=False` drops the v-head LoRA weights (unused at inference; keep them to resume training).
    """
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"The transformer has no LoRA adapter named {adapter_name!r}; call `add_pmf_lora` first.")
    lora_layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    if not include_v_head:
        lora_layers = {key: value for key, value in lora_layers.items() if not _is_v_head_module(key)}
    metadata = transformer.peft_config[adapter_name].to_dict()
    if save_class_embeddings is None:
        save_class_embeddings = hasattr(transformer, "_pmf_base_num_classes") or bool(
            transformer.class_embedder.weight.requires_grad
        )
    PMFLoraLoaderMixin.save_lora_weights(
        save_directory,
        transformer_lora_layers=lora_layers,
        is_main_process=is_main_process,
        transformer_lora_adapter_metadata=metadata,
        class_embeddings=transformer.class_embedder.weight if save_class_embeddings else None,
        id2label=id2label,
        base_model_info=base_model_info if base_model_info is not None else pmf_base_model_info(transformer),
    )


def load_pmf_lora_state(transformer: nn.Module, input_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Resume training: load LoRA weights (and the class table, if saved) written by [`save_pmf_lora`] into a
    transformer already set up the same way ([`add_pmf_lora`], and [`replace_class_table`] for a new label set).
    For accelerate's `register_load_state_pre_hook`. Raises on keys or table shapes that do not fit."""
    from peft.utils import set_peft_model_state_dict

    state_dict = PMFLoraLoaderMixin.lora_state_dict(str(input_dir))
    prefix = f"{PMFLoraLoaderMixin.transformer_name}."
    state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    source = repr(str(input_dir))
    _check_lora_shapes(state_dict, transformer, "", source)
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"The LoRA state in {source} has keys this model's adapter lacks: {unexpected[:5]}.")
    table_path = Path(input_dir, CLASS_EMBEDDINGS_NAME)
    if table_path.is_file():
        from safetensors.torch import load_file

        table = load_file(str(table_path))[CLASS_EMBEDDINGS_KEY]
        weight = transformer.class_embedder.weight
        if table.shape != weight.shape:
            raise ValueError(
                f"{table_path} holds a {tuple(table.shape)} class table, the model has {tuple(weight.shape)}: call "
                "`replace_class_table` with the same label set before resuming."
            )
        with torch.no_grad():
            weight.copy_(table.to(device=weight.device, dtype=weight.dtype))
