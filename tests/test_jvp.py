"""The layer-by-layer u-head JVP of `training.jvp` against `torch.func.jvp` of the model itself."""

from dataclasses import replace

import pytest
import torch

from conftest import converted, max_rel_err
from pmf_diffusers.lora import add_pmf_lora
from pmf_diffusers.models.transformer_pmf import (
    PMFAttention,
    PMFEagerAttnProcessor,
    PMFTransformer2DModel,
    get_2d_rope_freqs,
    pad_rope_freqs,
)
from pmf_diffusers.training import PMFLossConfig, pmf_loss, sample_draws
from pmf_diffusers.training import jvp
from pmf_diffusers.training.jvp import (
    attention_jvp,
    compiled_softmax_attention_jvp,
    explicit_jvp_supported,
    u_head_jvp,
)


def tiny_model(name: str) -> PMFTransformer2DModel:
    """An official tiny model with every parameter perturbed, so that no gate or output layer is zero."""
    config, state_dict = converted(name)
    model = PMFTransformer2DModel(**config)
    model.load_state_dict(state_dict)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def inputs(model: PMFTransformer2DModel, batch_size: int = 3):
    generator = torch.Generator().manual_seed(0)
    size = model.config.sample_size
    z = torch.randn(batch_size, 3, size, size, generator=generator)
    t = torch.tensor([0.9, 0.4, 0.07])[:batch_size]
    r = torch.tensor([0.2, 0.4, 0.0])[:batch_size]  # includes r = t (h = 0)
    conditions = (
        torch.tensor([1, 0, model.config.num_classes])[:batch_size],  # includes the null label
        torch.tensor([3.0, 1.0, 6.5])[:batch_size],
        torch.tensor([0.1, 0.0, 0.3])[:batch_size],
        torch.tensor([0.7, 1.0, 0.9])[:batch_size],
    )
    tangents = (torch.randn(z.shape, generator=generator), torch.ones(batch_size), torch.zeros(batch_size))
    return (z, t, r), tangents, conditions


def reference_jvp(model, primals, tangents, conditions):
    def x_prediction(z, time, r_time):
        return model(z, time, r_time, *conditions, head="u", return_dict=False)[0]

    model.set_attn_processor(PMFEagerAttnProcessor())
    return torch.func.jvp(x_prediction, primals, tangents)


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_explicit_jvp_equals_torch_func_jvp(name, single_thread):
    model = tiny_model(name)
    primals, tangents, conditions = inputs(model)
    with torch.no_grad():
        x_pred, d_x_pred = u_head_jvp(model, primals, tangents, *conditions)
        expected_x_pred, expected_d_x_pred = reference_jvp(model, primals, tangents, conditions)
        forward = model(*primals, *conditions, head="u").sample
    assert max_rel_err(x_pred, expected_x_pred) <= 1e-6
    assert max_rel_err(x_pred, forward) <= 1e-6
    assert max_rel_err(d_x_pred, expected_d_x_pred) <= 1e-5
    # A tangent along t alone (dz = 0) reaches the output only through the h-embedding.
    zero_z = (torch.zeros_like(tangents[0]), tangents[1], tangents[2])
    with torch.no_grad():
        _, d_time_only = u_head_jvp(model, primals, zero_z, *conditions)
        _, expected_time_only = reference_jvp(model, primals, zero_z, conditions)
    assert d_time_only.abs().max() > 0
    assert max_rel_err(d_time_only, expected_time_only) <= 1e-5
    # Fused QKV projections (an inference option) take their own branch.
    model.fuse_qkv_projections()
    with torch.no_grad():
        _, d_x_pred_fused = u_head_jvp(model, primals, tangents, *conditions)
    assert max_rel_err(d_x_pred_fused, expected_d_x_pred) <= 1e-5


def test_explicit_jvp_with_lora_and_its_fallback_rule(single_thread):
    model = tiny_model("tinyA")
    add_pmf_lora(model, rank=4, init="gaussian")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(0, 0.05)
    assert explicit_jvp_supported(model)
    primals, tangents, conditions = inputs(model)
    with torch.no_grad():
        _, d_x_pred = u_head_jvp(model, primals, tangents, *conditions)
        _, expected = reference_jvp(model, primals, tangents, conditions)
    assert max_rel_err(d_x_pred, expected) <= 1e-5

    # With active LoRA dropout the stacked primal/tangent rows would get different masks: not supported.
    dropout_model = tiny_model("tinyA")
    add_pmf_lora(dropout_model, rank=4, dropout=0.1)
    dropout_model.train()
    assert not explicit_jvp_supported(dropout_model)
    dropout_model.eval()
    assert explicit_jvp_supported(dropout_model)


# ---- attention="compiled": the same softmax attention tangent under torch.compile (docs/training.md, "JVP attention")


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_compiled_jvp_attention_equals_explicit(name, single_thread):
    model = tiny_model(name)
    primals, tangents, conditions = inputs(model)
    with torch.no_grad():
        x_pred, d_x_pred = u_head_jvp(model, primals, tangents, *conditions)
        x_pred_compiled, d_x_pred_compiled = u_head_jvp(model, primals, tangents, *conditions, attention="compiled")
        _, expected = reference_jvp(model, primals, tangents, conditions)
    assert max_rel_err(x_pred_compiled, x_pred) <= 1e-6
    assert max_rel_err(d_x_pred_compiled, d_x_pred) <= 1e-5
    assert max_rel_err(d_x_pred_compiled, expected) <= 1e-5


def test_compiled_jvp_attention_at_b16_sequence_length(single_thread):
    """One attention layer of pMF-B/16 (768 wide, 12 heads of 64) at its training sequence length: 16×16 patches and
    20 prefix tokens."""
    torch.manual_seed(0)
    attn = PMFAttention(dim=768, heads=12, head_dim=64)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.05 * torch.randn_like(param))
    rope_freqs = pad_rope_freqs(get_2d_rope_freqs(grid_size=16, head_dim=64), 20)
    x, dx = torch.randn(2, 276, 768), torch.randn(2, 276, 768)
    with torch.no_grad():
        out, d_out = attention_jvp(attn, x, dx, rope_freqs)
        out_compiled, d_out_compiled = attention_jvp(attn, x, dx, rope_freqs, attention="compiled")
        attn.set_processor(PMFEagerAttnProcessor())
        expected_out, expected_d_out = torch.func.jvp(lambda states: attn(states, rope_freqs), (x,), (dx,))
    assert max_rel_err(out, expected_out) <= 1e-6 and max_rel_err(d_out, expected_d_out) <= 1e-5
    assert max_rel_err(out_compiled, out) <= 1e-6
    assert max_rel_err(d_out_compiled, d_out) <= 1e-5


def test_pmf_loss_with_compiled_jvp_attention(single_thread, monkeypatch):
    compiled_calls = []  # the option reaches the blocks: each one fetches the compiled function

    def count_compiled_fetches():
        compiled_calls.append(1)
        return compiled_softmax_attention_jvp()

    monkeypatch.setattr(jvp, "compiled_softmax_attention_jvp", count_compiled_fetches)
    model = tiny_model("tinyA").train()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    labels = torch.tensor([1, 4, 7])
    config = PMFLossConfig(lpips_lambda=0.0, convnext_lambda=0.0)
    draws = sample_draws(3, config, generator, (3, 32, 32))
    results = {}
    for mode in ("explicit", "compiled"):
        model.zero_grad(set_to_none=True)
        loss = pmf_loss(model, images, labels, replace(config, jvp_attention=mode), draws=draws).loss
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        results[mode] = loss.detach(), grads
    (loss, grads), (loss_compiled, grads_compiled) = results["explicit"], results["compiled"]
    assert len(compiled_calls) == len(model.transformer_blocks) + len(model.u_head_blocks)
    assert max_rel_err(loss_compiled, loss) <= 1e-5
    assert grads_compiled.keys() == grads.keys()
    assert max(max_rel_err(grads_compiled[name], grads[name]) for name in grads) <= 1e-4


def test_jvp_attention_mode_is_checked():
    with pytest.raises(ValueError, match="jvp_attention must be one of 'explicit', 'compiled', got 'flash'"):
        PMFLossConfig(jvp_attention="flash")
    model = tiny_model("tinyA")
    primals, tangents, conditions = inputs(model)
    with pytest.raises(ValueError, match="got 'fused'"):
        u_head_jvp(model, primals, tangents, *conditions, attention="fused")
