"""EDM-style ("power function" / half-life ramp-up) EMA of model parameters, as used by the official pMF code.

Official schedule (``main:utils/ema_util.py``, ``ema_type: edm``, ``ema_val`` = half-lives in kimg): after the
optimizer update of step ``s`` (1-based)::

    hl   = min(half_life_kimg * 1000, s * ref_batch * rampup_ratio)     # images
    beta = 0.5 ** (ref_batch / max(hl, 1e-8))
    ema  = beta * ema + (1 - beta) * theta

with ``ref_batch = 1024`` hard-coded in the official code (it is *not* the actual batch size) and
``rampup_ratio = 0.05``.  The EMA is initialised to the initial parameters ``theta_0``.  The official run keeps
three EMAs with half-lives 500, 1000 and 2000 kimg (steady-state beta 0.998581 / 0.999290 / 0.999645, reached at
steps 9766 / 19531 / 39062).

Sharded parameters (FSDP2 ``DTensor`` s) get sharded shadows, updated shard-locally. ``state_dict()`` gathers the full
shadows (collective: call it on every process, as ``accelerator.save_state`` does) so the checkpoint file, written
by the main process, holds whole tensors; ``load_state_dict`` keeps each process's shard of them.

``diffusers.training_utils.EMAModel`` does not implement this schedule (its decay is ``1 - (1 + s) / (10 + s)``
warm-up or the ``inv_gamma``/``power`` schedule, capped at ``decay``), hence these small classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["OFFICIAL_RAMPUP_RATIO", "edm_ema_beta", "PowerEMA", "MultiEMA"]

# The official half-life ramp-up: the half-life is at most this share of the steps taken so far.
OFFICIAL_RAMPUP_RATIO = 0.05


def edm_ema_beta(step: int, half_life_kimg: float, ref_batch: int = 1024, rampup_ratio: float | None = OFFICIAL_RAMPUP_RATIO) -> float:
    """EMA decay ``beta`` applied after optimizer step ``step`` (1-based).  Computed in float64."""
    hl = float(half_life_kimg) * 1000.0
    if rampup_ratio is not None:
        hl = min(hl, float(step) * float(ref_batch) * float(rampup_ratio))
    return 0.5 ** (float(ref_batch) / max(hl, 1e-8))


def _as_list(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    return list(parameters)


def _check_count(params: list[torch.Tensor], expected: int) -> None:
    if len(params) != expected:
        raise ValueError(f"expected {expected} parameters, got {len(params)}")


def _ema_key(half_life_kimg: float) -> str:
    """The name of the EMA with this half-life: ``"ema_<half-life kimg>"`` (e.g. ``"ema_500"``)."""
    return f"ema_{float(half_life_kimg):g}"


class _StoredParameters:
    """``store`` / ``restore`` of the training parameters around a swap-in of EMA weights."""

    _stored: list[torch.Tensor] | None = None

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save a copy of the current (training) parameters, e.g. before ``copy_to`` for validation."""
        self._stored = [p.detach().clone() for p in _as_list(parameters)]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by ``store`` (and drop the stored copy)."""
        if self._stored is None:
            raise RuntimeError("restore() called without a preceding store()")
        params = _as_list(parameters)
        _check_count(params, len(self._stored))
        for s, p in zip(self._stored, params):
            p.data.copy_(s)
        self._stored = None


class PowerEMA(_StoredParameters):
    """EDM half-life EMA of one set of parameters (fp32 shadow copies on the parameters' devices).

    Args:
        parameters: the parameters to track (an iterable of tensors, or an ``nn.Module``); the order must be the
            same in every later call (``step``, ``copy_to``, ``store``, ``restore``).
        half_life_kimg: EMA half-life in thousands of images (official: 500, 1000 or 2000).
        ref_batch: images per step used by the schedule (official hard-coded 1024).
        rampup_ratio: half-life ramp-up ratio (official 0.05); ``None`` disables the ramp-up.

    Usage::

        ema = PowerEMA(model.parameters(), half_life_kimg=500)
        TrainingState(accelerator, ema=ema)  # checkpointed as safetensors (pmf_diffusers.training.checkpointing)
        ...
        optimizer.step(); ema.step(model.parameters())
        ema.store(model.parameters()); ema.copy_to(model.parameters()); evaluate(); ema.restore(model.parameters())
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        half_life_kimg: float = 500.0,
        ref_batch: int = 1024,
        rampup_ratio: float | None = OFFICIAL_RAMPUP_RATIO,
    ):
        params = _as_list(parameters)
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"`rampup_ratio` must be > 0 (or None for no ramp-up), got {rampup_ratio}.")
        self.half_life_kimg = float(half_life_kimg)
        self.ref_batch = int(ref_batch)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.num_updates = 0
        self.shadow_params: list[torch.Tensor] = [
            p.detach().to(dtype=torch.float32, copy=True) for p in params
        ]
        self._stored: list[torch.Tensor] | None = None

    # -- schedule -------------------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """``beta`` used for the update after optimizer step ``step`` (1-based)."""
        return edm_ema_beta(step, self.half_life_kimg, self.ref_batch, self.rampup_ratio)

    @property
    def name(self) -> str:
        return _ema_key(self.half_life_kimg)

    # -- update ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor], global_step: int | None = None) -> float:
        """Update the shadows after one optimizer step; returns the ``beta`` used.

        ``global_step`` (1-based optimizer step just taken) overrides the internal counter, which otherwise
        counts calls to ``step``.
        """
        params = _as_list(parameters)
        _check_count(params, len(self.shadow_params))
        self.num_updates = int(global_step) if global_step is not None else self.num_updates + 1
        beta = self.decay_at(self.num_updates)
        # Group by device so foreach kernels can be used; cast non-fp32 parameters.
        by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for s, p in zip(self.shadow_params, params):
            p = p.detach()
            if p.device != s.device or p.dtype != s.dtype:
                p = p.to(device=s.device, dtype=s.dtype)
            shadows, srcs = by_device.setdefault(s.device, ([], []))
            shadows.append(s)
            srcs.append(p)
        for shadows, srcs in by_device.values():
            torch._foreach_mul_(shadows, beta)
            torch._foreach_add_(shadows, srcs, alpha=1.0 - beta)
        return beta

    # -- swapping weights in and out ------------------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the EMA weights into ``parameters`` (cast to their dtype/device)."""
        params = _as_list(parameters)
        _check_count(params, len(self.shadow_params))
        for s, p in zip(self.shadow_params, params):
            p.data.copy_(s.to(device=p.device, dtype=p.dtype))

    def to(self, device=None) -> "PowerEMA":
        self.shadow_params = [s.to(device=device) for s in self.shadow_params]
        return self

    # -- checkpointing --------------------------------------------------------------------------------------
    @staticmethod
    def _full(shadow: torch.Tensor) -> torch.Tensor:
        """A full copy of a shadow (gathered across processes when sharded)."""
        return shadow.full_tensor() if isinstance(shadow, DTensor) else shadow.detach().clone()

    def full_shadow_params(self) -> list[torch.Tensor]:
        """The shadows as whole tensors (collective when sharded: call it on every process)."""
        return [self._full(s) for s in self.shadow_params]

    def state_dict(self) -> dict:
        return {
            "half_life_kimg": self.half_life_kimg,
            "ref_batch": self.ref_batch,
            "rampup_ratio": self.rampup_ratio,
            "num_updates": self.num_updates,
            "shadow_params": self.full_shadow_params(),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        shadows = state_dict["shadow_params"]
        if len(shadows) != len(self.shadow_params):
            raise ValueError(f"state has {len(shadows)} shadow params, expected {len(self.shadow_params)}")
        for s, src in zip(self.shadow_params, shadows):
            if tuple(s.shape) != tuple(src.shape):
                raise ValueError(f"shape mismatch: {tuple(src.shape)} vs {tuple(s.shape)}")
            src = src.to(device=s.device, dtype=s.dtype)
            if isinstance(s, DTensor):  # this process's shard of the full tensor (no communication)
                src = distribute_tensor(src, s.device_mesh, s.placements, src_data_rank=None)
            s.copy_(src)
        self.half_life_kimg = float(state_dict.get("half_life_kimg", self.half_life_kimg))
        self.ref_batch = int(state_dict.get("ref_batch", self.ref_batch))
        self.rampup_ratio = state_dict.get("rampup_ratio", self.rampup_ratio)
        self.num_updates = int(state_dict["num_updates"])

    def __repr__(self) -> str:
        return (
            f"PowerEMA(half_life_kimg={self.half_life_kimg:g}, ref_batch={self.ref_batch}, "
            f"rampup_ratio={self.rampup_ratio}, num_updates={self.num_updates}, n_params={len(self.shadow_params)})"
        )


class MultiEMA(_StoredParameters):
    """Several :class:`PowerEMA` s of the same parameters, keyed ``"ema_<half-life kimg>"`` (e.g. ``"ema_500"``).

    Official pMF: ``MultiEMA(model.parameters(), half_lives_kimg=(500, 1000, 2000))``.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        half_lives_kimg: Sequence[float] = (500.0, 1000.0, 2000.0),
        ref_batch: int = 1024,
        rampup_ratio: float | None = OFFICIAL_RAMPUP_RATIO,
    ):
        params = _as_list(parameters)
        self.emas: dict[str, PowerEMA] = {}
        for hl in half_lives_kimg:
            ema = PowerEMA(params, half_life_kimg=hl, ref_batch=ref_batch, rampup_ratio=rampup_ratio)
            if ema.name in self.emas:
                raise ValueError(f"duplicate half-life {hl}")
            self.emas[ema.name] = ema
        self._stored: list[torch.Tensor] | None = None

    key_for = staticmethod(_ema_key)

    def keys(self):
        return self.emas.keys()

    def __getitem__(self, key: str | float | int) -> PowerEMA:
        if not isinstance(key, str):
            key = self.key_for(key)
        return self.emas[key]

    def __iter__(self):
        return iter(self.emas)

    def __len__(self) -> int:
        return len(self.emas)

    def items(self):
        return self.emas.items()

    @property
    def num_updates(self) -> int:
        return next(iter(self.emas.values())).num_updates if self.emas else 0

    def decay_at(self, step: int) -> dict[str, float]:
        return {k: e.decay_at(step) for k, e in self.emas.items()}

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor], global_step: int | None = None) -> dict[str, float]:
        params = _as_list(parameters)
        return {k: e.step(params, global_step=global_step) for k, e in self.emas.items()}

    def copy_to(self, parameters: Iterable[torch.Tensor], key: str | float | int) -> None:
        """Copy the EMA with the given key (``"ema_500"`` or ``500``) into ``parameters``."""
        self[key].copy_to(parameters)

    def to(self, device=None) -> "MultiEMA":
        for e in self.emas.values():
            e.to(device)
        return self

    def state_dict(self) -> dict:
        return {k: e.state_dict() for k, e in self.emas.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = set(self.emas) - set(state_dict)
        unexpected = set(state_dict) - set(self.emas)
        if missing or unexpected:
            raise KeyError(f"EMA keys mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for k, e in self.emas.items():
            e.load_state_dict(state_dict[k])

    def __repr__(self) -> str:
        return f"MultiEMA({', '.join(repr(e) for e in self.emas.values())})"
