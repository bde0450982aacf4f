"""PMFPipeline conventions shared with diffusers pipelines (guidance / timestep / interrupt properties, step-end
callbacks, pipeline-level QKV fusion), bounded memory on long label lists (sub-batching), and one-line errors for
input that used to be truncated or crash deep inside."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import max_rel_err

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel
from pmf_diffusers.labels import validate_id2label
from pmf_diffusers.pipelines.pipeline_pmf import DEFAULT_MAX_BATCH_SIZE, check_guidance_settings

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 10
TOL = 1e-5  # the official-parity tolerance: sub-batches may round differently in the last bits of a GEMM


@pytest.fixture(scope="module")
def transformer():
    """A tiny random model with non-degenerate weights (the official init zeroes the gates and output layers)."""
    torch.manual_seed(0)
    model = PMFTransformer2DModel(
        sample_size=16, patch_size=8, num_layers=2, num_head_layers=1, num_attention_heads=2, attention_head_dim=8,
        mlp_hidden_dim=32, bottleneck_dim=8, num_classes=NUM_CLASSES, frequency_embedding_dim=16, with_v_head=False,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture
def pipe(transformer):
    pipe = PMFPipeline(transformer, PMFScheduler(), id2label={i: f"class {i}" for i in range(NUM_CLASSES)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch, seed=0):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def record_transformer_calls(pipe):
    """Record the keyword arguments of every transformer call; returns (calls, hook handle)."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True,
    )
    return calls, handle


# --------------------------------------------------------------------------------------------------------------
# diffusers' pipeline conventions
# --------------------------------------------------------------------------------------------------------------
def test_callback_changes_guidance_from_the_next_step(pipe):
    """diffusers' common `test_callback_cfg`: the callback raises `pipe._guidance_scale` after every step."""

    def increase_guidance(pipe, step, timestep, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    calls, handle = record_transformer_calls(pipe)
    pipe([1, 2], num_inference_steps=3, guidance_scale=2.0, latents=noise(2), output_type="latent",
         callback_on_step_end=increase_guidance, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    handle.remove()
    assert pipe.num_timesteps == 3
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps
    assert [call["guidance"].tolist() for call in calls] == [[2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]

    def narrow_interval(pipe, step, timestep, callback_kwargs):
        pipe._guidance_interval = (0.25, 0.5)
        return callback_kwargs

    calls, handle = record_transformer_calls(pipe)
    pipe([1], num_inference_steps=2, guidance_interval=(0.0, 1.0), latents=noise(1), output_type="latent",
         callback_on_step_end=narrow_interval)
    handle.remove()
    assert pipe.guidance_interval == (0.25, 0.5)
    assert [call["guidance_interval_start"].item() for call in calls] == [0.0, 0.25]
    assert [call["guidance_interval_end"].item() for call in calls] == [1.0, 0.5]

    def invalid_guidance(pipe, step, timestep, callback_kwargs):
        pipe._guidance_scale = float("nan")
        return callback_kwargs

    with pytest.raises(ValueError, match="finite number ≥ 1"):
        pipe([1], num_inference_steps=2, callback_on_step_end=invalid_guidance)


def test_properties_report_the_call_settings(pipe):
    pipe([3], num_inference_steps=4, guidance_scale=np.float32(2.5), guidance_interval=np.array([0.1, 0.7]),
         latents=noise(1), output_type="latent")
    assert pipe.guidance_scale == 2.5 and type(pipe.guidance_scale) is float
    assert pipe.guidance_interval == (pytest.approx(0.1), pytest.approx(0.7))
    assert pipe.num_timesteps == 4 and pipe.interrupt is False
    pipe([3], latents=noise(1), output_type="latent")  # defaults from the config
    assert pipe.guidance_scale == pipe.config.default_guidance_scale and pipe.num_timesteps == 1


def test_interrupt_skips_the_remaining_steps(pipe):
    def stop_after_first(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = True
        return callback_kwargs

    calls, handle = record_transformer_calls(pipe)
    interrupted = pipe([1, 2], num_inference_steps=4, latents=noise(2), output_type="latent",
                       callback_on_step_end=stop_after_first).images
    handle.remove()
    assert len(calls) == 1 and pipe.interrupt

    seen = []
    pipe([1, 2], num_inference_steps=4, latents=noise(2), output_type="latent",
         callback_on_step_end=lambda p, i, t, kwargs: seen.append(kwargs["latents"].clone()) or kwargs)
    torch.testing.assert_close(interrupted, seen[0], rtol=0, atol=0)  # the sample after step 0
    assert not pipe.interrupt  # reset by the next call


def test_callback_may_replace_latents_and_must_return_a_dict(pipe):
    """diffusers' `test_callback_inputs`: zeroing the latents at the last step zeroes the output."""

    def zero_last(pipe, step, timestep, callback_kwargs):
        if step == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    out = pipe([1, 2], num_inference_steps=3, latents=noise(2), output_type="latent", callback_on_step_end=zero_last)
    assert out.images.abs().sum() == 0

    with pytest.raises(TypeError, match="must return a dict.*got NoneType"):
        pipe([1, 2], callback_on_step_end=lambda *args: None)
    with pytest.raises(ValueError, match=r"returned `latents` of shape \(1, 3, 16, 16\); expected .*\(2, 3, 16, 16\)"):
        pipe([1, 2], callback_on_step_end=lambda p, i, t, kwargs: {"latents": torch.zeros(1, 3, 16, 16)})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_callback_latents_must_be_finite(pipe, value):
    """Latents a step-end callback returns get the same check as latents passed in: NaN/inf gives a black image."""

    def spoil(pipe, step, timestep, callback_kwargs):
        callback_kwargs["latents"][0, 0, 0, 0] = value
        return callback_kwargs

    message = "returned by `callback_on_step_end` must be finite.*NaN or infinite"
    with pytest.raises(ValueError, match=message) as raised:
        pipe([1, 2], num_inference_steps=2, output_type="latent", callback_on_step_end=spoil)
    assert "\n" not in str(raised.value)
    with pytest.raises(TypeError, match="returned by `callback_on_step_end` must be a torch.Tensor, got ndarray"):
        pipe([1, 2], callback_on_step_end=lambda p, i, t, kwargs: {"latents": np.zeros((2, 3, 16, 16), np.float32)})


def test_pipeline_level_qkv_fusion(pipe):
    latents = noise(3)
    unfused = pipe([0, 4, 10], num_inference_steps=2, latents=latents, output_type="latent").images
    pipe.fuse_qkv_projections()
    try:
        attention = [m for m in pipe.transformer.modules() if hasattr(m, "to_qkv")]
        assert attention and all(m.fused_projections for m in attention)
        fused = pipe([0, 4, 10], num_inference_steps=2, latents=latents, output_type="latent").images
        assert max_rel_err(fused, unfused) <= 1e-6
    finally:
        pipe.unfuse_qkv_projections()
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    torch.testing.assert_close(
        pipe([0, 4, 10], num_inference_steps=2, latents=latents, output_type="latent").images, unfused, rtol=0, atol=0
    )


def test_pipeline_qkv_fusion_refuses_live_lora_and_changes_nothing(transformer):
    from peft import LoraConfig

    model = PMFTransformer2DModel.from_config(transformer.config).eval()
    model.load_state_dict(transformer.state_dict())
    # An adapter on the last attention layer only: the transformer's own loop would fuse the earlier layers first.
    model.add_adapter(LoraConfig(r=2, target_modules=["u_head_blocks.0.attn.to_q"]))
    pipe = PMFPipeline(model, PMFScheduler())
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        pipe.fuse_qkv_projections()
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())


# --------------------------------------------------------------------------------------------------------------
# Long label lists: sub-batches with the same images
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seeding", ["generator", "generator_list"])
def test_sub_batches_give_the_images_of_one_batch(pipe, seeding):
    labels = [i % (NUM_CLASSES + 1) for i in range(10)]

    def generator():
        if seeding == "generator":
            return torch.Generator().manual_seed(7)
        return [torch.Generator().manual_seed(100 + i) for i in range(len(labels))]

    outputs, inputs = {}, {}
    for max_batch_size in (None, 4):
        calls, handle = record_transformer_calls(pipe)
        outputs[max_batch_size] = {
            output_type: pipe(labels, num_inference_steps=2, guidance_scale=2.0, generator=generator(),
                              output_type=output_type, max_batch_size=max_batch_size).images
            for output_type in ("latent", "np", "pil")
        }
        handle.remove()
        inputs[max_batch_size] = calls
    # Activations are bounded: at most 4 images per transformer call, in order.
    assert [len(call["hidden_states"]) for call in inputs[4]] == [4, 4, 2] * 2 * 3
    assert [len(call["hidden_states"]) for call in inputs[None]] == [10] * 2 * 3
    # The same per-image noise as the unbatched call, exactly.
    first_step = torch.cat([call["hidden_states"] for call in inputs[4][:3]])
    torch.testing.assert_close(first_step, inputs[None][0]["hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(
        torch.cat([call["class_labels"] for call in inputs[4][:3]]), torch.tensor(labels), rtol=0, atol=0
    )
    whole, sub = outputs[None], outputs[4]
    assert max_rel_err(sub["latent"], whole["latent"]) <= TOL
    assert sub["np"].shape == whole["np"].shape == (10, 16, 16, 3)
    np.testing.assert_allclose(sub["np"], whole["np"], rtol=0, atol=TOL)
    assert len(sub["pil"]) == 10
    for image, expected in zip(sub["pil"], whole["pil"]):
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_sub_batches_keep_one_callback_per_step(pipe):
    labels = list(range(7))
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["latents"].shape[0]))
        return callback_kwargs

    pipe(labels, num_inference_steps=3, latents=noise(7), max_batch_size=3, output_type="latent",
         callback_on_step_end=record)
    assert seen == [(0, 7), (1, 7), (2, 7)]


def test_default_max_batch_size_bounds_long_label_lists(pipe):
    assert DEFAULT_MAX_BATCH_SIZE == 64
    calls, handle = record_transformer_calls(pipe)
    images = pipe([1] * 150, generator=torch.Generator().manual_seed(0), output_type="pt").images
    handle.remove()
    assert [len(call["hidden_states"]) for call in calls] == [64, 64, 22]
    assert images.shape == (150, 3, 16, 16)


# --------------------------------------------------------------------------------------------------------------
# Class labels: integers of any dtype; floats and bools refused instead of truncated
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([3, 10, 0], dtype=torch.int64),
        torch.tensor([3, 10, 0], dtype=torch.int32),
        torch.tensor([3, 10, 0], dtype=torch.int16),
        torch.tensor([3, 10, 0], dtype=torch.int8),
        torch.tensor([3, 10, 0], dtype=torch.uint8),
        np.array([3, 10, 0], dtype=np.int32),
        np.array([3, 10, 0], dtype=np.uint16),
        [np.int64(3), torch.tensor(10), "class 0"],
        ["3", "+10", " 0 "],
    ],
)
def test_integer_labels_of_any_dtype(pipe, labels):
    assert pipe.get_label_ids(labels) == [3, 10, 0]


def test_scalar_integer_labels(pipe):
    assert pipe.get_label_ids(torch.tensor(4, dtype=torch.int16)) == [4]
    assert pipe.get_label_ids(np.int8(4)) == [4]
    assert pipe.get_label_ids(np.array(4)) == [4]


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([1.5, 2.7]), "dtype torch.float32"),
        (torch.tensor([1.0, 2.0]), "dtype torch.float32"),  # whole floats too: a float tensor is not a label list
        (torch.tensor([True, False]), "dtype torch.bool"),
        (torch.tensor(10.9), "dtype torch.float32"),
        (torch.tensor([[1, 2]]), "one-dimensional"),
        (np.array([1.5]), "dtype float64"),
        (np.array([True]), "dtype bool"),
        (np.float32(3.0), "dtype float32"),
        ([torch.tensor(1.5)], r"got 1\.5 \(float\)"),
        ([np.bool_(True)], r"got True \(bool\)"),
        (2.0, r"got 2\.0 \(float\)"),
        (None, r"got None"),
    ],
)
def test_float_and_bool_labels_are_refused(pipe, labels, message):
    with pytest.raises(TypeError, match=rf"Class labels must be .*{message}"):
        pipe(labels, output_type="latent")


@pytest.mark.parametrize("label", [-1, "-1", "-3", torch.tensor([-1]), "11"])
def test_negative_or_too_large_ids_are_out_of_range(pipe, label):
    with pytest.raises(ValueError, match=r"Class id -?\d+ is out of range: this model has classes 0\.\.9"):
        pipe(label, output_type="latent")


def test_integer_like_class_names_are_reserved():
    with pytest.raises(ValueError, match="reserves"):
        validate_id2label({0: "cat", 1: "-1"})


# --------------------------------------------------------------------------------------------------------------
# Other bad input: one line that names the fix
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"generator": 5}, TypeError, r"`generator` must be a torch.Generator .*manual_seed\(seed\)"),
        ({"generator": [5, 6]}, TypeError, "`generator` must be a torch.Generator"),
        ({"guidance_interval": 0.5}, ValueError, r"`guidance_interval` must be a pair \(t_min, t_max\), got 0\.5"),
        ({"guidance_interval": "0.1 0.8"}, ValueError, "must be a pair"),
        ({"guidance_interval": (0.1, float("nan"))}, ValueError, "0 ≤ t_min ≤ t_max ≤ 1"),
        ({"guidance_scale": float("inf")}, ValueError, "finite number ≥ 1"),
        ({"guidance_scale": float("-inf")}, ValueError, "finite number ≥ 1"),
        ({"guidance_scale": "2"}, ValueError, "finite number ≥ 1"),
        ({"latents": np.zeros((2, 3, 16, 16), np.float32)}, TypeError, r"a torch.Tensor, got ndarray.*from_numpy"),
        ({"latents": torch.full((2, 3, 16, 16), float("nan"))}, ValueError, "NaN or infinite"),
        ({"latents": torch.full((2, 3, 16, 16), float("inf"))}, ValueError, "NaN or infinite"),
        ({"latents": torch.zeros((2, 3, 16, 16), dtype=torch.long)}, ValueError, "floating-point"),
        ({"max_batch_size": 0}, ValueError, "`max_batch_size` must be a positive integer or None"),
        ({"max_batch_size": 2.5}, ValueError, "`max_batch_size`"),
        ({"max_batch_size": True}, ValueError, "`max_batch_size`"),
    ],
)
def test_bad_inputs_get_one_line(pipe, kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        pipe([1, 2], output_type="latent", **kwargs)
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------------------------
# Loading a pipeline folder: safetensors only, finite weights
# --------------------------------------------------------------------------------------------------------------
class CodePayload:
    """Unpickled by a full unpickler, this creates `marker`: the code a tampered weights file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_pickle_with_code(path, tensors, marker):
    """Write `tensors` as a torch pickle (`.bin`) that also holds a code payload creating `marker`."""
    torch.save({**tensors, "payload": CodePayload(marker)}, path)


def assert_payload_is_live(path, marker):
    """The payload really runs under a full unpickler (so a test that saw no marker proves something)."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickle_weights_in_a_pipeline_folder_are_refused_unread(pipe, tmp_path):
    from safetensors.torch import load_file

    folder, marker = tmp_path / "pipe", tmp_path / "payload-ran"
    pipe.save_pretrained(folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    pickle_file = weights.with_suffix(".bin")
    save_pickle_with_code(pickle_file, load_file(weights), marker)
    weights.unlink()
    for kwargs in ({}, {"use_safetensors": False}):
        with pytest.raises(ValueError) as raised:
            PMFPipeline.from_pretrained(folder, **kwargs)
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith(f"{pickle_file} is a pickle weights file: PMFPipeline.from_pretrained loads weights "
                                  "only from safetensors")
        assert f"save_file(torch.load('{pickle_file}', weights_only=True), '{weights}')" in message
    assert not marker.exists()
    assert_payload_is_live(pickle_file, marker)


def test_pipeline_folder_with_non_finite_weights_is_refused(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    first, second = sorted(name for name, tensor in tensors.items() if tensor.is_floating_point())[:2]
    tensors[first].view(-1)[0] = float("nan")
    tensors[second].view(-1)[-1] = float("-inf")
    save_file(tensors, weights)
    message = rf"{folder}/transformer has NaN or infinite weights in 2 tensor\(s\)"
    with pytest.raises(ValueError, match=message) as raised:
        PMFPipeline.from_pretrained(folder)
    message = str(raised.value)
    assert "\n" not in message and first in message and second in message


def test_check_guidance_settings_accepts_numbers_of_any_kind():
    check_guidance_settings(np.float64(2.0), np.array([0.1, 0.8]))
    check_guidance_settings(torch.tensor(3.0), torch.tensor([0.0, 1.0]))
    check_guidance_settings(7, [0, 1])
    for bad in (math.inf, math.nan, True, [2.0], 0.99):
        with pytest.raises(ValueError, match="guidance_scale"):
            check_guidance_settings(bad)
    for bad in (0.5, (0.1,), (0.2, 0.1), (0.1, math.inf), (True, 1.0), "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            check_guidance_settings(None, bad)
