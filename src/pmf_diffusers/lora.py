# Copyright 2026 The pmf-diffusers developers. MIT License.
"""LoRA for pixel MeanFlow, in one namespace (`from pmf_diffusers.lora import add_pmf_lora, read_label_set, ...`).

The code lives in three modules, each with one job; this module only re-exports their public names:

* `pmf_diffusers.loaders.lora_pmf`: the adapter format and [`PMFLoraLoaderMixin`] (what the pipeline imports);
* `pmf_diffusers.training.lora`: adding adapters, new class tables, exporting and resuming a trained adapter;
* `pmf_diffusers.labels`: label sets (`id2label`) and label-set files.
"""

from . import loaders
from .labels import label_set_index, read_label_set, validate_id2label
from .loaders import *  # noqa: F403 - the adapter format and the loader mixin, as `pmf_diffusers.loaders` exports them
from .training.lora import (
    PMF_LORA_TARGETS,
    add_pmf_lora,
    init_v_head_from_u_head,
    load_pmf_lora_state,
    replace_class_table,
    resolve_lora_targets,
    save_pmf_lora,
)

__all__ = [
    *loaders.__all__,
    "PMF_LORA_TARGETS",
    "add_pmf_lora",
    "init_v_head_from_u_head",
    "label_set_index",
    "load_pmf_lora_state",
    "read_label_set",
    "replace_class_table",
    "resolve_lora_targets",
    "save_pmf_lora",
    "validate_id2label",
]
