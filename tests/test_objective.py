"""The pMF objective against the official JAX `main` oracle (all randomness injected), and the draw distributions."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_DIR
from pmf_diffusers.conversion import convert_official_state_dict, official_key_to_diffusers
from pmf_diffusers.models.transformer_pmf import PMFTransformer2DModel
from pmf_diffusers.training import LOSS_PRESETS, PMFDraws, PMFLossConfig, muon_param_groups, pmf_loss, sample_draws

SCENARIOS = {
    # S1: B/16-like, official first-k class dropout. S2: L/16-like with the uniform (t, r) mix.
    "S1": PMFLossConfig(lpips_lambda=0.0, convnext_lambda=0.0, class_dropout_mode="first_k"),
    "S2": PMFLossConfig(
        p_mean=0.0, noise_scale=2.0, cfg_beta=2.0, tr_uniform=True, lpips_lambda=0.0, convnext_lambda=0.0
    ),
}


def nchw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2) if tensor.ndim == 4 and tensor.shape[-1] == 3 else tensor


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def tiny_a_weights():
    return convert_official_state_dict(load_file(REFERENCE_DIR / "tinyA_state_dict.safetensors"))


@pytest.mark.parametrize("explicit_jvp", [True, False], ids=["explicit-jvp", "torch-func-jvp"])
@pytest.mark.parametrize("scenario", ["S1", "S2"])
def test_loss_intermediates_and_gradients_match_jax(scenario, explicit_jvp, tiny_a_weights):
    config_dict, state_dict = tiny_a_weights
    model = PMFTransformer2DModel(**config_dict)
    model.load_state_dict(state_dict)
    oracle = load_file(REFERENCE_DIR / f"jax_train_{scenario}.safetensors")
    draws = PMFDraws(
        t=oracle["t"].flatten(),
        r=oracle["r"].flatten(),
        omega=oracle["omega"].flatten(),
        t_min=oracle["t_min"].flatten(),
        t_max=oracle["t_max"].flatten(),
        drop_mask=oracle["drop_mask"].bool(),
        noise=nchw(oracle["e"]),
    )
    config = replace(SCENARIOS[scenario], explicit_jvp=explicit_jvp)
    output = pmf_loss(model, nchw(oracle["x"]), oracle["labels"].long(), config, draws=draws)
    output.loss.backward()

    assert relative_error(output.loss, oracle["loss"][0]) <= 1e-4
    assert relative_error(output.loss_u, oracle["metric_loss_u"][0]) <= 1e-4
    assert relative_error(output.loss_v, oracle["metric_loss_v"][0]) <= 1e-4
    for name in ["V", "v_g", "u", "du_dt", "v", "v_t", "v_c", "v_u", "z_t"]:
        assert relative_error(getattr(output, name), nchw(oracle[name])) <= 1e-4, name
    for name in ["loss_u_per_sample", "loss_v_per_sample", "loss_u_weighted", "loss_v_weighted"]:
        assert relative_error(getattr(output, name), oracle[name]) <= 1e-4, name
    assert output.labels_after_drop.tolist() == oracle["labels_after_drop"].tolist()
    assert relative_error(output.extras["v_g_before_drop"], nchw(oracle["v_g_before_drop"])) <= 1e-4

    gradients = load_file(REFERENCE_DIR / f"jax_train_{scenario}_grads_torchkeys.safetensors")
    parameters = dict(model.named_parameters())
    assert len(gradients) == len(parameters)
    for official_key, expected in gradients.items():
        grad = parameters[official_key_to_diffusers(official_key)].grad
        assert grad is not None, official_key
        if expected.abs().max() == 0:
            assert grad.abs().max() == 0, official_key
        else:
            assert relative_error(grad, expected) <= 1e-4, official_key


def test_muon_routing_of_our_model_matches_official(tiny_a_weights):
    import json

    config_dict, _ = tiny_a_weights
    model = PMFTransformer2DModel(**config_dict)
    routing = json.loads((REFERENCE_DIR / "tinyA_muon_param_routing.json").read_text())
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: group["use_muon"] for group in muon_param_groups(model) for p in group["params"]}
    expected = {official_key_to_diffusers(key): entry["optimizer"] == "muon" for key, entry in routing.items()}
    assert ours == expected


def test_sample_draws_follow_the_official_rules():
    config = PMFLossConfig(class_dropout_mode="first_k")
    generator = torch.Generator().manual_seed(0)
    draws = sample_draws(4096, config, generator, image_shape=(3, 4, 4))
    flow_matching = torch.arange(4096) < 2048
    assert torch.equal(draws.r[flow_matching], draws.t[flow_matching])
    assert (draws.t >= draws.r).all() and (draws.t <= 1).all() and (draws.r >= 0).all()
    assert torch.equal(draws.t_min[flow_matching], torch.zeros(2048))
    assert torch.equal(draws.t_max[flow_matching], torch.ones(2048))
    assert (draws.t_min[~flow_matching] <= 0.5).all() and (draws.t_max[~flow_matching] >= 0.5).all()
    assert draws.omega.min() >= 1 and draws.omega.max() <= 8
    # Density ∝ 1/ω on [1, 8]: the median is sqrt(8).
    assert abs(draws.omega.median().item() - 8**0.5) < 0.1
    # logit(t) of the non-flow-matching samples before the max/min swap is N(0.8, 0.8): check the fm half.
    logit_t = torch.logit(draws.t[flow_matching])
    assert abs(logit_t.mean().item() - 0.8) < 0.05 and abs(logit_t.std().item() - 0.8) < 0.05
    # First-k dropout: a prefix of the batch, about 10 % of it.
    k = int(draws.drop_mask.sum())
    assert draws.drop_mask[:k].all() and not draws.drop_mask[k:].any() and 300 < k < 520
    assert draws.noise.shape == (4096, 3, 4, 4)

    per_sample = sample_draws(4096, PMFLossConfig(noise_scale=2.0), torch.Generator().manual_seed(1), (3, 4, 4))
    assert 300 < int(per_sample.drop_mask.sum()) < 520 and not per_sample.drop_mask[: int(per_sample.drop_mask.sum())].all()
    assert abs(per_sample.noise.std().item() - 2.0) < 0.05


def test_official_recipes_per_size():
    """The per-size recipes of the official configs (docs/algorithm.md, "Training recipe"): pMF-B/16 is the default,
    the other sizes change these values."""
    changes = {
        "pMF-B/16": {},
        "pMF-B/32": dict(noise_scale=2.0),
        "pMF-L/16": dict(cfg_beta=2.0),
        "pMF-L/32": dict(p_mean=0.0, noise_scale=4.0, perceptual_max_t=0.6),
        "pMF-H/16": dict(p_mean=0.0, noise_scale=2.0, perceptual_max_t=0.6, tr_uniform=True),
        "pMF-H/32": dict(p_mean=0.0, noise_scale=4.0, perceptual_max_t=0.6, tr_uniform=True),
    }
    assert list(LOSS_PRESETS) == list(changes)
    for name, values in changes.items():
        assert LOSS_PRESETS[name] == PMFLossConfig.from_preset(name) == replace(PMFLossConfig(), **values), name
    assert PMFLossConfig() == PMFLossConfig(p_mean=0.8, p_std=0.8, cfg_max=7.0, cfg_beta=1.0, noise_scale=1.0)


def test_missing_perceptual_networks_warn_once(tiny_a_weights, caplog):
    """Without perceptual networks the LPIPS / ConvNeXt terms are skipped, with one warning however many steps run."""
    from pmf_diffusers.training import objective

    config, state_dict = tiny_a_weights
    model = PMFTransformer2DModel(**config)
    model.load_state_dict(state_dict, strict=False)
    images = torch.zeros(2, 3, config["sample_size"], config["sample_size"])
    loss_config = PMFLossConfig()  # perceptual weights are on by default
    objective._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger=objective.logger.name):
        for seed in range(3):
            pmf_loss(model, images, torch.tensor([0, 1]), loss_config, generator=torch.Generator().manual_seed(seed))
    assert caplog.text.count("no perceptual networks given") == 1


def test_presets_and_bad_config():
    assert PMFLossConfig.from_preset("pMF-L/16").cfg_beta == 2.0
    assert PMFLossConfig.from_preset("pMF-H/16").tr_uniform
    assert PMFLossConfig.from_preset("pMF-L/32", p_std=1.0).p_std == 1.0
    with pytest.raises(ValueError, match="Unknown pMF size"):
        PMFLossConfig.from_preset("pMF-X/8")
    with pytest.raises(ValueError, match="class_dropout_mode"):
        PMFLossConfig(class_dropout_mode="random")
