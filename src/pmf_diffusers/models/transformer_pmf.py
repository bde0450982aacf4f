# Copyright 2026 The pmf-diffusers developers. MIT License.
"""PMFTransformer2DModel: the pixel MeanFlow (pMF) network of Lu et al., arXiv 2601.22158.

A pre-norm ViT on raw pixels. Five conditions enter as *in-context tokens* (no adaLN): the class label, the
guidance scale ω (embedded as 1 − 1/ω), the guidance interval [t_min, t_max] and the step size h = t − r. The time
t itself is not embedded. After a shared trunk the network forks into a u-head (used for sampling) and an optional
auxiliary v-head (used only by the training objective). Each head predicts an *image* (x-prediction); velocities
are derived outside the network: u = (z_t − x̂_u) / max(t, 0.05).
"""

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..loaders.single_file import PMFFromOriginalModelMixin


@dataclass
class PMFTransformer2DModelOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            The u-head x-prediction x̂_u: a clean image in [-1, 1] model units (not a velocity). `None` when only the
            v-head was requested.
        v_sample (`torch.Tensor` of shape `(batch_size, channels, height, width)`, *optional*):
            The auxiliary v-head x-prediction x̂_v (training only). `None` unless requested.
    """

    sample: torch.Tensor | None = None
    v_sample: torch.Tensor | None = None


class PMFRMSNorm(nn.Module):
    """RMSNorm as in the official code: normalise in the input dtype, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(hidden_states) * self.weight


def get_2d_rope_freqs(grid_size: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Axial 2-D RoPE rotations e^{i·angle} for a `grid_size`² patch grid, complex64 of shape (N, head_dim // 2).

    Pair j < head_dim/4 rotates with the patch row, the remaining pairs with the patch column, each at frequency
    theta^(−4k/head_dim).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs `attention_head_dim` divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) * 4 / head_dim)
    index = torch.arange(grid_size * grid_size)
    rows = torch.div(index, grid_size, rounding_mode="floor").to(torch.float32)
    cols = (index % grid_size).to(torch.float32)
    angles = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_interleaved_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2j], x[2j+1]) of `x` (B, N, H, D) in fp32 and cast back.

    One complex multiplication (x[2j] + i·x[2j+1])·e^{i·angle}: the same products and sums as the real-valued
    (cos, sin) form, bit for bit, but faster than slicing the pairs apart and re-stacking them (docs/benchmarks.md).
    """
    x_complex = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(x_complex * freqs[None, :, None, :])
    return rotated.flatten(-2).type_as(x)


def pad_rope_freqs(freqs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prepend `num_prefix` identity rotations (1 + 0i) so the whole sequence can be rotated in one go; multiplying
    by 1 + 0i returns the prefix tokens exactly."""
    identity = torch.ones(num_prefix, freqs.shape[-1], dtype=freqs.dtype, device=freqs.device)
    return torch.cat([identity, freqs])


class PMFAttnProcessor:
    """Full bidirectional attention with QK-RMSNorm and 2-D RoPE on the patch tokens (the last N of the sequence).

    Attention runs through diffusers' `dispatch_attention_fn`, so any backend can be selected with
    `model.set_attention_backend(...)`. Forward-mode AD (`torch.func.jvp`, used by the training objective) needs the
    `"_native_math"` backend: fused SDPA kernels do not implement it.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "PMFAttention",
        hidden_states: torch.Tensor,
        rope_freqs: torch.Tensor,
    ) -> torch.Tensor:
        if attn.fused_projections:
            attn.check_fused_projections()
            # One GEMM three times as wide runs closer to the machine's GEMM peak than three narrow ones.
            query, key, value = attn.to_qkv(hidden_states).unflatten(-1, (3 * attn.heads, -1)).chunk(3, dim=2)
        else:
            query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
            key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
            value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        # The in-context condition tokens come first and are not rotated. `rope_freqs` covers either the patch tokens
        # only (N rows) or the whole sequence with identity rotations for the prefix (see `pad_rope_freqs`).
        num_prefix = hidden_states.shape[1] - rope_freqs.shape[0]
        if num_prefix:
            query = torch.cat([query[:, :num_prefix], apply_interleaved_rope(query[:, num_prefix:], rope_freqs)], dim=1)
            key = torch.cat([key[:, :num_prefix], apply_interleaved_rope(key[:, num_prefix:], rope_freqs)], dim=1)
        else:
            query = apply_interleaved_rope(query, rope_freqs)
            key = apply_interleaved_rope(key, rope_freqs)

        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out(hidden_states)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, L, H, D) query/key/value → (B, L, H, D)."""
        return dispatch_attention_fn(
            query, key, value, attn_mask=None, backend=self._attention_backend, parallel_config=self._parallel_config
        )


class PMFEagerAttnProcessor(PMFAttnProcessor):
    """Attention written out as in the official code: (q/√d)·kᵀ, softmax in fp32, ·v.

    Supports forward-mode AD and costs less under `torch.func.jvp` than the math SDPA backend (whose safe softmax
    adds masking ops to every tangent); the training objective swaps it in for its JVP.
    """

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-1, -2)
        probabilities = scores.float().softmax(dim=-1).to(value.dtype)
        return (probabilities @ value).transpose(1, 2)


class PMFAttention(nn.Module, AttentionModuleMixin):
    _default_processor_cls = PMFAttnProcessor
    _available_processors = [PMFAttnProcessor, PMFEagerAttnProcessor]
    # `model.fuse_qkv_projections()` (diffusers' AttentionMixin) concatenates to_q/to_k/to_v into `to_qkv`.
    _supports_qkv_fusion = True
    is_cross_attention = False
    use_bias = False

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.inner_dim = heads * head_dim
        self.to_q = nn.Linear(dim, self.inner_dim, bias=False)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=False)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=False)
        self.norm_q = PMFRMSNorm(head_dim, eps=eps)
        self.norm_k = PMFRMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(self.inner_dim, dim, bias=False)
        self.set_processor(self._default_processor_cls())

    def fuse_projections(self):
        self.check_fused_projections()
        super().fuse_projections()

    def check_fused_projections(self):
        # `to_qkv` is a plain copy of the three weights: LoRA layers on to_q/to_k/to_v would be silently bypassed.
        if not all(type(layer) is nn.Linear for layer in (self.to_q, self.to_k, self.to_v)):
            raise ValueError(
                "Fused QKV projections cannot be combined with LoRA adapters on to_q/to_k/to_v: call "
                "`transformer.unfuse_qkv_projections()` before loading adapters, or fuse the LoRA first "
                "(`pipe.fuse_lora()`, then `pipe.unload_lora_weights()`) and fuse the projections after."
            )

    def forward(self, hidden_states: torch.Tensor, rope_freqs: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states, rope_freqs)


class PMFFeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), bias-free."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # In-place product: one activation-sized buffer less per block (same values; autograd-safe, silu's backward
        # needs its input, not its output).
        return self.down_proj(F.silu(self.gate_proj(hidden_states)).mul_(self.up_proj(hidden_states)))


@maybe_allow_in_graph
class PMFTransformerBlock(nn.Module):
    """Pre-norm block with per-channel residual gates that start at zero (every block starts as the identity)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_hidden_dim: int, eps: float):
        super().__init__()
        self.norm1 = PMFRMSNorm(dim, eps=eps)
        self.attn = PMFAttention(dim, num_attention_heads, attention_head_dim, eps=eps)
        self.attn_gate = nn.Parameter(torch.zeros(dim))
        self.norm2 = PMFRMSNorm(dim, eps=eps)
        self.ff = PMFFeedForward(dim, mlp_hidden_dim)
        self.ff_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden_states: torch.Tensor, rope_freqs: torch.Tensor) -> torch.Tensor:
        # h + g ⊙ f(h) as one fused op (addcmul): one pass over the activations instead of two.
        hidden_states = torch.addcmul(hidden_states, self.attn_gate, self.attn(self.norm1(hidden_states), rope_freqs))
        return torch.addcmul(hidden_states, self.ff_gate, self.ff(self.norm2(hidden_states)))


class PMFBottleneckPatchEmbed(nn.Module):
    """Patchify with a p×p conv into a narrow bottleneck, then a 1×1 conv to the hidden size; (B, N, D) row-major."""

    def __init__(self, patch_size: int, in_channels: int, bottleneck_dim: int, embed_dim: int):
        super().__init__()
        self.proj_in = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size)
        self.proj_out = nn.Conv2d(bottleneck_dim, embed_dim, kernel_size=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(pixels)).flatten(2).transpose(1, 2)


class PMFScalarEmbedder(nn.Module):
    """Sinusoidal features of a raw scalar (no ×1000; cos before sin) followed by Linear → SiLU → Linear."""

    def __init__(self, frequency_dim: int, embed_dim: int):
        super().__init__()
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedder = TimestepEmbedding(frequency_dim, embed_dim)

    def forward(self, scalar: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embedder(self.time_proj(scalar).to(dtype))


class PMFTransformer2DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin, PMFFromOriginalModelMixin):
    r"""
    The pixel MeanFlow transformer (official `pmfDiT`).

    Args:
        sample_size (`int`, defaults to 256): Image side S in pixels.
        patch_size (`int`, defaults to 16): Patch side p; the sequence has N = (S/p)² patch tokens.
        in_channels (`int`, defaults to 3): Image channels.
        num_layers (`int`, defaults to 8): Blocks in the shared trunk (official `depth − aux_head_depth`).
        num_head_layers (`int`, defaults to 8): Blocks in each head (official `aux_head_depth`).
        num_attention_heads (`int`, defaults to 12): Attention heads; hidden size = heads × head dim.
        attention_head_dim (`int`, defaults to 64): Channels per head (divisible by 4 for the 2-D RoPE).
        mlp_hidden_dim (`int`, defaults to 2048): SwiGLU width (official int(D·8/3), rounded up to a multiple of 8
            only for hidden sizes above 1024).
        bottleneck_dim (`int`, defaults to 128): Width of the patch-embedding bottleneck.
        num_classes (`int`, defaults to 1000): Class count K; label K is the null (unconditional) class.
        num_class_tokens / num_guidance_tokens / num_interval_tokens / num_time_tokens: Sizes of the in-context token
            groups (8 / 4 / 2 each for t_min and t_max / 4 in all released models).
        frequency_embedding_dim (`int`, defaults to 256): Sinusoidal feature size of the scalar embedders.
        rope_theta (`float`, defaults to 10000.0): RoPE base.
        norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        with_v_head (`bool`, defaults to `True`): Build the auxiliary v-head (needed for training, not for sampling;
            the released checkpoints do not include it).
        block_init_scale (`float`, defaults to 0.32): Block linears are initialised N(0, (scale/√fan_in)²).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PMFTransformerBlock"]
    _repeated_blocks = ["PMFTransformerBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "pos_embed", "tokens", "norm", "embedder"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        num_layers: int = 8,
        num_head_layers: int = 8,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        mlp_hidden_dim: int = 2048,
        bottleneck_dim: int = 128,
        num_classes: int = 1000,
        num_class_tokens: int = 8,
        num_guidance_tokens: int = 4,
        num_interval_tokens: int = 2,
        num_time_tokens: int = 4,
        frequency_embedding_dim: int = 256,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        with_v_head: bool = True,
        block_init_scale: float = 0.32,
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        inner_dim = num_attention_heads * attention_head_dim
        grid_size = sample_size // patch_size
        self.num_patches = grid_size * grid_size
        self.num_prefix_tokens = num_class_tokens + num_guidance_tokens + 2 * num_interval_tokens + num_time_tokens

        self.patch_embed = PMFBottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, inner_dim)
        self.class_embedder = nn.Embedding(num_classes + 1, inner_dim)
        self.guidance_embedder = PMFScalarEmbedder(frequency_embedding_dim, inner_dim)
        self.guidance_start_embedder = PMFScalarEmbedder(frequency_embedding_dim, inner_dim)
        self.guidance_end_embedder = PMFScalarEmbedder(frequency_embedding_dim, inner_dim)
        self.delta_time_embedder = PMFScalarEmbedder(frequency_embedding_dim, inner_dim)

        self.class_tokens = nn.Parameter(torch.zeros(1, num_class_tokens, inner_dim))
        self.guidance_tokens = nn.Parameter(torch.zeros(1, num_guidance_tokens, inner_dim))
        self.guidance_start_tokens = nn.Parameter(torch.zeros(1, num_interval_tokens, inner_dim))
        self.guidance_end_tokens = nn.Parameter(torch.zeros(1, num_interval_tokens, inner_dim))
        self.delta_time_tokens = nn.Parameter(torch.zeros(1, num_time_tokens, inner_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, inner_dim))

        # Complex, so that casting the model to bf16/fp16 keeps the rotations in full precision.
        self.register_buffer("rope_freqs", get_2d_rope_freqs(grid_size, attention_head_dim, rope_theta), persistent=False)

        def make_blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                [
                    PMFTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, mlp_hidden_dim, norm_eps)
                    for _ in range(count)
                ]
            )

        out_features = patch_size * patch_size * in_channels
        self.transformer_blocks = make_blocks(num_layers)
        self.u_head_blocks = make_blocks(num_head_layers)
        self.u_norm_out = PMFRMSNorm(inner_dim, eps=norm_eps)
        self.u_proj_out = nn.Linear(inner_dim, out_features)
        if with_v_head:
            self.v_head_blocks = make_blocks(num_head_layers)
            self.v_norm_out = PMFRMSNorm(inner_dim, eps=norm_eps)
            self.v_proj_out = nn.Linear(inner_dim, out_features)

        self.gradient_checkpointing = False
        self.batch_chunk_size = None
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None):
        """The official initialisation, for training from scratch (`from_pretrained` overwrites it)."""
        inner_dim = self.config.num_attention_heads * self.config.attention_head_dim
        token_std = 1.0 / math.sqrt(inner_dim)

        def normal_(tensor: torch.Tensor, std: float):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)

        def xavier_linear_style_(conv: nn.Conv2d):
            # Official: Xavier-uniform with linear fan-in/out (kernel area × in, out), not torch's conv convention.
            fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            limit = math.sqrt(6.0 / (fan_in + conv.weight.shape[0]))
            conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * limit)
            conv.bias.zero_()

        xavier_linear_style_(self.patch_embed.proj_in)
        xavier_linear_style_(self.patch_embed.proj_out)
        normal_(self.class_embedder.weight, token_std)
        for embedder in (
            self.guidance_embedder,
            self.guidance_start_embedder,
            self.guidance_end_embedder,
            self.delta_time_embedder,
        ):
            for linear in (embedder.embedder.linear_1, embedder.embedder.linear_2):
                normal_(linear.weight, 1.0 / math.sqrt(linear.in_features))
                linear.bias.zero_()
        for tokens in (
            self.class_tokens,
            self.guidance_tokens,
            self.guidance_start_tokens,
            self.guidance_end_tokens,
            self.delta_time_tokens,
        ):
            normal_(tokens, token_std)
        normal_(self.pos_embed, 0.02)

        for module in self.modules():
            if isinstance(module, PMFTransformerBlock):
                for linear in (
                    module.attn.to_q,
                    module.attn.to_k,
                    module.attn.to_v,
                    module.attn.to_out,
                    module.ff.gate_proj,
                    module.ff.up_proj,
                    module.ff.down_proj,
                ):
                    normal_(linear.weight, self.config.block_init_scale / math.sqrt(linear.in_features))
                module.attn_gate.zero_()
                module.ff_gate.zero_()
            elif isinstance(module, PMFRMSNorm):
                module.weight.fill_(1.0)
        for proj_out in (self.u_proj_out, getattr(self, "v_proj_out", None)):
            if proj_out is not None:
                proj_out.weight.zero_()
                proj_out.bias.zero_()

    def _apply(self, fn, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Casting complex values to real discards the imaginary part")
            super()._apply(fn, *args, **kwargs)
        rope_freqs = self._buffers.get("rope_freqs")
        if rope_freqs is not None and not rope_freqs.is_complex():
            # `module.to(torch.bfloat16)` also casts complex buffers to the real dtype, silently dropping the
            # imaginary part (the sines). The table is deterministic: rebuild it in complex64 on the new device.
            config = self.config
            self._buffers["rope_freqs"] = get_2d_rope_freqs(
                config.sample_size // config.patch_size, config.attention_head_dim, config.rope_theta
            ).to(rope_freqs.device)
        return self

    def enable_batch_chunking(self, chunk_size: int = 4):
        """Run the transformer blocks on sub-batches of `chunk_size` samples.

        Samples never interact in this network, so the outputs are the same up to fp32 rounding. On a CPU it keeps the
        activations of a large batch cache-sized: at batch 16, chunks of 4 ran faster than one pass
        (docs/benchmarks.md). It does not save memory in training (autograd keeps every chunk's activations).
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
        self.batch_chunk_size = chunk_size

    def disable_batch_chunking(self):
        self.batch_chunk_size = None

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) with features ordered (row-in-patch, col-in-patch, channel) → (B, C, S, S)."""
        p = self.config.patch_size
        channels = self.config.in_channels
        grid = self.config.sample_size // p
        patches = patches.reshape(patches.shape[0], grid, grid, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], channels, grid * p, grid * p)

    def _run_blocks(self, blocks: nn.ModuleList, hidden_states: torch.Tensor, rope_freqs) -> torch.Tensor:
        for block in blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, rope_freqs)
            else:
                hidden_states = block(hidden_states, rope_freqs)
        return hidden_states

    def embed_inputs(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        r_timestep: torch.Tensor,
        class_labels: torch.LongTensor,
        guidance: torch.Tensor | None = None,
        guidance_interval_start: torch.Tensor | None = None,
        guidance_interval_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input sequence (B, prefix + N, D): condition tokens, then patch tokens, plus learned positions."""
        batch_size = hidden_states.shape[0]
        ones = torch.ones(batch_size, device=hidden_states.device, dtype=torch.float32)
        guidance = ones if guidance is None else guidance
        guidance_interval_start = torch.zeros_like(ones) if guidance_interval_start is None else guidance_interval_start
        guidance_interval_end = ones if guidance_interval_end is None else guidance_interval_end

        patch_tokens = self.patch_embed(hidden_states)
        dtype = patch_tokens.dtype
        # ω is embedded as 1 − 1/ω ∈ [0, 1); the step size h = t − r, not t, is embedded.
        class_emb = self.class_embedder(class_labels)
        guidance_emb = self.guidance_embedder(1 - 1 / guidance, dtype)
        start_emb = self.guidance_start_embedder(guidance_interval_start, dtype)
        end_emb = self.guidance_end_embedder(guidance_interval_end, dtype)
        delta_time_emb = self.delta_time_embedder(timestep - r_timestep, dtype)

        hidden_states = torch.cat(
            [
                self.class_tokens + class_emb[:, None],
                self.guidance_tokens + guidance_emb[:, None],
                self.guidance_start_tokens + start_emb[:, None],
                self.guidance_end_tokens + end_emb[:, None],
                self.delta_time_tokens + delta_time_emb[:, None],
                patch_tokens,
            ],
            dim=1,
        )
        return hidden_states + self.pos_embed

    def decode_head(self, head: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of a head's output sequence (patch tokens only) → image (B, C, S, S)."""
        norm_out, proj_out = (self.u_norm_out, self.u_proj_out) if head == "u" else (self.v_norm_out, self.v_proj_out)
        return self.unpatchify(proj_out(norm_out(hidden_states[:, self.num_prefix_tokens :])))

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        r_timestep: torch.Tensor,
        class_labels: torch.LongTensor,
        guidance: torch.Tensor | None = None,
        guidance_interval_start: torch.Tensor | None = None,
        guidance_interval_end: torch.Tensor | None = None,
        head: str = "u",
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> PMFTransformer2DModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
                The noisy image z_t (pixels, noise already multiplied by the checkpoint's noise scale).
            timestep (`torch.Tensor` of shape `(batch_size,)`):
                Current time t ∈ [0, 1] (t = 1 is pure noise). Only h = t − r is embedded.
            r_timestep (`torch.Tensor` of shape `(batch_size,)`):
                Target time r ≤ t of the average velocity u(z_t, r, t).
            class_labels (`torch.LongTensor` of shape `(batch_size,)`):
                Class ids in [0, num_classes]; `num_classes` is the null (unconditional) label.
            guidance (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                The guidance scale ω ≥ 1, a network input (guidance is distilled; no batch doubling). Defaults to 1.
            guidance_interval_start, guidance_interval_end (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                The guidance interval [t_min, t_max]. Default to 0 and 1.
            head (`str`, defaults to `"u"`):
                Which head(s) to run: `"u"`, `"v"` (auxiliary, training only) or `"both"`.
            attention_kwargs (`dict`, *optional*): Accepts `scale` for LoRA layers.
            return_dict (`bool`, defaults to `True`): Return a [`PMFTransformer2DModelOutput`] instead of a tuple.

        Returns:
            x-predictions (images in [-1, 1] model units, not velocities): `sample` from the u-head and/or `v_sample`
            from the v-head. As a tuple: `(sample,)`, `(v_sample,)` or `(sample, v_sample)`.
        """
        if head not in ("u", "v", "both"):
            raise ValueError(f"`head` must be 'u', 'v' or 'both', got {head!r}.")
        if head != "u" and not self.config.with_v_head:
            raise ValueError("This model has no v-head (`with_v_head=False`); only `head='u'` is available.")
        hidden_states = self.embed_inputs(
            hidden_states, timestep, r_timestep, class_labels, guidance, guidance_interval_start, guidance_interval_end
        )
        rope_freqs = pad_rope_freqs(self.rope_freqs, self.num_prefix_tokens)

        outputs = {"sample": [], "v_sample": []}
        # Samples never interact (attention and norms are per sample), so the blocks may run on sub-batches.
        for states in hidden_states.split(self.batch_chunk_size or hidden_states.shape[0]):
            states = self._run_blocks(self.transformer_blocks, states, rope_freqs)
            if head in ("u", "both"):
                outputs["sample"].append(self.decode_head("u", self._run_blocks(self.u_head_blocks, states, rope_freqs)))
            if head in ("v", "both"):
                outputs["v_sample"].append(self.decode_head("v", self._run_blocks(self.v_head_blocks, states, rope_freqs)))
        # Without chunking there is one part: no copy of the output.
        outputs = {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in outputs.items() if parts}

        if not return_dict:
            return tuple(outputs.values())
        return PMFTransformer2DModelOutput(**outputs)
