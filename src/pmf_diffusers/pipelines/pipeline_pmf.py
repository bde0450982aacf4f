# Copyright 2026 The pmf-diffusers developers. MIT License.
"""PMFPipeline: class-conditional, one-step, pixel-space sampling with pixel MeanFlow."""

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..labels import class_name_index, load_imagenet_id2label, resolve_class_labels
from ..loaders import PMFLoraLoaderMixin
from ..models.transformer_pmf import PMFAttention, PMFTransformer2DModel
from ..schedulers.scheduling_pmf import PMFScheduler

logger = logging.get_logger(__name__)

__all__ = ["PMFPipeline", "check_guidance_settings", "load_imagenet_id2label"]


# Images per transformer call by default: enough to keep a GPU busy at the released sizes, few enough that a long
# label list needs about as much memory as its output (the activations of 64 B/16 images are about 1 GB).
DEFAULT_MAX_BATCH_SIZE = 64


def _real_number(value) -> float | None:
    """`value` as a float if it is a real number (Python/NumPy scalar, 0-d array or tensor), else `None`."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_guidance_settings(
    guidance_scale: float | None = None, guidance_interval: tuple[float, float] | list[float] | None = None
) -> None:
    """Raise a one-line `ValueError` unless ω is a finite number ≥ 1 and the interval is a pair (t_min, t_max) with
    0 ≤ t_min ≤ t_max ≤ 1.

    The one place these rules live: the pipeline, the CLI, evaluation, the training script and the Space call it.
    `None` means "the checkpoint's default" and is not checked.
    """
    if guidance_scale is not None:
        omega = _real_number(guidance_scale)
        if omega is None or not 1.0 <= omega < float("inf"):  # the comparisons also reject NaN
            raise ValueError(f"`guidance_scale` (ω) must be a finite number ≥ 1 (1 = no guidance), got {guidance_scale!r}.")
    if guidance_interval is None:
        return
    values = guidance_interval.tolist() if hasattr(guidance_interval, "tolist") else guidance_interval
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 2:
        raise ValueError(f"`guidance_interval` must be a pair (t_min, t_max), got {guidance_interval!r}.")
    t_min, t_max = (_real_number(value) for value in values)
    if t_min is None or t_max is None or not (0.0 <= t_min <= t_max <= 1.0):
        raise ValueError(f"`guidance_interval` must satisfy 0 ≤ t_min ≤ t_max ≤ 1, got {tuple(values)!r}.")


class PMFPipeline(DiffusionPipeline, PMFLoraLoaderMixin):
    r"""
    One-step (or few-step) class-conditional image generation with pixel MeanFlow (Lu et al., arXiv 2601.22158).

    Guidance is *distilled into the network*: `guidance_scale` (ω) and `guidance_interval` ([t_min, t_max]) are
    network inputs, so sampling runs one batch with no conditional/unconditional doubling. The sample stays in fp32
    through the loop even when the transformer runs in bf16/fp16.

    Args:
        transformer ([`PMFTransformer2DModel`]): The pMF network (only its u-head is used).
        scheduler ([`PMFScheduler`]): Uniform t = 1 → 0 schedule; its `init_noise_sigma` is the noise scale.
        id2label (`dict[int, str]`, *optional*): Class names (comma-separated synonyms). Saved in
            `model_index.json`.
        default_guidance_scale (`float`, defaults to 1.0): ω used when `guidance_scale` is not given.
        default_guidance_interval (`tuple[float, float]`, defaults to (0.0, 1.0)): [t_min, t_max] used when
            `guidance_interval` is not given.
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: PMFTransformer2DModel,
        scheduler: PMFScheduler,
        id2label: dict[int, str] | dict[str, str] | None = None,  # str keys when read back from model_index.json
        default_guidance_scale: float = 1.0,
        default_guidance_interval: tuple[float, float] | list[float] = (0.0, 1.0),
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(
            default_guidance_scale=float(default_guidance_scale),
            default_guidance_interval=[float(value) for value in default_guidance_interval],
        )
        self.set_id2label(id2label)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    def set_id2label(self, id2label: dict[int, str] | dict[str, str] | None) -> None:
        """Set the class names (saved in `model_index.json`) and rebuild the name → id map.

        Used by `load_lora_weights` for adapters with a new label set; `None` removes the names (ids only).
        """
        # JSON turns int keys into strings; normalise back.
        id2label = {int(key): value for key, value in id2label.items()} if id2label else None
        self.id2label = id2label or {}
        # After the attribute: DiffusionPipeline.__setattr__ mirrors config attributes, and the config keeps `None`.
        self.register_to_config(id2label=id2label)
        # name → ids; a synonym shared by two classes (e.g. "crane") maps to both and must be disambiguated by id.
        self.labels: dict[str, list[int]] = class_name_index(self.id2label)

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    def get_label_ids(self, label: int | str | list[int | str]) -> list[int]:
        """Map class names (any listed synonym, case-insensitive) and/or ids to class ids.

        `num_classes` (or the name `"unconditional"`) is the null label. Accepts a bare string or int.
        """
        labels = [label] if isinstance(label, (int, str)) else list(label)
        labels = [int(item) if isinstance(item, torch.Tensor) and item.ndim == 0 else item for item in labels]
        return resolve_class_labels(labels, self.num_classes, self.id2label, self.labels)

    def check_inputs(self, num_inference_steps, guidance_scale, guidance_interval, output_type, callback_inputs):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer ≥ 1, got {num_inference_steps!r}.")
        check_guidance_settings(guidance_scale, guidance_interval)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if callback_inputs is not None and not all(k in self._callback_tensor_inputs for k in callback_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}.")

    def prepare_latents(self, batch_size, generator, latents, device) -> torch.Tensor:
        config = self.transformer.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images: pass one per image.")
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        # z₁ = noise_scale · ε, drawn in fp32 (one draw per image with a generator list, like the official sampler).
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return noise * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_inference_steps: int = 1,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            class_labels (`int`, `str` or a list of them): ImageNet class ids or names (e.g. `"golden retriever"`);
                one image per entry. `num_classes` or `"unconditional"` is the null class.
            num_inference_steps (`int`, defaults to 1): Steps on the uniform schedule t = 1 → 0. pMF is a one-step
                model; more steps are possible.
            guidance_scale (`float`, *optional*): ω ≥ 1, a network input. Defaults to the checkpoint's recommended
                value (`default_guidance_scale` in `model_index.json`).
            guidance_interval (`tuple[float, float]`, *optional*): [t_min, t_max] within [0, 1] where guidance is
                active. Defaults to the checkpoint's recommended interval.
            generator (`torch.Generator` or a list with one per image, *optional*): Seeds the initial noise.
            latents (`torch.Tensor`, *optional*): The initial sample z₁ of shape (B, C, S, S), used as given (it must
                already include the noise scale).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (BHWC in [0, 1]), `"pt"` (BCHW in [0, 1]) or
                `"latent"` (the raw final sample in model units, no clipping).
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): Called after each step as
                `callback(pipe, step_index, timestep, callback_kwargs)`; may return a dict replacing `latents`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): Tensors passed in `callback_kwargs`.

        Examples:
        ```py
        >>> import pmf_diffusers
        >>> pipe = pmf_diffusers.load_official("pMF-B/16")  # or PMFPipeline.from_pretrained(folder)
        >>> image = pipe(class_labels="golden retriever").images[0]
        ```
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        guidance_interval = tuple(self.config.default_guidance_interval if guidance_interval is None else guidance_interval)
        self.check_inputs(
            num_inference_steps, guidance_scale, guidance_interval, output_type, callback_on_step_end_tensor_inputs
        )
        label_ids = self.get_label_ids(class_labels)
        batch_size = len(label_ids)
        device = self._execution_device
        dtype = self.transformer.dtype

        latents = self.prepare_latents(batch_size, generator, latents, device)
        class_ids = torch.tensor(label_ids, device=device, dtype=torch.long)
        guidance = torch.full((batch_size,), guidance_scale, device=device, dtype=torch.float32)
        interval_start = torch.full((batch_size,), guidance_interval[0], device=device, dtype=torch.float32)
        interval_end = torch.full((batch_size,), guidance_interval[1], device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        sigmas = self.scheduler.sigmas

        # A bar for one network call is noise; show it for multi-step sampling.
        steps = self.progress_bar(timesteps) if num_inference_steps > 1 else timesteps
        for i, timestep in enumerate(steps):
            t = sigmas[i].expand(batch_size)
            r = sigmas[i + 1].expand(batch_size)
            x_pred = self.transformer(
                hidden_states=latents.to(dtype),
                timestep=t,
                r_timestep=r,
                class_labels=class_ids,
                guidance=guidance,
                guidance_interval_start=interval_start,
                guidance_interval_end=interval_end,
                return_dict=False,
            )[0]
            latents = self.scheduler.step(x_pred, timestep, latents, return_dict=False)[0]

            if callback_on_step_end is not None:
                callback_kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                callback_outputs = callback_on_step_end(self, i, timestep, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
