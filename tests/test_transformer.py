"""PMFTransformer2DModel against the official torch `pmfDiT` forward pass (tinyA / tinyB reference files)."""

from __future__ import annotations

import pytest
import torch

from conftest import REFERENCE_DIR, converted, load_reference, max_rel_err, needs_reference

pytestmark = [needs_reference, pytest.mark.usefixtures("single_thread")]

TOL = 1e-5


def _model(name: str):
    from pmf_diffusers.conversion import build_pipeline

    config, state_dict = converted(name)
    return build_pipeline(config, state_dict).transformer


def _forward(model, ref: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(
            hidden_states=ref["z_t"],
            timestep=ref["t"],
            r_timestep=ref["r"],
            class_labels=ref["labels"],
            guidance=ref["omega"],
            guidance_interval_start=ref["t_min"],
            guidance_interval_end=ref["t_max"],
            head="both",
        )


def _velocity(z_t: torch.Tensor, x_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (z_t - x_pred) / t.clamp(min=0.05)[:, None, None, None]


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_forward_parity_with_official(name):
    ref = load_reference(f"{name}_forward")
    model = _model(name)
    captured = {}
    model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: captured.update(seq=args[0].clone()))
    model.patch_embed.register_forward_hook(lambda module, args, out: captured.update(x_embed=out.clone()))

    out = _forward(model, ref)
    assert max_rel_err(out.sample, ref["u_head_xpred"]) <= TOL
    assert max_rel_err(out.v_sample, ref["v_head_xpred"]) <= TOL
    assert max_rel_err(_velocity(ref["z_t"], out.sample, ref["t"]), ref["u"]) <= TOL
    assert max_rel_err(_velocity(ref["z_t"], out.v_sample, ref["t"]), ref["v"]) <= TOL
    # Intermediates: patch embedding and the first block's input sequence (conditions + pos_embed).
    assert max_rel_err(captured["x_embed"], ref["x_embed"]) <= TOL
    assert max_rel_err(captured["seq"], ref["seq_after_pos_embed"]) <= TOL


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_condition_embeddings_and_rope_match_official(name):
    ref = load_reference(f"{name}_forward")
    model = _model(name)
    dtype = torch.float32
    with torch.no_grad():
        assert max_rel_err(model.class_embedder(ref["labels"]), ref["y_embed"]) <= TOL
        assert max_rel_err(model.delta_time_embedder(ref["h"], dtype), ref["h_embed"]) <= TOL
        assert max_rel_err(model.guidance_embedder(1 - 1 / ref["omega"], dtype), ref["omega_embed"]) <= TOL
        assert max_rel_err(model.guidance_start_embedder(ref["t_min"], dtype), ref["t_min_embed"]) <= TOL
        assert max_rel_err(model.guidance_end_embedder(ref["t_max"], dtype), ref["t_max_embed"]) <= TOL
    assert model.rope_freqs.dtype == torch.complex64
    assert max_rel_err(model.rope_freqs.real, ref["rope_freqs_real"]) <= TOL
    assert max_rel_err(model.rope_freqs.imag, ref["rope_freqs_imag"]) <= TOL


def test_heads_and_tuple_output():
    ref = load_reference("tinyA_forward")
    model = _model("tinyA")
    both = _forward(model, ref)
    kwargs = dict(
        hidden_states=ref["z_t"], timestep=ref["t"], r_timestep=ref["r"], class_labels=ref["labels"],
        guidance=ref["omega"], guidance_interval_start=ref["t_min"], guidance_interval_end=ref["t_max"],
    )
    with torch.no_grad():
        (u_only,) = model(**kwargs, return_dict=False)
        (v_only,) = model(**kwargs, head="v", return_dict=False)
        u_pair, v_pair = model(**kwargs, head="both", return_dict=False)
    torch.testing.assert_close(u_only, both.sample, rtol=0, atol=0)
    torch.testing.assert_close(v_only, both.v_sample, rtol=0, atol=0)
    torch.testing.assert_close(u_pair, both.sample, rtol=0, atol=0)
    torch.testing.assert_close(v_pair, both.v_sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="head"):
        model(**kwargs, head="w")


def test_default_conditions_are_no_guidance():
    """guidance / interval default to ω = 1 and [0, 1]."""
    ref = load_reference("tinyA_forward")
    model = _model("tinyA")
    batch = ref["z_t"].shape[0]
    with torch.no_grad():
        implicit = model(ref["z_t"], ref["t"], ref["r"], ref["labels"]).sample
        explicit = model(
            ref["z_t"], ref["t"], ref["r"], ref["labels"], guidance=torch.ones(batch),
            guidance_interval_start=torch.zeros(batch), guidance_interval_end=torch.ones(batch),
        ).sample
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


def test_eval_model_without_v_head():
    from pmf_diffusers.conversion import build_pipeline

    config, state_dict = converted("tinyA")
    config["with_v_head"] = False
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("v_head_blocks.", "v_norm_out.", "v_proj_out."))}
    model = build_pipeline(config, state_dict).transformer
    assert not hasattr(model, "v_head_blocks")
    ref = load_reference("tinyA_forward")
    with torch.no_grad():
        sample = model(ref["z_t"], ref["t"], ref["r"], ref["labels"], ref["omega"], ref["t_min"], ref["t_max"]).sample
    assert max_rel_err(sample, ref["u_head_xpred"]) <= TOL
    with pytest.raises(ValueError, match="no v-head"):
        model(ref["z_t"], ref["t"], ref["r"], ref["labels"], head="v")


def test_bad_constructor_arguments():
    from pmf_diffusers import PMFTransformer2DModel

    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        PMFTransformer2DModel(sample_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        PMFTransformer2DModel(sample_size=16, patch_size=8, num_attention_heads=2, attention_head_dim=6)


def test_flax_parameters_give_the_same_forward():
    """The official Flax tree (`/`-joined keys, and the same as a nested dict) converts to identical weights."""
    from pmf_diffusers.conversion import build_pipeline, convert_official_state_dict

    flax_flat = load_reference("tinyA_flax_params")
    assert any("/" in key for key in flax_flat)
    nested: dict = {}
    for path, value in flax_flat.items():
        node = nested
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.numpy()  # as a Flax tree would hold them (arrays, not torch tensors)

    ref = load_reference("tinyA_forward")
    torch_config, torch_weights = converted("tinyA")
    for tree in (flax_flat, nested):
        config, weights = convert_official_state_dict(tree)
        assert config == torch_config
        assert set(weights) == set(torch_weights)
        for key, value in weights.items():
            torch.testing.assert_close(value, torch_weights[key], rtol=0, atol=0, msg=key)
        out = _forward(build_pipeline(config, weights).transformer, ref)
        assert max_rel_err(out.sample, ref["u_head_xpred"]) <= TOL
        assert max_rel_err(out.v_sample, ref["v_head_xpred"]) <= TOL


def test_reference_dir_points_at_shared_reference():
    assert REFERENCE_DIR.name == "reference" and REFERENCE_DIR.parent.name == "shared"


@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_fused_qkv_projections_keep_parity_and_unfuse(name):
    ref = load_reference(f"{name}_forward")
    model = _model(name)
    unfused = _forward(model, ref)
    model.fuse_qkv_projections()
    attn = model.transformer_blocks[0].attn
    assert attn.fused_projections and attn.to_qkv.weight.shape == (3 * attn.inner_dim, attn.to_q.in_features)
    fused = _forward(model, ref)
    assert max_rel_err(fused.sample, ref["u_head_xpred"]) <= TOL
    assert max_rel_err(fused.v_sample, ref["v_head_xpred"]) <= TOL
    assert max_rel_err(fused.sample, unfused.sample) <= 1e-6

    model.unfuse_qkv_projections()
    assert not hasattr(attn, "to_qkv") and not attn.fused_projections
    assert torch.equal(_forward(model, ref).sample, unfused.sample)


def test_batch_chunking_gives_the_same_outputs():
    ref = load_reference("tinyA_forward")
    model = _model("tinyA")
    whole = _forward(model, ref)
    assert ref["z_t"].shape[0] >= 3
    model.enable_batch_chunking(2)  # uneven last chunk
    chunked = _forward(model, ref)
    assert max_rel_err(chunked.sample, whole.sample) <= 1e-6
    assert max_rel_err(chunked.v_sample, whole.v_sample) <= 1e-6
    assert max_rel_err(chunked.sample, ref["u_head_xpred"]) <= TOL
    model.disable_batch_chunking()
    assert torch.equal(_forward(model, ref).sample, whole.sample)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            model.enable_batch_chunking(bad)
