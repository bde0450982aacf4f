"""Muon + AdamW optimiser matching the official pMF optimiser.

The official JAX code trains with ``optax.contrib.muon(learning_rate=1e-3, adam_b2=0.95)`` and all other
defaults.  That call partitions the parameter tree by *Flax rank*: rank-2 arrays go through Muon, everything
else through AdamW.  This module re-implements both halves from their mathematical definition for PyTorch:

Muon part (param groups with ``use_muon=True``; 2-D torch weights laid out ``(out, in)`` like ``nn.Linear``)::

    m_s   = beta * m_{s-1} + (1 - beta) * g_s                              (s = 1-based step)
    g_hat = beta * m_s / (1 - beta**(s+1)) + (1 - beta) * g_s / (1 - beta**s)   (Nesterov + bias correction)
    O     = NewtonSchulz5(g_hat)                                          (fp32, see below)
    u     = sqrt(max(1, fan_out / fan_in)) * O  [+ weight_decay * p]
    p    <- p - lr * u

Newton-Schulz (coefficients (a, b, c)) is carried out exactly as optax does it on the *Flax* kernel layout
``(in, out) = W.T``: ``X = W.T``; if ``X`` has more rows than columns it is transposed; ``X /= ||X||_F + eps``;
``ns_steps`` times ``A = X X^T; B = b A + c A A; X = a X + B X``; undo the transpose(s).  Mathematically the
orientation does not matter, numerically it does (for square matrices optax iterates on ``W^T``, i.e. forms
``W^T W``), so the torch weight is processed in the Flax orientation.

Adam part (``use_muon=False``; everything else)::

    m_s   = b1 * m_{s-1} + (1 - b1) * g_s
    v_s   = b2 * v_{s-1} + (1 - b2) * g_s**2
    m_hat = b1 * m_s / (1 - b1**(s+1)) + (1 - b1) * g_s / (1 - b1**s)   (nesterov=True, optax/NAdam style)
    v_hat = v_s / (1 - b2**s)
    u     = m_hat / (sqrt(v_hat + eps_root) + eps)  [+ weight_decay * p]
    p    <- p - lr * u

All optimiser state lives in the ordinary ``torch.optim.Optimizer`` state (``step``, ``momentum_buffer`` /
``exp_avg``, ``exp_avg_sq``), so ``state_dict()`` / ``load_state_dict()`` and accelerate's
``save_state`` / ``load_state`` resume exactly.

Unlike ``torch.optim.Muon`` (bf16 Newton-Schulz, different momentum and scaling conventions) the orthogonalisation
here always runs in fp32.

Sharded parameters (FSDP2 ``DTensor`` s): the Adam part and the Muon momentum are elementwise and run on each
process's shard. Newton-Schulz needs the whole matrix, so the momentum-corrected update is gathered with
``full_tensor()`` (collective), orthogonalised on every process (redundant but small next to the model's work) and
only the process's own shard of the result is applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["Muon", "muon_param_groups", "newton_schulz_orthogonalize"]

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_orthogonalize(
    x: torch.Tensor,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Approximate orthogonalisation of a matrix (or a batch ``(..., R, C)`` of matrices) as in optax.

    Works on the given orientation: if ``R > C`` the matrix is transposed first (so the Gram matrix is the small
    one), normalised by its Frobenius norm + ``eps``, iterated ``ns_steps`` times and transposed back.  The
    computation is done in fp32 and the result is returned in fp32.
    """
    if x.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(x.shape)}")
    a, b, c = (float(v) for v in ns_coefficients)
    x = x.to(torch.float32)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm + eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x


def _bias_correction(beta: float, count: int) -> float:
    # 1 - beta**count, rounded to fp32 like optax (the division is then an fp32 op); numpy rounds like torch, on the
    # host without creating a tensor.
    return float(np.float32(1.0 - beta**count))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D ``nn.Linear``-style weights + (Nesterov) AdamW for everything else.

    Reproduces ``optax.contrib.muon(learning_rate=lr, adam_b2=0.95)`` (optax 0.2.5 - 0.2.8) when the parameter
    groups are built with :func:`muon_param_groups`.  Each param group carries a boolean ``use_muon`` flag
    (default ``False`` if missing); all other hyper-parameters may also be overridden per group.

    Args:
        params: iterable of parameters or of param-group dicts (with ``use_muon``).
        lr: learning rate shared by both parts (``learning_rate`` in optax).
        momentum: Muon momentum ``beta`` (optax ``beta``).
        nesterov: Nesterov momentum with bias correction, applied to both Muon and Adam parts (optax passes its
            ``nesterov`` flag to both).
        ns_steps: number of Newton-Schulz iterations.
        ns_coefficients: quintic Newton-Schulz coefficients ``(a, b, c)``.
        eps: Newton-Schulz normalisation epsilon (``||X||_F + eps``).
        adam_betas: ``(b1, b2)`` of the Adam part.
        adam_eps: Adam denominator epsilon.
        adam_eps_root: Adam epsilon inside the square root.
        weight_decay: decoupled weight decay (added to the update before the ``lr`` scaling, optax
            ``add_decayed_weights`` semantics) for both parts; 0 in the official recipe.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
        eps: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_eps_root: float = 0.0,
        weight_decay: float = 0.0,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not (0.0 <= adam_betas[0] < 1.0 and 0.0 <= adam_betas[1] < 1.0):
            raise ValueError(f"Invalid adam_betas: {adam_betas}")
        if len(tuple(ns_coefficients)) != 3:
            raise ValueError("ns_coefficients must be a triple (a, b, c)")
        defaults = dict(
            lr=lr,
            use_muon=False,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=int(ns_steps),
            ns_coefficients=tuple(float(v) for v in ns_coefficients),
            eps=eps,
            adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
            adam_eps_root=adam_eps_root,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(
                            f"Muon param groups may only hold 2-D weights, got shape {tuple(p.shape)}"
                        )
        self._host_steps: dict[int, int] = {}  # id(param) -> step count (see `_next_step`)

    def __setstate__(self, state):  # also run by `load_state_dict`
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("use_muon", False)
        self._host_steps = {}

    # ------------------------------------------------------------------------------------------------------
    def _next_step(self, param: torch.Tensor, state: dict) -> int:
        """Advance the parameter's step count. `state["step"]` (a tensor, as in torch's optimizers) is what a
        checkpoint keeps; the host keeps its own copy, so the count is read from the tensor only once after a
        `load_state_dict` (where it may have been mapped to the GPU), never per step."""
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            self._host_steps[id(param)] = 0
        elif id(param) not in self._host_steps:
            self._host_steps[id(param)] = int(state["step"].item())
        state["step"] += 1
        self._host_steps[id(param)] += 1
        return self._host_steps[id(param)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group)
            else:
                self._adam_group_step(group)
        return loss

    # ------------------------------------------------------------------------------------------------------
    def _muon_group_step(self, group: dict) -> None:
        beta = group["momentum"]
        lr = group["lr"]
        wd = group["weight_decay"]
        # Bucket by (step, shape, device) so Newton-Schulz runs batched over same-shaped matrices.
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if p.ndim != 2:
                raise ValueError(f"Muon param groups may only hold 2-D weights, got shape {tuple(p.shape)}")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            count = self._next_step(p, state)
            g = p.grad.to(torch.float32)
            m = state["momentum_buffer"]
            # m = (1 - beta) * g + beta * m   (optax tree_update_moment)
            m.mul_(beta).add_(g, alpha=1.0 - beta)
            if group["nesterov"]:
                bc_next = _bias_correction(beta, count + 1)
                bc = _bias_correction(beta, count)
                g_hat = (m / bc_next).mul_(beta).add_((g / bc).mul_(1.0 - beta))
            else:
                g_hat = m / _bias_correction(beta, count)
            if isinstance(g_hat, DTensor):
                g_hat = g_hat.full_tensor()  # FSDP2: the whole matrix, identical on every process
            # Flax kernel layout (in, out) = W.T: optax orthogonalises that orientation.
            key = (count, tuple(p.shape), g_hat.device)
            buckets.setdefault(key, []).append((p, g_hat.T))

        for (_, shape, _), items in buckets.items():
            flax_stack = torch.stack([x for _, x in items]) if len(items) > 1 else items[0][1].unsqueeze(0)
            ortho = newton_schulz_orthogonalize(
                flax_stack, group["ns_coefficients"], group["ns_steps"], group["eps"]
            )
            fan_out, fan_in = shape  # torch (out, in)
            scale = math.sqrt(max(1.0, fan_out / fan_in))
            for i, (p, _) in enumerate(items):
                upd = ortho[i].T * scale
                if isinstance(p, DTensor):  # keep this process's shard (no communication)
                    upd = distribute_tensor(upd, p.device_mesh, p.placements, src_data_rank=None)
                if wd != 0.0:
                    upd = upd + wd * p.to(torch.float32)
                p.add_(upd.to(p.dtype), alpha=-lr)

    def _adam_group_step(self, group: dict) -> None:
        b1, b2 = group["adam_betas"]
        lr = group["lr"]
        eps = group["adam_eps"]
        eps_root = group["adam_eps_root"]
        wd = group["weight_decay"]
        # Bucket by step count and dtype so the elementwise work can use foreach kernels.
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon/Adam does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            count = self._next_step(p, state)
            buckets.setdefault((count, p.device, p.dtype), []).append(p)

        for (count, _, _), params in buckets.items():
            grads = [p.grad for p in params]
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            # m = (1 - b1) g + b1 m ;  v = (1 - b2) g^2 + b2 v
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, grads, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_add_(vs, torch._foreach_mul(grads, grads), alpha=1.0 - b2)
            bc1 = _bias_correction(b1, count)
            bc2 = _bias_correction(b2, count)
            if group["nesterov"]:
                bc1_next = _bias_correction(b1, count + 1)
                m_hat = torch._foreach_div(ms, bc1_next)
                torch._foreach_mul_(m_hat, b1)
                g_term = torch._foreach_div(grads, bc1)
                torch._foreach_mul_(g_term, 1.0 - b1)
                torch._foreach_add_(m_hat, g_term)
                del g_term
            else:
                m_hat = torch._foreach_div(ms, bc1)
            denom = torch._foreach_div(vs, bc2)
            if eps_root != 0.0:
                torch._foreach_add_(denom, eps_root)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_div_(m_hat, denom)
            del denom
            if wd != 0.0:
                torch._foreach_add_(m_hat, params, alpha=wd)
            torch._foreach_add_(params, m_hat, alpha=-lr)


def muon_param_groups(model: nn.Module, lr: float | None = None, **group_kwargs) -> list[dict]:
    """Split ``model``'s trainable parameters into a Muon group and an Adam group, as the official optimiser does.

    Routing is by module type (not by name): the ``weight`` of every ``nn.Linear`` (including subclasses) goes
    to Muon; everything else -- biases, conv kernels, norm scales, residual gates, learned token groups,
    position embeddings, and the ``nn.Embedding`` label table (2-D in torch but 3-D, hence Adam, in the official
    Flax model) -- goes to Adam.  Only parameters with ``requires_grad`` are included; shared parameters appear
    once.  Empty groups are omitted.  ``lr`` and ``group_kwargs`` are copied into both groups.
    """
    muon_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if w is not None and w.ndim == 2:
                muon_ids.add(id(w))
    muon, adam, seen = [], [], set()
    for p in model.parameters():  # deduplicated by nn.Module.parameters()
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if id(p) in muon_ids else adam).append(p)
    extra = dict(group_kwargs)
    if lr is not None:
        extra["lr"] = lr
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, **extra})
    if adam:
        groups.append({"params": adam, "use_muon": False, **extra})
    return groups
