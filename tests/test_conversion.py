"""Official checkpoints → diffusers: key lists of all released sizes, strict errors, file loading, `load_official`;
the facts about the released sizes (`official.py`) and `load_pipeline`, the one loader of a model source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE_DIR, load_reference, max_rel_err, needs_reference, official_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = ["B_16", "B_32", "L_16", "L_32", "H_16", "H_32"]
# docs/algorithm.md, "Released sizes": (image, patch, hidden, trunk depth, head dim, MLP width, bottleneck, noise scale)
SPEC = {
    "B_16": (256, 16, 768, 8, 64, 2048, 128, 1.0),
    "B_32": (512, 32, 768, 8, 64, 2048, 128, 2.0),
    "L_16": (256, 16, 1024, 24, 64, 2730, 128, 1.0),
    "L_32": (512, 32, 1024, 24, 64, 2730, 128, 4.0),
    "H_16": (256, 16, 1280, 40, 80, 3416, 256, 2.0),
    "H_32": (512, 32, 1280, 40, 80, 3416, 256, 4.0),
}


def _meta_state_dict(entries: dict) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "complex64": torch.complex64}
    return {key: torch.empty(spec["shape"], dtype=dtypes[spec["dtype"]], device="meta") for key, spec in entries.items()}


def _param_count(config: dict) -> int:
    from pmf_diffusers import PMFTransformer2DModel

    with torch.device("meta"):
        model = PMFTransformer2DModel(**config)
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# Key lists of the six released sizes (meta device, no memory)
# --------------------------------------------------------------------------------------------------------------
@needs_reference
@pytest.mark.parametrize("size", SIZES)
def test_official_key_lists_convert_with_exact_param_counts(size):
    from pmf_diffusers.conversion import (
        OFFICIAL_PRESETS,
        CheckpointConversionError,
        check_preset,
        convert_official_state_dict,
        resolve_preset,
    )

    listing = json.loads((REFERENCE_DIR / f"official_keys_pmfDiT_{size}.json").read_text())
    eval_keys = listing["keys"]
    assert eval_keys["net.rope_freqs"]["dtype"] == "complex64"

    # Eval mode: what the released .pt files hold (net. prefix, rope_freqs buffer, no v-head).
    config, weights = convert_official_state_dict(_meta_state_dict(eval_keys))
    assert config["with_v_head"] is False
    assert len(weights) == len(eval_keys) - 1  # all but the deterministic rope_freqs
    assert all(tensor.device.type == "meta" for tensor in weights.values())
    assert _param_count(config) == listing["param_count_eval"]

    image, patch, hidden, depth, head_dim, mlp, bottleneck, noise_scale = SPEC[size]
    assert (config["sample_size"], config["patch_size"], config["num_layers"], config["num_head_layers"]) == (
        image, patch, depth, 8)
    assert config["num_attention_heads"] * config["attention_head_dim"] == hidden
    assert (config["attention_head_dim"], config["mlp_hidden_dim"], config["bottleneck_dim"]) == (head_dim, mlp, bottleneck)
    assert config["num_classes"] == 1000

    # Training mode: + v-head keys.
    train_config, train_weights = convert_official_state_dict(
        _meta_state_dict({**eval_keys, **listing["train_only_keys"]})
    )
    assert train_config == {**config, "with_v_head": True}
    assert len(train_weights) == len(eval_keys) - 1 + len(listing["train_only_keys"])
    assert _param_count(train_config) == listing["param_count_train"]

    # The matching preset is accepted, every preset with a different shape refuses the checkpoint.
    preset = resolve_preset(f"pMF-{size.replace('_', '/')}")
    assert preset is resolve_preset(f"pmfDiT_{size}") is resolve_preset(size.lower().replace("_", "-"))
    assert preset.noise_scale == noise_scale
    check_preset(config, preset)
    for other in OFFICIAL_PRESETS.values():
        if other is not preset:
            with pytest.raises(CheckpointConversionError, match=f"contradicts preset {other.name}"):
                check_preset(config, other)


def test_resolve_preset_rejects_unknown_sizes():
    from pmf_diffusers.conversion import resolve_preset

    with pytest.raises(ValueError, match="Unknown pMF size 'pMF-XL/2'.*pMF-B/16"):
        resolve_preset("pMF-XL/2")


# --------------------------------------------------------------------------------------------------------------
# convert_official_state_dict on the tiny reference model
# --------------------------------------------------------------------------------------------------------------
@needs_reference
def test_prefixed_eval_dict_and_optional_rope_freqs():
    from pmf_diffusers.conversion import build_pipeline, convert_official_state_dict

    ref = load_reference("tinyA_forward")
    rope = torch.polar(torch.ones_like(ref["rope_freqs_real"]), torch.atan2(ref["rope_freqs_imag"], ref["rope_freqs_real"]))
    without_rope = official_state_dict("tinyA", prefix="net.", v_head=False)
    with_rope = {**without_rope, "net.rope_freqs": rope}
    assert rope.dtype == torch.complex64

    outputs = []
    for state_dict in (without_rope, with_rope):
        config, weights = convert_official_state_dict(state_dict)
        assert config["with_v_head"] is False
        assert not any(key.startswith(("v_head_blocks", "v_norm_out", "v_proj_out")) for key in weights)
        model = build_pipeline(config, weights).transformer
        with torch.no_grad():
            outputs.append(model(ref["z_t"], ref["t"], ref["r"], ref["labels"], ref["omega"], ref["t_min"], ref["t_max"]).sample)
    assert max_rel_err(outputs[0], ref["u_head_xpred"]) <= 1e-5
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)

    # Unprefixed training-mode dict: v-head detected.
    config, _ = convert_official_state_dict(official_state_dict("tinyA"))
    assert config["with_v_head"] is True
    config, _ = convert_official_state_dict(official_state_dict("tinyB", prefix="net."))
    assert (config["num_class_tokens"], config["num_guidance_tokens"], config["num_interval_tokens"],
            config["num_time_tokens"], config["num_classes"], config["mlp_hidden_dim"]) == (3, 1, 1, 2, 7, 192)


@needs_reference
def test_missing_extra_and_mis_shaped_keys_are_all_named():
    from pmf_diffusers.conversion import CheckpointConversionError, convert_official_state_dict

    state_dict = official_state_dict("tinyA", prefix="net.", v_head=False)
    # missing
    broken = dict(state_dict)
    del broken["net.u_heads.1.attn.k_proj._flax_linear.weight"]
    del broken["net.u_final_layer.norm.weight"]
    with pytest.raises(CheckpointConversionError, match="missing keys") as error:
        convert_official_state_dict(broken)
    assert "u_head_blocks.1.attn.to_k.weight" in str(error.value) and "u_norm_out.weight" in str(error.value)
    # extra
    broken = {**state_dict, "net.ema_decay": torch.zeros(1), "net.shared_blocks.0.attn.bias": torch.zeros(64)}
    with pytest.raises(CheckpointConversionError, match="unexpected keys") as error:
        convert_official_state_dict(broken)
    assert "ema_decay" in str(error.value) and "shared_blocks.0.attn.bias" in str(error.value)
    # mis-shaped
    broken = dict(state_dict)
    broken["net.shared_blocks.1.mlp.w2._flax_linear.weight"] = torch.zeros(64, 171)
    broken["net.rope_freqs"] = torch.zeros(15, 8, dtype=torch.complex64)
    with pytest.raises(CheckpointConversionError, match="mis-shaped keys") as error:
        convert_official_state_dict(broken)
    assert "transformer_blocks.1.ff.down_proj.weight (64, 171) (expected (64, 170))" in str(error.value)
    assert "rope_freqs (15, 8)" in str(error.value)
    # all at once, one message
    broken = dict(state_dict)
    del broken["net.u_final_layer.norm.weight"]
    broken["net.extra_thing"] = torch.zeros(2)
    broken["net.u_final_layer.linear._flax_linear.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointConversionError) as error:
        convert_official_state_dict(broken)
    message = str(error.value)
    assert "u_norm_out.weight" in message and "extra_thing" in message and "u_proj_out.bias (7,)" in message
    # a half v-head (v_final_layer present, v_heads missing) is reported as missing keys
    broken = {**state_dict, "net.v_final_layer.norm.weight": torch.ones(64)}
    with pytest.raises(CheckpointConversionError, match="missing keys.*v_head_blocks.0"):
        convert_official_state_dict(broken)


def test_not_a_pmf_state_dict():
    from pmf_diffusers.conversion import CheckpointConversionError, convert_official_state_dict

    with pytest.raises(CheckpointConversionError, match="non-empty mapping"):
        convert_official_state_dict({})
    with pytest.raises(CheckpointConversionError, match="Not a pMF checkpoint: missing pos_embed"):
        convert_official_state_dict({"model.weight": torch.zeros(2)})
    with pytest.raises(CheckpointConversionError, match="not a tensor"):
        convert_official_state_dict({"net.pos_embed": [1, 2, 3]})


# --------------------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------------------
class NotWeights:
    """A pickled custom object: refused by torch.load(weights_only=True)."""

    def __init__(self):
        self.payload = torch.zeros(2)


@needs_reference
def test_load_official_checkpoint_accepts_only_plain_weights(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    from pmf_diffusers.conversion import CheckpointConversionError, load_official_checkpoint

    state_dict = load_official_checkpoint(tiny_checkpoint)
    assert set(state_dict) == set(official_state_dict("tinyA", prefix="net.", v_head=False))

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state_dict, "epoch": 3}, wrapped)
    assert set(load_official_checkpoint(wrapped)) == set(state_dict)
    safetensors_file = tmp_path / "weights.safetensors"
    save_file(official_state_dict("tinyA"), str(safetensors_file))
    assert set(load_official_checkpoint(safetensors_file)) == set(official_state_dict("tinyA"))

    for name, obj in [("object.pt", NotWeights()), ("function.pt", {"net.pos_embed": os.system}),
                      ("mixed.pt", {**state_dict, "net.extra": NotWeights()})]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointConversionError, match="not a plain weights file"):
            load_official_checkpoint(tmp_path / name)
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointConversionError, match="not a plain weights file"):
        load_official_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official_checkpoint(tmp_path / "missing.pt")


@needs_reference
def test_convert_checkpoint_to_folder(tmp_path, tiny_checkpoint, tiny_preset):
    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.conversion import OFFICIAL_PRESETS, CheckpointConversionError, convert_checkpoint

    output = tmp_path / "converted"
    pipe = convert_checkpoint(tiny_checkpoint, output, preset=tiny_preset)
    assert (output / "model_index.json").is_file()
    assert (output / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert pipe.config.default_guidance_scale == 7.5
    assert list(pipe.config.default_guidance_interval) == [0.1, 0.8]
    assert pipe.scheduler.config.noise_scale == 1.0
    assert pipe.transformer.config.with_v_head is False

    loaded = PMFPipeline.from_pretrained(output)
    loaded.set_progress_bar_config(disable=True)
    ref = load_reference("tinyA_generate")
    sample = loaded(ref["labels"].tolist(), latents=ref["noise_unscaled"], output_type="latent").images
    assert max_rel_err(sample, ref["sample_s1_w7.5_i0.1-0.8"]) <= 1e-5  # defaults from the preset: ω 7.5, [0.1, 0.8]

    # A non-empty output folder is refused unless overwrite.
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(tiny_checkpoint, output, noise_scale=2.0)
    pipe = convert_checkpoint(tiny_checkpoint, output, noise_scale=2.0, guidance_scale=3.0,
                              guidance_interval=(0.2, 0.6), overwrite=True)
    assert PMFPipeline.from_pretrained(output).scheduler.config.noise_scale == 2.0
    (tmp_path / "empty").mkdir()
    convert_checkpoint(tiny_checkpoint, tmp_path / "empty")  # an existing empty folder is fine

    # Contradicting presets.
    with pytest.raises(CheckpointConversionError, match="contradicts preset pMF-B/16"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "never", preset="pMF-B/16")
    with pytest.raises(CheckpointConversionError, match="contradicts preset pMF-H/32"):
        convert_checkpoint(tiny_checkpoint, preset=OFFICIAL_PRESETS["pMF-H/32"])
    assert not (tmp_path / "never").exists()


@needs_reference
def test_overwrite_replaces_only_what_a_conversion_wrote(tmp_path, tiny_checkpoint):
    """Issue 12, item 3: `overwrite=True` replaces the files of an earlier conversion, never anything else."""
    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.conversion import convert_checkpoint

    output = tmp_path / "out"
    convert_checkpoint(tiny_checkpoint, output)
    foreign = {
        "notes.txt": b"mine",
        "samples/0000.png": b"png",
        "transformer/README.md": b"my notes on the weights",
        "scheduler/tuning.json": b"{}",
    }
    for name, data in foreign.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(data)
    # What an earlier, sharded save would have left: shards and their index.
    stale = ["transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
             "transformer/diffusion_pytorch_model.safetensors.index.json"]
    for name in stale:
        (output / name).write_bytes(b"old")

    convert_checkpoint(tiny_checkpoint, output, noise_scale=2.0, overwrite=True)
    for name, data in foreign.items():
        assert (output / name).read_bytes() == data, name
    assert not any((output / name).exists() for name in stale)
    assert PMFPipeline.from_pretrained(output).scheduler.config.noise_scale == 2.0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tinyA.pt"]  # no staging folder left


@needs_reference
def test_overwrite_never_touches_the_input_or_another_pipeline(tmp_path, tiny_checkpoint):
    import shutil

    from pmf_diffusers.conversion import check_output_folder, convert_checkpoint

    work = tmp_path / "work"
    work.mkdir()
    checkpoint = work / "tinyA.pt"
    shutil.copyfile(tiny_checkpoint, checkpoint)
    (work / "other.txt").write_text("keep")
    data = checkpoint.read_bytes()
    for output in (work, tmp_path, Path(os.path.relpath(work))):  # the folder itself, a parent, a relative path
        with pytest.raises(ValueError, match="contains the checkpoint .*write the pipeline to another folder"):
            convert_checkpoint(checkpoint, output, overwrite=True)
    assert checkpoint.read_bytes() == data and (work / "other.txt").read_text() == "keep"
    assert sorted(path.name for path in work.iterdir()) == ["other.txt", "tinyA.pt"]

    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(FileExistsError, match="holds a model_index.json that is not a PMFPipeline's"):
        convert_checkpoint(tiny_checkpoint, other, overwrite=True)
    assert json.loads((other / "model_index.json").read_text()) == {"_class_name": "StableDiffusionPipeline"}
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        check_output_folder(work / "other.txt")


@needs_reference
def test_interrupted_overwrite_never_looks_complete(tmp_path, tiny_checkpoint, monkeypatch):
    """The new files are moved in with model_index.json last: a failure half-way leaves no complete-looking folder,
    keeps the user's files and no staging folder; the next run completes it."""
    from pmf_diffusers import PMFPipeline
    from pmf_diffusers import conversion
    from pmf_diffusers.conversion import convert_checkpoint

    output = tmp_path / "out"
    convert_checkpoint(tiny_checkpoint, output)
    (output / "notes.txt").write_text("mine")
    real_replace = os.replace

    def disk_full_on_weights(source, target):
        if str(target).endswith(".safetensors"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(conversion.os, "replace", disk_full_on_weights)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(tiny_checkpoint, output, noise_scale=2.0, overwrite=True)
    monkeypatch.setattr(conversion.os, "replace", real_replace)
    assert not (output / "model_index.json").exists() and (output / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tinyA.pt"]

    convert_checkpoint(tiny_checkpoint, output, noise_scale=2.0, overwrite=True)
    assert PMFPipeline.from_pretrained(output).scheduler.config.noise_scale == 2.0


@needs_reference
def test_non_finite_settings_are_refused(tmp_path, tiny_checkpoint):
    """Issue 12, item 9: inf/NaN noise scale and guidance never reach a saved config."""
    from pmf_diffusers import PMFScheduler
    from pmf_diffusers.conversion import convert_checkpoint

    for value in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="`noise_scale` must be a finite number > 0"):
            PMFScheduler(noise_scale=value)
        with pytest.raises(ValueError, match="`noise_scale` must be a finite number > 0"):
            convert_checkpoint(tiny_checkpoint, tmp_path / "out", noise_scale=value)
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guidance_scale"):
            convert_checkpoint(tiny_checkpoint, tmp_path / "out", guidance_scale=value)
        with pytest.raises(ValueError, match="guidance_interval"):
            convert_checkpoint(tiny_checkpoint, tmp_path / "out", guidance_interval=(0.1, value))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# load_official, offline, against a fake Hub cache
# --------------------------------------------------------------------------------------------------------------
def _fake_hub_cache(root: Path, repo_id: str, filename: str, state_dict: dict) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(state_dict, snapshot / filename)
    return snapshot / filename


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path, offline. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into
    `huggingface_hub.constants` at import time and `hf_hub_download` looks them up there at call time, so patch both
    the environment (for subprocesses) and the constants."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@needs_reference
def test_load_official_converts_once_and_caches(tmp_path, offline_hub, tiny_preset):
    from pmf_diffusers.conversion import load_official

    repo_id = "test-org/tiny-pmf"
    checkpoint = _fake_hub_cache(
        offline_hub, repo_id, tiny_preset.filename, official_state_dict("tinyA", prefix="net.", v_head=False)
    )
    cache_dir = tmp_path / "converted"
    pipe = load_official(tiny_preset, cache_dir=cache_dir, repo_id=repo_id)
    pipe.set_progress_bar_config(disable=True)
    folder = cache_dir / "tiny-A"
    assert (folder / "model_index.json").is_file()
    assert not (cache_dir / "tiny-A.partial").exists()
    ref = load_reference("tinyA_generate")
    sample = pipe(ref["labels"].tolist(), latents=ref["noise_unscaled"], output_type="latent").images
    assert max_rel_err(sample, ref["sample_s1_w7.5_i0.1-0.8"]) <= 1e-5

    # Second call: served from the converted cache, the Hub file is no longer needed.
    checkpoint.unlink()
    again = load_official(tiny_preset, cache_dir=cache_dir, repo_id=repo_id, dtype=torch.bfloat16)
    assert again.transformer.dtype == torch.bfloat16
    assert again.transformer.rope_freqs.dtype == torch.complex64


@needs_reference
def test_load_official_completes_an_interrupted_cache_folder(tmp_path, offline_hub, tiny_preset):
    """A cache folder left incomplete (no model_index.json) is converted into again; files that are not a
    conversion's stay."""
    from pmf_diffusers.conversion import load_official

    repo_id = "test-org/tiny-pmf"
    _fake_hub_cache(offline_hub, repo_id, tiny_preset.filename, official_state_dict("tinyA", prefix="net.", v_head=False))
    folder = tmp_path / "converted" / "tiny-A"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{truncated")
    (folder / "keep.txt").write_text("not ours")
    load_official(tiny_preset, cache_dir=tmp_path / "converted", repo_id=repo_id)
    assert (folder / "model_index.json").is_file() and (folder / "keep.txt").read_text() == "not ours"
    assert json.loads((folder / "transformer" / "config.json").read_text())["sample_size"] == 32


def test_load_official_offline_without_cache_raises_connection_error(tmp_path, offline_hub):
    from pmf_diffusers.conversion import load_official

    with pytest.raises(ConnectionError, match="pMF-L/32 is not cached.*offline.*pmf convert"):
        load_official("pMF-L/32", cache_dir=tmp_path / "converted")
    assert not (tmp_path / "converted" / "pMF-L-32").exists()


def test_default_cache_dir_is_under_hf_home():
    from huggingface_hub import constants

    from pmf_diffusers.conversion import default_cache_dir

    assert default_cache_dir() == Path(constants.HF_HOME) / "pmf-diffusers" / "converted"


# --------------------------------------------------------------------------------------------------------------
# official.py: the released sizes; loading.py: one meaning of a model source
# --------------------------------------------------------------------------------------------------------------
def test_official_facts_and_loading_helpers_import_without_torch():
    import subprocess
    import sys

    code = "import sys, pmf_diffusers.official, pmf_diffusers.loading; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_match_preset_identifies_each_released_size_by_its_shapes():
    from pmf_diffusers.official import OFFICIAL_PRESETS, match_preset, official_model_config

    for name, preset in OFFICIAL_PRESETS.items():
        config = {**official_model_config(name), "num_classes": 1000}
        assert match_preset(config) is preset
        assert match_preset(config, noise_scale=preset.noise_scale, num_classes=1000) is preset
        assert match_preset(config, num_classes=10) is None  # other classes: not the released model
        other_noise_scales = {p.noise_scale for p in OFFICIAL_PRESETS.values()} - {preset.noise_scale}
        assert match_preset(config, noise_scale=min(other_noise_scales)) is None
        assert match_preset({**config, "num_layers": config["num_layers"] + 1}) is None
        assert match_preset({**config, "sample_size": 2 * config["sample_size"]}) is None


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME, so that no size counts as converted (`default_cache_dir` reads it at call time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_home"


def test_load_pipeline_sources(tmp_path, offline_hub, empty_hf_home):
    from pmf_diffusers import PMFPipeline, bundled_model_path
    from pmf_diffusers.loading import load_pipeline

    bundled = load_pipeline()
    assert isinstance(bundled, PMFPipeline)
    folder = load_pipeline(str(bundled_model_path()), dtype=torch.bfloat16)
    assert folder.transformer.dtype == torch.bfloat16
    assert folder.transformer.config == bundled.transformer.config
    assert load_pipeline(bundled_model_path(), device="cpu").device.type == "cpu"

    checkpoint = tmp_path / "pMF-B-16.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(ValueError, match="is a file; a PMFPipeline folder is expected.*pmf convert"):
        load_pipeline(str(checkpoint))
    with pytest.raises(FileNotFoundError, match="no PMFPipeline folder"):
        load_pipeline(tmp_path / "missing")
    for size in ("pMF-L/32", "l32", "pmf-l-32"):  # official size names: converted on first use, here offline
        with pytest.raises(ConnectionError, match="pMF-L/32 is not cached"):
            load_pipeline(size)
    with pytest.raises(OSError, match="could not load 'someone/some-model' from the Hub"):
        load_pipeline("someone/some-model")
    for source in ("no-such-model", "bad repo id!", "a/b/c"):
        with pytest.raises(ValueError, match="unknown model"):
            load_pipeline(source)
    with pytest.raises(ValueError, match="cannot use device 'no-such-device'"):
        load_pipeline(device="no-such-device")


def test_looks_like_repo_id_and_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pmf_diffusers.loading import hub_offline, is_official_size_name, looks_like_repo_id

    assert looks_like_repo_id("Lyy0725/pMF") and looks_like_repo_id("org/model.v2")
    for text in ("model", "a/b/c", "bad id!/x", "", None, "./folder"):
        assert not looks_like_repo_id(text), text
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_repo_id("org/model")  # an existing local folder is not a repo id

    assert is_official_size_name("B/16") and is_official_size_name("pmfDiT_H_32")
    assert not is_official_size_name("pMF-XL/2") and not is_official_size_name(None)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_offline() is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub_offline() is False
