"""PMFPipeline: sampling parity with the official `pixelMeanFlow.generate`, outputs, save/load, inputs."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import GENERATE_SETTINGS, NOISE_SCALE, load_reference, make_pipeline, max_rel_err, needs_reference

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5


# --------------------------------------------------------------------------------------------------------------
# Parity with the official sampler
# --------------------------------------------------------------------------------------------------------------
@needs_reference
@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_generate_parity_with_official(name):
    ref = load_reference(f"{name}_generate")
    pipe = make_pipeline(name)
    labels = ref["labels"].tolist()
    assert labels[-1] == pipe.num_classes  # the null label is covered
    latents = NOISE_SCALE[name] * ref["noise_unscaled"]
    for key, steps, omega, interval in GENERATE_SETTINGS:
        sample = pipe(
            labels, num_inference_steps=steps, guidance_scale=omega, guidance_interval=interval,
            latents=latents.clone(), output_type="latent",
        ).images
        assert sample.dtype == torch.float32
        assert max_rel_err(sample, ref[key]) <= TOL, key


@needs_reference
@pytest.mark.parametrize("name", ["tinyA", "tinyB"])
def test_generator_list_reproduces_official_noise(name):
    """One CPU generator per image, seeded like the official `BatchGenerator`, gives the official samples."""
    ref = load_reference(f"{name}_generate")
    pipe = make_pipeline(name)
    labels = ref["labels"].tolist()
    for key, steps, omega, interval in (GENERATE_SETTINGS[0], GENERATE_SETTINGS[3]):
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in ref["seeds"]]
        sample = pipe(
            labels, num_inference_steps=steps, guidance_scale=omega, guidance_interval=interval,
            generator=generators, output_type="latent",
        ).images
        assert max_rel_err(sample, ref[key]) <= TOL, key


@needs_reference
def test_one_step_sample_is_the_u_head_prediction(tiny_pipeline):
    ref = load_reference("tinyA_generate")
    latents = ref["noise_unscaled"]
    labels = ref["labels"]
    sample = tiny_pipeline(labels.tolist(), guidance_scale=7.5, guidance_interval=(0.1, 0.8), latents=latents,
                           output_type="latent").images
    batch = len(labels)
    with torch.no_grad():
        x_pred = tiny_pipeline.transformer(
            latents, torch.ones(batch), torch.zeros(batch), labels, torch.full((batch,), 7.5),
            torch.full((batch,), 0.1), torch.full((batch,), 0.8),
        ).sample
    torch.testing.assert_close(sample, x_pred, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
def _noise(pipe, batch, seed=0):
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.sample_size, config.sample_size)
    return torch.randn(shape, generator=generator) * pipe.scheduler.init_noise_sigma


@needs_reference
def test_return_dict_and_tuple(tiny_pipeline):
    latents = _noise(tiny_pipeline, 2)
    as_dict = tiny_pipeline([1, 2], latents=latents, output_type="pt")
    as_tuple = tiny_pipeline([1, 2], latents=latents, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_dict.images, as_tuple[0], rtol=0, atol=0)


@needs_reference
def test_output_types(tiny_pipeline):
    latents = _noise(tiny_pipeline, 3)
    size = tiny_pipeline.transformer.config.sample_size
    latent = tiny_pipeline([0, 1, 10], latents=latents, output_type="latent").images
    pt = tiny_pipeline([0, 1, 10], latents=latents, output_type="pt").images
    np_images = tiny_pipeline([0, 1, 10], latents=latents, output_type="np").images
    pil = tiny_pipeline([0, 1, 10], latents=latents, output_type="pil").images

    assert latent.shape == (3, 3, size, size) and latent.dtype == torch.float32
    assert latent.min() < -1 or latent.max() > 1  # raw model units, not clipped (random-ish tiny weights)
    assert pt.shape == (3, 3, size, size) and 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, ((latent + 1) / 2).clamp(0, 1), rtol=1e-6, atol=1e-6)
    assert isinstance(np_images, np.ndarray) and np_images.shape == (3, size, size, 3)
    assert 0 <= np_images.min() and np_images.max() <= 1
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    assert len(pil) == 3 and all(isinstance(image, PIL.Image.Image) for image in pil)
    assert pil[0].size == (size, size) and pil[0].mode == "RGB"
    expected = np.round(np_images[0] * 255).astype(np.uint8)
    assert np.abs(np.asarray(pil[0]).astype(int) - expected.astype(int)).max() <= 1

    with pytest.raises(ValueError, match="output_type"):
        tiny_pipeline([0], latents=latents[:1], output_type="jpeg")


@needs_reference
def test_generators_seed_the_noise(tiny_pipeline):
    first = tiny_pipeline([1, 2], generator=torch.Generator().manual_seed(3), output_type="latent").images
    again = tiny_pipeline([1, 2], generator=torch.Generator().manual_seed(3), output_type="latent").images
    other = tiny_pipeline([1, 2], generator=torch.Generator().manual_seed(4), output_type="latent").images
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    # A generator list draws each image from its own generator: image i only depends on generator i.
    pair = tiny_pipeline([1, 2], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="latent")
    single = tiny_pipeline([2], generator=[torch.Generator().manual_seed(6)], output_type="latent")
    torch.testing.assert_close(pair.images[1:], single.images, rtol=1e-6, atol=1e-6)


@needs_reference
def test_bf16_transformer_keeps_fp32_sample(tiny_pipeline):
    latents = _noise(tiny_pipeline, 4)
    labels = [0, 3, 7, 10]
    fp32 = tiny_pipeline(labels, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="latent").images
    tiny_pipeline.transformer.to(torch.bfloat16)
    assert tiny_pipeline.transformer.dtype == torch.bfloat16
    assert tiny_pipeline.transformer.rope_freqs.dtype == torch.complex64  # rotations stay in full precision
    bf16 = tiny_pipeline(labels, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="latent").images
    assert bf16.dtype == torch.float32
    assert torch.isfinite(bf16).all()
    assert max_rel_err(bf16, fp32) < 0.05
    assert not torch.equal(bf16, fp32)
    pt = tiny_pipeline(labels, latents=latents, output_type="pt").images
    assert pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1


@needs_reference
@needs_reference
def test_compiled_frozen_fused_transformer_keeps_official_parity():
    """The fast CPU recipe of docs/inference.md: fused QKV + torch.compile with inductor freezing, in the pipeline."""
    import torch._inductor.config as inductor_config

    ref = load_reference("tinyA_generate")
    pipe = make_pipeline("tinyA")
    key, steps, omega, interval = GENERATE_SETTINGS[1]  # two steps: the compiled graph runs twice per call
    pipe.transformer.fuse_qkv_projections()
    pipe.transformer.compile(dynamic=False)
    with inductor_config.patch(freezing=True):
        sample = pipe(
            ref["labels"].tolist(), num_inference_steps=steps, guidance_scale=omega, guidance_interval=interval,
            latents=NOISE_SCALE["tinyA"] * ref["noise_unscaled"], output_type="latent",
        ).images
    assert max_rel_err(sample, ref[key]) <= TOL


def test_callback_on_step_end_called_each_step_and_replaces_latents(tiny_pipeline):
    latents = _noise(tiny_pipeline, 2)
    calls = []
    replacement = torch.full_like(latents, 0.25)

    def callback(pipe, step, timestep, callback_kwargs):
        calls.append((step, float(timestep), callback_kwargs["latents"].clone()))
        return {"latents": replacement.clone()} if step == 1 else {}

    model_inputs = []
    hook = tiny_pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: model_inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    out = tiny_pipeline([1, 2], num_inference_steps=4, latents=latents, output_type="latent",
                        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"]).images
    hook.remove()
    assert [step for step, _, _ in calls] == [0, 1, 2, 3]
    assert [t for _, t, _ in calls] == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    assert len(model_inputs) == 4
    torch.testing.assert_close(model_inputs[2], replacement, rtol=0, atol=0)  # step 2 starts from the replacement
    torch.testing.assert_close(calls[0][2], model_inputs[1], rtol=0, atol=0)
    torch.testing.assert_close(calls[3][2], out, rtol=0, atol=0)

    # Replacing the final latents replaces the output.
    out = tiny_pipeline([1, 2], latents=latents, output_type="latent",
                        callback_on_step_end=lambda *args: {"latents": replacement}).images
    torch.testing.assert_close(out, replacement, rtol=0, atol=0)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        tiny_pipeline([1], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["x_pred"])


# --------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------
@needs_reference
def test_save_load_round_trip_and_model_index(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    id2label = {i: f"class {i}, synonym {i}" for i in range(10)}
    pipe = make_pipeline("tinyA", guidance_scale=7.5, guidance_interval=(0.1, 0.8), id2label=id2label)
    pipe.save_pretrained(tmp_path / "saved")

    model_index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    model_index.pop("_diffusers_version")
    # diffusers' list form: the pipeline, model and scheduler classes come from the generated `pipeline_pmf.py` for
    # diffusers' generic loader (tests/test_generic_loader.py); PMFPipeline.from_pretrained uses the package's classes.
    assert model_index == {
        "_class_name": ["pipeline_pmf", "PMFPipeline"],
        "default_guidance_interval": [0.1, 0.8],
        "default_guidance_scale": 7.5,
        "id2label": {str(i): f"class {i}, synonym {i}" for i in range(10)},
        "scheduler": ["pipeline_pmf", "PMFScheduler"],
        "transformer": ["pipeline_pmf", "PMFTransformer2DModel"],
    }
    assert (tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler_config = json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["noise_scale"] == 1.0 and scheduler_config["_class_name"] == "PMFScheduler"

    loaded = PMFPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, PMFTransformer2DModel)
    assert isinstance(loaded.scheduler, PMFScheduler)
    assert loaded.id2label == id2label
    assert loaded.config.default_guidance_scale == 7.5
    assert list(loaded.config.default_guidance_interval) == [0.1, 0.8]
    assert loaded.get_label_ids("Synonym 3") == [3]
    assert loaded.transformer.rope_freqs.dtype == torch.complex64

    latents = _noise(pipe, 3)
    for kwargs in ({}, {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_interval": (0.2, 0.9)}):
        expected = pipe([0, 5, 10], latents=latents, output_type="latent", **kwargs).images
        actual = loaded([0, 5, 10], latents=latents, output_type="latent", **kwargs).images
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@needs_reference
def test_defaults_come_from_the_pipeline_config(tiny_pipeline):
    pipe = make_pipeline("tinyA", guidance_scale=7.5, guidance_interval=(0.1, 0.8))
    latents = _noise(pipe, 2)
    implicit = pipe([1, 2], latents=latents, output_type="latent").images
    explicit = pipe([1, 2], latents=latents, output_type="latent", guidance_scale=7.5, guidance_interval=(0.1, 0.8)).images
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    unguided = pipe([1, 2], latents=latents, output_type="latent", guidance_scale=1.0).images
    assert not torch.equal(implicit, unguided)


# --------------------------------------------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------------------------------------------
def test_imagenet_class_names(imagenet_pipeline):
    from pmf_diffusers import load_imagenet_id2label

    id2label = load_imagenet_id2label()
    assert len(id2label) == 1000 and id2label[1].startswith("goldfish")
    pipe = imagenet_pipeline
    assert pipe.get_label_ids("goldfish") == [1]  # bare string
    assert pipe.get_label_ids("Carassius auratus") == [1]  # synonym, case-insensitive
    assert pipe.get_label_ids("  GOLDFISH ") == [1]
    assert pipe.get_label_ids(["goldfish", 207, "golden retriever", "unconditional", "1000"]) == [1, 207, 207, 1000, 1000]
    assert pipe.get_label_ids(torch.tensor(5).item()) == [5]
    with pytest.raises(ValueError, match="ambiguous") as error:
        pipe.get_label_ids("crane")
    assert "134" in str(error.value) and "517" in str(error.value)
    with pytest.raises(ValueError, match="goldfish"):  # suggests close names
        pipe.get_label_ids("goldfsh")
    images = pipe("goldfish", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 16, 16)


@needs_reference
def test_names_without_id2label(tiny_pipeline):
    with pytest.raises(ValueError, match="no `id2label`"):
        tiny_pipeline.get_label_ids("goldfish")
    assert tiny_pipeline.get_label_ids("unconditional") == [10]


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------
@needs_reference
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [11]}, "out of range"),
        ({"class_labels": [-1]}, "out of range"),
        ({"class_labels": []}, "empty"),
        ({"class_labels": [1.5]}, "ints or class names"),
        ({"class_labels": [True]}, "ints or class names"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -2}, "num_inference_steps"),
        ({"num_inference_steps": 1.0}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "≥ 1"),
        ({"guidance_scale": float("nan")}, "≥ 1"),
        ({"guidance_interval": (-0.1, 0.5)}, "t_min"),
        ({"guidance_interval": (0.2, 1.5)}, "t_min"),
        ({"guidance_interval": (0.8, 0.2)}, "t_min"),
        ({"guidance_interval": (0.1, 0.5, 0.9)}, "guidance_interval"),
        ({"latents": torch.zeros(2, 3, 16, 16)}, "shape"),
        ({"latents": torch.zeros(3, 3, 32, 32)}, "shape"),
        ({"generator": [torch.Generator()]}, "generators for a batch of 2"),
    ],
)
def test_bad_inputs(tiny_pipeline, kwargs, message):
    call = {"class_labels": [1, 2], "output_type": "latent", **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_pipeline(**call)


def test_unknown_class_name_suggests_close_names(imagenet_pipeline):
    with pytest.raises(ValueError, match="Unknown class name 'golden retreiver'.*golden retriever"):
        imagenet_pipeline("golden retreiver")
    with pytest.raises(ValueError, match="Unknown class name"):
        imagenet_pipeline(["zzzzzz"])
    with pytest.raises(ValueError, match="out of range"):
        imagenet_pipeline([1001])
