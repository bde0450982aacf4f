# Copyright 2026 The pmf-diffusers developers. MIT License.
"""PMFScheduler: the pixel MeanFlow sampler (uniform t = 1 → 0 in N steps, x-prediction → average velocity)."""

import math
from dataclasses import dataclass

import torch

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


def check_noise_scale(noise_scale: float) -> float:
    """Raise a one-line `ValueError` unless `noise_scale` is a finite number > 0; returns it as a float.

    The one place this rule lives: the scheduler, `pmf convert` and the conversion helpers call it."""
    try:
        value = float(noise_scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(noise_scale, bool) or not (0.0 < value < math.inf):  # the comparisons also reject NaN
        raise ValueError(f"`noise_scale` must be a finite number > 0, got {noise_scale!r}.")
    return value


@dataclass
class PMFSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): z_r, the sample at the target time r (the next model input).
        pred_original_sample (`torch.Tensor`): x̂, the model's clean-image prediction at the current step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class PMFScheduler(SchedulerMixin, ConfigMixin):
    """
    Sampler of pixel MeanFlow (Lu et al., 2026). The model predicts a clean image x̂ at time t; the average velocity
    over [r, t] is u = (z_t − x̂) / max(t, `min_time`) and one step moves z_t to z_r = z_t − (t − r)·u. With one step
    (t = 1 → r = 0) the result is exactly x̂.

    The public surface mirrors diffusers' `FlowMapEulerDiscreteScheduler`: `timesteps` has one entry per step in
    units of `num_train_timesteps` (t · 1000), `sigmas` has N + 1 entries ending in 0 (the times t themselves), and
    `step(..., r_timestep=None)` defaults to the next time on the schedule.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Scale between times t ∈ [0, 1] and `timesteps`.
        noise_scale (`float`, defaults to 1.0): Standard deviation of the initial noise z₁ = noise_scale·ε; exposed
            as `init_noise_sigma`. Official values: 1.0 (B/16, L/16), 2.0 (B/32, H/16), 4.0 (L/32, H/32).
        min_time (`float`, defaults to 0.05): Floor of t in the x → u conversion (official 0.05).
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, noise_scale: float = 1.0, min_time: float = 0.05):
        check_noise_scale(noise_scale)  # an inf/NaN/0 scale would give an all-black or all-NaN image
        self.init_noise_sigma = noise_scale
        self.num_inference_steps = None
        self.sigmas = None
        self.timesteps = None
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process z_t = (1 − t)·x + t·noise (`noise` already multiplied by `noise_scale`)."""
        t = (timestep / self.config.num_train_timesteps).to(sample.dtype)
        t = t.view(*t.shape, *([1] * (sample.ndim - t.ndim)))
        return (1 - t) * sample + t * noise

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        timesteps: list[float] | None = None,
    ):
        """Build the schedule: by default the official uniform times linspace(1, 0, N + 1).

        Args:
            num_inference_steps (`int`, *optional*): Number of steps N ≥ 1.
            device: Where to put `sigmas` / `timesteps`.
            sigmas (`list[float]`, *optional*): Custom decreasing times in (0, 1] (N entries; the final 0 is appended).
            timesteps (`list[float]`, *optional*): The same in `num_train_timesteps` units.
        """
        if sigmas is not None and timesteps is not None:
            raise ValueError("Pass either `sigmas` or `timesteps`, not both.")
        if timesteps is not None:
            sigmas = [float(t) / self.config.num_train_timesteps for t in timesteps]
        if sigmas is not None:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError(f"Got {len(sigmas)} custom times for `num_inference_steps={num_inference_steps}`.")
            num_inference_steps = len(sigmas)
            working = torch.tensor(sigmas, dtype=torch.float32)
            if (working <= 0).any() or (working > 1).any() or (working[1:] >= working[:-1]).any():
                raise ValueError(f"Custom times must be strictly decreasing in (0, 1], got {sigmas}.")
            full = torch.cat([working, working.new_zeros(1)])
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"`num_inference_steps` must be an integer ≥ 1, got {num_inference_steps}.")
            num_inference_steps = int(num_inference_steps)
            # fp32 like the official sampler, so multi-step times are bit-identical to it.
            full = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float32)

        self.num_inference_steps = num_inference_steps
        self.sigmas = full.to(device)
        self.timesteps = (full[:-1] * self.config.num_train_timesteps).to(device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int | None:
        """Index of `timestep` on the schedule, or `None` when it is off-schedule."""
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        diffs = (self.timesteps.float().cpu() - value).abs()
        index = int(diffs.argmin())
        return index if diffs[index] <= 1e-3 else None

    def _time(self, timestep: float | torch.Tensor, index: int | None) -> torch.Tensor:
        if index is not None:
            return self.sigmas[index].float()
        value = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        return value.float() / self.config.num_train_timesteps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        r_timestep: float | torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PMFSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Move `sample` z_t to z_r given the model's x-prediction `model_output`.

        Args:
            model_output (`torch.Tensor`): x̂, the u-head x-prediction (any float dtype; the maths runs in fp32).
            timestep (`float` or `torch.Tensor`): t in `num_train_timesteps` units (an entry of `self.timesteps`, or
                any value for off-schedule sampling).
            sample (`torch.Tensor`): z_t.
            r_timestep (`float` or `torch.Tensor`, *optional*): r in the same units; defaults to the next time on
                the schedule.
            return_dict (`bool`): Return a [`PMFSchedulerOutput`] instead of `(prev_sample, pred_original_sample)`.
        """
        if self.timesteps is None:
            raise ValueError("`set_timesteps` has not been called.")
        t_index = self.index_for_timestep(timestep)
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else (t_index or 0)
        if r_timestep is None:
            if t_index is None:
                raise ValueError("`timestep` is off the schedule: pass `r_timestep` explicitly.")
            r = self.sigmas[t_index + 1].float()
        else:
            r = self._time(r_timestep, self.index_for_timestep(r_timestep))
        t = self._time(timestep, t_index)
        t = t.to(sample.device).reshape(-1, *([1] * (sample.ndim - 1)))
        r = r.to(sample.device).reshape(-1, *([1] * (sample.ndim - 1)))

        sample_fp32 = sample.float()
        pred_original_sample = model_output.float()
        mean_velocity = (sample_fp32 - pred_original_sample) / t.clamp(min=self.config.min_time)
        prev_sample = (sample_fp32 - (t - r) * mean_velocity).to(sample.dtype)

        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return PMFSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self):
        return self.config.num_train_timesteps
