# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The pixel MeanFlow training objective (official JAX `main` branch, restated in PyTorch).

Per batch: logit-normal times (t, r) with a flow-matching share (r = t), a guidance scale ω and interval, a
guided target v_g built from the model's own auxiliary v-head, the MeanFlow compound velocity
V = u + (t − r)·sg(du/dt) with du/dt a JVP along (v_c, 1, 0), adaptive weighting L / sg((L + eps)^p), the v-head
loss, and perceptual losses on x̂ = z_t − t·u for small t.

Compared with a literal port, this implementation computes the same loss and gradients with less work: the
guidance targets only need the v-head (one no-grad pass on a 2B batch), the JVP only needs the trunk + u-head and
runs without autograd, and one ordinary forward of both heads carries the gradient.
"""

import functools
import weakref
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from diffusers.utils import logging
from torch.distributed.tensor import DTensor

from ..models.transformer_pmf import PMFEagerAttnProcessor, PMFTransformer2DModel
from ..official import OFFICIAL_PRESETS, resolve_preset
from .jvp import check_jvp_attention, explicit_jvp_supported, u_head_jvp

logger = logging.get_logger(__name__)


@dataclass
class PMFLossConfig:
    """Hyper-parameters of the pMF objective (official names in snake_case). Defaults: the pMF-B/16 recipe.

    Attributes:
        p_mean, p_std: Logit-normal time distribution: t = sigmoid(p_mean + p_std·n).
        noise_scale: The noise is noise_scale·ε (per size: `OfficialPreset.noise_scale` in `pmf_diffusers.official`).
        data_proportion: Share of each batch (its first part) trained as flow matching (r = t, interval [0, 1]).
        tr_uniform: With probability `tr_uniform_prob` per sample, draw t and r from U(0, 1) instead (H models).
        cfg_max: ω is drawn on [1, 1 + cfg_max].
        cfg_beta: Power-law exponent of the ω density (∝ ω^−β).
        class_dropout_prob: Probability of training a sample unconditionally (null label, target v_t).
        class_dropout_mode: `"per_sample"` (independent Bernoulli draws, default) or `"first_k"` (official `main`
            branch: k ~ Binomial(B, p) and the first k samples of the batch are dropped).
        norm_p, norm_eps: Adaptive weighting L / sg((L + eps)^p).
        lpips_lambda, convnext_lambda: Weights of the perceptual terms (after the same adaptive weighting).
        perceptual_max_t: Only samples with t below this get perceptual losses.
        min_time: Floor of t in the x → velocity conversions (official 0.05).
        jvp_in_fp32: Run the JVP with autocast disabled, so a bf16 run keeps du/dt (which reaches 1e3 for small t)
            in full precision.
        explicit_jvp: Compute the JVP with the layer-by-layer forward-mode pass of `training.jvp` (same result to
            fp32 rounding, faster than `torch.func.jvp`: docs/benchmarks.md); `False` forces `torch.func.jvp`.
            Models whose block linears are not plain linear maps (bias, active dropout) always use `torch.func.jvp`.
        jvp_attention: How the explicit JVP runs each block's softmax attention and its tangent: `"explicit"`
            (default, eager) or `"compiled"` (`torch.compile`d; same result to fp32 rounding; docs/training.md,
            "JVP attention"). Ignored when the JVP falls back to `torch.func.jvp`.
    """

    p_mean: float = 0.8
    p_std: float = 0.8
    noise_scale: float = 1.0
    data_proportion: float = 0.5
    tr_uniform: bool = False
    tr_uniform_prob: float = 0.1
    cfg_max: float = 7.0
    cfg_beta: float = 1.0
    class_dropout_prob: float = 0.1
    class_dropout_mode: str = "per_sample"
    norm_p: float = 1.0
    norm_eps: float = 0.01
    lpips_lambda: float = 0.4
    convnext_lambda: float = 0.1
    perceptual_max_t: float = 0.8
    min_time: float = 0.05
    jvp_in_fp32: bool = True
    explicit_jvp: bool = True
    jvp_attention: str = "explicit"

    def __post_init__(self):
        check_jvp_attention(self.jvp_attention)
        if self.class_dropout_mode not in ("per_sample", "first_k"):
            raise ValueError(f"class_dropout_mode must be 'per_sample' or 'first_k', got {self.class_dropout_mode!r}.")
        if not 0.0 <= self.data_proportion <= 1.0 or not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError("data_proportion and class_dropout_prob must lie in [0, 1].")
        if self.cfg_max < 0 or self.noise_scale <= 0 or self.p_std < 0:
            raise ValueError("cfg_max must be ≥ 0, noise_scale > 0 and p_std ≥ 0.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PMFLossConfig":
        """The official recipe of a size (`"pMF-B/16"` … `"pMF-H/32"`), with optional field overrides."""
        preset = resolve_preset(name)
        return replace(LOSS_PRESETS[preset.name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# Per-size recipes (docs/algorithm.md, "Training recipe"): the defaults above with each size's noise scale and the
# values its official config changes, as listed in `pmf_diffusers.official.OFFICIAL_PRESETS`.
LOSS_PRESETS: dict[str, PMFLossConfig] = {
    name: PMFLossConfig(noise_scale=preset.noise_scale, **preset.recipe) for name, preset in OFFICIAL_PRESETS.items()
}


@dataclass
class PMFDraws:
    """The random quantities of one batch. Scalars are shaped (B,); `noise` is image-shaped and already multiplied
    by the noise scale. Flow-matching samples are those with r = t and interval [0, 1]."""

    t: torch.Tensor
    r: torch.Tensor
    omega: torch.Tensor
    t_min: torch.Tensor
    t_max: torch.Tensor
    drop_mask: torch.Tensor
    noise: torch.Tensor

    def to(self, device: torch.device | str) -> "PMFDraws":
        return PMFDraws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def sample_omega(uniform: torch.Tensor, cfg_max: float, cfg_beta: float) -> torch.Tensor:
    """Map U(0, 1) draws to ω on [1, 1 + cfg_max] with density ∝ ω^−β (inverse CDF)."""
    top = 1.0 + cfg_max
    if cfg_beta == 1.0:
        return top**uniform
    exponent = 1.0 - cfg_beta
    return (1.0 + uniform * (top**exponent - 1.0)) ** (1.0 / exponent)


def sample_draws(
    batch_size: int,
    config: PMFLossConfig,
    generator: torch.Generator | None = None,
    image_shape: tuple[int, int, int] = (3, 256, 256),
    device: torch.device | str = "cpu",
) -> PMFDraws:
    """Draw t, r, ω, the guidance interval, the class-dropout mask and the noise of a batch (official distributions).

    All draws come from `generator` (on its own device) and are then moved to `device`.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def normal(*shape):
        return torch.randn(shape, generator=generator, device=gen_device)

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=gen_device)

    t = torch.sigmoid(config.p_mean + config.p_std * normal(batch_size))
    r = torch.sigmoid(config.p_mean + config.p_std * normal(batch_size))
    if config.tr_uniform:
        use_uniform = uniform(batch_size) < config.tr_uniform_prob
        t = torch.where(use_uniform, uniform(batch_size), t)
        r = torch.where(use_uniform, uniform(batch_size), r)
    # The first share of the batch is flow matching, as in the official code.
    flow_matching = torch.arange(batch_size, device=gen_device) < int(config.data_proportion * batch_size)
    r = torch.where(flow_matching, t, r)
    t, r = torch.maximum(t, r), torch.minimum(t, r)

    noise = config.noise_scale * normal(batch_size, *image_shape)
    t_min = torch.where(flow_matching, 0.0, 0.5 * uniform(batch_size))
    t_max = torch.where(flow_matching, 1.0, 0.5 + 0.5 * uniform(batch_size))
    omega = sample_omega(uniform(batch_size), config.cfg_max, config.cfg_beta)

    drop_draws = uniform(batch_size)
    if config.class_dropout_mode == "first_k":
        # k ~ Binomial(B, p) stays on the device: comparing with a tensor needs no host copy of k
        num_dropped = (drop_draws < config.class_dropout_prob).sum()
        drop_mask = torch.arange(batch_size, device=gen_device) < num_dropped
    else:
        drop_mask = drop_draws < config.class_dropout_prob

    draws = PMFDraws(t=t, r=r, omega=omega, t_min=t_min, t_max=t_max, drop_mask=drop_mask, noise=noise)
    return draws.to(device)


@dataclass
class PMFLossOutput:
    """Result of [`pmf_loss`]. Images are NCHW; per-sample values are (B,).

    `loss` is the differentiable total. `loss_u` / `loss_v` are the official logged metrics (plain means of
    (V − v_g)² and (v − v_g)²; the weighted total sits near 2 by construction and says little). `loss_lpips` /
    `loss_convnext` are batch means of the raw perceptual distances (0 where a sample is masked out).
    """

    loss: torch.Tensor
    loss_u: torch.Tensor
    loss_v: torch.Tensor
    loss_lpips: torch.Tensor
    loss_convnext: torch.Tensor
    loss_u_per_sample: torch.Tensor
    loss_v_per_sample: torch.Tensor
    loss_u_weighted: torch.Tensor
    loss_v_weighted: torch.Tensor
    V: torch.Tensor
    v_g: torch.Tensor
    u: torch.Tensor
    du_dt: torch.Tensor
    v: torch.Tensor
    v_t: torch.Tensor
    v_c: torch.Tensor
    v_u: torch.Tensor
    z_t: torch.Tensor
    labels_after_drop: torch.Tensor
    extras: dict = field(default_factory=dict)


def adaptive_weight(per_sample_loss: torch.Tensor, norm_p: float, norm_eps: float) -> torch.Tensor:
    """L / sg((L + eps)^p): every sample's term sits near 1, so no sample dominates the batch."""
    return per_sample_loss / (per_sample_loss.detach() + norm_eps) ** norm_p


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare transformer behind DDP / torch.compile wrappers (functorch transforms must not see DDP hooks). FSDP2
    shards the model in place: its parameters stay `DTensor`s, see `_with_full_weights`."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class _CallWith(torch.nn.Module):
    """Holds a model so that `torch.func.functional_call` can swap its weights for any function of it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, function, *args):
        return function(self.model, *args)


_meta_replicas: "weakref.WeakKeyDictionary[torch.nn.Module, _CallWith]" = weakref.WeakKeyDictionary()


def _with_full_weights(model: torch.nn.Module, function, *args):
    """`function(model, *args)`, with the full weights when FSDP2 has sharded them (parameters are `DTensor`s).

    The no-grad passes call blocks' layers directly (the explicit JVP) or run under `torch.func.jvp`, which FSDP's
    forward hooks do not support. So under FSDP2 every process gathers the full parameters once (collective) and runs
    `function` on a parameter-free replica of the model (built on the meta device) that borrows them; they are
    released when it returns. Unsharded models run as they are.
    """
    if not isinstance(next(model.parameters()), DTensor):
        return function(model, *args)
    if model not in _meta_replicas:
        with torch.device("meta"):
            _meta_replicas[model] = _CallWith(PMFTransformer2DModel.from_config(model.config))
    replica = _meta_replicas[model]
    replica.model.train(model.training)
    tensors = {
        f"model.{name}": param.full_tensor() if isinstance(param, DTensor) else param
        for name, param in model.named_parameters()
    }
    tensors.update({f"model.{name}": buffer for name, buffer in model.named_buffers()})
    return torch.func.functional_call(replica, tensors, (function, *args), strict=True)


def _u_head_jvp_autograd(model, primals, tangents, class_labels, guidance, interval_start, interval_end):
    """`torch.func.jvp` of the u-head x-prediction (the general fallback of `u_head_jvp`). Fused attention kernels
    have no forward-mode AD, so the written-out attention of the official code is swapped in for this call."""

    def x_prediction(z, time, r_time):
        return model(
            z, time, r_time, class_labels, guidance, interval_start, interval_end, head="u", return_dict=False
        )[0]

    processors = model.attn_processors
    model.set_attn_processor(PMFEagerAttnProcessor())
    try:
        return torch.func.jvp(x_prediction, primals, tangents)
    finally:
        model.set_attn_processor(processors)


@functools.cache
def _warn_once(message: str) -> None:
    """Log `message` the first time it comes up only: `pmf_loss` runs at every step."""
    logger.warning(message)


def pmf_loss(
    transformer: torch.nn.Module,
    images: torch.Tensor,
    class_labels: torch.Tensor,
    config: PMFLossConfig,
    draws: PMFDraws | None = None,
    generator: torch.Generator | None = None,
    perceptual: torch.nn.Module | None = None,
    crop_generator: torch.Generator | None = None,
) -> PMFLossOutput:
    """The official pMF objective for one batch.

    Args:
        transformer: A [`PMFTransformer2DModel`] with its v-head (possibly wrapped by DDP / accelerate).
        images: Clean images, NCHW in [-1, 1].
        class_labels: Int labels (B,) in [0, num_classes).
        config: [`PMFLossConfig`].
        draws: The batch's random quantities; drawn with [`sample_draws`] from `generator` when `None`.
        generator: Random source for the draws and the perceptual crops.
        perceptual: Optional `PerceptualLoss` (returns per-sample `"lpips"` and `"convnext"` distances on a shared
            random crop). Without it the perceptual terms are skipped (with a warning if their weights are non-zero).
        crop_generator: Random source of the perceptual crop boxes (default: `generator`). The boxes are needed on
            the host, so a CPU generator here spares a device→host copy (a sync) per step on a GPU.

    No step of this function reads a device tensor on the host: the perceptual networks see the whole batch and
    their terms are masked to t < `perceptual_max_t` (selecting the sub-batch would need its size on the host).
    """
    model = _unwrap(transformer)
    batch_size = images.shape[0]
    num_classes = model.config.num_classes
    if draws is None:
        draws = sample_draws(batch_size, config, generator, tuple(images.shape[1:]), images.device)
    dtype = model.dtype

    def column(values: torch.Tensor) -> torch.Tensor:
        return values.float().reshape(-1, 1, 1, 1)

    x = images.float()
    t, r = draws.t.float(), draws.r.float()
    omega, t_min, t_max = draws.omega.float(), draws.t_min.float(), draws.t_max.float()
    labels = class_labels.long()
    time_floor = column(t).clamp(min=config.min_time, max=1.0)

    z_t = (1 - column(t)) * x + column(t) * draws.noise.float()
    v_t = (z_t - x) / time_floor

    # Guidance target from the model's own v-head at h = 0 over [0, 1]: conditional with ω masked to 1 outside the
    # sample's interval, and unconditional (null label, ω = 1) — one no-grad pass on a 2B batch. (On flow-matching
    # samples the interval is [0, 1], so the official separate "raw ω" pass gives the same v_c there.)
    in_interval = (t_min <= t) & (t <= t_max)
    omega_masked = torch.where(in_interval, omega, torch.ones_like(omega))
    drop = draws.drop_mask.bool().to(x.device)
    labels_after_drop = torch.where(drop, torch.full_like(labels, num_classes), labels)

    def target_and_jvp(net: torch.nn.Module):
        """The two no-grad passes: v_c, v_u from the v-head, then the u-head x-prediction and its JVP along v_c."""
        x_pred_v = net(
            torch.cat([z_t, z_t]).to(dtype),
            timestep=torch.cat([t, t]),
            r_timestep=torch.cat([t, t]),
            class_labels=torch.cat([labels, torch.full_like(labels, num_classes)]),
            guidance=torch.cat([omega_masked, torch.ones_like(omega)]),
            guidance_interval_start=torch.zeros(2 * batch_size, device=x.device),
            guidance_interval_end=torch.ones(2 * batch_size, device=x.device),
            head="v",
            return_dict=False,
        )[0].float()
        v_c, v_u = ((torch.cat([z_t, z_t]) - x_pred_v) / torch.cat([time_floor, time_floor])).chunk(2)

        # du/dt along (dz, dt, dr) = (v_c, 1, 0): trunk + u-head only, without autograd.
        primals = (z_t.to(dtype), t, r)
        tangents = (v_c.to(dtype), torch.ones_like(t), torch.zeros_like(r))
        conditions = (labels_after_drop, omega, t_min, t_max)
        with torch.autocast(
            device_type=x.device.type, enabled=not config.jvp_in_fp32 and torch.is_autocast_enabled(x.device.type)
        ):
            if config.explicit_jvp and explicit_jvp_supported(net):
                x_pred_u, d_x_pred_u = u_head_jvp(net, primals, tangents, *conditions, attention=config.jvp_attention)
            else:
                x_pred_u, d_x_pred_u = _u_head_jvp_autograd(net, primals, tangents, *conditions)
        return v_c, v_u, x_pred_u, d_x_pred_u

    with torch.no_grad():
        v_c, v_u, x_pred_u, d_x_pred_u = _with_full_weights(model, target_and_jvp)
        v_g_before_drop = v_t + (1 - 1 / column(omega_masked)) * (v_c - v_u)
        # u = (z − x̂)/max(t, t_min): the floor's derivative follows torch's clamp rule, as in a JVP of the whole map.
        _, du_dt = torch.func.jvp(
            lambda z, x_pred, time: (z - x_pred.float()) / column(time).clamp(min=config.min_time, max=1.0),
            (z_t, x_pred_u, t),
            (v_c, d_x_pred_u, torch.ones_like(t)),
        )
    v_g = torch.where(column(drop) > 0, v_t, v_g_before_drop)

    # The gradient-carrying pass (wrapped model, so DDP / FSDP hooks and checkpointing apply).
    x_pred_u, x_pred_v = transformer(
        z_t.to(dtype),
        timestep=t,
        r_timestep=r,
        class_labels=labels_after_drop,
        guidance=omega,
        guidance_interval_start=t_min,
        guidance_interval_end=t_max,
        head="both",
        return_dict=False,
    )
    u = (z_t - x_pred_u.float()) / time_floor
    v = (z_t - x_pred_v.float()) / time_floor
    V = u + column(t - r) * du_dt

    loss_u_per_sample = (V - v_g).pow(2).sum(dim=(1, 2, 3))
    loss_v_per_sample = (v - v_g).pow(2).sum(dim=(1, 2, 3))
    loss_u_weighted = adaptive_weight(loss_u_per_sample, config.norm_p, config.norm_eps)
    loss_v_weighted = adaptive_weight(loss_v_per_sample, config.norm_p, config.norm_eps)
    total = loss_u_weighted + loss_v_weighted

    zeros = torch.zeros(batch_size, device=x.device)
    lpips_per_sample, convnext_per_sample = zeros, zeros
    wants_perceptual = config.lpips_lambda > 0 or config.convnext_lambda > 0
    if wants_perceptual and perceptual is None:
        _warn_once("pmf_loss: no perceptual networks given; the LPIPS / ConvNeXt terms are skipped.")
    if wants_perceptual and perceptual is not None:
        selected = t < config.perceptual_max_t
        x_hat = z_t - column(t) * u
        distances = perceptual(x_hat, x, generator=crop_generator if crop_generator is not None else generator)
        lpips_per_sample = torch.where(selected, distances["lpips"].float().flatten(), zeros)
        convnext_per_sample = torch.where(selected, distances["convnext"].float().flatten(), zeros)
        total = total + config.lpips_lambda * adaptive_weight(lpips_per_sample, config.norm_p, config.norm_eps)
        total = total + config.convnext_lambda * adaptive_weight(convnext_per_sample, config.norm_p, config.norm_eps)

    return PMFLossOutput(
        loss=total.mean(),
        loss_u=(V - v_g).detach().pow(2).mean(),
        loss_v=(v - v_g).detach().pow(2).mean(),
        loss_lpips=lpips_per_sample.detach().mean(),
        loss_convnext=convnext_per_sample.detach().mean(),
        loss_u_per_sample=loss_u_per_sample.detach(),
        loss_v_per_sample=loss_v_per_sample.detach(),
        loss_u_weighted=loss_u_weighted.detach(),
        loss_v_weighted=loss_v_weighted.detach(),
        V=V.detach(),
        v_g=v_g,
        u=u.detach(),
        du_dt=du_dt,
        v=v.detach(),
        v_t=v_t,
        v_c=v_c,
        v_u=v_u,
        z_t=z_t,
        labels_after_drop=labels_after_drop,
        extras={"v_g_before_drop": v_g_before_drop, "omega_masked": omega_masked},
    )
