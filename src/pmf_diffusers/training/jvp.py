# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The u-head JVP of the objective, written out layer by layer.

pmf_loss needs du/dt = J·(v_c, 1, 0): one forward-mode derivative of the trunk + u-head. `torch.func.jvp` gets it
right but costs several forwards (docs/benchmarks.md): every linear layer runs a primal and a tangent GEMM separately, and each
elementwise op (RMSNorm, SwiGLU, softmax) expands into several tangent ops. Here each transformer block carries
(primal, tangent) pairs explicitly:

* linear layers run once on the primal and tangent rows stacked together (they are linear maps, so the tangent is
  just the same layer applied to the tangent rows), one bigger GEMM instead of two;
* RMSNorm, SwiGLU and softmax attention use their closed-form derivatives;
* the cheap parts before and after the blocks (embedders, final norm and projection) still go through
  `torch.func.jvp`, so they cannot drift from the model's own forward.

The result equals `torch.func.jvp` of the model to fp32 rounding (tested). It needs every linear layer inside the
blocks to be a deterministic linear map (no bias, no active dropout); `explicit_jvp_supported` checks that, and
pmf_loss falls back to `torch.func.jvp` otherwise (e.g. LoRA with dropout).

The softmax attention and its tangent (`softmax_attention_jvp`) materialise the score matrix and its tangent. With
`attention="compiled"` that function runs under `torch.compile`, so the softmax and its tangent become fused kernels
(off by default: docs/training.md, "JVP attention").
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..models.transformer_pmf import (
    PMFAttention,
    PMFFeedForward,
    PMFRMSNorm,
    PMFTransformer2DModel,
    PMFTransformerBlock,
    apply_interleaved_rope,
    pad_rope_freqs,
)


# How `u_head_jvp` runs the softmax attention of each block: "explicit" (eager) or "compiled" (torch.compile).
JVP_ATTENTION_MODES = ("explicit", "compiled")


def check_jvp_attention(mode: str) -> str:
    """`mode` if it is one of `JVP_ATTENTION_MODES`, else a ValueError naming them."""
    if mode not in JVP_ATTENTION_MODES:
        raise ValueError(f"jvp_attention must be one of {', '.join(map(repr, JVP_ATTENTION_MODES))}, got {mode!r}.")
    return mode


def _linear_pair(layer: nn.Module, primal: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free linear layer applied to primal and tangent rows in one call."""
    return layer(torch.cat([primal, tangent])).chunk(2)


def rms_norm_jvp(norm: PMFRMSNorm, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x·s·w with s = (mean(x²) + eps)^−½; dy = s·(dx − s²·mean(x·dx)·x)·w."""
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    normed = x * scale
    d_normed = scale * (dx - scale.square() * (x * dx).mean(-1, keepdim=True) * x)
    return normed.type_as(x) * norm.weight, d_normed.type_as(dx) * norm.weight


def softmax_attention_jvp(
    query: torch.Tensor,
    d_query: torch.Tensor,
    key: torch.Tensor,
    d_key: torch.Tensor,
    value: torch.Tensor,
    d_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d)·v on (B, H, L, D) tensors (softmax in fp32, as `PMFEagerAttnProcessor`) and its tangent."""
    scale = query.shape[-1] ** -0.5
    num_tokens = query.shape[2]
    # S = (q/√d)·kᵀ and dS = (dq/√d)·kᵀ + (q/√d)·dkᵀ; the first two share kᵀ, so they run as one product.
    scores, d_scores = ((torch.cat([query, d_query], dim=2) * scale) @ key.transpose(-1, -2)).split(num_tokens, dim=2)
    d_scores = d_scores + (query * scale) @ d_key.transpose(-1, -2)
    probabilities = scores.float().softmax(dim=-1)
    # Softmax derivative: dP = P ⊙ (dS − Σⱼ P·dS).
    d_scores = d_scores.float()
    d_probabilities = probabilities * (d_scores - (probabilities * d_scores).sum(-1, keepdim=True))
    probabilities, d_probabilities = probabilities.to(value.dtype), d_probabilities.to(value.dtype)
    # O = P·v and dO = dP·v + P·dv; the first two share v.
    output, d_output = (torch.cat([probabilities, d_probabilities], dim=2) @ value).split(num_tokens, dim=2)
    return output, d_output + probabilities @ d_value


@functools.cache
def compiled_softmax_attention_jvp():
    """`softmax_attention_jvp` under `torch.compile` (inductor), built on first use: the softmax, its tangent and the
    dtype casts become fused kernels over the score rows; the products stay library GEMMs."""
    return torch.compile(softmax_attention_jvp, fullgraph=True)


def attention_jvp(
    attn: PMFAttention, x: torch.Tensor, dx: torch.Tensor, rope_freqs: torch.Tensor, attention: str = "explicit"
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-normed, RoPE-rotated softmax attention (as `PMFEagerAttnProcessor`: softmax in fp32) and its tangent.
    `attention` picks how the softmax attention runs (`JVP_ATTENTION_MODES`)."""
    heads = attn.heads
    if attn.fused_projections:
        qkv, d_qkv = (part.unflatten(-1, (3 * heads, -1)).chunk(3, dim=2) for part in _linear_pair(attn.to_qkv, x, dx))
        (query, key, value), (d_query, d_key, d_value) = qkv, d_qkv
    else:
        query, d_query = (part.unflatten(-1, (heads, -1)) for part in _linear_pair(attn.to_q, x, dx))
        key, d_key = (part.unflatten(-1, (heads, -1)) for part in _linear_pair(attn.to_k, x, dx))
        value, d_value = (part.unflatten(-1, (heads, -1)) for part in _linear_pair(attn.to_v, x, dx))
    query, d_query = rms_norm_jvp(attn.norm_q, query, d_query)
    key, d_key = rms_norm_jvp(attn.norm_k, key, d_key)
    # The rotation is linear: rotate primal and tangent rows together.
    query, d_query = apply_interleaved_rope(torch.cat([query, d_query]), rope_freqs).chunk(2)
    key, d_key = apply_interleaved_rope(torch.cat([key, d_key]), rope_freqs).chunk(2)

    # (B, L, H, D) → (B, H, L, D)
    query, d_query, key, d_key, value, d_value = (
        tensor.transpose(1, 2) for tensor in (query, d_query, key, d_key, value, d_value)
    )
    softmax_attention = softmax_attention_jvp if attention == "explicit" else compiled_softmax_attention_jvp()
    output, d_output = softmax_attention(query, d_query, key, d_key, value, d_value)
    output, d_output = (tensor.transpose(1, 2).flatten(2, 3) for tensor in (output, d_output))
    return _linear_pair(attn.to_out, output, d_output)


def feed_forward_jvp(ff: PMFFeedForward, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU down(silu(a)·b) with silu'(a) = σ(a)·(1 + a·(1 − σ(a)))."""
    gate, d_gate = _linear_pair(ff.gate_proj, x, dx)
    up, d_up = _linear_pair(ff.up_proj, x, dx)
    sigmoid = torch.sigmoid(gate)
    activated = F.silu(gate)
    d_activated = d_gate * sigmoid * (1 + gate * (1 - sigmoid))
    return _linear_pair(ff.down_proj, activated * up, d_activated * up + activated * d_up)


def block_jvp(
    block: PMFTransformerBlock,
    x: torch.Tensor,
    dx: torch.Tensor,
    rope_freqs: torch.Tensor,
    attention: str = "explicit",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block with its gated residuals (linear in the branch output, so the tangent follows directly)."""
    attn_out, d_attn_out = attention_jvp(block.attn, *rms_norm_jvp(block.norm1, x, dx), rope_freqs, attention)
    x, dx = x + block.attn_gate * attn_out, dx + block.attn_gate * d_attn_out
    ff_out, d_ff_out = feed_forward_jvp(block.ff, *rms_norm_jvp(block.norm2, x, dx))
    return x + block.ff_gate * ff_out, dx + block.ff_gate * d_ff_out


def explicit_jvp_supported(model: PMFTransformer2DModel) -> bool:
    """True when every linear layer in the blocks is a deterministic linear map (bias-free, no active dropout)."""
    for blocks in (model.transformer_blocks, model.u_head_blocks):
        for module in blocks.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                return False
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                return False
    return True


def u_head_jvp(
    model: PMFTransformer2DModel,
    primals: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tangents: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    class_labels: torch.LongTensor,
    guidance: torch.Tensor,
    guidance_interval_start: torch.Tensor,
    guidance_interval_end: torch.Tensor,
    attention: str = "explicit",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-mode derivative of the u-head x-prediction with respect to (z_t, t, r).

    Args:
        model: The bare (unwrapped) transformer.
        primals: (z_t, t, r), with z_t in the model's dtype.
        tangents: (dz, dt, dr), e.g. (v_c, 1, 0) for du/dt.
        class_labels, guidance, guidance_interval_start, guidance_interval_end: Held fixed.
        attention: `"explicit"` (default) runs each block's softmax attention and its tangent eagerly;
            `"compiled"` runs them under `torch.compile` (the first call compiles; same result to fp32 rounding).

    Returns:
        `(x_pred, dx_pred)`: the u-head x-prediction and its directional derivative (what
        `torch.func.jvp(lambda z, t, r: model(z, t, r, ..., head="u").sample, primals, tangents)` returns).
    """

    def embed(z, time, r_time):
        return model.embed_inputs(
            z, time, r_time, class_labels, guidance, guidance_interval_start, guidance_interval_end
        )

    check_jvp_attention(attention)
    hidden_states, d_hidden_states = torch.func.jvp(embed, primals, tangents)
    rope_freqs = pad_rope_freqs(model.rope_freqs, model.num_prefix_tokens)
    for block in (*model.transformer_blocks, *model.u_head_blocks):
        hidden_states, d_hidden_states = block_jvp(block, hidden_states, d_hidden_states, rope_freqs, attention)
    return torch.func.jvp(lambda states: model.decode_head("u", states), (hidden_states,), (d_hidden_states,))
