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
from ..loaders.single_file import PMFFromSingleFileMixin
from ..models.transformer_pmf import PMFAttention, PMFTransformer2DModel
from ..remote_code import PMFRemoteCodeMixin
from ..schedulers.scheduling_pmf import PMFScheduler

logger = logging.get_logger(__name__)

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "PMFPipeline", "check_guidance_settings", "load_imagenet_id2label"]


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
            raise ValueError(
                f"`guidance_scale` (ω) must be a finite number ≥ 1 (1 = no guidance), got {guidance_scale!r}."
            )
    if guidance_interval is None:
        return
    values = _interval_values(guidance_interval)
    if values is None:
        raise ValueError(f"`guidance_interval` must be a pair (t_min, t_max), got {guidance_interval!r}.")
    t_min, t_max = values
    if t_min is None or t_max is None or not (0.0 <= t_min <= t_max <= 1.0):
        raise ValueError(f"`guidance_interval` must satisfy 0 ≤ t_min ≤ t_max ≤ 1, got {guidance_interval!r}.")


def _check_latents(latents, source: str = "`latents`") -> None:
    """Raise a one-line error unless `latents` is a floating-point torch tensor with only finite values: NaN or inf
    noise gives an all-black image without a word. The one check for latents passed in and returned by a step-end
    callback."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(
            f"{source} must be a torch.Tensor, got {type(latents).__name__}: convert it with "
            "`torch.from_numpy(latents)` (or `torch.as_tensor`)."
        )
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise ValueError(
            f"{source} must be finite floating-point noise, got a {latents.dtype} tensor"
            f"{'' if not latents.is_floating_point() else ' with NaN or infinite values'}."
        )


def _interval_values(guidance_interval) -> tuple[float | None, float | None] | None:
    """(t_min, t_max) as floats (`None` for an entry that is not a real number), or `None` if it is not a pair."""
    values = guidance_interval.tolist() if hasattr(guidance_interval, "tolist") else guidance_interval
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 2:
        return None
    return _real_number(values[0]), _real_number(values[1])


class PMFPipeline(PMFRemoteCodeMixin, DiffusionPipeline, PMFLoraLoaderMixin, PMFFromSingleFileMixin):
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

    def get_label_ids(self, label) -> list[int]:
        """Map class names (any listed synonym, case-insensitive) and/or ids to class ids.

        Accepts one label or a list of them; ids may be ints, NumPy integers or integer tensors/arrays (any integer
        dtype). Float and bool labels are refused (never truncated). `num_classes` (or the name `"unconditional"`) is
        the null label.
        """
        return resolve_class_labels(label, self.num_classes, self.id2label, self.labels)

    # diffusers' pipeline conventions: the settings of the running (or last) call, readable and settable by
    # `callback_on_step_end` (e.g. `pipe._guidance_scale += 1`, used from the next step on).
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_interval(self) -> tuple[float, float]:
        return self._guidance_interval

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def fuse_qkv_projections(self) -> None:
        """Fuse the transformer's query/key/value projections into one `to_qkv` layer (sampling only; bit-identical
        outputs). Refused while LoRA layers are live on `to_q`/`to_k`/`to_v`: merge them first (`fuse_lora()`, then
        `unload_lora_weights()`). See [`~PMFTransformer2DModel.fuse_qkv_projections`]."""
        # Check every attention layer before fusing any, so a refusal leaves the model as it was.
        for module in self.transformer.modules():
            if isinstance(module, PMFAttention):
                module.check_fused_projections()
        self.transformer.fuse_qkv_projections()

    def unfuse_qkv_projections(self) -> None:
        """Go back to the separate query/key/value projections (before saving, training or loading LoRA)."""
        self.transformer.unfuse_qkv_projections()

    def check_inputs(
        self,
        num_inference_steps,
        guidance_scale,
        guidance_interval,
        output_type,
        callback_inputs,
        generator=None,
        latents=None,
        max_batch_size=None,
    ):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer ≥ 1, got {num_inference_steps!r}.")
        check_guidance_settings(guidance_scale, guidance_interval)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if callback_inputs is not None and not all(k in self._callback_tensor_inputs for k in callback_inputs):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}."
            )
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(item, torch.Generator) for item in generators):
            raise TypeError(
                f"`generator` must be a torch.Generator or a list with one per image, got {generator!r}: for a seed, "
                "pass `generator=torch.Generator().manual_seed(seed)`."
            )
        if latents is not None:
            _check_latents(latents)
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(f"`max_batch_size` must be a positive integer or None, got {max_batch_size!r}.")

    def prepare_latents(self, batch_size, generator, latents, device) -> torch.Tensor:
        config = self.transformer.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images: pass one per image.")
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        # z₁ = noise_scale · ε, drawn in fp32 for the whole batch at once (one draw per image with a generator list,
        # like the official sampler), so sub-batching never changes an image's noise.
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return noise * self.scheduler.init_noise_sigma

    def predict_x(self, latents, class_ids, t, r, max_batch_size) -> torch.Tensor:
        """The u-head's x-prediction for every sample, in sub-batches of at most `max_batch_size` images.

        Guidance comes from `self._guidance_scale` / `self._guidance_interval`, which a step-end callback may have
        changed. Samples never interact in the network, so sub-batching only bounds the activation memory.
        """
        check_guidance_settings(self._guidance_scale, self._guidance_interval)
        dtype = self.transformer.dtype
        batch_size = latents.shape[0]
        chunk_size = batch_size if max_batch_size is None else max_batch_size
        predictions = []
        for start in range(0, batch_size, chunk_size):
            chunk = slice(start, start + chunk_size)
            count = len(class_ids[chunk])

            def constant(value):
                return torch.full((count,), float(value), device=latents.device, dtype=torch.float32)

            predictions.append(
                self.transformer(
                    hidden_states=latents[chunk].to(dtype),
                    timestep=t.expand(count),
                    r_timestep=r.expand(count),
                    class_labels=class_ids[chunk],
                    guidance=constant(self._guidance_scale),
                    guidance_interval_start=constant(self._guidance_interval[0]),
                    guidance_interval_end=constant(self._guidance_interval[1]),
                    return_dict=False,
                )[0]
            )
        return predictions[0] if len(predictions) == 1 else torch.cat(predictions)

    def postprocess(self, latents, output_type, max_batch_size):
        """Images from the final samples; converted in sub-batches so a long list never holds several float copies."""
        if output_type == "latent":
            return latents
        chunk_size = len(latents) if max_batch_size is None else max_batch_size
        parts = [
            self.image_processor.postprocess(latents[start : start + chunk_size], output_type=output_type)
            for start in range(0, len(latents), chunk_size)
        ]
        if len(parts) == 1:
            return parts[0]
        if output_type == "pil":
            return [image for part in parts for image in part]
        return np.concatenate(parts) if output_type == "np" else torch.cat(parts)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor,
        num_inference_steps: int = 1,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_batch_size: int | None = DEFAULT_MAX_BATCH_SIZE,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            class_labels (`int`, `str`, a list of them, or an integer tensor/array): ImageNet class ids or names (e.g.
                `"golden retriever"`); one image per entry. `num_classes` or `"unconditional"` is the null class.
                Float and bool labels are refused.
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
                `callback(pipe, step_index, timestep, callback_kwargs)` and must return a dict (usually
                `callback_kwargs`); a `latents` entry replaces the sample. It may also change `pipe._guidance_scale`,
                `pipe._guidance_interval` (used from the next step on) or set `pipe._interrupt = True` (skip the
                remaining steps).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): Tensors passed in `callback_kwargs`.
            max_batch_size (`int` or `None`, defaults to `DEFAULT_MAX_BATCH_SIZE` = 64): Most images per
                transformer call. A longer label list runs in sub-batches with the same images (the noise of the
                whole batch is drawn first, exactly as without sub-batching; values agree to float rounding), so the
                activation memory stays bounded; only the samples and outputs grow with the number of images.
                `None` runs the whole batch at once.

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
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        guidance_interval = self.config.default_guidance_interval if guidance_interval is None else guidance_interval
        self.check_inputs(
            num_inference_steps,
            guidance_scale,
            guidance_interval,
            output_type,
            callback_on_step_end_tensor_inputs,
            generator=generator,
            latents=latents,
            max_batch_size=max_batch_size,
        )
        self._guidance_scale = _real_number(guidance_scale)
        self._guidance_interval = _interval_values(guidance_interval)
        self._interrupt = False

        label_ids = self.get_label_ids(class_labels)
        batch_size = len(label_ids)
        device = self._execution_device

        latents = self.prepare_latents(batch_size, generator, latents, device)
        class_ids = torch.tensor(label_ids, device=device, dtype=torch.long)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        sigmas = self.scheduler.sigmas
        self._num_timesteps = len(timesteps)

        # A bar for one network call is noise; show it for multi-step sampling.
        steps = self.progress_bar(timesteps) if num_inference_steps > 1 else timesteps
        for i, timestep in enumerate(steps):
            if self.interrupt:
                continue
            x_pred = self.predict_x(latents, class_ids, sigmas[i], sigmas[i + 1], max_batch_size)
            latents = self.scheduler.step(x_pred, timestep, latents, return_dict=False)[0]

            if callback_on_step_end is not None:
                callback_kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                callback_outputs = callback_on_step_end(self, i, timestep, callback_kwargs)
                latents = self._latents_from_callback(callback_outputs, latents)

        images = self.postprocess(latents, output_type, max_batch_size)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def _latents_from_callback(callback_outputs, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(callback_outputs, dict):
            raise TypeError(
                f"`callback_on_step_end` must return a dict (usually the `callback_kwargs` it was given), got "
                f"{type(callback_outputs).__name__}."
            )
        new_latents = callback_outputs.pop("latents", latents)
        _check_latents(new_latents, source="The `latents` returned by `callback_on_step_end`")
        if new_latents.shape != latents.shape:
            raise ValueError(
                f"`callback_on_step_end` returned `latents` of shape {tuple(new_latents.shape)}; expected a tensor of "
                f"shape {tuple(latents.shape)}."
            )
        return new_latents.to(device=latents.device, dtype=latents.dtype)
