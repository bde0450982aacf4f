#!/usr/bin/env python
# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Train pixel MeanFlow (pMF) — one-step, latent-free, class-conditional image generation — with 🤗 accelerate.

    accelerate launch examples/train_pmf.py --preset toy-cpu --train_data_dir data/toy --output_dir runs/toy

One script for one CPU, one GPU or many: DDP, or FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`), configured
with `accelerate config` or `accelerate launch` flags; FSDP1 and DeepSpeed are refused (docs/training.md, "Multi-GPU:
DDP and FSDP"). See `--help` for every option and worked examples. This file only wires the library together,
diffusers-example style: the objective, optimizer, EMA, data, presets, checkpoints and exports live in
`pmf_diffusers.training`, the model cards and the Hub push in `pmf_diffusers.hub`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import datasets
import diffusers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration, DistributedType, ProjectConfiguration, is_wandb_available, set_seed,
)
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from pmf_diffusers import PMFTransformer2DModel
from pmf_diffusers.commands import options_in_errors
from pmf_diffusers.conversion import build_pipeline
from pmf_diffusers.labels import read_label_set
from pmf_diffusers.loading import is_official_size_name, looks_like_repo_id
from pmf_diffusers.official import match_preset
from pmf_diffusers.pipelines.pipeline_pmf import check_guidance_settings
from pmf_diffusers.training import MultiEMA, Muon, PMFLossConfig, muon_param_groups, pmf_loss
from pmf_diffusers.training.checkpointing import (
    CheckpointError, CheckpointSaveError, ObjectiveRNG, TrainingState, check_checkpoint_compatible, checkpoint_step,
    find_resume_checkpoint, read_data_state, remove_interrupted_saves, resumable_batches, save_checkpoint,
)
from pmf_diffusers.training.data import (
    DatasetError, EpochShuffleSampler, ImageCollator, check_first_images, load_training_dataset, loader_options,
)
from pmf_diffusers.training.distributed import (
    check_distributed_setup, gather_state_dict, unwrap_model, weights_are_finite,
)
from pmf_diffusers.training.export import (
    ema_weights, log_sample_grid, lora_adapter_card, save_lora_adapter, save_pipeline, save_sample_grid,
    training_card_info,
)
from pmf_diffusers.training.finetune import (
    RemappedCollator, add_fine_tuning_adapters, dataset_class_index, dataset_id2label, load_for_fine_tuning,
)
from pmf_diffusers.training.metrics import LOSS_NAMES, MetricsFile, SkippedImages, StepMetrics
from pmf_diffusers.training.presets import TRAINING_PRESETS, TrainingPreset, get_training_preset
from pmf_diffusers.training import recipe

logger = get_logger(__name__, log_level="INFO")

# Model-shape and recipe flags: the preset's value unless given (help text per flag).
SHAPE_FLAGS = {
    "resolution": "Image side S (preset: 256/512 official, 32 toy-cpu).",
    "patch_size": "Patch side p.",
    "num_layers": "Shared trunk blocks.",
    "num_head_layers": "Blocks in each head (u and v).",
    "num_attention_heads": "Attention heads.",
    "attention_head_dim": "Channels per head (multiple of 4).",
    "mlp_hidden_dim": "SwiGLU width.",
    "bottleneck_dim": "Patch-embedding bottleneck width.",
}
RECIPE_FLAGS = {
    "p_mean": "Logit-normal time mean (official 0.8 B/L-16, 0.0 L/32, H).",
    "p_std": "Logit-normal time std (official 0.8).",
    "noise_scale": "Noise = noise_scale·ε (official 1/2/1/4/2/4).",
    "data_proportion": "Flow-matching share of each batch (0.5).",
    "tr_uniform": "Draw t, r from U(0, 1) with probability --tr_uniform_prob per sample (official: H models only).",
    "tr_uniform_prob": "Probability for --tr_uniform (0.1).",
    "cfg_max": "ω is drawn on [1, 1 + cfg_max] (7).",
    "cfg_beta": "ω density ∝ ω^-β (1; L/16: 2).",
    "class_dropout_prob": "Null-label probability (0.1).",
    "class_dropout_mode": "'per_sample' Bernoulli draws (default) or 'first_k' (official main branch: the first k of "
    "the batch).",
    "norm_p": "Adaptive weighting power p in L / sg((L+eps)^p) (1).",
    "norm_eps": "Adaptive weighting eps (0.01).",
    "lpips_lambda": "LPIPS-VGG weight (official 0.4; small presets 0).",
    "convnext_lambda": "ConvNeXt-V2 weight (official 0.1; small presets 0).",
    "perceptual_max_t": "Perceptual terms only for t below this (0.8/0.6).",
}


class TrainingSetupError(ValueError):
    """A problem with the arguments or the environment, found before training starts."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped without writing a new checkpoint."""


def raise_if_diverged(first_bad_step: int | None, processes: int, last_checkpoint: Path | None) -> None:
    if first_bad_step is not None:
        raise NonFiniteLossError(
            f"Non-finite loss at step {first_bad_step} on {processes} process(es). Training stopped; no checkpoint was "
            f"written after the divergence. Last good checkpoint: {last_checkpoint or 'none (none saved yet)'}. Resume "
            "from it with a lower --learning_rate, more warmup (--lr_warmup_steps), or --mixed_precision no."
        )


@contextlib.contextmanager
def setup_errors(prefix: str = ""):
    """Report the library's `ValueError`s (and `OSError`s) of a setup step as one `TrainingSetupError` line."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise TrainingSetupError(f"{prefix}{err}") from None


EPILOG = r"""
presets (model shape + training recipe + sampling defaults; every value can be overridden by its flag):
{presets}

examples (more in docs/training.md and docs/lora.md):
  # 0. a toy dataset (10 classes of coloured shapes, 32x32) and a CPU run (1500 steps, ~20 min on 2 idle cores;
  #    on a machine shared with other jobs OMP_NUM_THREADS=1 is much faster)
  pmf toy-data data/toy --images-per-class 200
  accelerate launch --cpu --num_processes 1 examples/train_pmf.py --preset toy-cpu \
      --train_data_dir data/toy --output_dir runs/toy-cpu --max_train_minutes 25

  # 1. ImageNet-1k 256px, pMF-B/16, 8 GPUs, official recipe (global batch 1024 = 8 x 128, lr 1e-3, 320 epochs;
  #    LPIPS/ConvNeXt weights: see --vgg_path / --convnext_path; the official pipeline upscales the few images
  #    smaller than 256px). Or stream it: --dataset_name ILSVRC/imagenet-1k --streaming --max_train_steps 400000
  accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/train_pmf.py \
      --preset pMF-B/16 --train_data_dir /data/imagenet/train --allow_upscale \
      --dataloader_num_workers 8 --output_dir runs/pmf-b16 --checkpointing_steps 5000 --validation_steps 5000

  # 2. resume after an interruption (same command; `latest` picks the newest complete checkpoint)
  accelerate launch ... examples/train_pmf.py <same arguments> --resume_from_checkpoint latest

  # 3. fine-tune the released weights (a v-head is added as a copy of the u-head: --v_head_init copy)
  accelerate launch ... examples/train_pmf.py --pretrained_model pMF-B/16 --train_data_dir /data/my_subset \
      --allow_upscale --learning_rate 1e-4 --max_train_steps 20000 --output_dir runs/pmf-b16-ft

  # 4. two CPU processes (DDP over gloo; ACCELERATE_USE_CPU=1 picks the CPU backend). FSDP2: `accelerate launch
  #    --use_fsdp --fsdp_version 2 ...` (docs/training.md, "Multi-GPU: DDP and FSDP")
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
      --mixed_precision no examples/train_pmf.py --preset toy-cpu --train_data_dir data/toy --output_dir runs/ddp

  # 5. LoRA on your own classes: one folder per name of labels.txt; the export is the adapter runs/my-shapes/lora
  accelerate launch examples/train_pmf.py --pretrained_model checkpoints/pMF-B-16 --train_data_dir my_images \
      --lora_rank 16 --new_label_set labels.txt --learning_rate 1e-4 --max_train_steps 2000 --output_dir runs/my-shapes

batch size: --train_batch_size is per device (diffusers convention); --global_batch_size counts all processes and
accumulation steps (the official notion) and must be divisible by num_processes x gradient_accumulation_steps.
With neither, the preset's global batch is used.

outputs (in --output_dir): training_args.json, logs/ (tensorboard, metrics.jsonl, wandb/), samples/step_*.png,
checkpoint-STEP/ (accelerate state + pmf_checkpoint.json), pipeline/ (the EMA model as a PMFPipeline folder) or, with
--lora_rank, lora/ (the EMA adapter with its README.md card and samples.png).
"""


# ------------------------------------------------------------------------------------------------------ arguments


def _format_presets() -> str:
    return "\n".join(f"  {name:10s} {preset.description}" for name, preset in TRAINING_PRESETS.items())


def _ema_choice(value: str) -> float | str | None:
    if value == "preset":
        return value
    if value.lower() in ("none", "raw", "off"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a half-life in kimg or 'none', got {value!r}") from None


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and recipe")
    group.add_argument("--preset", type=str, default=None, help=f"Model shape + recipe + sampling defaults: "
                       f"{', '.join(TRAINING_PRESETS)}. Required unless --pretrained_model is given (then the official "
                       "preset matching its shape is used, if any).")
    group.add_argument("--pretrained_model", type=str, default=None, help="Fine-tune from a PMFPipeline folder, a Hub "
                       "id or an official size name (pMF-B/16, ...: the converted released weights). Its shape, noise "
                       "scale, class names and guidance defaults are kept; the recipe comes from --preset and the "
                       "recipe flags.")
    group.add_argument("--v_head_init", type=str, default="copy", choices=["copy", "fresh"], help="When "
                       "--pretrained_model has no v-head (the released checkpoints do not): 'copy' (default) "
                       "initialises it as a copy of the u-head — a good start, since by the MeanFlow identity "
                       "u(z, t, t) = v(z, t) the u-head at h = 0 already predicts v; 'fresh' uses the official "
                       "from-scratch initialisation (zero output layer).")
    for name, help_text in SHAPE_FLAGS.items():
        group.add_argument(f"--{name}", type=int, default=None, help=help_text)
    group.add_argument("--gradient_checkpointing", action="store_true", help="Recompute block activations in the "
                       "backward pass (the JVP pass runs without autograd anyway).")

    group = parser.add_argument_group("LoRA fine-tuning (peft; needs --pretrained_model; docs/lora.md)")
    group.add_argument("--lora_rank", type=int, default=None, help="LoRA rank r > 0: freeze the pretrained weights and "
                       "train a low-rank adapter (+ the class table with --new_label_set / --train_class_embeddings). "
                       "The EMA tracks only the trained parameters, and the export is the adapter folder "
                       "output_dir/lora (load it with pipe.load_lora_weights), not a full pipeline. Without this flag "
                       "the script does full fine-tuning.")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / r "
                       "(default: r).")
    group.add_argument("--lora_target", type=str, default=None, help="LoRA target modules: a preset (attention, "
                       "attention+mlp [default], all-linear) or comma-separated module-name suffixes such as "
                       "to_q,to_v,ff.down_proj. A name that matches no Linear layer is an error.")
    group.add_argument("--train_class_embeddings", action="store_true", help="With --lora_rank: also train the full "
                       "class-embedding table (same classes, exported with the adapter).")
    group.add_argument("--new_label_set", type=str, default=None, metavar="FILE", help="Train your own classes: a "
                       "label-set file (one class name per line, or a JSON list / {id: name}). The class table is "
                       "replaced by one row per name (+ the pretrained null row) and trained; the dataset's class "
                       "folder names must match these names (case-insensitive, '_' = space). Needs --pretrained_model.")


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective (defaults: the preset's recipe; docs/algorithm.md)")
    for name, help_text in RECIPE_FLAGS.items():
        if name == "tr_uniform":
            group.add_argument("--tr_uniform", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "class_dropout_mode":
            group.add_argument(f"--{name}", type=str, default=None, choices=["per_sample", "first_k"], help=help_text)
        else:
            group.add_argument(f"--{name}", type=float, default=None, help=help_text)
    group.add_argument("--no_perceptual", action="store_true", help="Train without the perceptual losses (same as "
                       "--lpips_lambda 0 --convnext_lambda 0).")
    group.add_argument("--vgg_path", type=str, default=None, help="torchvision VGG16 checkpoint vgg16-397923af.pth for "
                       "LPIPS (default: $TORCH_HOME/hub/checkpoints/, downloaded unless HF_HUB_OFFLINE=1). The LPIPS "
                       "linear heads come from the installed `lpips` package files.")
    group.add_argument("--lpips_weights_path", type=str, default=None, help="lpips weights/v0.1/vgg.pth (default: "
                       "installed).")
    group.add_argument("--convnext_path", type=str, default="facebook/convnextv2-base-22k-224", help="ConvNeXt-V2 "
                       "model for the feature loss (Hub id or local folder).")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train_data_dir", type=str, default=None, help="Image folder with one sub-folder per class.")
    group.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id (or local dataset folder).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="Dataset config name.")
    group.add_argument("--dataset_split", type=str, default="train", help="Split to train on.")
    group.add_argument("--image_column", type=str, default=None, help="Image column (default: 'image').")
    group.add_argument("--label_column", type=str, default=None, help="Class column (default: 'label'; none = 1 class).")
    group.add_argument("--num_classes", type=int, default=None, help="Class count when the label column is a plain int.")
    group.add_argument("--streaming", action="store_true", help="Stream the dataset (datasets.IterableDataset). Each "
                       "process reads its own part (datasets.distributed.split_dataset_by_node; accelerate does not "
                       "shard or dispatch it), shuffled with a buffer. Requires --max_train_steps (or a preset "
                       "default); resuming skips the consumed examples.")
    group.add_argument("--shuffle_buffer_size", type=int, default=10000, help="Shuffle buffer for --streaming.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (debugging).")
    group.add_argument("--allow_upscale", action="store_true", help="Bicubic-upscale images smaller than --resolution "
                       "(official ImageNet pipeline) instead of stopping.")
    group.add_argument("--cache_dir", type=str, default=None, help="datasets cache folder.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")


def _add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=None, help="Images per device per micro-step.")
    group.add_argument("--global_batch_size", type=int, default=None, help="Images per optimizer step over all "
                       "processes (official 1024); must be divisible by num_processes × gradient_accumulation_steps.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    group.add_argument("--learning_rate", type=float, default=None, help="Learning rate of Muon + Adam (official 1e-3).")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="b1 of the Adam part (0.9).")
    group.add_argument("--adam_beta2", type=float, default=None, help="b2 of the Adam part (official 0.95).")
    group.add_argument("--muon_momentum", type=float, default=0.95, help="Muon momentum (0.95).")
    group.add_argument("--weight_decay", type=float, default=0.0, help="Decoupled weight decay (official 0).")
    group.add_argument("--lr_scheduler", type=str, default="constant", help="diffusers.optimization.get_scheduler "
                       "name: constant (official), constant_with_warmup, cosine, linear, ...")
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps (official 0).")
    group.add_argument("--max_grad_norm", type=float, default=0.0, help="Gradient clipping; 0 = off (official).")
    group.add_argument("--num_train_epochs", type=int, default=None, help="Epochs (official 320).")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    group.add_argument("--max_train_minutes", type=float, default=None, help="Wall-clock budget: stop after the first "
                       "step past it (then sample, export, push as usual). Handy for time-boxed CPU demos; the "
                       "stopping step depends on the machine's speed.")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Autocast "
                       "precision (default: the accelerate config). bf16 recommended on GPUs; weights and EMA stay "
                       "fp32 and the JVP runs in fp32.")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 for fp32 matmuls and cuDNN convolutions "
                       "on Ampere+ GPUs (faster, ~1e-3 relative). Default: both off, set explicitly (also cuDNN's, which "
                       "PyTorch enables by default), so the fp32 JVP runs in full precision (docs/training.md).")
    group.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, data order and objective draws.")

    group = parser.add_argument_group("EMA")
    group.add_argument("--ema_half_lives_kimg", type=float, nargs="*", default=None, help="EMA half-lives in kimg "
                       "(official 500 1000 2000; none = no EMA). EDM schedule with ramp-up: the half-life is min(hl, "
                       "5%% of images seen), so short runs average over their last ~5%%.")
    group.add_argument("--ema_ref_batch", type=int, default=None, help="Reference batch of the EMA schedule (official "
                       "1024, hard-coded there); e.g. the real batch size for small runs. During the ramp-up the decay "
                       "does not depend on it.")
    group.add_argument("--ema_rampup_ratio", type=float, default=None, help="EMA half-life ramp-up: the half-life is at "
                       "most this share of the steps taken so far (official 0.05; default: the preset's). Short runs "
                       "never leave the ramp-up, so this sets their averaging window.")
    group.add_argument("--export_ema", type=_ema_choice, default="preset", help="Half-life (kimg) of the EMA used for "
                       "validation samples and the exported pipeline, or 'none' for the raw weights. Default: the EMA "
                       "of the official evaluation for official presets (B/16 2000, B/32 2000, L/16 1000, L/32 2000, "
                       "H/16 1000, H/32 500), the smallest half-life otherwise.")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging, validation, export")
    group.add_argument("--output_dir", type=str, default="pmf-model", help="Where everything is written.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--report_to", type=str, default="tensorboard", help="'tensorboard' (default), 'wandb', 'all' "
                       "(tensorboard, and wandb when installed) or 'none'.")
    group.add_argument("--tracker_project_name", type=str, default="train_pmf", help="Tracker project name.")
    group.add_argument("--logging_steps", type=int, default=1, help="Log scalars (averaged over the steps since the last "
                       "log) every N steps. Only logging steps read values back from the GPU: the non-finite-loss check "
                       "and --max_train_minutes run there too (and before each checkpoint).")
    group.add_argument("--validation_steps", type=int, default=None, help="Sample a one-step grid (EMA weights, fixed "
                       "seeds and classes) every N steps; 0 = only at the end.")
    group.add_argument("--validation_classes", type=int, nargs="+", default=None, help="Class ids of the grid rows "
                       "(default: the first 10 classes; ImageNet: the official 8 sample classes).")
    group.add_argument("--validation_images_per_class", type=int, default=8, help="Grid columns (seeds).")
    group.add_argument("--guidance_scale", type=float, default=None, help="ω for samples and the exported default.")
    group.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
                       help="Guidance interval for samples and the exported default.")
    group.add_argument("--export_drop_v_head", action="store_true", help="Export the pipeline without the v-head "
                       "(sampling needs only the u-head; like the released files).")

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=None, help="Save the training state every N steps "
                       "(and at the end); 0 = never.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' (newest complete "
                       "checkpoint-* in --output_dir; a damaged one is skipped with a warning; starts fresh when none) "
                       "or a checkpoint path. Its files are checked against the checksums recorded when it was saved.")
    group.add_argument("--export_at_checkpoints", action="store_true", help="Also export the EMA pipeline into each "
                       "checkpoint folder (checkpoint-STEP/pipeline).")

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the exported pipeline at the end.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Target repo id (user/name).")
    group.add_argument("--hub_private", action="store_true", help="Create the repo as private.")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a pixel MeanFlow (pMF) class-conditional one-step image generator with accelerate.",
        epilog=EPILOG.format(presets=_format_presets()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add_arguments in (_add_model_arguments, _add_objective_arguments, _add_data_arguments,
                          _add_optimization_arguments, _add_output_arguments):
        add_arguments(parser)
    args = parser.parse_args(input_args)
    args.command_line = _command_line(input_args)
    _check_args(parser, args)
    return args


def _command_line(input_args: list[str] | None) -> str:
    argv = list(sys.argv[1:]) if input_args is None else list(input_args)
    script = os.path.relpath(__file__) if not os.path.isabs(sys.argv[0] or "") else __file__
    launcher = "accelerate launch" if "ACCELERATE_DYNAMO_BACKEND" in os.environ or "LOCAL_RANK" in os.environ else "python"
    return " ".join([launcher, shlex.quote(script)] + [shlex.quote(a) for a in argv])


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.train_data_dir is None and args.dataset_name is None:
        parser.error("give --train_data_dir (an image folder) or --dataset_name (a Hub dataset).")
    if args.train_data_dir is not None and args.dataset_name is not None:
        parser.error("give only one of --train_data_dir and --dataset_name.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/pmf-toy).")
    if args.gradient_accumulation_steps < 1:
        parser.error("--gradient_accumulation_steps must be ≥ 1.")
    for name in ("train_batch_size", "global_batch_size", "max_train_steps", "num_train_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be ≥ 1.")
    try:
        check_guidance_settings(args.guidance_scale, args.guidance_interval)
    except ValueError as err:
        parser.error(f"--guidance_scale / --guidance_interval: {err}")
    if args.lora_rank is not None:
        if args.lora_rank <= 0:
            parser.error(f"--lora_rank must be a positive integer (e.g. 16), got {args.lora_rank}; omit it for full "
                         "fine-tuning.")
        if args.pretrained_model is None:
            parser.error("--lora_rank (LoRA fine-tuning) needs --pretrained_model: a PMFPipeline folder or Hub id to "
                         "adapt (e.g. converted official weights: `pmf convert pMF-B/16 checkpoints/pMF-B-16`).")
    else:
        for name in ("lora_alpha", "lora_target"):
            if getattr(args, name) is not None:
                parser.error(f"--{name} only applies to LoRA fine-tuning: add --lora_rank.")
        if args.train_class_embeddings:
            parser.error("--train_class_embeddings only applies to LoRA fine-tuning (add --lora_rank); full "
                         "fine-tuning trains the class table anyway.")
    if args.lora_alpha is not None and not (args.lora_alpha > 0 and math.isfinite(args.lora_alpha)):
        parser.error(f"--lora_alpha must be a positive number, got {args.lora_alpha}.")
    if args.new_label_set is not None:
        if args.pretrained_model is None:
            parser.error("--new_label_set needs --pretrained_model: it replaces the class table of a pretrained model "
                         "(a model trained from scratch takes its classes from the dataset).")
        if not Path(args.new_label_set).is_file():
            parser.error(f"--new_label_set {args.new_label_set}: no such file.")


# ------------------------------------------------------------------------------------------------ model and classes


def build_loss_config(preset: TrainingPreset, args: argparse.Namespace, noise_scale: float | None = None) -> PMFLossConfig:
    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    if noise_scale is not None and "noise_scale" not in overrides:
        overrides["noise_scale"] = noise_scale
    if args.no_perceptual:
        overrides.update(lpips_lambda=0.0, convnext_lambda=0.0)
    with setup_errors("Invalid recipe: "):
        return PMFLossConfig(**{**preset.loss.to_dict(), **overrides})


def load_pretrained(source: str, v_head_init: str) -> tuple[PMFTransformer2DModel, dict]:
    """`load_for_fine_tuning`: the transformer of `--pretrained_model` with a v-head, and the pipeline's defaults."""
    try:
        return load_for_fine_tuning(source, v_head_init)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingSetupError(f"Cannot load --pretrained_model {source} as a PMFPipeline: {err}") from None


def dataset_label_index(args, data, label_set: dict | None, pretrained_id2label: dict | None) -> list[int] | None:
    """Model class id of each dataset class (None: the identity); LoRA on the base classes matches them by name."""
    with setup_errors(f"--new_label_set {args.new_label_set}: the dataset's class names must be names of the label "
                      "set. "):
        return dataset_class_index(data.class_names, label_set, pretrained_id2label if args.lora_rank else None)


def _hub_id(text: str | None) -> str | None:
    """`text` when it names a Hub repo (not a local folder or an official size name), else None."""
    return text if looks_like_repo_id(text) and not is_official_size_name(text) else None


def resolve_batch_sizes(args: argparse.Namespace, preset: TrainingPreset, num_processes: int) -> tuple[int, int]:
    """(per-device micro-batch, global batch per optimizer step)."""
    with setup_errors():
        return recipe.resolve_batch_sizes(preset, num_processes, args.gradient_accumulation_steps,
                                          args.global_batch_size, args.train_batch_size)


# ------------------------------------------------------------------------------------------------------- the run


@dataclass
class TrainingRun:
    """What the setup decides and the loop, the checkpoints, the validation and the exports share."""

    args: argparse.Namespace
    accelerator: Accelerator
    output_dir: Path
    preset: TrainingPreset
    loss_config: PMFLossConfig
    perceptual: torch.nn.Module | None
    # the model (before `prepare`; replaced by the prepared model) and its classes
    model: torch.nn.Module
    model_config: dict
    lora_config: dict | None
    label_set: dict[int, str] | None
    label_index: list[int] | None  # model class id of each dataset class (None: the identity)
    id2label: dict[int, str]
    # sampling defaults written into the export; the base model recorded with a LoRA adapter (Hub ids only)
    guidance_scale: float
    guidance_interval: tuple[float, float]
    base_model_name: str | None
    # data
    data: object
    per_device_batch: int
    global_batch: int
    collator: object = None
    train_dataloader: torch.utils.data.DataLoader | None = None  # map-style datasets
    stream: object = None  # --streaming: this process's part of the shuffled stream
    # optimisation (filled by `prepare_training`)
    unwrapped: PMFTransformer2DModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: object = None
    max_train_steps: int = 0
    updates_per_epoch: int | None = None
    ema: MultiEMA | None = None
    ema_params: list[torch.nn.Parameter] = field(default_factory=list)  # what the EMA tracks (LoRA: the trained)
    ema_key: str | None = None
    objective_rng: ObjectiveRNG | None = None
    # progress
    global_step: int = 0
    data_state: dict = field(default_factory=lambda: {"epoch": 0, "batches_in_epoch": 0})
    last_checkpoint: Path | None = None
    resolved: dict = field(default_factory=dict)
    validation_classes: list[int] = field(default_factory=list)

    @property
    def ema_keys(self) -> list[str]:
        return list(self.ema.keys()) if self.ema is not None else []


def configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for library_logging in (datasets.utils.logging, diffusers.utils.logging):  # warnings once, errors everywhere
        library_logging.set_verbosity(logging.WARNING if accelerator.is_local_main_process else logging.ERROR)


def load_model_to_fine_tune(args, preset: TrainingPreset | None, label_set):
    """(model, pretrained info, preset, LoRA settings) for `--pretrained_model`; the preset defaults to the official
    size the model has the shape of."""
    model, info = load_pretrained(args.pretrained_model, args.v_head_init)
    if preset is None:
        official = match_preset(dict(model.config))
        if official is None:
            raise TrainingSetupError(
                f"--pretrained_model {args.pretrained_model} matches no official size: pass --preset to choose the recipe."
            )
        preset = get_training_preset(official.name)
        logger.info(f"Using the {official.name} recipe for the pretrained model.")
    with setup_errors("--lora_target / --lora_rank: "):  # new class table + LoRA, before the optimizer and `prepare`
        lora_config = add_fine_tuning_adapters(
            model, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_target=args.lora_target,
            train_class_embeddings=args.train_class_embeddings, seed=args.seed,
            new_num_classes=len(label_set) if label_set is not None else None,
        )
    return model, info, preset, lora_config


def load_perceptual_networks(args, loss_config: PMFLossConfig, accelerator: Accelerator):
    """The frozen LPIPS / ConvNeXt nets of the perceptual terms (None without them); never prepared or checkpointed."""
    if loss_config.lpips_lambda <= 0 and loss_config.convnext_lambda <= 0:
        return None
    from pmf_diffusers.training.perceptual import PerceptualLoss, PerceptualWeightsNotFoundError

    try:
        with accelerator.main_process_first():  # one download, then the other processes read the cache
            perceptual = PerceptualLoss.from_pretrained(
                lpips=loss_config.lpips_lambda > 0, convnext=loss_config.convnext_lambda > 0, vgg_path=args.vgg_path,
                lpips_weights_path=args.lpips_weights_path, convnext_path=args.convnext_path,
            )
    except PerceptualWeightsNotFoundError as err:
        raise PerceptualWeightsNotFoundError(
            f"{err}\nTo train without the perceptual losses pass --no_perceptual (or --lpips_lambda 0 "
            "--convnext_lambda 0)."
        ) from None
    return perceptual.to(accelerator.device).eval().requires_grad_(False)


def setup_run(args, accelerator: Accelerator, preset: TrainingPreset | None, output_dir: Path, label_set) -> TrainingRun:
    """Model, recipe, perceptual nets, data and classes, in the order that fails fastest."""
    pretrained_info = lora_config = model = None
    if args.pretrained_model is not None:
        model, pretrained_info, preset, lora_config = load_model_to_fine_tune(args, preset, label_set)
    loss_config = build_loss_config(preset, args, pretrained_info["noise_scale"] if pretrained_info else None)
    per_device_batch, global_batch = resolve_batch_sizes(args, preset, accelerator.num_processes)
    perceptual = load_perceptual_networks(args, loss_config, accelerator)  # a missing download fails before the data
    with accelerator.main_process_first():
        data = load_training_dataset(
            train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name, split=args.dataset_split, image_column=args.image_column,
            label_column=args.label_column, streaming=args.streaming, cache_dir=args.cache_dir,
            num_classes=args.num_classes, max_train_samples=args.max_train_samples, seed=args.seed,
        )
    label_index = None
    if pretrained_info is None:
        shape = {"sample_size" if flag == "resolution" else flag: getattr(args, flag) for flag in SHAPE_FLAGS}
        with setup_errors("Model shape: "):
            model = PMFTransformer2DModel(**recipe.resolve_model_config(preset, data.num_classes, **shape))
    else:
        label_index = dataset_label_index(args, data, label_set, pretrained_info["id2label"])
    num_classes = model.config.num_classes
    if label_index is not None:
        logger.info(f"Dataset classes → model classes: {len(set(label_index))} of {num_classes} classes.")
    elif pretrained_info is not None and data.num_classes > num_classes:
        raise TrainingSetupError(f"The dataset has {data.num_classes} classes but --pretrained_model has {num_classes}.")
    elif pretrained_info is not None and data.num_classes < num_classes:
        logger.warning(f"The dataset has {data.num_classes} classes, the pretrained model {num_classes}: labels "
                       f"0..{data.num_classes - 1} reuse the first class embeddings.")
    id2label = dataset_id2label(data.class_names, num_classes, label_set=label_set, class_index=label_index,
                                pretrained_id2label=pretrained_info["id2label"] if pretrained_info else None)
    defaults = pretrained_info or {"guidance_scale": preset.guidance_scale, "guidance_interval": preset.guidance_interval}
    return TrainingRun(
        args=args, accelerator=accelerator, output_dir=output_dir, preset=preset, loss_config=loss_config,
        perceptual=perceptual, model=model, model_config={k: v for k, v in model.config.items() if not k.startswith("_")},
        lora_config=lora_config, label_set=label_set, label_index=label_index, id2label=id2label,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults["guidance_scale"],
        guidance_interval=tuple(args.guidance_interval or defaults["guidance_interval"]),
        base_model_name=_hub_id(args.pretrained_model), data=data, per_device_batch=per_device_batch,
        global_batch=global_batch,
    )


def setup_data_loading(run: TrainingRun) -> None:
    """The collator, a fail-fast check of the first image, and the dataloader (map-style) or this process's stream."""
    args, data = run.args, run.data
    run.collator = ImageCollator(
        run.model_config["sample_size"], data.image_column, data.label_column, data.label_to_id, args.allow_upscale,
        num_classes=run.model_config["num_classes"] if run.label_index is None else data.num_classes,
    )
    if run.label_index is not None:
        run.collator = RemappedCollator(run.collator, run.label_index)
    # Fail fast (before the model is prepared) when the data is at a lower resolution than the run: a single small or
    # unreadable image is skipped and reported during training instead.
    first_rows = data.dataset.take(64) if data.streaming else data.dataset.select(range(min(64, data.num_examples)))
    check_first_images(first_rows, data.image_column, run.model_config["sample_size"], args.allow_upscale)
    if data.streaming:
        from datasets.distributed import split_dataset_by_node

        stream = data.dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        # accelerate must not shard this again
        run.stream = split_dataset_by_node(stream, rank=run.accelerator.process_index, world_size=run.accelerator.num_processes)
        return
    if data.num_examples < run.global_batch // args.gradient_accumulation_steps:
        raise DatasetError(
            f"The dataset has {data.num_examples} images, fewer than one batch over all processes "
            f"({run.global_batch // args.gradient_accumulation_steps}). Lower the batch size or add data."
        )
    run.train_dataloader = torch.utils.data.DataLoader(
        data.dataset, sampler=EpochShuffleSampler(data.num_examples, seed=args.seed), batch_size=run.per_device_batch,
        collate_fn=run.collator, num_workers=args.dataloader_num_workers, drop_last=True,
        persistent_workers=args.dataloader_num_workers > 0, **loader_options(run.accelerator.device),
    )


def prepare_training(run: TrainingRun) -> None:
    """Optimizer, schedule, `accelerator.prepare`, the EMAs and the objective's random source."""
    args, preset, accelerator, model = run.args, run.preset, run.accelerator, run.model
    world = accelerator.num_processes
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    learning_rate = args.learning_rate if args.learning_rate is not None else preset.learning_rate
    adam_beta2 = args.adam_beta2 if args.adam_beta2 is not None else preset.adam_beta2
    optimizer = Muon(muon_param_groups(model, lr=learning_rate), lr=learning_rate, momentum=args.muon_momentum,
                     adam_betas=(args.adam_beta1, adam_beta2), weight_decay=args.weight_decay)
    half_lives = list(args.ema_half_lives_kimg if args.ema_half_lives_kimg is not None else preset.ema_half_lives_kimg)
    with setup_errors():
        run.max_train_steps = recipe.resolve_max_train_steps(
            preset, max_train_steps=args.max_train_steps, num_train_epochs=args.num_train_epochs,
            num_examples=None if run.data.streaming else run.data.num_examples, per_device_batch=run.per_device_batch,
            num_processes=world, gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        export_hl = recipe.resolve_export_ema(preset, half_lives, args.export_ema)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=run.max_train_steps * world)
    if run.train_dataloader is not None:
        run.model, run.optimizer, run.train_dataloader, run.lr_scheduler = accelerator.prepare(
            model, optimizer, run.train_dataloader, lr_scheduler
        )
        if len(run.train_dataloader) == 0:
            raise DatasetError("The dataloader is empty: fewer images than one batch per process.")
        run.updates_per_epoch = math.ceil(len(run.train_dataloader) / args.gradient_accumulation_steps)
    else:
        run.model, run.optimizer, run.lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    run.unwrapped = unwrap_model(accelerator, run.model)

    # The EMA tracks what is trained: every parameter in full training, the adapter (+ class table) with LoRA.
    if run.lora_config is not None:
        run.ema_params = [param for param in run.unwrapped.parameters() if param.requires_grad]
    else:
        run.ema_params = list(run.unwrapped.parameters())
    rampup_ratio = args.ema_rampup_ratio if args.ema_rampup_ratio is not None else preset.ema_rampup_ratio
    if half_lives:
        ref_batch = args.ema_ref_batch if args.ema_ref_batch is not None else preset.ema_ref_batch
        with setup_errors("Invalid EMA settings: "):
            run.ema = MultiEMA(run.ema_params, half_lives_kimg=half_lives, ref_batch=ref_batch, rampup_ratio=rampup_ratio)
    run.ema_key = MultiEMA.key_for(export_hl) if export_hl is not None else None
    run.objective_rng = ObjectiveRNG(args.seed, accelerator.device)
    TrainingState(accelerator, objective_rng=run.objective_rng, ema=run.ema)  # saved and loaded with the accelerate state
    run.resolved.update(learning_rate=learning_rate, adam_beta2=adam_beta2, ema_half_lives_kimg=half_lives,
                        ema_rampup_ratio=rampup_ratio,
                        export_ema_kimg=export_hl)


def resume(run: TrainingRun, resume_path: Path | None) -> None:
    args, accelerator = run.args, run.accelerator
    if resume_path is not None:
        meta = check_checkpoint_compatible(resume_path, run.model_config, run.ema_keys, run.lora_config)
        if meta.get("seed") not in (None, args.seed):
            logger.warning(f"{resume_path} was trained with --seed {meta['seed']}, this run has --seed {args.seed}: the "
                           "objective draws keep the checkpoint's seed, the data order follows --seed.")
        if meta.get("num_processes") not in (None, accelerator.num_processes):
            logger.warning(f"{resume_path} was written by {meta['num_processes']} process(es), this run has "
                           f"{accelerator.num_processes}: the data order and objective draws will differ from an "
                           "uninterrupted run.")
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        run.global_step = int(meta["global_step"])
        run.data_state = read_data_state(resume_path, accelerator.process_index) or run.data_state
        run.last_checkpoint = resume_path
        if accelerator.is_main_process:  # the steps after the checkpoint are trained (and logged) again
            metrics_file = MetricsFile(run.output_dir / args.logging_dir / "metrics.jsonl")
            if dropped := metrics_file.truncate_after(run.global_step):
                logger.info(f"Removed {dropped} line(s) after step {run.global_step} from {metrics_file.path}.")
    if run.updates_per_epoch is not None:  # map-style: the data position is a function of the step
        run.data_state = {
            "epoch": run.global_step // run.updates_per_epoch,
            "batches_in_epoch": min(
                (run.global_step % run.updates_per_epoch) * args.gradient_accumulation_steps, len(run.train_dataloader)
            ),
        }


def record_run(run: TrainingRun) -> None:
    """training_args.json, the trackers' config and the start-of-training summary."""
    args, accelerator, unwrapped, loss_config = run.args, run.accelerator, run.unwrapped, run.loss_config
    num_parameters = sum(p.numel() for p in unwrapped.parameters())
    num_trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    label_set = run.label_set
    run.resolved = {
        "preset": run.preset.name,
        "per_device_batch_size": run.per_device_batch,
        "global_batch_size": run.global_batch,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "max_train_steps": run.max_train_steps,
        **run.resolved,  # learning rate, Adam b2, EMA half-lives, exported EMA
        "loss_config": loss_config.to_dict(),
        "transformer_config": run.model_config,
        "num_parameters": num_parameters,
        "num_trainable_parameters": num_trainable,
        "lora": run.lora_config,
        "new_label_set": {"file": args.new_label_set, "num_classes": len(label_set)} if label_set is not None else None,
        "dataset": run.data.source,
        "num_examples": run.data.num_examples,
        "class_names": run.data.class_names,
        "guidance_scale": run.guidance_scale,
        "guidance_interval": list(run.guidance_interval),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "datasets": datasets.__version__},
    }
    safe_args = {k: v for k, v in vars(args).items() if "token" not in k.lower()}
    if accelerator.is_main_process:
        training_args = {"args": safe_args, "command": args.command_line, "resolved": run.resolved}
        (run.output_dir / "training_args.json").write_text(json.dumps(training_args, indent=2, default=str) + "\n")
        tracker_config = {k: v for k, v in {**safe_args, **run.resolved, **loss_config.to_dict()}.items()
                          if isinstance(v, (int, float, str, bool))}
        # The wandb run folder goes next to the tensorboard logs unless WANDB_DIR says otherwise.
        wandb_dir = os.environ.get("WANDB_DIR", str(run.output_dir / args.logging_dir))
        # On resume, tensorboard hides the events of the steps after the checkpoint (logged again).
        purge = {"purge_step": run.global_step + 1} if run.global_step else {}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config,
                                  init_kwargs={"wandb": {"dir": wandb_dir}, "tensorboard": purge})

    logger.info("***** Running training *****")
    logger.info(f"  Preset = {run.preset.name}; parameters = {num_parameters / 1e6:.2f}M; recipe = {loss_config}")
    logger.info(f"  Examples = {run.data.num_examples or 'streaming'}; classes = {run.model_config['num_classes']}")
    logger.info(f"  Batch: {run.per_device_batch} per device × {accelerator.num_processes} process(es) × "
                f"{args.gradient_accumulation_steps} accumulation = {run.global_batch} per step; steps = "
                f"{run.max_train_steps}; start step = {run.global_step}")
    logger.info(f"  Trainable parameters = {num_trainable:,} of {num_parameters:,} "
                f"({100 * num_trainable / max(num_parameters, 1):.2f}%); EMA over {len(run.ema_params)} tensors")
    lora = run.lora_config
    if lora is not None:
        table = "new label set" if label_set is not None else "trained" if lora["train_class_embeddings"] else "frozen"
        logger.info(f"  LoRA: rank {lora['rank']}, alpha {lora['alpha']:g} (scale {lora['alpha'] / lora['rank']:g}), "
                    f"target {lora['target']} = {lora['target_modules']}, class table {table}")
    if label_set is not None:
        logger.info(f"  New label set ({len(label_set)} classes) from {args.new_label_set}: {list(label_set.values())[:10]}")


# ---------------------------------------------------------------------------------------- validation, checkpoints


def run_validation(run: TrainingRun, step: int) -> Path | None:
    """One-step samples with the exported EMA, saved to samples/step_XXXXXXX.png and sent to the trackers.
    Collective: under FSDP the weights are gathered and the main process samples with a full copy."""
    accelerator, path, sampler = run.accelerator, None, run.unwrapped
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:  # an FSDP forward would need every process
        state_dict = gather_state_dict(accelerator, run.model, run.ema, run.ema_key)
        if accelerator.is_main_process:
            sampler = build_pipeline(run.model_config, state_dict).transformer.to(accelerator.device)
    if accelerator.is_main_process:
        with ema_weights(None if sharded else run.ema, run.ema_params, run.ema_key):
            path = save_sample_grid(
                accelerator, sampler, run.output_dir / "samples" / f"step_{step:07d}.png",
                classes=run.validation_classes, images_per_class=run.args.validation_images_per_class,
                seed=run.args.seed, noise_scale=run.loss_config.noise_scale, guidance_scale=run.guidance_scale,
                guidance_interval=run.guidance_interval,
            )
        log_sample_grid(accelerator.trackers, path, step)
    accelerator.wait_for_everyone()
    return path


def export(run: TrainingRun, folder: Path, card=None, samples: Path | None = None) -> Path | None:
    """Export the EMA weights into `folder`: `pipeline/` (full training) or `lora/` (the adapter, with `card` and
    `samples`). Collective; returns the written folder on the main process."""
    args, accelerator = run.args, run.accelerator
    if run.lora_config is None:
        state_dict = gather_state_dict(accelerator, run.model, run.ema, run.ema_key)
        if not accelerator.is_main_process:
            return None
        return save_pipeline(
            folder / "pipeline", run.unwrapped.config, state_dict, noise_scale=run.loss_config.noise_scale,
            id2label=run.id2label, guidance_scale=run.guidance_scale, guidance_interval=run.guidance_interval,
            drop_v_head=args.export_drop_v_head,
        )
    if not accelerator.is_main_process:
        return None
    return save_lora_adapter(
        folder / "lora", run.unwrapped, ema=run.ema, ema_key=run.ema_key, ema_parameters=run.ema_params,
        id2label=dict(run.label_set) if run.label_set is not None else None,  # only a new label set's names
        include_v_head=not args.export_drop_v_head, base_model=run.base_model_name, card=card, samples=samples,
    )


def save_training_checkpoint(run: TrainingRun, step: int, metrics: StepMetrics) -> Path:
    accelerator, args = run.accelerator, run.args
    # Refuse to save after a non-finite loss (checked here and at logging steps only: reading it is a device sync),
    # and diverged weights (e.g. an inf gradient that left a finite loss).
    raise_if_diverged(*metrics.first_non_finite_step(accelerator), run.last_checkpoint)
    if not weights_are_finite(accelerator, run.unwrapped.parameters()):
        raise NonFiniteLossError(
            f"Non-finite weights after step {step}: not saving a checkpoint. Last good checkpoint: "
            f"{run.last_checkpoint or 'none'}."
        )
    metadata = {
        "transformer_config": run.model_config,
        "ema_keys": run.ema_keys,
        "lora": run.lora_config,
        "num_processes": accelerator.num_processes,
        "seed": args.seed,
        "preset": run.preset.name,
        "loss_config": run.loss_config.to_dict(),
        "command": args.command_line,
    }
    run.last_checkpoint = save_checkpoint(
        accelerator, run.output_dir, step, metadata, run.data_state,
        write_extras=(lambda folder: export(run, folder)) if args.export_at_checkpoints else None,
        total_limit=args.checkpoints_total_limit,
    )
    return run.last_checkpoint


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class LoopStats:
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))  # logged steps
    skipped: SkippedImages = field(default_factory=SkippedImages)
    last_validation: int | None = None
    last_validation_grid: Path | None = None


def training_step(run: TrainingRun, batch: dict, micro_step: int, metrics: StepMetrics) -> None:
    """One micro-step (forward, backward, optimizer step when gradients sync). Nothing is read back from the device:
    the losses are accumulated in `metrics`, read at logging steps (docs/training.md, "Host syncs")."""
    accelerator = run.accelerator
    images, labels = batch["pixel_values"], batch["class_labels"]
    if images.shape[0] == 0:
        raise DatasetError(f"Every image of a batch was skipped: {(batch['corrupt'] + batch['too_small'])[:4]}.")
    images = images.to(accelerator.device, non_blocking=True)  # no-ops when accelerate already moved the batch
    labels = labels.to(accelerator.device, non_blocking=True)
    with accelerator.accumulate(run.model):
        generator = run.objective_rng.for_step(run.global_step, micro_step, accelerator.process_index)
        with accelerator.autocast():
            out = pmf_loss(run.model, images, labels, run.loss_config, generator=generator, perceptual=run.perceptual,
                           crop_generator=run.objective_rng.host_generator)
        metrics.add(out, run.global_step + 1, images=images.shape[0], corrupt=len(batch["corrupt"]),
                    too_small=len(batch["too_small"]))
        accelerator.backward(out.loss)
        if accelerator.sync_gradients and run.args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)


def log_step(run: TrainingRun, stats: LoopStats, metrics: StepMetrics, epoch: int, over_time: bool) -> bool:
    """Read the statistics of the steps since the last log (one gather, one sync), stop on a non-finite loss, log
    them; True when the --max_train_minutes budget is spent on any process."""
    accelerator, step = run.accelerator, run.global_step
    values = metrics.collect(accelerator, over_time=float(over_time))
    raise_if_diverged(values["first_bad_step"], values["bad_processes"], run.last_checkpoint)
    logs = {**{name: values[name] for name in LOSS_NAMES}, "lr": run.lr_scheduler.get_last_lr()[0],
            "img_per_sec": values["img_per_sec"], "epoch": epoch, **stats.skipped.add_totals(values)}
    stats.history.append({"step": step, **logs})
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        MetricsFile(run.output_dir / run.args.logging_dir / "metrics.jsonl").append({"step": step, **logs})
    if values["over_time"] > 0:
        logger.info(f"--max_train_minutes {run.args.max_train_minutes} reached at step {step}.")
    return values["over_time"] > 0


def train_loop(run: TrainingRun) -> LoopStats:
    args, accelerator = run.args, run.accelerator
    validation_steps = args.validation_steps if args.validation_steps is not None else run.preset.validation_steps
    checkpointing_steps = args.checkpointing_steps if args.checkpointing_steps is not None else run.preset.checkpointing_steps
    stats, metrics = LoopStats(), StepMetrics(accelerator.device)
    progress_bar = tqdm(range(run.max_train_steps), initial=run.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    train_start, micro_step, epoch = time.perf_counter(), 0, run.data_state["epoch"]
    if run.global_step >= run.max_train_steps:
        logger.info(f"Already at step {run.global_step} ≥ {run.max_train_steps}: nothing to train.")
        batch_source = ()
    else:
        batch_source = resumable_batches(
            accelerator, run.data_state, dataloader=run.train_dataloader, stream=run.stream,
            batch_size=run.per_device_batch, collate_fn=run.collator, num_workers=args.dataloader_num_workers,
            pin_memory=loader_options(accelerator.device)["pin_memory"], source=run.data.source,
        )
    for batch, epoch in batch_source:
        stats.skipped.note(batch)
        training_step(run, batch, micro_step, metrics)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        run.global_step += 1
        micro_step = 0
        if run.ema is not None:
            run.ema.step(run.ema_params, global_step=run.global_step)
        progress_bar.update(1)
        out_of_time = False
        if run.global_step % args.logging_steps == 0:  # the only steps that read values back from the device
            over = args.max_train_minutes is not None and time.perf_counter() - train_start > 60 * args.max_train_minutes
            out_of_time = log_step(run, stats, metrics, epoch, over)
            last = stats.history[-1]
            progress_bar.set_postfix(loss=f"{last['loss']:.3f}", loss_u=f"{last['loss_u']:.4f}",
                                     img_s=f"{last['img_per_sec']:.0f}")
        if validation_steps and run.global_step % validation_steps == 0:
            stats.last_validation_grid = run_validation(run, run.global_step)
            stats.last_validation = run.global_step
        if checkpointing_steps and run.global_step % checkpointing_steps == 0:
            save_training_checkpoint(run, run.global_step, metrics)
        if run.global_step >= run.max_train_steps or out_of_time:
            break
    progress_bar.close()
    if metrics.micro_steps:  # the steps since the last log: logged, and checked before anything is saved
        log_step(run, stats, metrics, epoch, over_time=False)

    # A final checkpoint, so that a time-boxed or shortened run can be continued.
    step = run.global_step
    if checkpointing_steps and step > 0 and step % checkpointing_steps and (
        run.last_checkpoint is None or checkpoint_step(run.last_checkpoint) != step
    ):
        save_training_checkpoint(run, step, metrics)
    if stats.last_validation != step:
        stats.last_validation_grid = run_validation(run, step)
    return stats


def finish(run: TrainingRun, stats: LoopStats) -> dict:
    """Export (pipeline or LoRA adapter with its card), report unreadable images, push to the Hub."""
    args, accelerator, step = run.args, run.accelerator, run.global_step
    card_info = training_card_info(
        run.resolved, run.loss_config, steps=step, command=args.command_line,
        dataset=args.dataset_name if args.dataset_name else f"image folder `{Path(args.train_data_dir).name}`",
        hub_dataset=_hub_id(args.dataset_name), base_model=run.base_model_name,
    )
    if run.lora_config is None:
        exported = export(run, run.output_dir)
    else:
        card, samples, config = None, stats.last_validation_grid, run.model_config
        if accelerator.is_main_process:
            card = lora_adapter_card(
                card_info, repo_id=args.hub_model_id or str(run.output_dir / "lora"),
                title=(args.hub_model_id or "").split("/")[-1] or f"pMF LoRA adapter ({run.output_dir.name})",
                base=args.pretrained_model, lora_config=run.lora_config, num_parameters=run.resolved["num_parameters"],
                num_trainable_parameters=run.resolved["num_trainable_parameters"], num_classes=config["num_classes"],
                resolution=config["sample_size"], patch_size=config["patch_size"], id2label=run.id2label,
                guidance_scale=run.guidance_scale, guidance_interval=run.guidance_interval,
                noise_scale=run.loss_config.noise_scale, sample_classes=run.validation_classes if samples else None,
                sample_seed=args.seed, images_per_class=args.validation_images_per_class,
            )
        exported = export(run, run.output_dir, card=card, samples=samples)
    stats.skipped.report(accelerator.process_index)
    if accelerator.is_main_process and args.push_to_hub:
        if run.lora_config is None:
            from pmf_diffusers.hub import push_pipeline_to_hub

            push_pipeline_to_hub(
                str(exported), args.hub_model_id, private=args.hub_private,
                token=None,  # huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); never passed on the CLI
                commit_message=f"pMF training: step {step}", card_kind="trained", card_info=card_info,
            )
        else:
            from pmf_diffusers.hub import push_adapter_to_hub

            result = push_adapter_to_hub(exported, args.hub_model_id, private=args.hub_private,
                                         commit_message=f"pMF LoRA training: step {step}")
            logger.info(f"Pushed the adapter to {args.hub_model_id}: {result.commit_url}")
    accelerator.wait_for_everyone()
    logger.info(f"Done at step {step}; " + (f"pipeline in {run.output_dir / 'pipeline'}" if run.lora_config is None else
                f"LoRA adapter in {run.output_dir / 'lora'} (PMFPipeline.from_pretrained(<base>).load_lora_weights)"))
    return {
        "global_step": step,
        "history": list(stats.history),
        "pipeline_dir": run.output_dir / "pipeline" if run.lora_config is None else None,
        "lora_dir": run.output_dir / "lora" if run.lora_config is not None else None,
        "last_checkpoint": run.last_checkpoint,
        "corrupt_images": dict(stats.skipped.seen["corrupt"]),
        "corrupt_total": stats.skipped.total["corrupt"],
        "too_small_images": dict(stats.skipped.seen["too_small"]),
    }


# ---------------------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary (final step, per-step metrics, output folders, unreadable images)."""
    output_dir = Path(args.output_dir)
    if args.preset is None and args.pretrained_model is None:
        raise TrainingSetupError(f"Pass --preset (one of: {', '.join(TRAINING_PRESETS)}) or --pretrained_model.")
    with setup_errors():
        preset = get_training_preset(args.preset) if args.preset is not None else None
    if args.pretrained_model is not None and any(getattr(args, name) is not None for name in SHAPE_FLAGS):
        raise TrainingSetupError("With --pretrained_model the model shape comes from the checkpoint: drop the shape flags.")

    report_to = None if args.report_to in (None, "none", "") else args.report_to
    if report_to == "wandb" and not is_wandb_available():
        raise TrainingSetupError("--report_to wandb needs `pip install wandb` (then `wandb login` or WANDB_MODE=offline).")
    if report_to == "all":
        # accelerate's "all" would also start any other tracker it finds installed (mlflow, comet_ml, ...).
        report_to = ["tensorboard", "wandb"] if is_wandb_available() else ["tensorboard"]
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=report_to, project_config=project_config,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))  # with pinned memory
    # Library errors name API parameters (`image_column`, `size=N`); ours are the flags of the same names.
    options = {name: f"--{name}" for name in vars(args)} | {"size": "--resolution"}
    try:
        with options_in_errors(options):
            return _train(args, accelerator, preset, output_dir)
    finally:
        accelerator.end_training()


def _train(args, accelerator: Accelerator, preset: TrainingPreset | None, output_dir: Path) -> dict:
    configure_logging(accelerator)
    with setup_errors():
        check_distributed_setup(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and args.lora_rank is not None:
        raise TrainingSetupError("--lora_rank is not supported with FSDP (the adapter is small): use DDP "
                                 "(`accelerate launch --multi_gpu`).")
    if torch.cuda.is_available():  # the TF32 policy, explicit both ways (the library never sets torch.backends)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    if preset is not None:  # cheap checks first
        resolve_batch_sizes(args, preset, accelerator.num_processes)
    resume_path = find_resume_checkpoint(accelerator, args.resume_from_checkpoint, output_dir)  # verified
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"No complete checkpoint in {output_dir}: starting a new training run.")
    with setup_errors("--new_label_set: "):
        label_set = read_label_set(args.new_label_set) if args.new_label_set is not None else None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_interrupted_saves(output_dir)
    set_seed(args.seed)

    run = setup_run(args, accelerator, preset, output_dir, label_set)
    setup_data_loading(run)
    prepare_training(run)
    resume(run, resume_path)
    record_run(run)
    with setup_errors("--"):
        run.validation_classes = recipe.resolve_validation_classes(
            args.validation_classes, run.model_config["num_classes"], run.label_index)
    stats = train_loop(run)
    return finish(run, stats)


def cli(argv: list[str] | None = None) -> int:
    from pmf_diffusers.training.perceptual import PerceptualWeightsNotFoundError

    args = parse_args(argv)
    try:
        main(args)
    except (TrainingSetupError, CheckpointError, CheckpointSaveError, DatasetError,
            PerceptualWeightsNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
