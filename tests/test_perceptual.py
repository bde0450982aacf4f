"""Perceptual losses: LPIPS-VGG against the lpips 0.1.4 oracle, ConvNeXt-V2 distance, paired crops."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmf_diffusers.training.perceptual import (
    ConvNeXtV2Features,
    LPIPSVGG,
    PerceptualLoss,
    PerceptualWeightsNotFoundError,
    paired_random_resized_crop,
    sample_crop_boxes,
)

# `shared/` is a sibling of the repository root (see conftest.py).
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lpips_vgg_reference.safetensors"
CASES = ("a64", "b64", "c224")
MAP_CASES = ("a64", "b64")
# Sums of the five tensors of lpips/weights/v0.1/vgg.pth (reference README).
LIN_SUMS = (6.925992, 8.858334, 17.515006, 51.521323, 47.034854)


def _lpips_vgg_pth():
    spec = importlib.util.find_spec("lpips")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


LPIPS_VGG_PTH = _lpips_vgg_pth()
# The calibrated weights are a test requirement (installed by .ci/run): a missing file fails, it does not skip.
needs_lin = pytest.mark.usefixtures("lin_weights")


@pytest.fixture(scope="module")
def ref():
    assert REFERENCE.exists(), f"reference oracles not found at {REFERENCE}"
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def recipe_trunk():
    """Random VGG16 trunk rebuilt the way the LPIPS oracle's trunk was made (seed 0, the draws below)."""
    torch.manual_seed(0)
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    sd, cin, idx = {}, 3, 0
    for v in cfg:
        if v == "M":
            idx += 1
            continue
        conv = torch.nn.Conv2d(cin, v, kernel_size=3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(math.sqrt(6.0))
        sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"] = conv.weight.detach(), conv.bias.detach()
        cin, idx = v, idx + 2
    return sd


@pytest.fixture(scope="module")
def lin_weights():
    assert LPIPS_VGG_PTH is not None, "lpips weights file missing: pip install --no-deps lpips==0.1.4"
    return torch.load(LPIPS_VGG_PTH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lpips_model(recipe_trunk, lin_weights):
    return LPIPSVGG(vgg_state_dict=recipe_trunk, linear_weights=lin_weights)


@pytest.fixture(scope="module")
def lpips_outputs(ref, lpips_model):
    out = {}
    with torch.no_grad():
        for case in CASES:
            out[case] = lpips_model(ref[f"{case}_in0"], ref[f"{case}_in1"], return_per_layer=True)
    return out


@pytest.fixture(scope="module")
def feature_diffs(ref, recipe_trunk):
    model = LPIPSVGG(vgg_state_dict=recipe_trunk)  # independent of the linear weights
    with torch.no_grad():
        return {case: model.feature_diffs(ref[f"{case}_in0"], ref[f"{case}_in1"]) for case in CASES}


def test_recipe_trunk_matches_trunk_stats(ref, recipe_trunk):
    stats = {k.removeprefix("trunk_stats/"): v for k, v in ref.items() if k.startswith("trunk_stats/")}
    assert set(stats) == set(recipe_trunk)
    for name, tensor in recipe_trunk.items():
        flat = tensor.double().flatten()
        got = torch.stack([flat.sum(), flat.abs().sum(), flat[0], flat[-1]])
        torch.testing.assert_close(got, stats[name], rtol=1e-9, atol=0, msg=name)


@needs_lin
def test_linear_weights_file(lin_weights):
    assert sorted(lin_weights) == [f"lin{k}.model.1.weight" for k in range(5)]
    for k, expected in enumerate(LIN_SUMS):
        assert lin_weights[f"lin{k}.model.1.weight"].sum().item() == pytest.approx(expected, abs=1e-5)


@needs_lin
@pytest.mark.parametrize("case", CASES)
def test_distance_and_layers_match_oracle(ref, lpips_outputs, case):
    dist, layers = lpips_outputs[case]
    assert dist.shape == (ref[f"{case}_in0"].shape[0],)
    torch.testing.assert_close(dist, ref[f"{case}_dist"].flatten(), rtol=0, atol=1e-6)
    assert len(layers) == 5
    for k, layer in enumerate(layers):
        torch.testing.assert_close(layer, ref[f"{case}_layer{k}"].flatten(), rtol=0, atol=1e-6)
    if case == "a64":
        assert dist[3].item() == 0.0  # identical pair


@pytest.mark.parametrize("case", CASES)
def test_channel_mean_diffs_match_oracle(ref, feature_diffs, case):
    for k, d in enumerate(feature_diffs[case]):
        torch.testing.assert_close(d.mean(dim=(2, 3)), ref[f"{case}_chanmean_diff{k}"], rtol=1e-5, atol=1e-9)
        if case in MAP_CASES:
            torch.testing.assert_close(d.sum(1, keepdim=True), ref[f"{case}_map_sum{k}"], rtol=1e-5, atol=1e-9)


@needs_lin
@pytest.mark.parametrize("case", MAP_CASES)
def test_linear_maps_match_oracle(ref, lpips_model, feature_diffs, case):
    with torch.no_grad():
        for k, (lin, d) in enumerate(zip(lpips_model.lins, feature_diffs[case])):
            torch.testing.assert_close(lin(d), ref[f"{case}_map_lin{k}"], rtol=1e-5, atol=1e-12)


@needs_lin
def test_frozen_but_differentiable_wrt_inputs(ref, lpips_model):
    assert not any(p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training
    x0 = ref["a64_in0"][:2].clone().requires_grad_(True)
    lpips_model(x0, ref["a64_in1"][:2]).sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())


def test_state_dict_layout_and_torchvision_checkpoint(recipe_trunk):
    model = LPIPSVGG()
    keys = set(model.state_dict())
    assert {k for k in keys if k.startswith("features.")} == set(recipe_trunk)
    assert {k for k in keys if not k.startswith("features.")} == {f"lins.{k}.weight" for k in range(5)}
    # Full torchvision vgg16() state dict: classifier.* ignored.
    full = dict(recipe_trunk)
    full.update({"classifier.0.weight": torch.zeros(4096, 25088), "classifier.0.bias": torch.zeros(4096)})
    full.update({"classifier.6.weight": torch.zeros(1000, 4096), "classifier.6.bias": torch.zeros(1000)})
    model.load_vgg_state_dict(full)
    for name, tensor in recipe_trunk.items():
        assert torch.equal(model.state_dict()[name], tensor)
    # vgg16().features state dict (no prefix).
    other = LPIPSVGG(vgg_state_dict={k.removeprefix("features."): v for k, v in recipe_trunk.items()})
    assert torch.equal(other.features[28].bias, recipe_trunk["features.28.bias"])
    with pytest.raises(RuntimeError):
        model.load_vgg_state_dict({"features.1.weight": torch.zeros(1)})


@needs_lin
def test_from_pretrained_hub_cache_and_package_weights(tmp_path, monkeypatch, ref, recipe_trunk, lin_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save({**recipe_trunk, "classifier.6.bias": torch.zeros(1000)}, checkpoint)
    model = LPIPSVGG.from_pretrained()
    assert torch.equal(model.lins[2].weight, lin_weights["lin2.model.1.weight"])
    with torch.no_grad():
        dist = model(ref["a64_in0"][:2], ref["a64_in1"][:2])
    torch.testing.assert_close(dist, ref["a64_dist"].flatten()[:2], rtol=0, atol=1e-6)


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PerceptualWeightsNotFoundError) as info:
        LPIPSVGG.from_pretrained(vgg_path=tmp_path / "nope" / "vgg.pth", lpips_weights_path=tmp_path / "lin.pth")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nope" / "vgg.pth") in message and "vgg16-397923af.pth" in message
    assert str(tmp_path / "lin.pth") in message and "pip install --no-deps lpips==0.1.4" in message

    with pytest.raises(PerceptualWeightsNotFoundError, match="HF_HUB_OFFLINE") as info:
        LPIPSVGG.from_pretrained(lpips_weights_path=tmp_path / "lin.pth")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in str(info.value)


def test_convnext_missing_weights_error(tmp_path):
    with pytest.raises(PerceptualWeightsNotFoundError, match="config.json") as info:
        ConvNeXtV2Features.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_convnext_missing_hub_weights_offline():
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if not HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (a connected machine would download 350 MB)")
    with pytest.raises(PerceptualWeightsNotFoundError, match="models--facebook--convnextv2-base-22k-224") as info:
        PerceptualLoss.from_pretrained(lpips=False)
    assert "hf download facebook/convnextv2-base-22k-224" in str(info.value)


@pytest.fixture(scope="module")
def tiny_convnext():
    from transformers import ConvNextV2Config

    torch.manual_seed(0)
    config = ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], image_size=32)
    return ConvNeXtV2Features(config)


def test_convnext_distance(tiny_convnext):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    b = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert not tiny_convnext.training and not any(p.requires_grad for p in tiny_convnext.parameters())
    with torch.no_grad():
        assert torch.equal(tiny_convnext(a, a), torch.zeros(3))
        dist = tiny_convnext(a, b)
        fa, fb = tiny_convnext.features(a), tiny_convnext.features(b)
    assert dist.shape == (3,) and (dist > 0).all()
    assert fa.shape == (3, 64)
    torch.testing.assert_close(dist, ((fa - fb) ** 2).sum(-1))
    torch.testing.assert_close(fa, tiny_convnext.model(pixel_values=a).pooler_output)

    a_hat = a.clone().requires_grad_(True)
    tiny_convnext(a_hat, b).sum().backward()
    assert a_hat.grad is not None and a_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_convnext.parameters())


def test_paired_crop_shapes_determinism_and_shared_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 40, 48, generator=g) * 2 - 1
    a, b = paired_random_resized_crop(x, x, size=24, generator=torch.Generator().manual_seed(7))
    assert a.shape == b.shape == (5, 3, 24, 24)
    assert torch.equal(a, b)
    a2, _ = paired_random_resized_crop(x, x, size=24, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, a2)
    a3, _ = paired_random_resized_crop(x, x, size=24, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, a3)
    # Same box for both: a per-sample constant offset survives the (normalised) resampling kernel.
    offset = torch.linspace(-0.5, 0.5, 5).view(5, 1, 1, 1)
    c_hat, c = paired_random_resized_crop(x + offset, x, size=24, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c_hat - c, offset.expand_as(c), rtol=0, atol=1e-5)
    torch.testing.assert_close(c, a)


def test_crop_boxes_follow_the_recipe():
    size = 96
    boxes = sample_crop_boxes(4000, size, size, generator=torch.Generator().manual_seed(0))
    tops, lefts, hs, ws = (torch.tensor(v, dtype=torch.float64) for v in zip(*boxes))
    assert (tops >= 0).all() and (lefts >= 0).all() and (tops + hs <= size).all() and (lefts + ws <= size).all()
    area, ratio = hs * ws / size**2, ws / hs
    inside = (hs < size) & (ws < size)  # unclipped boxes: only the rounding perturbs area and ratio
    assert (area[inside] > 0.075).all() and (area <= 1).all() and area.max() > 0.95 and area.min() < 0.09
    assert (ratio[inside] > 0.70).all() and (ratio[inside] < 1.43).all()  # 3/4, 4/3 up to rounding
    assert abs(torch.log(ratio[inside]).mean().item()) < 0.01  # log-uniform, symmetric around 1
    # Boxes below the median area 0.54 of U(0.08, 1) are never clipped (side < 0.85·size).
    assert abs((area < 0.54).double().mean().item() - 0.5) < 0.03
    # Positions cover the free range (both extremes occur).
    assert ((tops == 0) & (hs < size)).any() and ((tops + hs == size) & (tops > 0)).any()


def test_paired_crop_resamples_the_box():
    x = torch.randn(3, 3, 50, 60, generator=torch.Generator().manual_seed(1))
    a, _ = paired_random_resized_crop(x, x, size=32, generator=torch.Generator().manual_seed(4))
    boxes = sample_crop_boxes(3, 50, 60, generator=torch.Generator().manual_seed(4))
    for i, (top, left, h, w) in enumerate(boxes):
        expected = torch.nn.functional.interpolate(
            x[i : i + 1, :, top : top + h, left : left + w], size=(32, 32), mode="bicubic", antialias=True
        )
        torch.testing.assert_close(a[i : i + 1], expected, rtol=0, atol=0)


def test_paired_crop_differentiable():
    x_hat = torch.randn(2, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    a, b = paired_random_resized_crop(x_hat, x, size=8, generator=torch.Generator().manual_seed(1))
    assert a.requires_grad and not b.requires_grad
    torch.autograd.gradcheck(
        lambda t: paired_random_resized_crop(t, x, size=8, generator=torch.Generator().manual_seed(1))[0], (x_hat,)
    )


@needs_lin
def test_perceptual_loss(recipe_trunk, lin_weights, tiny_convnext):
    lpips = LPIPSVGG(vgg_state_dict=recipe_trunk, linear_weights=lin_weights)
    loss = PerceptualLoss(lpips=lpips, convnext=tiny_convnext, crop_size=32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    x_hat = (x + 0.2 * torch.randn(2, 3, 48, 48, generator=g)).clamp(-1, 1).requires_grad_(True)
    out = loss(x_hat, x, generator=torch.Generator().manual_seed(5))
    assert set(out) == {"lpips", "convnext"} and out["lpips"].shape == out["convnext"].shape == (2,)
    crop_hat, crop = paired_random_resized_crop(x_hat, x, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(out["lpips"], lpips(crop_hat, crop))
        torch.testing.assert_close(out["convnext"], tiny_convnext(crop_hat, crop))
    (out["lpips"] + out["convnext"]).sum().backward()
    assert x_hat.grad.abs().sum() > 0

    only = PerceptualLoss(convnext=tiny_convnext, crop_size=32)(x_hat, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(only["lpips"], torch.zeros(2))
    torch.testing.assert_close(only["convnext"], out["convnext"])
