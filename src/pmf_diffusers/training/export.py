# Copyright 2026 The pmf-diffusers developers. MIT License.
"""What a training run (`examples/train_pmf.py`) leaves behind: sample grids, the (EMA) weights as a `PMFPipeline`
folder or as a LoRA adapter folder, and the facts of the run for their model cards (rendered by `pmf_diffusers.hub`).

The `save_*` functions run on the main process only (gather sharded weights first with
`pmf_diffusers.training.distributed.gather_state_dict`, which is collective). Folders are written next to their
destination and renamed when complete, so an interrupted export never replaces a good one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "ema_weights",
    "log_sample_grid",
    "lora_adapter_card",
    "save_lora_adapter",
    "save_pipeline",
    "save_sample_grid",
    "training_card_info",
]


@contextlib.contextmanager
def ema_weights(ema, parameters: list[torch.nn.Parameter], key: str | None):
    """Within the block `parameters` hold the EMA `key` of `ema` (a `MultiEMA`); restored afterwards. No-op when
    `ema` or `key` is None (raw weights)."""
    if ema is None or key is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters, key)
    try:
        yield
    finally:
        ema.restore(parameters)


@torch.no_grad()
def save_sample_grid(
    accelerator,
    transformer: torch.nn.Module,
    path: str | Path,
    *,
    classes: list[int],
    images_per_class: int,
    seed: int,
    noise_scale: float,
    guidance_scale: float,
    guidance_interval: tuple[float, float],
) -> Path:
    """One-step samples of `transformer` as a grid image at `path`: one row per class, column j drawn with a generator
    seeded `seed + j` on the accelerator's device (so every row uses the same noises), under its autocast."""
    from ..image_grid import save_image_grid
    from ..pipelines.pipeline_pmf import PMFPipeline
    from ..schedulers.scheduling_pmf import PMFScheduler

    was_training = transformer.training
    transformer.eval()
    try:
        pipeline = PMFPipeline(transformer, PMFScheduler(noise_scale=noise_scale))
        pipeline.set_progress_bar_config(disable=True)
        device = accelerator.device
        generators = [torch.Generator(device=device).manual_seed(seed + j) for _ in classes for j in range(images_per_class)]
        with accelerator.autocast():
            images = pipeline(
                class_labels=[c for c in classes for _ in range(images_per_class)],
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                generator=generators,
                output_type="pt",
            ).images
    finally:
        transformer.train(was_training)
    images = images.float().cpu()
    scale = max(1, 64 // images.shape[-1])  # small samples are enlarged (nearest-neighbour) to stay visible
    return save_image_grid(images, path, nrow=images_per_class, value_range=(0.0, 1.0), scale=scale)


def log_sample_grid(trackers, path: Path, step: int) -> None:
    """Send a saved grid to the trackers as the image `samples`: the grid itself (rows = classes), not loose images
    that they would re-tile their own way."""
    import numpy as np
    from PIL import Image

    grid = np.asarray(Image.open(path).convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": grid[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step)


def _replace_folder(staging: Path, destination: Path) -> Path:
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)
    return destination


def _staging_folder(destination: Path) -> Path:
    staging = destination.with_name(f".tmp-{destination.name}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def save_pipeline(
    destination: str | Path,
    transformer_config: dict,
    state_dict: dict[str, torch.Tensor],
    *,
    noise_scale: float,
    id2label: dict[int, str] | None,
    guidance_scale: float,
    guidance_interval: tuple[float, float],
    drop_v_head: bool = False,
) -> Path:
    """Write the weights as a `PMFPipeline` folder (safetensors), loadable with `PMFPipeline.from_pretrained`.

    `drop_v_head=True` leaves out the v-head, which sampling does not use (like the released checkpoints)."""
    from ..conversion import build_pipeline
    from ..models.transformer_pmf import PMFTransformer2DModel

    destination = Path(destination)
    config = {key: value for key, value in dict(transformer_config).items() if not key.startswith("_")}
    if drop_v_head:
        config["with_v_head"] = False
        with torch.device("meta"):  # the key set of a model without v-head, without allocating it
            kept = PMFTransformer2DModel.from_config(config).state_dict().keys()
        state_dict = {key: state_dict[key] for key in kept}
    pipeline = build_pipeline(
        config, state_dict, noise_scale=noise_scale, guidance_scale=guidance_scale,
        guidance_interval=tuple(guidance_interval), id2label=id2label,
    )
    staging = _staging_folder(destination)
    pipeline.save_pretrained(staging, safe_serialization=True)
    return _replace_folder(staging, destination)


def save_lora_adapter(
    destination: str | Path,
    transformer: torch.nn.Module,
    *,
    ema=None,
    ema_key: str | None = None,
    ema_parameters: list[torch.nn.Parameter] | None = None,
    id2label: dict[int, str] | None = None,
    include_v_head: bool = True,
    base_model: str | None = None,
    card=None,
    samples: str | Path | None = None,
) -> Path:
    """Write the LoRA adapter of `transformer` (`save_pmf_lora`: LoRA file, sidecar, class table when trained) with
    the EMA `ema_key` of the trained parameters `ema_parameters` applied; optionally a model card (`README.md`) and a
    sample grid (`samples.png`).

    `base_model` (a Hub id) is recorded as the adapter's base; a local path of this machine never is."""
    from .lora import pmf_base_model_info, save_pmf_lora

    destination = Path(destination)
    staging = _staging_folder(destination)
    base_info = pmf_base_model_info(transformer)
    base_info.pop("name_or_path", None)
    if base_model:
        base_info["name_or_path"] = base_model
    with ema_weights(ema, ema_parameters, ema_key):
        save_pmf_lora(transformer, staging, base_model_info=base_info, id2label=id2label, include_v_head=include_v_head)
    if samples is not None and Path(samples).is_file():
        shutil.copyfile(samples, staging / "samples.png")
    if card is not None:
        card.save(staging / "README.md")
    return _replace_folder(staging, destination)


def training_card_info(
    resolved: dict,
    loss_config,
    *,
    steps: int,
    dataset: str,
    command: str,
    hub_dataset: str | None = None,
    base_model: str | None = None,
) -> dict:
    """Training facts for a `trained` model card (`pmf_diffusers.hub.push_pipeline_to_hub(card_info=...)` /
    `render_model_card`): the recipe table, dataset, steps and the command. No tokens, no local paths in the metadata.

    Args:
        resolved: the run's resolved settings (`training_args.json` "resolved": `preset`, `global_batch_size`,
            `learning_rate`, `adam_beta2`, `ema_half_lives_kimg`, `export_ema_kimg`, `mixed_precision`).
        loss_config: the objective's `PMFLossConfig`.
        steps: optimizer steps trained.
        dataset: how the card names the data (a Hub id or a description).
        command: the command that reproduces the run.
        hub_dataset, base_model: Hub ids for the card metadata (None for local data / models).
    """
    export_ema = resolved["export_ema_kimg"]
    recipe = {
        "preset": resolved["preset"],
        "training steps": steps,
        "global batch": resolved["global_batch_size"],
        "learning rate": resolved["learning_rate"],
        "optimizer": f"Muon + Adam (b2 {resolved['adam_beta2']:g})",
        "EMA half-lives (kimg)": ", ".join(f"{h:g}" for h in resolved["ema_half_lives_kimg"]) or "none",
        "exported EMA (kimg)": "raw weights" if export_ema is None else f"{export_ema:g}",
        "mixed precision": resolved["mixed_precision"],
    }
    if resolved.get("ema_rampup_ratio") is not None:
        recipe["EMA ramp-up (share of steps)"] = f"{resolved['ema_rampup_ratio']:g}"
    recipe.update({k: v for k, v in loss_config.to_dict().items() if k not in ("min_time", "jvp_in_fp32")})
    info = {"dataset": dataset, "training_steps": steps, "recipe": recipe, "command": command}
    if hub_dataset:
        info["datasets"] = [hub_dataset]
    if base_model:
        info["base_model"] = base_model
    return info


def lora_adapter_card(
    card_info: dict,
    *,
    repo_id: str,
    title: str,
    base: str,
    lora_config: dict,
    num_parameters: int,
    num_trainable_parameters: int,
    num_classes: int,
    resolution: int,
    patch_size: int,
    id2label: dict[int, str],
    guidance_scale: float,
    guidance_interval: tuple[float, float],
    noise_scale: float,
    sample_classes: list[int] | None = None,
    sample_seed: int = 0,
    images_per_class: int = 1,
):
    """The model card of a LoRA adapter: `render_model_card("trained", adapter_base=base, ...)`, whose usage snippet
    loads the base pipeline `base` (Hub id or folder) and then the adapter `repo_id`.

    `card_info` is [`training_card_info`]; `lora_config` the run's LoRA settings (`rank`, `alpha`, `target`,
    `target_modules`, `train_class_embeddings`, `new_label_set`). `sample_classes` (with `sample_seed` and
    `images_per_class`, as in [`save_sample_grid`]) describe the grid saved with the adapter as `samples.png`."""
    from ..hub import check_model_card, render_model_card
    from ..official import IMAGENET_SAMPLE_CLASSES, OFFICIAL_NUM_CLASSES

    info = dict(card_info)
    new_label_set = bool(lora_config["new_label_set"])
    class_table = (
        f"new label set of {num_classes} classes" if new_label_set
        else "trained" if lora_config["train_class_embeddings"] else "base model's (frozen)"
    )
    recipe = {
        "LoRA rank": lora_config["rank"],
        "LoRA alpha": f"{lora_config['alpha']:g}",
        "LoRA targets": f"{lora_config['target']} ({', '.join(lora_config['target_modules'])})",
        "trainable parameters": f"{num_trainable_parameters:,} of {num_parameters:,}",
        "class table": class_table,
        **info.pop("recipe", {}),
    }
    kind = "new label set" if new_label_set else "the base model's classes"
    holds = (
        " and its class table (`class_embeddings.safetensors`) with the class names" if new_label_set
        else " (and the retrained class table)" if lora_config["train_class_embeddings"] else ""
    )
    description = (
        f"A **LoRA adapter** (rank {lora_config['rank']}, {lora_config['target']}) for the pMF base model `{base}`, "
        f"trained on {kind} with `pmf-diffusers` (`examples/train_pmf.py --lora_rank`). It holds only the adapter"
        f"{holds}: load the base pipeline, then `pipe.load_lora_weights(...)` (see Usage)."
    )
    example_class = IMAGENET_SAMPLE_CLASSES[0]
    if num_classes < OFFICIAL_NUM_CLASSES or example_class not in id2label:
        example_class = min(id2label) if id2label else 0
    sample_info = {}
    if sample_classes is not None:
        last_seed = sample_seed + images_per_class - 1
        sample_info = {
            "sample_grid": "samples.png",
            "sample_labels": ", ".join(f"{id2label.get(c, c)} ({c})" for c in sample_classes),
            "sample_seeds": f"{sample_seed}…{last_seed} (one row per class, column j uses seed {sample_seed} + j)",
        }
    card = render_model_card(
        "trained",
        repo_id=repo_id,
        adapter_base=base,
        title=title,
        description=description,
        resolution=resolution,
        patch_size=patch_size,
        num_classes=num_classes,
        example_class=example_class,
        example_label=id2label.get(example_class),
        guidance_scale=guidance_scale,
        guidance_interval=list(guidance_interval),
        noise_scale=noise_scale,
        recipe=recipe,
        tags=["lora"],
        **sample_info,
        **info,
    )
    check_model_card(card)
    return card
