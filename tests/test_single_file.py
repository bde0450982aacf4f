"""`PMFTransformer2DModel.from_single_file` / `PMFPipeline.from_single_file` (loaders/single_file.py): parity with
`pmf convert`, Hub file forms (offline, against a local huggingface_hub cache), presets, and every kind of bad input.
Also the conversion errors they share with `pmf convert`: keys named as the file spells them, NaN/inf weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE_DIR, load_reference, max_rel_err, needs_reference, official_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _settings(pipe) -> dict:
    """Everything a saved PMFPipeline folder records about the pipeline, its transformer and its scheduler."""
    return {
        "pipeline": {key: pipe.config[key] for key in ("default_guidance_scale", "default_guidance_interval")},
        "id2label": pipe.id2label,
        "transformer": _public(pipe.transformer.config),
        "scheduler": _public(pipe.scheduler.config),
    }


def _assert_identical_weights(actual: torch.nn.Module, expected: torch.nn.Module):
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert actual_state[key].dtype == tensor.dtype, key
        assert torch.equal(actual_state[key], tensor), key
    assert torch.equal(actual.rope_freqs, expected.rope_freqs) and actual.rope_freqs.dtype == torch.complex64


def _assert_identical_images(actual, expected, num_classes: int):
    labels = list(range(min(num_classes, 4)))
    for pipe in (actual, expected):
        pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        images = [
            pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="pt").images
            for pipe in (actual, expected)
        ]
        assert torch.equal(images[0], images[1])


def _hub_cache(root: Path, repo_id: str, files: dict[str, dict]) -> None:
    """The huggingface_hub cache layout (models--org--name/{refs/main, snapshots/<commit>/<file>}) holding `files`."""
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for filename, state_dict in files.items():
        path = repo_dir / "snapshots" / COMMIT / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty default Hub cache in tmp_path, offline (huggingface_hub reads both from `constants` at call time)."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


# --------------------------------------------------------------------------------------------------------------
# Parity with `pmf convert`
# --------------------------------------------------------------------------------------------------------------
@needs_reference
def test_pipeline_matches_convert_checkpoint_and_the_oracle(tmp_path, tiny_checkpoint, tiny_preset):
    from pmf_diffusers import PMFPipeline, PMFTransformer2DModel
    from pmf_diffusers.conversion import convert_checkpoint

    convert_checkpoint(tiny_checkpoint, tmp_path / "converted", preset=tiny_preset)
    converted = PMFPipeline.from_pretrained(tmp_path / "converted")
    pipe = PMFPipeline.from_single_file(tiny_checkpoint, preset=tiny_preset)

    assert isinstance(pipe, PMFPipeline) and not pipe.transformer.training
    assert _settings(pipe) == _settings(converted)
    assert pipe.config.default_guidance_scale == 7.5 and pipe.transformer.config.with_v_head is False
    _assert_identical_weights(pipe.transformer, converted.transformer)
    _assert_identical_images(pipe, converted, pipe.num_classes)
    ref = load_reference("tinyA_generate")
    sample = pipe(ref["labels"].tolist(), latents=ref["noise_unscaled"], output_type="latent").images
    assert max_rel_err(sample, ref["sample_s1_w7.5_i0.1-0.8"]) <= 1e-5  # the preset's ω 7.5, [0.1, 0.8]

    # The model alone: the same weights and config as the converted folder's transformer.
    model = PMFTransformer2DModel.from_single_file(str(tiny_checkpoint))
    assert isinstance(model, PMFTransformer2DModel) and not model.training
    assert _public(model.config) == _public(converted.transformer.config)
    _assert_identical_weights(model, converted.transformer)

    # torch_dtype (and diffusers' alias dtype): the same as from_pretrained(..., dtype=...).
    converted_bf16 = PMFPipeline.from_pretrained(tmp_path / "converted", dtype=torch.bfloat16)
    for loaded in (
        PMFPipeline.from_single_file(tiny_checkpoint, preset=tiny_preset, torch_dtype=torch.bfloat16).transformer,
        PMFTransformer2DModel.from_single_file(tiny_checkpoint, dtype=torch.bfloat16),
    ):
        assert loaded.dtype == torch.bfloat16
        _assert_identical_weights(loaded, converted_bf16.transformer)


@needs_reference
def test_pipeline_matches_the_pmf_convert_command(tmp_path, capsys):
    """tinyB (7 classes, noise scale 2) through `pmf convert` with explicit settings, and from_single_file with the
    same settings, from a `.pt` and from a `.safetensors` file (training-mode keys, no prefix: the v-head is kept)."""
    from safetensors.torch import save_file

    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.cli import main

    settings = {"noise_scale": 2.0, "guidance_scale": 3.0, "guidance_interval": (0.2, 0.6)}
    flags = ["--noise-scale", "2", "--guidance-scale", "3", "--guidance-interval", "0.2", "0.6"]
    torch.save(official_state_dict("tinyB", prefix="net.", v_head=False), tmp_path / "tinyB.pt")
    save_file(official_state_dict("tinyB"), str(tmp_path / "tinyB.safetensors"))

    for name, with_v_head in (("tinyB.pt", False), ("tinyB.safetensors", True)):
        output = tmp_path / f"converted-{name}"
        assert main(["convert", str(tmp_path / name), str(output), *flags]) == 0
        converted = PMFPipeline.from_pretrained(output)
        pipe = PMFPipeline.from_single_file(str(tmp_path / name), **settings)
        assert pipe.transformer.config.with_v_head is with_v_head
        assert _settings(pipe) == _settings(converted)
        assert pipe.scheduler.config.noise_scale == 2.0 and list(pipe.config.default_guidance_interval) == [0.2, 0.6]
        _assert_identical_weights(pipe.transformer, converted.transformer)
        _assert_identical_images(pipe, converted, pipe.num_classes)
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------------------
# Presets: explicit, automatic (by shapes), none
# --------------------------------------------------------------------------------------------------------------
def _released_key_list(size: str) -> dict[str, torch.Tensor]:
    """The keys and shapes of a released `.pt`, as meta tensors (no memory, no data)."""
    listing = json.loads((REFERENCE_DIR / f"official_keys_pmfDiT_{size}.json").read_text())
    dtypes = {"float32": torch.float32, "complex64": torch.complex64}
    return {
        key: torch.empty(spec["shape"], dtype=dtypes[spec["dtype"]], device="meta")
        for key, spec in listing["keys"].items()
    }


@needs_reference
@pytest.mark.parametrize("size", ["B_16", "L_32"])
def test_released_shapes_pick_their_preset(size):
    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.official import OFFICIAL_PRESETS, CheckpointConversionError

    preset = OFFICIAL_PRESETS[f"pMF-{size.replace('_', '/')}"]
    state_dict = _released_key_list(size)

    for chosen in ("auto", preset.name, preset):  # automatic by shapes, by name, as an OfficialPreset
        pipe = PMFPipeline.from_single_file(state_dict, preset=chosen)
        assert pipe.scheduler.config.noise_scale == preset.noise_scale
        assert pipe.config.default_guidance_scale == preset.guidance_scale
        assert tuple(pipe.config.default_guidance_interval) == preset.guidance_interval
        assert pipe.num_classes == 1000 and pipe.get_label_ids("golden retriever") == [207]

    # Explicit settings override the preset's; preset=None gives pmf convert's no-preset defaults.
    pipe = PMFPipeline.from_single_file(state_dict, noise_scale=3.0, guidance_interval=(0.0, 0.5))
    assert pipe.scheduler.config.noise_scale == 3.0 and pipe.config.default_guidance_scale == preset.guidance_scale
    assert tuple(pipe.config.default_guidance_interval) == (0.0, 0.5)
    pipe = PMFPipeline.from_single_file(state_dict, preset=None)
    assert pipe.scheduler.config.noise_scale == 1.0 and pipe.config.default_guidance_scale == 1.0

    other = next(name for name in OFFICIAL_PRESETS if name != preset.name)
    with pytest.raises(CheckpointConversionError, match=f"contradicts preset {other}"):
        PMFPipeline.from_single_file(state_dict, preset=other)


@needs_reference
def test_no_preset_matches_a_custom_shape(tiny_checkpoint, caplog):
    from diffusers.utils import logging as diffusers_logging

    from pmf_diffusers import PMFPipeline

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe = PMFPipeline.from_single_file(tiny_checkpoint)
        assert "does not have the shapes of a released pMF size" in caplog.text
        assert pipe.scheduler.config.noise_scale == 1.0 and pipe.config.default_guidance_scale == 1.0
        caplog.clear()
        with caplog.at_level("WARNING"):
            PMFPipeline.from_single_file(tiny_checkpoint, preset=None)
        assert "released pMF size" not in caplog.text
    finally:
        diffusers_logging.disable_propagation()


# --------------------------------------------------------------------------------------------------------------
# config=
# --------------------------------------------------------------------------------------------------------------
@needs_reference
def test_config_argument(tmp_path, tiny_checkpoint):
    from pmf_diffusers import PMFPipeline, PMFTransformer2DModel
    from pmf_diffusers.conversion import convert_checkpoint
    from pmf_diffusers.official import CheckpointConversionError

    from pmf_diffusers import PMFScheduler

    # A pipeline folder with its own settings, class names and a non-default scheduler entry.
    folder = tmp_path / "pipe"
    pipe = convert_checkpoint(tiny_checkpoint, noise_scale=2.0, guidance_scale=3.0, guidance_interval=(0.2, 0.6))
    pipe.set_id2label({index: f"class {index}" for index in range(10)})
    pipe.scheduler = PMFScheduler.from_config(pipe.scheduler.config, min_time=0.1)
    pipe.save_pretrained(folder)
    reference = PMFPipeline.from_pretrained(folder)
    assert reference.scheduler.config.min_time == 0.1 and reference.id2label[3] == "class 3"

    # A pipeline folder (its transformer/ config) or a model folder, for the model.
    for config in (folder, str(folder / "transformer")):
        model = PMFTransformer2DModel.from_single_file(tiny_checkpoint, config=config)
        _assert_identical_weights(model, reference.transformer)
    # Settings that shapes cannot tell are taken from the config; a contradicting shape is named.
    model = PMFTransformer2DModel.from_single_file(tiny_checkpoint, config={**reference.transformer.config,
                                                                            "rope_theta": 100.0})
    assert model.config.rope_theta == 100.0 and not torch.equal(model.rope_freqs, reference.transformer.rope_freqs)
    with pytest.raises(CheckpointConversionError, match=r"contradicts the given config: num_layers 3 \(the checkpoint has 2\)"):
        PMFTransformer2DModel.from_single_file(tiny_checkpoint, config={"num_layers": 3})
    with pytest.raises(OSError, match="No PMFTransformer2DModel config found"):
        PMFTransformer2DModel.from_single_file(tiny_checkpoint, config=tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    with pytest.raises(ValueError, match="is a UNet2DModel config, not a PMFTransformer2DModel config"):
        PMFTransformer2DModel.from_single_file(tiny_checkpoint, config=tmp_path / "unet")

    # For the pipeline, a PMFPipeline folder supplies the sampling settings and class names instead of a preset.
    pipe = PMFPipeline.from_single_file(tiny_checkpoint, config=folder)
    assert _settings(pipe) == _settings(reference)
    _assert_identical_images(pipe, reference, pipe.num_classes)
    with pytest.raises(ValueError, match="Give preset or config, not both"):
        PMFPipeline.from_single_file(tiny_checkpoint, config=folder, preset="pMF-B/16")
    with pytest.raises(OSError, match="is not a PMFPipeline folder"):
        PMFPipeline.from_single_file(tiny_checkpoint, config=folder / "transformer")


# --------------------------------------------------------------------------------------------------------------
# Hub files: URL forms, offline against a local cache
# --------------------------------------------------------------------------------------------------------------
def test_parse_hub_file_reference():
    from pmf_diffusers.loaders.single_file import HubFileReference, parse_hub_file_reference

    expected = {
        "https://huggingface.co/Lyy0725/pMF/blob/main/pMF-B-16.pt": ("Lyy0725/pMF", "pMF-B-16.pt", "main"),
        "https://huggingface.co/Lyy0725/pMF/resolve/main/pMF-B-16.pt?download=true": ("Lyy0725/pMF", "pMF-B-16.pt", "main"),
        "huggingface.co/org/repo/blob/v1.0/weights/model.safetensors": ("org/repo", "weights/model.safetensors", "v1.0"),
        f"https://hf.co/org/repo/blob/{COMMIT}/a.pt": ("org/repo", "a.pt", COMMIT),
        "hf.co/org/repo/a.pt": ("org/repo", "a.pt", None),
        "Lyy0725/pMF/pMF-B-16.pt": ("Lyy0725/pMF", "pMF-B-16.pt", None),
        "org/repo/sub/dir/a.pt": ("org/repo", "sub/dir/a.pt", None),
        "https://huggingface.co/org/repo/blob/refs%2Fpr%2F3/a.pt": ("org/repo", "a.pt", "refs/pr/3"),
    }
    for text, fields in expected.items():
        assert parse_hub_file_reference(text) == HubFileReference(*fields), text
    for text in ("pMF-B/16", "org/repo", "https://huggingface.co/org/repo", "https://example.com/org/repo/a.pt",
                 "/abs/path/a.pt", "./org/repo/a.pt", "org//repo/a.pt", "bad id!/repo/a.pt", "a.pt"):
        assert parse_hub_file_reference(text) is None, text


@needs_reference
def test_hub_files_resolve_offline_from_the_cache(tmp_path, offline_hub, tiny_checkpoint):
    from pmf_diffusers import PMFPipeline, PMFTransformer2DModel

    state_dict = official_state_dict("tinyA", prefix="net.", v_head=False)
    _hub_cache(offline_hub, "test-org/tiny-pmf", {"tinyA.pt": state_dict, "sub/tinyA.pt": state_dict})
    custom_cache = tmp_path / "custom-cache"
    _hub_cache(custom_cache, "test-org/tiny-pmf", {"tinyA.pt": state_dict})
    local = PMFTransformer2DModel.from_single_file(tiny_checkpoint)

    for reference, kwargs in [
        ("https://huggingface.co/test-org/tiny-pmf/blob/main/tinyA.pt", {}),
        ("test-org/tiny-pmf/tinyA.pt", {}),
        ("test-org/tiny-pmf/sub/tinyA.pt", {"local_files_only": True}),
        (f"hf.co/test-org/tiny-pmf/resolve/{COMMIT}/tinyA.pt", {}),
        ("test-org/tiny-pmf/tinyA.pt", {"revision": COMMIT}),
        ("https://huggingface.co/test-org/tiny-pmf/blob/main/tinyA.pt", {"cache_dir": custom_cache}),
    ]:
        _assert_identical_weights(PMFTransformer2DModel.from_single_file(reference, **kwargs), local)
    pipe = PMFPipeline.from_single_file("test-org/tiny-pmf/tinyA.pt", cache_dir=str(custom_cache), preset=None)
    _assert_identical_weights(pipe.transformer, local)

    # Not cached while offline, another revision than the link's: one clear line each.
    with pytest.raises(FileNotFoundError, match="not a local file, and the Hub file test-org/tiny-pmf/other.pt is not in"):
        PMFPipeline.from_single_file("test-org/tiny-pmf/other.pt")
    with pytest.raises(FileNotFoundError, match="offline, or local_files_only"):
        PMFTransformer2DModel.from_single_file("https://huggingface.co/someone/else/blob/main/a.pt")
    with pytest.raises(ValueError, match="names revision 'main' but revision='v2' was given"):
        PMFTransformer2DModel.from_single_file("https://huggingface.co/test-org/tiny-pmf/blob/main/tinyA.pt",
                                               revision="v2")


# --------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, no code run, keys named as the file spells them
# --------------------------------------------------------------------------------------------------------------
class RunsCode:
    """A pickle that would create a folder when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@needs_reference
def test_bad_files_are_refused_with_one_line(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    from pmf_diffusers import PMFPipeline, PMFTransformer2DModel
    from pmf_diffusers.official import CheckpointConversionError

    def refused(exception, pattern, source, **kwargs):
        for loader in (PMFPipeline.from_single_file, PMFTransformer2DModel.from_single_file):
            with pytest.raises(exception, match=pattern) as error:
                loader(source, **kwargs)
            assert "\n" not in str(error.value), str(error.value)
        return str(error.value)

    # A pickle with code: refused by torch.load(weights_only=True), the code never runs.
    marker = tmp_path / "code-ran"
    torch.save({"net.pos_embed": RunsCode(marker)}, tmp_path / "code.pt")
    message = refused(CheckpointConversionError, "code.pt is not a plain weights file", tmp_path / "code.pt")
    assert "refused it (Trying to load unsupported GLOBAL" in message and "weights_only` set to `False`" not in message
    assert not marker.exists()
    # Not a checkpoint at all, a truncated one, a broken .safetensors, another model's weights.
    (tmp_path / "text.pt").write_text("hello")
    refused(CheckpointConversionError, "text.pt is not a plain weights file", tmp_path / "text.pt")
    (tmp_path / "truncated.pt").write_bytes(tiny_checkpoint.read_bytes()[:5000])
    refused(CheckpointConversionError, "truncated.pt is not a plain weights file", tmp_path / "truncated.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    refused(CheckpointConversionError, "broken.safetensors is not a readable .safetensors file",
            tmp_path / "broken.safetensors")
    save_file({"conv_in.weight": torch.zeros(4, 3, 3, 3), "conv_in.bias": torch.zeros(4)},
              str(tmp_path / "unet.safetensors"))
    refused(CheckpointConversionError, r"unet.safetensors: Not a pMF checkpoint: missing pos_embed.*found e.g. conv_in",
            tmp_path / "unet.safetensors")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    refused(CheckpointConversionError, "non-empty mapping", tmp_path / "list.pt")

    # Missing, unexpected and mis-shaped keys: named as we name them and as the file spells them.
    broken = official_state_dict("tinyA", prefix="net.", v_head=False)
    del broken["net.u_heads.0.norm1.weight"], broken["net.pos_embed"]
    refused(CheckpointConversionError, "missing net.pos_embed", broken)  # found e.g. ... keeps the file's prefix too
    broken = official_state_dict("tinyA", prefix="net.", v_head=False)
    del broken["net.u_heads.0.norm1.weight"]
    broken["net.shared_blocks.1.mlp.w2._flax_linear.weight"] = torch.zeros(64, 171)
    broken["net.ema_decay"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    message = refused(CheckpointConversionError, "broken.pt: Checkpoint does not match a pMF network",
                      tmp_path / "broken.pt")
    assert "missing keys: u_head_blocks.0.norm1.weight [file key: net.u_heads.0.norm1.weight]" in message
    assert "unexpected keys: net.ema_decay" in message
    assert ("mis-shaped keys: transformer_blocks.1.ff.down_proj.weight (64, 171) (expected (64, 170)) "
            "[file key: net.shared_blocks.1.mlp.w2._flax_linear.weight]") in message
    # Without the prefix, the file's names carry none; a long list is cut to ten names and a count.
    unprefixed = {key: value for key, value in official_state_dict("tinyA", v_head=False).items()
                  if not key.startswith("u_heads.0.")}
    message = refused(CheckpointConversionError, r"missing keys: u_head_blocks\.0\.attn\.norm_k\.weight "
                      r"\[file key: u_heads\.0\.attn\.k_norm\.weight\]", unprefixed)
    assert message.count("[file key:") == 10 and "and 3 more" in message  # 13 parameters per block

    # Inputs that are not a checkpoint file.
    refused(ValueError, "is a folder; from_single_file loads one checkpoint file", tmp_path)
    refused(FileNotFoundError, "'missing.pt' is neither a local file nor a Hub file", "missing.pt")
    refused(FileNotFoundError, "The released pMF-B/16 is Lyy0725/pMF/pMF-B-16.pt", "pMF-B/16")
    refused(TypeError, "expects a checkpoint path, a Hub file link or a state dict, got int", 3)
    refused(ValueError, "torch_dtype must be a torch.dtype", tiny_checkpoint, torch_dtype="bf16")
    # Invalid sampling settings are refused before the file is read.
    for bad in ({"noise_scale": float("inf")}, {"guidance_scale": 0.5}, {"guidance_interval": (0.8, 0.2)}):
        with pytest.raises(ValueError):
            PMFPipeline.from_single_file(tmp_path / "never-read.pt", **bad)


@needs_reference
def test_non_finite_weights_are_refused_by_from_single_file_and_pmf_convert(tmp_path, capsys):
    from pmf_diffusers import PMFPipeline, PMFTransformer2DModel
    from pmf_diffusers.cli import main
    from pmf_diffusers.conversion import convert_checkpoint, convert_official_state_dict
    from pmf_diffusers.official import CheckpointConversionError

    state_dict = official_state_dict("tinyA", prefix="net.", v_head=False)
    state_dict["net.pos_embed"][0, 3, 5] = float("nan")
    state_dict["net.u_heads.1.mlp.w3._flax_linear.weight"][2, 2] = float("-inf")
    checkpoint = tmp_path / "diverged.pt"
    torch.save(state_dict, checkpoint)
    expected = ("NaN or infinite weights in 2 tensor(s): net.pos_embed, net.u_heads.1.mlp.w3._flax_linear.weight; "
                "the file is corrupt")

    for load in (PMFPipeline.from_single_file, PMFTransformer2DModel.from_single_file, convert_checkpoint):
        with pytest.raises(CheckpointConversionError) as error:
            load(checkpoint)
        assert expected in str(error.value)
    with pytest.raises(CheckpointConversionError, match="NaN or infinite weights in 1 tensor"):
        tokens = official_state_dict("tinyA")["class_tokens"]
        convert_official_state_dict({**official_state_dict("tinyA"), "class_tokens": torch.full_like(tokens, torch.inf)})

    # pmf convert: one line naming the keys, exit status 2, nothing written.
    capsys.readouterr()
    assert main(["convert", str(checkpoint), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmf: error: ") and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Key naming and import hygiene
# --------------------------------------------------------------------------------------------------------------
@needs_reference
@pytest.mark.parametrize("size", ["B_16", "B_32", "L_16", "L_32", "H_16", "H_32"])
def test_every_released_key_is_named_back_exactly(size):
    """The reverse key rules (used to name missing keys the file's way) invert the forward rules on every key of
    every released size, v-head included."""
    from pmf_diffusers.conversion import diffusers_key_to_official, official_key_to_diffusers

    listing = json.loads((REFERENCE_DIR / f"official_keys_pmfDiT_{size}.json").read_text())
    keys = [key[len("net."):] for key in [*listing["keys"], *listing["train_only_keys"]] if key != "net.rope_freqs"]
    ours = [official_key_to_diffusers(key) for key in keys]
    assert None not in ours and len(set(ours)) == len(keys)
    assert [diffusers_key_to_official(key) for key in ours] == keys
    assert diffusers_key_to_official("not_a_pmf_parameter.weight") is None


def test_model_module_imports_without_the_conversion_module():
    code = (
        "import sys; from pmf_diffusers.models.transformer_pmf import PMFTransformer2DModel; "
        "print(hasattr(PMFTransformer2DModel, 'from_single_file'), 'pmf_diffusers.conversion' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]
