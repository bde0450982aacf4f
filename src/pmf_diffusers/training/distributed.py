# Copyright 2026 The pmf-diffusers developers. MIT License.
"""What `pmf_diffusers.training` supports under 🤗 accelerate, and the helpers for sharded weights.

The Muon optimizer, the EMA and `pmf_loss`'s no-grad JVP pass work with plain weights (one process, DDP) and with
FSDP2-sharded ones (`DTensor`); DeepSpeed, Megatron-LM and FSDP1 are refused by [`check_distributed_setup`]. Under
FSDP2 every process holds a shard: [`full_tensor`] and [`gather_state_dict`] gather the whole tensors (collective:
call them on every process).
"""

from __future__ import annotations

import torch

__all__ = ["check_distributed_setup", "full_tensor", "gather_state_dict", "unwrap_model", "weights_are_finite"]


def check_distributed_setup(accelerator) -> None:
    """Raise `ValueError` (one line naming the launch to use) for a distributed setup training does not support."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(
            f"{accelerator.distributed_type} is not supported: the Muon optimizer, the EMA and pmf_loss's no-grad JVP "
            "pass work with plain or FSDP2-sharded (DTensor) weights. Use DDP (`accelerate launch --multi_gpu`) or "
            "FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`, docs/training.md)."
        )
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ValueError("FSDP1 is not supported: launch with --fsdp_version 2 (or fsdp_version: 2 in the accelerate "
                         "config).")
    if accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
        raise ValueError("FSDP cpu_ram_efficient_loading (on by default in `accelerate launch`) only works for "
                         "🤗 Transformers models: pass --fsdp_cpu_ram_efficient_loading false.")


def unwrap_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare model behind accelerate's wrappers (DDP, FSDP) and `torch.compile`."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (collective: every process must call it), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_state_dict(accelerator, model: torch.nn.Module, ema=None, ema_key: str | None = None):
    """The weights (with the EMA `ema_key` applied) as full fp32 CPU tensors on the main process, None elsewhere.

    Collective: call it on every process; under FSDP the weights and the EMA shadows are gathered from the shards.
    The EMA must track every parameter (full training, not LoRA)."""
    state_dict = accelerator.get_state_dict(model)
    shadows = [full_tensor(s) for s in ema[ema_key].shadow_params] if ema is not None and ema_key is not None else None
    if not accelerator.is_main_process:
        return None
    state_dict = {k: v.detach().float().cpu().clone() for k, v in state_dict.items()}
    if shadows is not None:
        names = [name for name, _ in unwrap_model(accelerator, model).named_parameters()]
        for name, shadow in zip(names, shadows):
            state_dict[name] = shadow.detach().float().cpu().clone()
    return state_dict


def weights_are_finite(accelerator, parameters) -> bool:
    """Whether the weights are finite on every process (each checks its own shard under FSDP2). Collective."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in parameters]
    finite = torch.tensor(float(all(torch.isfinite(p).all() for p in local)), device=accelerator.device)
    return accelerator.reduce(finite, "sum").item() == accelerator.num_processes
