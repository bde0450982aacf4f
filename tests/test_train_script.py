"""Tests of `examples/train_pmf.py` and its helpers (`pmf_diffusers.training.data` / `.presets`). CPU only.

Most runs call the script's `main(parse_args([...]))` in-process with the tests' `tiny-test` preset (16×16, ~50k
parameters; tests/train_utils.py) on a 4-class toy dataset; the trained model and EMAs are recorded when the script
ends training. The multi-process tests launch `accelerate launch` with two CPU processes (gloo), under DDP and FSDP2,
and compare the hashes of the weights each process ends with.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel
from pmf_diffusers.training import PMFLossConfig, pmf_loss, sample_draws
from pmf_diffusers.training.checkpointing import read_training_state
from pmf_diffusers.training.data import (
    CorruptImageError,
    DatasetError,
    ImageCollator,
    ImageTooSmallError,
    adm_center_crop,
    decode_image,
)
from pmf_diffusers.training.perceptual import PerceptualWeightsNotFoundError
from pmf_diffusers.training.presets import TRAINING_PRESETS, get_training_preset, official_model_config
from pmf_diffusers.training.toy_data import TOY_CLASS_FOLDERS, make_toy_dataset
from conftest import launch_train_script, load_train_script, max_rel_err
from train_utils import TINY_TEST_PRESET, add_tiny_test_preset, make_toy_subset, recording_accelerator

REPO_ROOT = Path(__file__).resolve().parents[1]


T = load_train_script("train_pmf_under_test")
TRAINED: list[dict] = []  # {"model", "ema"} of each run, recorded at accelerator.end_training()


@pytest.fixture(autouse=True)
def _isolated(isolated_accelerate, monkeypatch):
    add_tiny_test_preset(monkeypatch)
    monkeypatch.setattr(T, "Accelerator", recording_accelerator(T.Accelerator, TRAINED))
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_script")


@pytest.fixture(scope="module")
def toy4(workdir) -> Path:
    """4 classes × 16 images of 32×32 (the tiny-test preset trains at 16×16: exercises the BOX-halving crop)."""
    return make_toy_subset(workdir / "toy4", images_per_class=16, size=32)


@pytest.fixture(scope="module")
def hf_cache(workdir) -> Path:
    return workdir / "hf_cache"


def run(output_dir: Path, data: Path, cache: Path, *extra: str, steps: int = 4) -> dict:
    argv = [
        "--preset", "tiny-test", "--train_data_dir", str(data), "--output_dir", str(output_dir),
        "--max_train_steps", str(steps), "--report_to", "none", "--validation_steps", "0",
        "--checkpointing_steps", "0", "--cache_dir", str(cache), *extra,
    ]
    return train(argv)


def train(argv: list[str]) -> dict:
    """`main(parse_args(argv))`'s summary, with the trained model and EMAs."""
    return {**T.main(T.parse_args(argv)), **TRAINED[-1]}


def inject_nan_loss(monkeypatch, at_step: int) -> None:
    """Make the script's objective return a NaN loss at the `at_step`-th call (step `at_step` without accumulation)."""
    calls, real_loss = itertools.count(1), T.pmf_loss

    def pmf_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if next(calls) == at_step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T, "pmf_loss", pmf_loss)


def fixed_draw_loss_u(transformer, images, labels, config) -> float:
    """The objective's loss_u on fixed draws (same times, noise, ω for every model) — a low-noise progress measure."""
    draws = sample_draws(len(images), config, torch.Generator().manual_seed(1234), tuple(images.shape[1:]))
    return pmf_loss(transformer, images, labels, config, draws=draws).loss_u.item()


def load_rows(folder: Path, cache: Path) -> list[dict]:
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache))
    return list(dataset.cast_column("image", datasets.Image(decode=False)))


# --------------------------------------------------------------------------------------------------- learning


def test_learns_exports_logs_and_pushes(tmp_path, toy4, hf_cache, monkeypatch):
    """80 steps reduce the fixed-draw loss_u of the exported EMA model to ≤ 0.6× the initial one; the pipeline folder
    loads and samples; samples, tensorboard events, metrics and training_args.json are written; --push_to_hub calls
    pmf_diffusers.hub.push_pipeline_to_hub with token-free training args."""
    pushed = {}
    fake_hub = type(sys)("pmf_diffusers.hub")
    fake_hub.push_pipeline_to_hub = lambda folder, repo_id, **kwargs: pushed.update(folder=folder, repo_id=repo_id, **kwargs)
    monkeypatch.setitem(sys.modules, "pmf_diffusers.hub", fake_hub)

    out = tmp_path / "run"
    result = run(out, toy4, hf_cache, "--report_to", "tensorboard", "--validation_steps", "40",
                 "--push_to_hub", "--hub_model_id", "someone/pmf-tiny", "--hub_private", steps=80)
    assert result["global_step"] == 80

    # Progress on the training objective, measured on fixed draws over the whole dataset.
    rows = load_rows(toy4, hf_cache)
    batch = ImageCollator(16)(rows)
    config = PMFLossConfig(p_mean=0.0, p_std=1.0, lpips_lambda=0.0, convnext_lambda=0.0, class_dropout_prob=0.0)
    fresh = PMFTransformer2DModel.from_config(result["model"].config)
    pipe = PMFPipeline.from_pretrained(out / "pipeline")
    initial = fixed_draw_loss_u(fresh, batch["pixel_values"], batch["class_labels"], config)
    trained = fixed_draw_loss_u(pipe.transformer, batch["pixel_values"], batch["class_labels"], config)
    assert trained <= 0.6 * initial, (initial, trained)
    history = [h["loss_u"] for h in result["history"]]
    assert np.mean(history[-20:]) < np.mean(history[:20])

    # The exported pipeline: EMA weights, dataset class names, the preset's sampling defaults.
    assert pipe.id2label == dict(enumerate(TOY_CLASS_FOLDERS[:4]))
    assert pipe.scheduler.config.noise_scale == 1.0
    assert pipe.config.default_guidance_scale == TRAINING_PRESETS["tiny-test"].guidance_scale
    assert pipe.transformer.config.with_v_head
    ema_weights = dict(zip([n for n, _ in result["model"].named_parameters()], result["ema"]["ema_500"].shadow_params))
    for name, param in pipe.transformer.named_parameters():
        assert torch.equal(param, ema_weights[name]), name
    images = pipe(class_labels=["00_red_circle", 3], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

    # Logs and samples.
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_0000040.png", "step_0000080.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 80 and {"loss", "loss_u", "loss_v", "loss_lpips", "loss_convnext", "lr", "img_per_sec"} <= set(metrics[0])
    saved = json.loads((out / "training_args.json").read_text())
    assert "train_pmf.py" in saved["command"] and "--hub_model_id someone/pmf-tiny" in saved["command"]
    assert saved["resolved"]["global_batch_size"] == 8 and saved["resolved"]["preset"] == "tiny-test"

    # Hub push: the arguments the script passes are accepted by the real pmf_diffusers.hub (dry run, offline).
    assert pushed.pop("folder") == str(out / "pipeline") and pushed.pop("repo_id") == "someone/pmf-tiny"
    assert pushed["private"] is True and pushed["token"] is None and pushed["card_kind"] == "trained"
    assert pushed["card_info"]["training_steps"] == 80 and "--hub_model_id" in pushed["card_info"]["command"]
    monkeypatch.undo()
    from pmf_diffusers.hub import push_pipeline_to_hub

    staged = push_pipeline_to_hub(str(out / "pipeline"), "someone/pmf-tiny", **pushed, dry_run=True,
                                  staging_dir=tmp_path / "stage")
    card = (tmp_path / "stage" / "README.md").read_text()
    assert staged.card_kind == "trained" and "tiny-test" in card and "train_pmf.py" in card


# ----------------------------------------------------------------------------------------------------- resume


def _params_and_emas(result):
    return [p.detach().clone() for p in result["model"].parameters()], {
        key: [s.clone() for s in ema.shadow_params] for key, ema in result["ema"].items()
    }


def test_resume_is_bit_for_bit(tmp_path, toy4, hf_cache):
    """12 straight steps (8 batches/epoch, checkpoints every 3 with exports, at most 2 kept, a validation at 6) ==
    6 steps + resume to 12, via `--resume_from_checkpoint latest`, which must ignore an interrupted save."""
    common = ("--checkpointing_steps", "3", "--checkpoints_total_limit", "2", "--validation_steps", "6",
              "--export_at_checkpoints")
    straight = run(tmp_path / "straight", toy4, hf_cache, *common, steps=12)
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-9"]
    assert PMFPipeline.from_pretrained(tmp_path / "straight" / "checkpoint-9" / "pipeline").transformer.config.num_classes == 4

    resumed_dir = tmp_path / "resumed"
    first_half = run(resumed_dir, toy4, hf_cache, *common, steps=6)  # checkpoint-6 is also written by this run
    assert first_half["global_step"] == 6
    (resumed_dir / ".tmp-checkpoint-9").mkdir()  # an interrupted save: never picked, cleaned up
    (resumed_dir / ".tmp-checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    resumed = run(resumed_dir, toy4, hf_cache, *common, "--resume_from_checkpoint", "latest", steps=12)
    assert resumed["global_step"] == 12 and len(resumed["history"]) == 6
    assert not (resumed_dir / ".tmp-checkpoint-9").exists()

    params_a, emas_a = _params_and_emas(straight)
    params_b, emas_b = _params_and_emas(resumed)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    for key in emas_a:
        assert all(torch.equal(a, b) for a, b in zip(emas_a[key], emas_b[key])), key
    assert [h["loss_u"] for h in straight["history"][6:]] == [h["loss_u"] for h in resumed["history"]]


def test_bf16_accumulation_and_checkpointing_resume_exactly(tmp_path, toy4, hf_cache):
    """--mixed_precision bf16 (CPU autocast), --gradient_accumulation_steps 2, --gradient_checkpointing and a warmup
    schedule: trains, and 4 straight steps equal 2 + resume."""
    common = ("--mixed_precision", "bf16", "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
              "--global_batch_size", "8", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
              "--checkpointing_steps", "2")
    straight = run(tmp_path / "a", toy4, hf_cache, *common, steps=4)
    assert [round(h["lr"], 6) for h in straight["history"]] == [0.0015, 0.003, 0.003, 0.003]
    resumed = run(tmp_path / "b", toy4, hf_cache, *common, "--resume_from_checkpoint",
                  str(tmp_path / "a" / "checkpoint-2"), steps=4)
    assert all(torch.equal(a, b) for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()))
    assert straight["model"].dtype == torch.float32  # weights stay fp32 under autocast


def test_streaming_trains_and_resumes_exactly(tmp_path, toy4, hf_cache):
    """--streaming (8 batches per pass): resume inside the second pass, whose shuffle order differs from the first."""
    common = ("--streaming", "--shuffle_buffer_size", "16", "--checkpointing_steps", "10")
    straight = run(tmp_path / "a", toy4, hf_cache, *common, steps=13)
    assert json.loads((tmp_path / "a" / "checkpoint-10" / "data_state_rank0.json").read_text()) == {
        "epoch": 1, "batches_in_epoch": 2}
    resumed = run(tmp_path / "b", toy4, hf_cache, *common, "--resume_from_checkpoint",
                  str(tmp_path / "a" / "checkpoint-10"), steps=13)
    assert resumed["global_step"] == 13 and len(resumed["history"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()))


# ------------------------------------------------------------------------------------------------ two processes


def _launch(output_dir: Path, data: Path, cache: Path, *extra: str, fsdp: bool = False):
    """4 tiny-test steps on two CPU processes (DDP, or FSDP2 with `fsdp=True`); each process writes the hash of its
    final weights and EMAs (tests/launch_train_pmf.py)."""
    result = launch_train_script(
        "--preset", "tiny-test", "--train_data_dir", str(data), "--output_dir", str(output_dir),
        "--cache_dir", str(cache), "--report_to", "none", "--max_train_steps", "4", "--validation_steps", "0",
        *extra, fsdp=fsdp,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _hashes(output_dir: Path) -> list[str]:
    return [(output_dir / f"weights_hash_rank{r}.txt").read_text() for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(workdir, toy4, hf_cache) -> Path:
    """4 DDP steps on two CPU processes with checkpoints at 2 and 4 (the reference of the FSDP tests)."""
    first = _launch(workdir / "ddp", toy4, hf_cache, "--checkpointing_steps", "2")
    assert "MULTI_CPU" in first.stderr + first.stdout and "2 process(es)" in first.stderr + first.stdout
    return workdir / "ddp"


@pytest.fixture(scope="module")
def fsdp_run(workdir, toy4, hf_cache) -> Path:
    """The same run under FSDP2 (blocks wrapped, sharded DCP checkpoints)."""
    first = _launch(workdir / "fsdp", toy4, hf_cache, "--checkpointing_steps", "2", fsdp=True)
    assert "DistributedType.FSDP" in first.stderr + first.stdout
    return workdir / "fsdp"


def test_two_processes_identical_weights_and_resume(tmp_path, ddp_run, toy4, hf_cache):
    hashes = _hashes(ddp_run)
    assert hashes[0] == hashes[1]
    _launch(tmp_path / "b", toy4, hf_cache, "--resume_from_checkpoint", str(ddp_run / "checkpoint-2"))
    assert _hashes(tmp_path / "b") == hashes


def _fsdp_checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model of an FSDP2 checkpoint (a sharded DCP folder), as one full state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "pytorch_model_fsdp_0", folder.parent / f"{folder.name}-model.pt")
    return torch.load(folder.parent / f"{folder.name}-model.pt")["model"]


def _max_rel_errs(actual: dict, expected: dict) -> float:
    assert sorted(actual) == sorted(expected)
    return max(max_rel_err(actual[name], expected[name]) for name in expected)


def test_fsdp_matches_ddp(ddp_run, fsdp_run):
    """FSDP2 on two processes trains the same weights as DDP: raw weights, EMAs and the exported EMA pipeline agree to
    1e-5 relative (measured 3e-6: gradients are reduce-scattered instead of all-reduced, so fp32 sums are added in
    another order; everything else is the same arithmetic). Checkpoints hold full EMA tensors (gathered)."""
    from safetensors.torch import load_file

    assert (fsdp_run / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()
    hashes = _hashes(fsdp_run)
    assert hashes[0] == hashes[1]  # gathered weights, so the same on both processes

    raw = _fsdp_checkpoint_weights(fsdp_run / "checkpoint-4")
    assert _max_rel_errs(raw, load_file(ddp_run / "checkpoint-4" / "model.safetensors")) < 1e-5
    ema_fsdp, ema_ddp = (read_training_state(run / "checkpoint-4")["ema"] for run in (fsdp_run, ddp_run))
    for key in ema_ddp:
        shadows = ema_fsdp[key]["shadow_params"]
        assert all(type(shadow) is torch.Tensor for shadow in shadows)  # full tensors, not one process's shard
        assert max(max_rel_err(a, b) for a, b in zip(shadows, ema_ddp[key]["shadow_params"])) < 1e-5, key

    pipe = PMFPipeline.from_pretrained(fsdp_run / "pipeline")
    reference = PMFPipeline.from_pretrained(ddp_run / "pipeline")
    assert all(torch.isfinite(p).all() for p in pipe.transformer.parameters())
    assert _max_rel_errs(pipe.transformer.state_dict(), reference.transformer.state_dict()) < 1e-5
    assert (fsdp_run / "samples" / "step_0000004.png").is_file()  # sampled from gathered EMA weights


def test_fsdp_resume_is_bit_for_bit(tmp_path, fsdp_run, toy4, hf_cache):
    """FSDP2: 2 steps + resume to 4 (sharded model/optimizer state, full EMAs, RNG and data order) equals the straight
    run exactly; the resumed half also uses --gradient_checkpointing, which must not change the result."""
    _launch(tmp_path / "resumed", toy4, hf_cache, "--resume_from_checkpoint", str(fsdp_run / "checkpoint-2"),
            "--gradient_checkpointing", fsdp=True)
    assert _hashes(tmp_path / "resumed") == _hashes(fsdp_run)


@pytest.mark.parametrize(
    ("fsdp_version", "extra", "message"),
    [
        (1, (), "FSDP1 is not supported: launch with --fsdp_version 2"),
        (2, ("--lora_rank", "4", "--pretrained_model", "unused"), "--lora_rank is not supported with FSDP"),
        (2, ("--fsdp_cpu_ram_efficient_loading",), "pass --fsdp_cpu_ram_efficient_loading false"),
    ],
)
def test_unsupported_fsdp_setups_are_refused(tmp_path, toy4, hf_cache, monkeypatch, fsdp_version, extra, message):
    """The checks run before any model work, so they are tested in-process with the accelerate state set to FSDP."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    ram_efficient = "--fsdp_cpu_ram_efficient_loading" in extra
    extra = tuple(arg for arg in extra if arg != "--fsdp_cpu_ram_efficient_loading")

    class FSDPAccelerator(T.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=fsdp_version, cpu_ram_efficient_loading=ram_efficient)
            self.state.distributed_type = DistributedType.FSDP

    monkeypatch.setattr(T, "Accelerator", FSDPAccelerator)
    with pytest.raises(T.TrainingSetupError, match=message):
        run(tmp_path / "out", toy4, hf_cache, *extra)


def test_deepspeed_is_refused(tmp_path, toy4, hf_cache, monkeypatch):
    from accelerate.utils import DistributedType

    class DeepSpeedAccelerator(T.Accelerator):
        distributed_type = DistributedType.DEEPSPEED  # what the script checks (the state stays usable)

    monkeypatch.setattr(T, "Accelerator", DeepSpeedAccelerator)
    with pytest.raises(T.TrainingSetupError, match="is not supported.*Use DDP .* or FSDP2"):
        run(tmp_path / "out", toy4, hf_cache)


# ------------------------------------------------------------------------------------------------- bad inputs


def test_missing_and_empty_data_folders(tmp_path, hf_cache):
    with pytest.raises(DatasetError, match="does not exist"):
        run(tmp_path / "out", tmp_path / "nowhere", hf_cache)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "class_a" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="contains no images"):
        run(tmp_path / "out", tmp_path / "empty", hf_cache)


def test_images_smaller_than_resolution(tmp_path, hf_cache):
    small = make_toy_dataset(tmp_path / "small", images_per_class=2, size=8)
    with pytest.raises(ImageTooSmallError, match=r"8×8.*--resolution N.*--allow_upscale"):
        run(tmp_path / "out", small, hf_cache)
    result = run(tmp_path / "out2", small, hf_cache, "--allow_upscale", steps=1)
    assert result["global_step"] == 1


def test_unknown_preset_and_missing_preset(tmp_path, toy4, hf_cache):
    args = T.parse_args(["--preset", "pMF-X/7", "--train_data_dir", str(toy4), "--output_dir", str(tmp_path)])
    with pytest.raises(T.TrainingSetupError, match="Valid presets: .*toy-cpu.*tiny-test") as err:
        T.main(args)
    assert "pMF-B/16" in str(err.value)
    args = T.parse_args(["--train_data_dir", str(toy4), "--output_dir", str(tmp_path)])
    with pytest.raises(T.TrainingSetupError, match="Pass --preset"):
        T.main(args)
    with pytest.raises(ValueError, match="Valid presets"):
        get_training_preset("toy-gpu")


def test_global_batch_must_divide_by_processes(tmp_path, toy4, hf_cache):
    preset = get_training_preset("tiny-test")
    args = T.parse_args(["--preset", "tiny-test", "--train_data_dir", "x", "--global_batch_size", "9"])
    with pytest.raises(T.TrainingSetupError, match=r"not divisible by the process count × gradient accumulation = 2 × 1"):
        T.resolve_batch_sizes(args, preset, num_processes=2)
    args = T.parse_args(["--preset", "tiny-test", "--train_data_dir", "x", "--global_batch_size", "12"])
    assert T.resolve_batch_sizes(args, preset, num_processes=2) == (6, 12)
    args = T.parse_args(["--preset", "tiny-test", "--train_data_dir", "x", "--train_batch_size", "4",
                         "--gradient_accumulation_steps", "2"])
    assert T.resolve_batch_sizes(args, preset, num_processes=2) == (4, 16)
    with pytest.raises(T.TrainingSetupError, match="not divisible"):  # the real script path (1 process × 2 accum)
        run(tmp_path / "out", toy4, hf_cache, "--global_batch_size", "9", "--gradient_accumulation_steps", "2")


def test_resume_errors(tmp_path, toy4, hf_cache):
    not_a_checkpoint = tmp_path / "random_folder"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(T.CheckpointError, match="is not a train_pmf.py checkpoint"):
        run(tmp_path / "out", toy4, hf_cache, "--resume_from_checkpoint", str(not_a_checkpoint))
    with pytest.raises(T.CheckpointError, match="does not exist"):
        run(tmp_path / "out", toy4, hf_cache, "--resume_from_checkpoint", str(tmp_path / "missing"))

    run(tmp_path / "first", toy4, hf_cache, "--checkpointing_steps", "2", steps=2)
    with pytest.raises(T.CheckpointError, match=r"num_layers: checkpoint 1, this run 2"):
        run(tmp_path / "out", toy4, hf_cache, "--num_layers", "2", "--resume_from_checkpoint",
            str(tmp_path / "first" / "checkpoint-2"))
    with pytest.raises(T.CheckpointError, match="contains the checkpoints checkpoint-2"):
        run(tmp_path / "out", toy4, hf_cache, "--resume_from_checkpoint", str(tmp_path / "first"))


def test_offline_without_perceptual_weights(tmp_path, toy4, hf_cache, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PerceptualWeightsNotFoundError, match=r"(?s)VGG16.*--no_perceptual"):
        run(tmp_path / "out", toy4, hf_cache, "--lpips_lambda", "0.4")
    with pytest.raises(PerceptualWeightsNotFoundError, match="--no_perceptual"):
        run(tmp_path / "out", toy4, hf_cache, "--convnext_lambda", "0.1", "--convnext_path", str(tmp_path / "no_convnext"))
    assert not (tmp_path / "out" / "training_args.json").exists()  # failed before training started
    argv = ["--preset", "tiny-test", "--train_data_dir", str(toy4), "--output_dir", str(tmp_path / "cli"),
            "--report_to", "none", "--cache_dir", str(hf_cache), "--lpips_lambda", "0.4"]
    assert T.cli(argv) == 2
    # Explicitly without perceptual losses it trains.
    assert run(tmp_path / "ok", toy4, hf_cache, "--lpips_lambda", "0.4", "--no_perceptual", steps=1)["global_step"] == 1


def test_perceptual_losses_are_wired_but_not_prepared_or_checkpointed(tmp_path, toy4, hf_cache, monkeypatch):
    """With (randomly initialised, small-crop) perceptual nets in place of the pretrained ones: the LPIPS / ConvNeXt
    terms are computed and logged, the nets stay out of the checkpoint, and a resume is still exact."""
    from transformers import ConvNextV2Config

    from pmf_diffusers.training import perceptual as perceptual_module

    created = []

    def fake_from_pretrained(cls, lpips=True, convnext=True, **kwargs):
        torch.manual_seed(0)
        tiny = ConvNextV2Config(num_channels=3, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], image_size=32)
        net = cls(lpips=perceptual_module.LPIPSVGG() if lpips else None,
                  convnext=perceptual_module.ConvNeXtV2Features(tiny) if convnext else None, crop_size=32)
        created.append(kwargs)
        return net

    monkeypatch.setattr(perceptual_module.PerceptualLoss, "from_pretrained", classmethod(fake_from_pretrained))
    common = ("--lpips_lambda", "0.4", "--convnext_lambda", "0.1", "--checkpointing_steps", "2",
              "--vgg_path", "/some/vgg16.pth")
    straight = run(tmp_path / "a", toy4, hf_cache, *common, steps=4)
    assert created[0]["vgg_path"] == "/some/vgg16.pth"
    assert all(h["loss_lpips"] > 0 and h["loss_convnext"] > 0 for h in straight["history"])
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the EMA and objective state: safetensors + JSON
    assert set(read_training_state(checkpoint)) == {"objective_rng", "ema"}
    from safetensors.torch import load_file

    assert set(load_file(checkpoint / "model.safetensors")) == set(straight["model"].state_dict())
    resumed = run(tmp_path / "b", toy4, hf_cache, *common, "--resume_from_checkpoint", str(checkpoint), steps=4)
    assert all(torch.equal(a, b) for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, toy4, hf_cache, monkeypatch):
    out = tmp_path / "nan"
    inject_nan_loss(monkeypatch, at_step=3)
    with pytest.raises(T.NonFiniteLossError, match=r"at step 3 .*Last good checkpoint: .*checkpoint-2"):
        run(out, toy4, hf_cache, "--checkpointing_steps", "2", steps=6)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list(out.glob(".tmp-checkpoint-*")) and not (out / "pipeline").exists()
    argv = ["--preset", "tiny-test", "--train_data_dir", str(toy4), "--output_dir", str(tmp_path / "cli"),
            "--report_to", "none", "--cache_dir", str(hf_cache), "--max_train_steps", "3"]
    inject_nan_loss(monkeypatch, at_step=1)
    assert T.cli(argv) == 3


def test_corrupt_images_are_reported_skipped_and_counted(tmp_path, toy4, hf_cache, caplog):
    data = tmp_path / "toy_corrupt"
    shutil.copytree(toy4, data)
    garbage = data / TOY_CLASS_FOLDERS[0] / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    truncated = data / TOY_CLASS_FOLDERS[1] / "truncated.png"
    payload = (data / TOY_CLASS_FOLDERS[1] / "00000.png").read_bytes()
    truncated.write_bytes(payload[: len(payload) // 2])
    caplog.set_level("WARNING")
    result = run(tmp_path / "out", data, hf_cache, steps=17)  # 66 images, 8 batches per epoch: > 2 epochs
    assert result["global_step"] == 17
    assert set(result["corrupt_images"]) == {str(garbage), str(truncated)}
    assert result["corrupt_total"] >= 4  # each file is met (and counted) once per epoch
    assert f"Skipping unreadable image {garbage}" in caplog.text and str(truncated) in caplog.text
    assert result["history"][-1]["corrupt_images"] == result["corrupt_total"]


# ------------------------------------------------------------------------------------- other data sources, fine-tune


def test_dataset_name_with_custom_columns(tmp_path, hf_cache):
    """A (local) `--dataset_name` with other column names, in-memory image bytes and plain int labels."""
    import datasets

    images, labels = [], []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(np.full((20, 24, 3), 20 * i, np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(i % 3)
    folder = tmp_path / "parquet_ds"
    folder.mkdir()
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("int64")})
    datasets.Dataset.from_dict({"picture": images, "kind": labels}, features=features).to_parquet(folder / "train.parquet")
    result = train([
        "--preset", "tiny-test", "--dataset_name", str(folder), "--image_column", "picture", "--label_column", "kind",
        "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--report_to", "none",
        "--global_batch_size", "4", "--cache_dir", str(hf_cache),
    ])
    assert result["global_step"] == 2 and result["model"].config.num_classes == 3
    with pytest.raises(DatasetError, match="--label_column 'nope' not found"):
        T.main(T.parse_args(["--preset", "tiny-test", "--dataset_name", str(folder), "--label_column", "nope",
                             "--output_dir", str(tmp_path / "x"), "--cache_dir", str(hf_cache)]))


def _tiny_pipeline_without_v_head(path: Path, num_classes: int = 4) -> Path:
    torch.manual_seed(3)
    config = {**TINY_TEST_PRESET.model, "num_classes": num_classes, "with_v_head": False}
    transformer = PMFTransformer2DModel(**config)
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(0.01 * torch.randn_like(param))  # non-zero output layer, so "copy" is distinguishable
    PMFPipeline(transformer, PMFScheduler(noise_scale=2.0), id2label={i: f"c{i}" for i in range(num_classes)},
                default_guidance_scale=3.0, default_guidance_interval=(0.1, 0.7)).save_pretrained(path)
    return path


def test_fine_tune_adds_v_head(tmp_path, toy4, hf_cache):
    folder = _tiny_pipeline_without_v_head(tmp_path / "pretrained")
    copied, info = T.load_pretrained(str(folder), "copy")
    assert info == {"noise_scale": 2.0, "id2label": {0: "c0", 1: "c1", 2: "c2", 3: "c3"}, "guidance_scale": 3.0,
                    "guidance_interval": (0.1, 0.7), "had_v_head": False}
    for (name_u, u), (name_v, v) in zip(copied.u_head_blocks.named_parameters(), copied.v_head_blocks.named_parameters()):
        assert name_u == name_v and torch.equal(u, v)
    assert torch.equal(copied.v_proj_out.weight, copied.u_proj_out.weight)
    fresh, _ = T.load_pretrained(str(folder), "fresh")
    assert not fresh.v_proj_out.weight.any() and torch.equal(fresh.u_proj_out.weight, copied.u_proj_out.weight)

    result = train([
        "--pretrained_model", str(folder), "--preset", "tiny-test", "--train_data_dir", str(toy4),
        "--output_dir", str(tmp_path / "ft"), "--max_train_steps", "2", "--report_to", "none",
        "--cache_dir", str(hf_cache), "--export_drop_v_head",
    ])
    pipe = PMFPipeline.from_pretrained(result["pipeline_dir"])
    assert not pipe.transformer.config.with_v_head
    assert pipe.scheduler.config.noise_scale == 2.0 and pipe.config.default_guidance_scale == 3.0
    assert pipe.id2label == dict(enumerate(TOY_CLASS_FOLDERS[:4]))
    with pytest.raises(T.TrainingSetupError, match="shape comes from the checkpoint"):
        T.main(T.parse_args(["--pretrained_model", str(folder), "--num_layers", "3", "--train_data_dir", str(toy4),
                             "--output_dir", str(tmp_path / "bad")]))


# ------------------------------------------------------------------------------------------ helpers and CLI


def _reference_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's `center_crop_arr` (guided-diffusion), restated."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(300, 200), (64, 64), (33, 90), (512, 1030)])
def test_adm_center_crop_matches_reference(shape):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), "RGB")
    ours = np.asarray(adm_center_crop(image, 32))
    assert ours.shape == (32, 32, 3)
    np.testing.assert_array_equal(ours, _reference_center_crop(image, 32))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK", "1"])
def test_any_mode_becomes_rgb_in_range(mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB")
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(
        np.random.default_rng(2).integers(0, 65535, (40, 40), dtype=np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    tensor = ImageCollator(16)([{"image": {"bytes": buffer.getvalue(), "path": None}, "label": 0}])["pixel_values"]
    assert tensor.shape == (1, 3, 16, 16) and tensor.min() >= -1 and tensor.max() <= 1


def test_decode_errors_name_the_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=str(bad)):
        decode_image({"path": str(bad), "bytes": None})
    with pytest.raises(ImageTooSmallError, match="small.png"):
        adm_center_crop(Image.new("RGB", (10, 40)), 16, path="small.png")
    assert adm_center_crop(Image.new("RGB", (10, 40)), 16, allow_upscale=True).size == (16, 16)


def test_presets():
    assert official_model_config("pMF-H/16")["mlp_hidden_dim"] == 3416
    assert official_model_config("pMF-L/32")["mlp_hidden_dim"] == 2730
    b16 = get_training_preset("B/16")
    assert b16.name == "pMF-B/16" and b16.loss == PMFLossConfig.from_preset("pMF-B/16") and b16.export_ema_kimg == 2000
    assert get_training_preset("pMF-L/16").loss.cfg_beta == 2.0 and get_training_preset("pMF-H/32").loss.tr_uniform
    with torch.device("meta"):
        model = PMFTransformer2DModel(**official_model_config("pMF-B/16"), num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 175_474_304  # training params (with the v-head)
    toy = TRAINING_PRESETS["toy-cpu"]
    assert toy.model["sample_size"] == 32 and toy.loss.lpips_lambda == 0 and toy.loss.convnext_lambda == 0


def test_recipe_flags_override_the_preset():
    args = T.parse_args(["--preset", "pMF-H/16", "--train_data_dir", "x", "--p_mean", "0.3", "--no-tr_uniform",
                         "--cfg_max", "5", "--class_dropout_mode", "first_k", "--no_perceptual"])
    config = T.build_loss_config(get_training_preset("pMF-H/16"), args)
    assert (config.p_mean, config.tr_uniform, config.cfg_max, config.class_dropout_mode) == (0.3, False, 5.0, "first_k")
    assert config.lpips_lambda == config.convnext_lambda == 0 and config.noise_scale == 2.0


def test_help_documents_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        T.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--preset toy-cpu", "pMF-B/16", "--resume_from_checkpoint latest", "--pretrained_model",
                   "ACCELERATE_USE_CPU=1", "--global_batch_size", "--v_head_init", "--streaming"):
        assert needle in text, needle
