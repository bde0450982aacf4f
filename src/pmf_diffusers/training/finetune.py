# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Fine-tuning a pretrained pMF pipeline (`examples/train_pmf.py --pretrained_model`): the trainable transformer with
a v-head, the LoRA / new-label-set surgery, and how a dataset's classes map onto the model's classes.

Typical order: [`load_for_fine_tuning`], then [`add_fine_tuning_adapters`] (before the optimizer and
`accelerator.prepare`), then [`dataset_class_index`] / [`dataset_id2label`] once the dataset is known.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "RemappedCollator",
    "add_fine_tuning_adapters",
    "dataset_class_index",
    "dataset_id2label",
    "is_imagenet_synset_folders",
    "load_for_fine_tuning",
]


def load_for_fine_tuning(source: str, v_head_init: str = "copy"):
    """The transformer of the pipeline `source` (folder, Hub id or official size name: see
    `pmf_diffusers.loading.load_pipeline`) in fp32 and with a v-head, and the pipeline's defaults.

    A pipeline without v-head (the released checkpoints) gets one: `v_head_init="copy"` copies the u-head
    ([`init_v_head_from_u_head`]), `"fresh"` keeps the official from-scratch initialisation (zero output layer).

    Returns:
        `(transformer, info)`, info holding `noise_scale`, `id2label` (None when the pipeline has none),
        `guidance_scale`, `guidance_interval` and `had_v_head`.
    """
    from ..loading import load_pipeline
    from ..models.transformer_pmf import PMFTransformer2DModel
    from .lora import init_v_head_from_u_head

    if v_head_init not in ("copy", "fresh"):
        raise ValueError(f"v_head_init must be 'copy' or 'fresh', got {v_head_init!r}")
    pipe = load_pipeline(source)
    transformer = pipe.transformer.float()
    info = {
        "noise_scale": float(pipe.scheduler.config.noise_scale),
        "id2label": dict(pipe.id2label) if pipe.id2label else None,
        "guidance_scale": float(pipe.config.default_guidance_scale),
        "guidance_interval": tuple(pipe.config.default_guidance_interval),
        "had_v_head": bool(transformer.config.with_v_head),
    }
    if transformer.config.with_v_head:
        return transformer, info
    model = PMFTransformer2DModel.from_config({**transformer.config, "with_v_head": True})  # official initialisation
    _, unexpected = model.load_state_dict(transformer.state_dict(), strict=False)  # only the v-head is missing
    if unexpected:
        raise ValueError(f"{source}: unexpected weights {unexpected}")
    if v_head_init == "copy":
        init_v_head_from_u_head(model)
    return model, info


def add_fine_tuning_adapters(
    transformer: torch.nn.Module,
    *,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_target: str | None = None,
    train_class_embeddings: bool = False,
    new_num_classes: int | None = None,
    seed: int = 0,
) -> dict | None:
    """Model surgery for fine-tuning: a new class table of `new_num_classes` rows (+ the pretrained null row kept;
    trained), then a LoRA adapter of rank `lora_rank` on `lora_target` (default `"attention+mlp"`; the base frozen).

    Returns the LoRA settings to record with the run and its checkpoints (None without LoRA)."""
    from .lora import add_pmf_lora, replace_class_table, resolve_lora_targets

    if new_num_classes is not None:
        replace_class_table(transformer, new_num_classes, init="null", generator=torch.Generator().manual_seed(seed))
    if lora_rank is None:
        return None
    target = lora_target if lora_target is not None else "attention+mlp"
    targets = resolve_lora_targets(transformer, target)
    add_pmf_lora(transformer, rank=lora_rank, alpha=lora_alpha, targets=targets,
                 train_class_embeddings=train_class_embeddings)
    return {
        "rank": lora_rank,
        "alpha": float(lora_alpha if lora_alpha is not None else lora_rank),
        "target": target,
        "target_modules": targets,
        "init": "gaussian",
        "train_class_embeddings": bool(transformer.class_embedder.weight.requires_grad),
        "new_label_set": new_num_classes,
    }


def is_imagenet_synset_folders(class_names: Sequence[str]) -> bool:
    """ImageNet's 1000 class folders named by synset (n01440764, ...), whose sorted order is the class-id order."""
    return len(class_names) == 1000 and all(re.fullmatch(r"n\d{8}", name) for name in class_names)


def dataset_class_index(
    class_names: Sequence[str], label_set: dict[int, str] | None = None, base_id2label: dict | None = None
) -> list[int] | None:
    """Model class id of each dataset class, or None for the identity (dataset class i = model class i).

    With a new `label_set` the dataset's class names must all be names of it (ValueError otherwise). With
    `base_id2label` (LoRA on the base model's classes) the names are matched to the base model's names when they all
    match; otherwise dataset class i trains base class i, as in full fine-tuning."""
    from ..labels import label_set_index

    if label_set is not None:
        return label_set_index(label_set, class_names)
    if not base_id2label or is_imagenet_synset_folders(class_names):
        return None
    try:
        index = label_set_index({int(k): str(v) for k, v in base_id2label.items()}, class_names)
    except ValueError:
        logger.warning(
            "The dataset's class names are not all class names of the base model: dataset class i trains base "
            "class i (a LoRA adapter keeps the base model's class names). Name the class folders after the base "
            "classes, or train your own classes with a new label set."
        )
        return None
    logger.info(f"Dataset classes matched to the base model's classes: {dict(zip(class_names, index))}")
    return index


def dataset_id2label(
    class_names: Sequence[str],
    num_classes: int,
    *,
    label_set: dict[int, str] | None = None,
    class_index: list[int] | None = None,
    pretrained_id2label: dict | None = None,
) -> dict[int, str]:
    """The class names to export with a model of `num_classes` classes trained on a dataset with `class_names`:
    a new `label_set`'s names; the pretrained model's names when the dataset's classes were matched to them
    (`class_index`) or the folders are named by class id; ImageNet's readable names for synset folders; else the
    folder names. Classes without a name are named by their id."""
    from ..labels import load_imagenet_id2label

    if label_set is not None:
        id2label = dict(label_set)
    elif is_imagenet_synset_folders(class_names):
        id2label = load_imagenet_id2label()
    elif pretrained_id2label and (class_index is not None or all(re.fullmatch(r"\d+", n) for n in class_names)):
        id2label = {int(k): v for k, v in pretrained_id2label.items()}
    else:
        id2label = dict(enumerate(class_names))
    if len(id2label) < num_classes:
        id2label = {**{i: str(i) for i in range(num_classes)}, **id2label}
    return id2label


class RemappedCollator:
    """Wraps a collator (`pmf_diffusers.training.data.ImageCollator`): dataset class i becomes model class `index[i]`
    (see [`dataset_class_index`])."""

    def __init__(self, collator, index: list[int]):
        self.collator = collator
        self.lookup = torch.tensor(index, dtype=torch.long)

    def __call__(self, rows) -> dict:
        batch = self.collator(rows)
        batch["class_labels"] = self.lookup[batch["class_labels"]]
        return batch
