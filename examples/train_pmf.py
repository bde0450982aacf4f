#!/usr/bin/env python
# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Train pixel MeanFlow (pMF) — one-step, latent-free, class-conditional image generation — with 🤗 accelerate.

    accelerate launch examples/train_pmf.py --preset toy-cpu --train_data_dir data/toy --output_dir runs/toy

One script for one CPU, one GPU or many: DDP, or FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`), configured
with `accelerate config` or `accelerate launch` flags; FSDP1 and DeepSpeed are refused (docs/training.md, "Multi-GPU:
DDP and FSDP"). See `--help` for every option and worked examples. The objective, optimizer, EMA, data transforms and
presets live in `pmf_diffusers.training` (this file only wires them together, diffusers-example style).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import datasets
import diffusers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, is_wandb_available, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel, load_imagenet_id2label
from pmf_diffusers.conversion import OFFICIAL_PRESETS
from pmf_diffusers.training import MultiEMA, Muon, PMFLossConfig, muon_param_groups, pmf_loss
from pmf_diffusers.training.data import (
    DatasetError,
    EpochShuffleSampler,
    ImageCollator,
    load_training_dataset,
    preprocess_image,
)
from pmf_diffusers.training.presets import TRAINING_PRESETS, TrainingPreset, get_training_preset
from pmf_diffusers.training.toy_data import save_image_grid

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_MARKER = "pmf_checkpoint.json"
# The model weights in an accelerate checkpoint: DDP / one process, FSDP sharded (a DCP folder), FSDP full state dict.
CHECKPOINT_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
V_HEAD_PREFIXES = ("v_head_blocks.", "v_norm_out.", "v_proj_out.")
OFFICIAL_SAMPLE_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # torch `evaluate.py --mode sample`
SHAPE_FLAGS = (
    "resolution",
    "patch_size",
    "num_layers",
    "num_head_layers",
    "num_attention_heads",
    "attention_head_dim",
    "mlp_hidden_dim",
    "bottleneck_dim",
)
RECIPE_FLAGS = (
    "p_mean",
    "p_std",
    "noise_scale",
    "data_proportion",
    "tr_uniform",
    "tr_uniform_prob",
    "cfg_max",
    "cfg_beta",
    "class_dropout_prob",
    "class_dropout_mode",
    "norm_p",
    "norm_eps",
    "lpips_lambda",
    "convnext_lambda",
    "perceptual_max_t",
)


class TrainingSetupError(ValueError):
    """A problem with the arguments, the checkpoint or the environment, found before training starts."""


class CheckpointError(TrainingSetupError):
    """A folder that is not a usable training checkpoint for this run."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped without writing a new checkpoint."""


EPILOG = r"""
presets (model shape + training recipe + sampling defaults; every value can be overridden by its flag):
{presets}

examples:
  # 0. a toy dataset (10 classes of coloured shapes, 32x32) and a CPU run (1500 steps, ~20 min on 2 idle cores;
  #    --max_train_minutes caps the time; on a machine shared with other jobs OMP_NUM_THREADS=1 is much faster)
  python -m pmf_diffusers.training.toy_data data/toy --images-per-class 200
  accelerate launch --cpu --num_processes 1 examples/train_pmf.py --preset toy-cpu \
      --train_data_dir data/toy --output_dir runs/toy-cpu --max_train_minutes 25

  # 1. ImageNet-1k 256px, pMF-B/16, 8 GPUs, official recipe (global batch 1024 = 8 x 128, lr 1e-3, 320 epochs;
  #    LPIPS/ConvNeXt weights must be available: see the --vgg_path / --convnext_path help). ImageNet holds a few
  #    images smaller than 256px, which the official pipeline upscales: hence --allow_upscale.
  accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/train_pmf.py \
      --preset pMF-B/16 --train_data_dir /data/imagenet/train --allow_upscale \
      --dataloader_num_workers 8 --output_dir runs/pmf-b16 --checkpointing_steps 5000 --validation_steps 5000
  #    or stream it from the Hub (gated: accept the terms, then `hf auth login`):
  #    ... --dataset_name ILSVRC/imagenet-1k --streaming --max_train_steps 400000

  # 2. resume after an interruption (same command + --resume_from_checkpoint; `latest` picks the newest complete one)
  accelerate launch ... examples/train_pmf.py <same arguments> --resume_from_checkpoint latest

  # 3. fine-tune converted official weights on your own data (here an ImageNet subset with the 1000 class folders);
  #    the released files have no v-head, so one is added as a copy of the u-head (--v_head_init copy)
  pmf convert pMF-B/16 checkpoints/pMF-B-16          # downloads Lyy0725/pMF and writes a PMFPipeline folder
  accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/train_pmf.py \
      --pretrained_model checkpoints/pMF-B-16 --preset pMF-B/16 --train_data_dir /data/my_imagenet_subset \
      --allow_upscale --learning_rate 1e-4 --max_train_steps 20000 --output_dir runs/pmf-b16-ft

  # 4. two CPU processes (DDP over gloo), e.g. to test multi-process behaviour without GPUs. `--cpu` would start a
  #    single process; ACCELERATE_USE_CPU=1 makes the torch.distributed launcher pick the CPU/gloo backend.
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
      --mixed_precision no --dynamo_backend no --main_process_port 29511 examples/train_pmf.py \
      --preset tiny-test --train_data_dir data/toy --output_dir runs/ddp --debug_dump_weights_hash

  # 5. FSDP2 (parameters, gradients, Muon/Adam state and EMAs sharded over the processes; docs/training.md)
  accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 --mixed_precision bf16 \
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap PMFTransformerBlock \
      --fsdp_state_dict_type SHARDED_STATE_DICT --fsdp_cpu_ram_efficient_loading false \
      examples/train_pmf.py --preset pMF-H/16 ...

  # 6. LoRA fine-tuning of converted weights on your own classes (docs/lora.md): one folder per name of labels.txt;
  #    the base stays frozen, the export is the adapter runs/my-shapes/lora (pipe.load_lora_weights(...))
  accelerate launch examples/train_pmf.py --pretrained_model checkpoints/pMF-B-16 --train_data_dir my_images \
      --lora_rank 16 --new_label_set labels.txt --learning_rate 1e-4 --max_train_steps 2000 --output_dir runs/my-shapes

batch size: --train_batch_size is per device (diffusers convention); --global_batch_size is the official notion
(images per optimizer step over all processes and accumulation steps) and must be divisible by
num_processes x gradient_accumulation_steps. With neither, the preset's global batch is used.

outputs (in --output_dir): training_args.json (arguments, exact command, resolved recipe), logs/ (tensorboard,
metrics.jsonl, wandb/ with --report_to wandb), samples/step_XXXXXXX.png (one-step EMA samples, fixed seeds and
classes), checkpoint-STEP/ (accelerate state + pmf_checkpoint.json; written to .tmp-checkpoint-STEP and renamed when
complete), pipeline/ (the exported EMA model as a PMFPipeline, loadable with PMFPipeline.from_pretrained); with
--lora_rank instead lora/ (the LoRA adapter with the EMA weights, README.md model card and samples.png; load it on top
of the base with PMFPipeline.from_pretrained(base).load_lora_weights(output_dir/lora)).
"""


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


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a pixel MeanFlow (pMF) class-conditional one-step image generator with accelerate.",
        epilog=EPILOG.format(presets=_format_presets()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    group = parser.add_argument_group("model and recipe")
    group.add_argument(
        "--preset", type=str, default=None,
        help=f"Model shape + recipe + sampling defaults: {', '.join(TRAINING_PRESETS)}. Required unless "
        "--pretrained_model is given (then the official preset matching its shape is used, if any).",
    )
    group.add_argument(
        "--pretrained_model", type=str, default=None,
        help="Fine-tune from a PMFPipeline folder (or Hub id), e.g. converted official weights. Its shape, noise scale, "
        "class names and guidance defaults are kept; the recipe comes from --preset and the recipe flags.",
    )
    group.add_argument(
        "--v_head_init", type=str, default="copy", choices=["copy", "fresh"],
        help="When --pretrained_model has no v-head (the released checkpoints do not): 'copy' (default) initialises "
        "it as a copy of the u-head — a good start, since by the MeanFlow identity u(z, t, t) = v(z, t) the u-head "
        "at h = 0 already predicts v; 'fresh' uses the official from-scratch initialisation (zero output layer).",
    )
    group.add_argument("--resolution", type=int, default=None, help="Image side S (preset: 256/512 official, 32 toy-cpu).")
    group.add_argument("--patch_size", type=int, default=None, help="Patch side p.")
    group.add_argument("--num_layers", type=int, default=None, help="Shared trunk blocks.")
    group.add_argument("--num_head_layers", type=int, default=None, help="Blocks in each head (u and v).")
    group.add_argument("--num_attention_heads", type=int, default=None, help="Attention heads.")
    group.add_argument("--attention_head_dim", type=int, default=None, help="Channels per head (multiple of 4).")
    group.add_argument("--mlp_hidden_dim", type=int, default=None, help="SwiGLU width.")
    group.add_argument("--bottleneck_dim", type=int, default=None, help="Patch-embedding bottleneck width.")
    group.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="Recompute block activations in the backward pass (the JVP pass runs without autograd anyway).",
    )

    group = parser.add_argument_group("LoRA fine-tuning (peft; needs --pretrained_model; docs/lora.md)")
    group.add_argument(
        "--lora_rank", type=int, default=None,
        help="LoRA rank r > 0: freeze the pretrained weights and train a low-rank adapter (+ the class table with "
        "--new_label_set / --train_class_embeddings). The EMA tracks only the trained parameters, and the export is "
        "the adapter folder output_dir/lora (load it with pipe.load_lora_weights), not a full pipeline. Without this "
        "flag the script does full fine-tuning.",
    )
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / r (default: r).")
    group.add_argument(
        "--lora_target", type=str, default=None,
        help="LoRA target modules: a preset (attention, attention+mlp [default], all-linear) or comma-separated "
        "module-name suffixes such as to_q,to_v,ff.down_proj. A name that matches no Linear layer is an error.",
    )
    group.add_argument(
        "--train_class_embeddings", action="store_true",
        help="With --lora_rank: also train the full class-embedding table (same classes, exported with the adapter).",
    )
    group.add_argument(
        "--new_label_set", type=str, default=None, metavar="FILE",
        help="Train your own classes: a label-set file (one class name per line, or a JSON list / {id: name}). The "
        "class table is replaced by one row per name (+ the pretrained null row) and trained; the dataset's class "
        "folder names must match these names (case-insensitive, '_' = space). Needs --pretrained_model.",
    )

    group = parser.add_argument_group("objective (defaults: the preset's recipe; pmf_spec.md §5)")
    group.add_argument("--p_mean", type=float, default=None, help="Logit-normal time mean (official 0.8 B/L-16, 0.0 L/32, H).")
    group.add_argument("--p_std", type=float, default=None, help="Logit-normal time std (official 0.8).")
    group.add_argument("--noise_scale", type=float, default=None, help="Noise = noise_scale·ε (official 1/2/1/4/2/4).")
    group.add_argument("--data_proportion", type=float, default=None, help="Flow-matching share of each batch (0.5).")
    group.add_argument(
        "--tr_uniform", action=argparse.BooleanOptionalAction, default=None,
        help="Draw t, r from U(0, 1) with probability --tr_uniform_prob per sample (official: H models only).",
    )
    group.add_argument("--tr_uniform_prob", type=float, default=None, help="Probability for --tr_uniform (0.1).")
    group.add_argument("--cfg_max", type=float, default=None, help="ω is drawn on [1, 1 + cfg_max] (7).")
    group.add_argument("--cfg_beta", type=float, default=None, help="ω density ∝ ω^-β (1; L/16: 2).")
    group.add_argument("--class_dropout_prob", type=float, default=None, help="Null-label probability (0.1).")
    group.add_argument(
        "--class_dropout_mode", type=str, default=None, choices=["per_sample", "first_k"],
        help="'per_sample' Bernoulli draws (default) or 'first_k' (official main branch: the first k of the batch).",
    )
    group.add_argument("--norm_p", type=float, default=None, help="Adaptive weighting power p in L / sg((L+eps)^p) (1).")
    group.add_argument("--norm_eps", type=float, default=None, help="Adaptive weighting eps (0.01).")
    group.add_argument("--lpips_lambda", type=float, default=None, help="LPIPS-VGG weight (official 0.4; small presets 0).")
    group.add_argument("--convnext_lambda", type=float, default=None, help="ConvNeXt-V2 weight (official 0.1; small presets 0).")
    group.add_argument("--perceptual_max_t", type=float, default=None, help="Perceptual terms only for t below this (0.8/0.6).")
    group.add_argument(
        "--no_perceptual", action="store_true",
        help="Train without the perceptual losses (same as --lpips_lambda 0 --convnext_lambda 0).",
    )
    group.add_argument(
        "--vgg_path", type=str, default=None,
        help="torchvision VGG16 checkpoint vgg16-397923af.pth for LPIPS (default: $TORCH_HOME/hub/checkpoints/, "
        "downloaded unless HF_HUB_OFFLINE=1). The LPIPS linear heads come from the installed `lpips` package files.",
    )
    group.add_argument("--lpips_weights_path", type=str, default=None, help="lpips weights/v0.1/vgg.pth (default: installed).")
    group.add_argument(
        "--convnext_path", type=str, default="facebook/convnextv2-base-22k-224",
        help="ConvNeXt-V2 model for the feature loss (Hub id or local folder).",
    )

    group = parser.add_argument_group("data")
    group.add_argument("--train_data_dir", type=str, default=None, help="Image folder with one sub-folder per class.")
    group.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id (or local dataset folder).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="Dataset config name.")
    group.add_argument("--dataset_split", type=str, default="train", help="Split to train on.")
    group.add_argument("--image_column", type=str, default=None, help="Image column (default: 'image').")
    group.add_argument("--label_column", type=str, default=None, help="Class column (default: 'label'; none = 1 class).")
    group.add_argument("--num_classes", type=int, default=None, help="Class count when the label column is a plain int.")
    group.add_argument(
        "--streaming", action="store_true",
        help="Stream the dataset (datasets.IterableDataset). Each process reads its own part "
        "(datasets.distributed.split_dataset_by_node; accelerate does not shard or dispatch it), shuffled with a "
        "buffer. Requires --max_train_steps (or a preset default); resuming skips the consumed examples.",
    )
    group.add_argument("--shuffle_buffer_size", type=int, default=10000, help="Shuffle buffer for --streaming.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (debugging).")
    group.add_argument(
        "--allow_upscale", action="store_true",
        help="Bicubic-upscale images smaller than --resolution (official ImageNet pipeline) instead of stopping.",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="datasets cache folder.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=None, help="Images per device per micro-step.")
    group.add_argument(
        "--global_batch_size", type=int, default=None,
        help="Images per optimizer step over all processes (official 1024); must be divisible by "
        "num_processes × gradient_accumulation_steps.",
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    group.add_argument("--learning_rate", type=float, default=None, help="Learning rate of Muon + Adam (official 1e-3).")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="b1 of the Adam part (0.9).")
    group.add_argument("--adam_beta2", type=float, default=None, help="b2 of the Adam part (official 0.95).")
    group.add_argument("--muon_momentum", type=float, default=0.95, help="Muon momentum (0.95).")
    group.add_argument("--weight_decay", type=float, default=0.0, help="Decoupled weight decay (official 0).")
    group.add_argument(
        "--lr_scheduler", type=str, default="constant",
        help="diffusers.optimization.get_scheduler name: constant (official), constant_with_warmup, cosine, linear, ...",
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps (official 0).")
    group.add_argument("--max_grad_norm", type=float, default=0.0, help="Gradient clipping; 0 = off (official).")
    group.add_argument("--num_train_epochs", type=int, default=None, help="Epochs (official 320).")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    group.add_argument(
        "--max_train_minutes", type=float, default=None,
        help="Wall-clock budget: stop after the first step past it (then sample, export, push as usual). Handy for "
        "time-boxed CPU demos; the stopping step depends on the machine's speed.",
    )
    group.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Autocast precision (default: the accelerate config). bf16 recommended on GPUs; weights and EMA stay fp32 "
        "and the JVP runs in fp32.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, data order and objective draws.")

    group = parser.add_argument_group("EMA")
    group.add_argument(
        "--ema_half_lives_kimg", type=float, nargs="*", default=None,
        help="EMA half-lives in kimg (official 500 1000 2000; none = no EMA). EDM schedule with ramp-up: the "
        "half-life is min(hl, 5%% of images seen), so short runs average over their last ~5%%.",
    )
    group.add_argument(
        "--ema_ref_batch", type=int, default=None,
        help="Reference batch of the EMA schedule (official 1024, hard-coded there); e.g. the real batch size for "
        "small runs. During the ramp-up the decay does not depend on it.",
    )
    group.add_argument(
        "--export_ema", type=_ema_choice, default="preset",
        help="Half-life (kimg) of the EMA used for validation samples and the exported pipeline, or 'none' for the raw "
        "weights. Default: the EMA of the official evaluation for official presets (B/16 2000, B/32 2000, "
        "L/16 1000, L/32 2000, H/16 1000, H/32 500), the smallest half-life otherwise.",
    )

    group = parser.add_argument_group("logging, validation, export")
    group.add_argument("--output_dir", type=str, default="pmf-model", help="Where everything is written.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument(
        "--report_to", type=str, default="tensorboard",
        help="'tensorboard' (default), 'wandb', 'all' (tensorboard, and wandb when installed) or 'none'.",
    )
    group.add_argument("--tracker_project_name", type=str, default="train_pmf", help="Tracker project name.")
    group.add_argument("--logging_steps", type=int, default=1, help="Log scalars every N steps.")
    group.add_argument(
        "--validation_steps", type=int, default=None,
        help="Sample a one-step grid (EMA weights, fixed seeds and classes) every N steps; 0 = only at the end.",
    )
    group.add_argument(
        "--validation_classes", type=int, nargs="+", default=None,
        help="Class ids of the grid rows (default: the first 10 classes; ImageNet: the official 8 sample classes).",
    )
    group.add_argument("--validation_images_per_class", type=int, default=8, help="Grid columns (seeds).")
    group.add_argument("--guidance_scale", type=float, default=None, help="ω for samples and the exported default.")
    group.add_argument(
        "--guidance_interval", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
        help="Guidance interval for samples and the exported default.",
    )
    group.add_argument(
        "--export_drop_v_head", action="store_true",
        help="Export the pipeline without the v-head (sampling needs only the u-head; like the released files).",
    )

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=None, help="Save the training state every N steps (and at the end); 0 = never.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint", type=str, default=None,
        help="'latest' (newest complete checkpoint-* in --output_dir; starts fresh when none) or a checkpoint path.",
    )
    group.add_argument(
        "--export_at_checkpoints", action="store_true",
        help="Also export the EMA pipeline into each checkpoint folder (checkpoint-STEP/pipeline).",
    )

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the exported pipeline at the end.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Target repo id (user/name).")
    group.add_argument("--hub_private", action="store_true", help="Create the repo as private.")

    group = parser.add_argument_group("debugging")
    group.add_argument(
        "--debug_dump_weights_hash", action="store_true",
        help="At the end every process writes output_dir/weights_hash_rank{r}.txt (sha256 of weights and EMAs).",
    )
    group.add_argument(
        "--debug_inject_nan_at_step", type=int, default=None,
        help="Multiply the main process's loss by NaN at this step (tests the divergence handling).",
    )

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
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        parser.error("--guidance_interval must satisfy 0 ≤ T_MIN ≤ T_MAX ≤ 1.")
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


# ------------------------------------------------------------------------------------------------------ helpers


class ObjectiveRNG:
    """The dedicated random source of the objective (times, ω, interval, class dropout, noise, perceptual crops).

    The generator is re-seeded at every micro-step from (seed, step, micro-step, process index) — the official
    `fold_in(fold_in(key, step), device)` pattern — so every process draws differently and a resumed run draws exactly
    what the uninterrupted run would have drawn, whatever the checkpoint frequency. Registered for checkpointing: a
    resume keeps the original seed even if --seed changes.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)

    def for_step(self, step: int, micro_step: int, process_index: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, step, micro_step, process_index]).generate_state(2, np.uint32)
        self.generator.manual_seed((int(words[0]) << 31) ^ int(words[1]))
        return self.generator

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


def unwrap_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (collective: every process must call it), else the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def weights_sha256(tensors) -> str:
    """Hash of the full tensors (collective under FSDP: call it on every process)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(full_tensor(tensor.detach()).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-STEP` folders with a completion marker, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if checkpoint_step(p) is not None and (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_resume_checkpoint(value: str | None, output_dir: Path) -> Path | None:
    if value is None:
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path} does not exist or is not a folder.")
    if not (path / CHECKPOINT_MARKER).is_file() or not any((path / name).exists() for name in CHECKPOINT_MODEL_FILES):
        inside = [p.name for p in complete_checkpoints(path)]
        hint = f" It contains the checkpoints {', '.join(inside)}: pass one of them." if inside else ""
        raise CheckpointError(
            f"{path} is not a train_pmf.py checkpoint (no {CHECKPOINT_MARKER} next to the accelerate state). Pass a "
            f"complete output_dir/checkpoint-STEP folder or 'latest'; interrupted saves (.tmp-checkpoint-*) are never "
            f"valid.{hint}"
        )
    return path


def _config_for_compare(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def check_checkpoint_compatible(path: Path, model_config: dict, ema_keys: list[str], lora_config: dict | None = None) -> dict:
    meta = json.loads((path / CHECKPOINT_MARKER).read_text())
    saved_lora = meta.get("lora")
    if saved_lora != lora_config:
        def describe(config):
            return "full fine-tuning (no LoRA)" if config is None else json.dumps(config)
        raise CheckpointError(
            f"Cannot resume from {path}: it was trained with {describe(saved_lora)}, this run asks for "
            f"{describe(lora_config)}. Pass the original --lora_rank / --lora_alpha / --lora_target / "
            "--train_class_embeddings / --new_label_set."
        )
    saved, current = meta.get("transformer_config", {}), _config_for_compare(model_config)
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"Cannot resume from {path}: the model differs from this run ({'; '.join(diffs)}). Use the preset and "
            f"shape flags of the original run (recorded in {path / CHECKPOINT_MARKER})."
        )
    if sorted(meta.get("ema_keys", [])) != sorted(ema_keys):
        raise CheckpointError(
            f"Cannot resume from {path}: it holds the EMAs {meta.get('ema_keys')} but this run asks for {ema_keys}. "
            "Pass the original --ema_half_lives_kimg."
        )
    return meta


def build_model_config(preset: TrainingPreset, args: argparse.Namespace, num_classes: int) -> dict:
    config = dict(preset.model)
    overrides = {
        "sample_size": args.resolution,
        "patch_size": args.patch_size,
        "num_layers": args.num_layers,
        "num_head_layers": args.num_head_layers,
        "num_attention_heads": args.num_attention_heads,
        "attention_head_dim": args.attention_head_dim,
        "mlp_hidden_dim": args.mlp_hidden_dim,
        "bottleneck_dim": args.bottleneck_dim,
    }
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["num_classes"] = num_classes
    config["with_v_head"] = True
    if config["sample_size"] % config["patch_size"]:
        raise TrainingSetupError(f"--resolution {config['sample_size']} is not a multiple of --patch_size {config['patch_size']}.")
    if config["attention_head_dim"] % 4:
        raise TrainingSetupError(f"--attention_head_dim {config['attention_head_dim']} must be a multiple of 4 (2-D RoPE).")
    return config


def build_loss_config(preset: TrainingPreset, args: argparse.Namespace, noise_scale: float | None = None) -> PMFLossConfig:
    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    if noise_scale is not None and "noise_scale" not in overrides:
        overrides["noise_scale"] = noise_scale
    if args.no_perceptual:
        overrides.update(lpips_lambda=0.0, convnext_lambda=0.0)
    try:
        return PMFLossConfig(**{**preset.loss.to_dict(), **overrides})
    except ValueError as err:
        raise TrainingSetupError(f"Invalid recipe: {err}") from None


def load_pretrained(path: str, v_head_init: str) -> tuple[PMFTransformer2DModel, dict]:
    """Load a PMFPipeline folder / Hub id for fine-tuning; add a v-head if it has none."""
    try:
        pipe = PMFPipeline.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingSetupError(f"Cannot load --pretrained_model {path} as a PMFPipeline: {err}") from None
    transformer = pipe.transformer.float()
    info = {
        "noise_scale": float(pipe.scheduler.config.noise_scale),
        "id2label": dict(pipe.id2label) if pipe.id2label else None,
        "guidance_scale": float(pipe.config.default_guidance_scale),
        "guidance_interval": tuple(pipe.config.default_guidance_interval),
        "had_v_head": bool(transformer.config.with_v_head),
    }
    if transformer.config.with_v_head:
        return transformer, info
    config = dict(transformer.config)
    config["with_v_head"] = True
    model = PMFTransformer2DModel.from_config(config)  # official initialisation everywhere (seeded)
    missing, unexpected = model.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected or any(not key.startswith(V_HEAD_PREFIXES) for key in missing):
        raise TrainingSetupError(f"--pretrained_model {path}: unexpected keys {unexpected}, missing {missing}.")
    if v_head_init == "copy":
        with torch.no_grad():
            model.v_head_blocks.load_state_dict(model.u_head_blocks.state_dict())
            model.v_norm_out.load_state_dict(model.u_norm_out.state_dict())
            model.v_proj_out.load_state_dict(model.u_proj_out.state_dict())
    return model, info


def read_new_label_set(path: str) -> dict[int, str]:
    from pmf_diffusers.lora import read_label_set

    try:
        return read_label_set(path)
    except (ValueError, OSError) as err:
        raise TrainingSetupError(f"--new_label_set: {err}") from None


def setup_lora(model: PMFTransformer2DModel, args: argparse.Namespace, label_set: dict[int, str] | None) -> dict | None:
    """Model surgery for fine-tuning, before the optimizer and `accelerator.prepare`: a new class table for
    `--new_label_set` (K + 1 rows, the pretrained null row kept, trainable), then the LoRA adapter for `--lora_rank`
    (base frozen). Returns the LoRA settings recorded in training_args.json and the checkpoints (None without LoRA)."""
    if label_set is None and args.lora_rank is None:
        return None
    from pmf_diffusers.lora import add_pmf_lora, replace_class_table, resolve_lora_targets

    if label_set is not None:
        replace_class_table(model, len(label_set), init="null", generator=torch.Generator().manual_seed(args.seed))
    if args.lora_rank is None:
        return None
    target = args.lora_target if args.lora_target is not None else "attention+mlp"
    try:
        targets = resolve_lora_targets(model, target)
        add_pmf_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=targets,
                     train_class_embeddings=args.train_class_embeddings)
    except ValueError as err:
        raise TrainingSetupError(f"--lora_target / --lora_rank: {err}") from None
    return {
        "rank": args.lora_rank,
        "alpha": float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank),
        "target": target,
        "target_modules": targets,
        "init": "gaussian",
        "train_class_embeddings": bool(model.class_embedder.weight.requires_grad),
        "new_label_set": len(label_set) if label_set is not None else None,
    }


def trainable_parameters(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    names, params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name)
            params.append(param)
    return names, params


class RemappedCollator:
    """Wraps an `ImageCollator`: dataset class i becomes model class `index[i]` (a label set's ids)."""

    def __init__(self, collator: ImageCollator, index: list[int]):
        self.collator = collator
        self.lookup = torch.tensor(index, dtype=torch.long)

    def __call__(self, rows) -> dict:
        batch = self.collator(rows)
        batch["class_labels"] = self.lookup[batch["class_labels"]]
        return batch


def dataset_label_index(args, data, label_set: dict | None, pretrained_id2label: dict | None) -> list[int] | None:
    """Model class id of each dataset class, or None for the identity (dataset class i = model class i).

    `--new_label_set`: the folder names must all be names of the label set. LoRA on the base model's classes: the
    folder names are matched to the base model's names when they all match (the adapter keeps the base names);
    otherwise dataset class i trains base class i, as in full fine-tuning."""
    from pmf_diffusers.lora import label_set_index

    if label_set is not None:
        try:
            return label_set_index(label_set, data.class_names)
        except ValueError as err:
            raise TrainingSetupError(
                f"--new_label_set {args.new_label_set}: the dataset's class names must be names of the label set. {err}"
            ) from None
    if args.lora_rank is None or not pretrained_id2label:
        return None
    if len(data.class_names) == 1000 and all(re.fullmatch(r"n\d{8}", name) for name in data.class_names):
        return None  # ImageNet folders named by synset: sorted synsets = class ids
    id2label = {int(k): str(v) for k, v in pretrained_id2label.items()}
    try:
        index = label_set_index(id2label, data.class_names)
    except ValueError:
        logger.warning(
            "The dataset's class names are not all class names of --pretrained_model: dataset class i trains base "
            "class i (a LoRA adapter keeps the base model's class names). Name the class folders after the base "
            "classes, or train your own classes with --new_label_set."
        )
        return None
    logger.info(f"Dataset classes matched to the base model's classes: {dict(zip(data.class_names, index))}")
    return index


def infer_preset_name(config: dict) -> str | None:
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    for name, preset in OFFICIAL_PRESETS.items():
        if (preset.sample_size, preset.patch_size, preset.hidden_size, preset.num_layers) == (
            config["sample_size"], config["patch_size"], hidden, config["num_layers"]
        ):
            return name
    return None


def resolve_batch_sizes(args: argparse.Namespace, preset: TrainingPreset, num_processes: int) -> tuple[int, int]:
    """(per-device micro-batch, global batch per optimizer step)."""
    accumulation = args.gradient_accumulation_steps
    divisor = num_processes * accumulation
    if args.global_batch_size is not None:
        if args.global_batch_size % divisor:
            raise TrainingSetupError(
                f"--global_batch_size {args.global_batch_size} is not divisible by the process count × gradient "
                f"accumulation = {num_processes} × {accumulation} = {divisor}. Choose a multiple of {divisor}, or pass "
                "--train_batch_size (per device) instead."
            )
        per_device = args.global_batch_size // divisor
        if args.train_batch_size is not None and args.train_batch_size != per_device:
            raise TrainingSetupError(
                f"--train_batch_size {args.train_batch_size} contradicts --global_batch_size {args.global_batch_size} "
                f"over {num_processes} process(es) × {accumulation} accumulation step(s) (= {per_device} per device)."
            )
        return per_device, args.global_batch_size
    if args.train_batch_size is not None:
        return args.train_batch_size, args.train_batch_size * divisor
    if preset.global_batch_size % divisor:
        raise TrainingSetupError(
            f"The preset's global batch {preset.global_batch_size} is not divisible by the process count × gradient "
            f"accumulation = {divisor}. Pass --global_batch_size (a multiple of {divisor}) or --train_batch_size."
        )
    return preset.global_batch_size // divisor, preset.global_batch_size


def resolve_id2label(class_names: list[str], pretrained_id2label: dict | None) -> dict[int, str]:
    if len(class_names) == 1000 and all(re.fullmatch(r"n\d{8}", name) for name in class_names):
        return load_imagenet_id2label()  # ImageNet folder named by synset: use readable names
    if pretrained_id2label and all(re.fullmatch(r"\d+", name) for name in class_names):
        return {int(k): v for k, v in pretrained_id2label.items()}
    return dict(enumerate(class_names))


def _is_repo_id(text: str | None) -> bool:
    return bool(text) and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not Path(text).exists()


def model_card_info(args, data, preset: TrainingPreset, loss_config: PMFLossConfig, resolved: dict, step: int) -> dict:
    """Training facts for the model card (`pmf_diffusers.hub.push_pipeline_to_hub(card_info=...)`); no tokens, no
    local paths in the metadata."""
    recipe = {
        "preset": preset.name,
        "training steps": step,
        "global batch": resolved["global_batch_size"],
        "learning rate": resolved["learning_rate"],
        "optimizer": f"Muon + Adam (b2 {resolved['adam_beta2']:g})",
        "EMA half-lives (kimg)": ", ".join(f"{h:g}" for h in resolved["ema_half_lives_kimg"]) or "none",
        "exported EMA (kimg)": "raw weights" if resolved["export_ema_kimg"] is None else f"{resolved['export_ema_kimg']:g}",
        "mixed precision": resolved["mixed_precision"],
    }
    recipe.update({k: v for k, v in loss_config.to_dict().items() if k not in ("min_time", "jvp_in_fp32")})
    info = {
        "dataset": args.dataset_name if args.dataset_name else f"image folder `{Path(args.train_data_dir).name}`",
        "training_steps": step,
        "recipe": recipe,
        "command": args.command_line,
    }
    if _is_repo_id(args.dataset_name):
        info["datasets"] = [args.dataset_name]
    if _is_repo_id(args.pretrained_model):
        info["base_model"] = args.pretrained_model
    return info


def full_state_dict(
    accelerator: Accelerator, model: torch.nn.Module, ema: MultiEMA | None, ema_key: str | None
) -> dict[str, torch.Tensor] | None:
    """The weights (with the EMA `ema_key` applied) as full fp32 CPU tensors on the main process, None elsewhere.
    Call on all processes: under FSDP the weights and the EMA shadows are gathered from the shards."""
    state_dict = accelerator.get_state_dict(model)
    shadows = [full_tensor(s) for s in ema[ema_key].shadow_params] if ema is not None and ema_key is not None else None
    if not accelerator.is_main_process:
        return None
    state_dict = {k: v.detach().float().cpu().clone() for k, v in state_dict.items()}
    if shadows is not None:
        names = [name for name, _ in unwrap_model(accelerator, model).named_parameters()]
        for name, shadow in zip(names, shadows):
            state_dict[name] = shadow.detach().float().cpu().clone()
    return state_dict


def export_pipeline(
    destination: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema: MultiEMA | None,
    ema_key: str | None,
    noise_scale: float,
    id2label: dict[int, str],
    guidance_scale: float,
    guidance_interval: tuple[float, float],
    drop_v_head: bool,
) -> Path | None:
    """Write the (EMA) weights as a PMFPipeline (safetensors) to `destination`, via a temporary folder + rename.

    Call on all processes (gathering sharded weights is collective); the main process writes."""
    state_dict = full_state_dict(accelerator, model, ema, ema_key)
    if not accelerator.is_main_process:
        return None
    unwrapped = unwrap_model(accelerator, model)
    config = {k: v for k, v in dict(unwrapped.config).items() if not k.startswith("_")}
    if drop_v_head:
        config["with_v_head"] = False
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(V_HEAD_PREFIXES)}
    transformer = PMFTransformer2DModel.from_config(config)
    transformer.load_state_dict(state_dict, strict=True)
    pipeline = PMFPipeline(
        transformer=transformer.eval(),
        scheduler=PMFScheduler(noise_scale=noise_scale),
        id2label=id2label,
        default_guidance_scale=guidance_scale,
        default_guidance_interval=guidance_interval,
    )
    tmp = destination.with_name(f".tmp-{destination.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(tmp, destination)
    return destination


def export_lora(
    destination: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema: MultiEMA | None,
    ema_key: str | None,
    ema_params: list[torch.nn.Parameter],
    id2label: dict[int, str] | None,
    include_v_head: bool,
    base_model_name: str | None,
    card=None,
    samples: Path | None = None,
) -> Path | None:
    """Write the LoRA adapter (`pmf_diffusers.lora.save_pmf_lora`: LoRA file, sidecar, class table when trained) with
    the EMA of the trained parameters applied, via a temporary folder + rename; optionally a model card (README.md)
    and a sample grid (samples.png). Main process only (the adapter is replicated)."""
    from pmf_diffusers.lora import pmf_base_model_info, save_pmf_lora

    if not accelerator.is_main_process:
        return None
    unwrapped = unwrap_model(accelerator, model)
    tmp = destination.with_name(f".tmp-{destination.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    base_info = pmf_base_model_info(unwrapped)
    base_info.pop("name_or_path", None)  # a local path of this machine; keep Hub ids only
    if base_model_name:
        base_info["name_or_path"] = base_model_name
    use_ema = ema is not None and ema_key is not None
    if use_ema:
        ema.store(ema_params)
        ema.copy_to(ema_params, ema_key)
    try:
        save_pmf_lora(unwrapped, tmp, base_model_info=base_info, id2label=id2label, include_v_head=include_v_head)
    finally:
        if use_ema:
            ema.restore(ema_params)
    if samples is not None and samples.is_file():
        shutil.copyfile(samples, tmp / "samples.png")
    if card is not None:
        card.save(tmp / "README.md")
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(tmp, destination)
    return destination


def adapter_model_card(args, data, preset, loss_config, resolved: dict, step: int, lora_config: dict, num_classes: int,
                       resolution: int, patch_size: int, id2label: dict, guidance_scale: float,
                       guidance_interval: tuple[float, float], sample_info: dict | None, adapter_ref: str):
    """The model card of a LoRA adapter: `pmf_diffusers.hub.render_model_card("trained", base_model=...)`, with the
    usage snippets rewritten to load the base pipeline and then the adapter."""
    from pmf_diffusers.hub import check_model_card, render_model_card

    info = model_card_info(args, data, preset, loss_config, resolved, step)
    base = args.pretrained_model
    recipe = {
        "LoRA rank": lora_config["rank"],
        "LoRA alpha": f"{lora_config['alpha']:g}",
        "LoRA targets": f"{lora_config['target']} ({', '.join(lora_config['target_modules'])})",
        "trainable parameters": f"{resolved['num_trainable_parameters']:,} of {resolved['num_parameters']:,}",
        "class table": (f"new label set of {num_classes} classes" if lora_config["new_label_set"] else
                        "trained" if lora_config["train_class_embeddings"] else "base model's (frozen)"),
        **info.pop("recipe"),
    }
    kind = "new label set" if lora_config["new_label_set"] else "the base model's classes"
    description = (
        f"A **LoRA adapter** (rank {lora_config['rank']}, {lora_config['target']}) for the pMF base model `{base}`, "
        f"trained on {kind} with `pmf-diffusers` (`examples/train_pmf.py --lora_rank`). It holds only the adapter"
        + (" and its class table (`class_embeddings.safetensors`) with the class names" if lora_config["new_label_set"]
           else " (and the retrained class table)" if lora_config["train_class_embeddings"] else "")
        + ": load the base pipeline, then `pipe.load_lora_weights(...)` (see Usage)."
    )
    example_class = 207 if num_classes >= 1000 and 207 in id2label else min(id2label) if id2label else 0
    card = render_model_card(
        "trained",
        repo_id=adapter_ref,
        title=(args.hub_model_id or "").split("/")[-1] or f"pMF LoRA adapter ({Path(args.output_dir).name})",
        description=description,
        resolution=resolution,
        patch_size=patch_size,
        num_classes=num_classes,
        example_class=example_class,
        example_label=id2label.get(example_class),
        guidance_scale=guidance_scale,
        guidance_interval=list(guidance_interval),
        noise_scale=loss_config.noise_scale,
        recipe=recipe,
        tags=["lora"],
        **(sample_info or {}),
        **info,
    )
    if card.data.base_model:
        card.data.base_model_relation = "adapter"
    lines = []
    for line in card.text.splitlines():
        match = re.fullmatch(r'(\s*)pipe = (\w+)\.from_pretrained\("' + re.escape(adapter_ref) + r'"(.*)\)', line)
        if match:
            indent, cls_name, rest = match.groups()
            lines.append(f'{indent}pipe = {cls_name}.from_pretrained("{base}"{rest})  # the base model')
            lines.append(f'{indent}pipe.load_lora_weights("{adapter_ref}")  # this adapter')
        else:
            lines.append(line)
    text = "\n".join(lines).replace(
        "The defaults stored in `model_index.json`, so `pipe(class_labels=...)` uses them.",
        "The settings of the samples (the base pipeline's `model_index.json` holds its own defaults; pass "
        "`guidance_scale=` / `guidance_interval=` to use these).",
    )
    if not card.data.base_model:  # a local base folder: the template would say "trained from scratch"
        text = text.replace("none (trained from scratch)", f"`{base}`").replace(
            "trained from scratch", f"adapted from `{base}` (LoRA)")
    card.text = text + "\n"
    check_model_card(card)
    return card


def push_adapter_to_hub(folder: Path, repo_id: str, private: bool, commit_message: str, token: str | None = None):
    """Upload an adapter folder as it is (README.md included) with `huggingface_hub.upload_folder`, using the
    conventions of `pmf_diffusers.hub.push_pipeline_to_hub`: repo-id check, token from huggingface_hub's usual sources
    (never printed), `HF_ENDPOINT` read at call time, offline mode refused, a token found in a file refuses the push,
    Hub errors reported as one-line `HubPushError`s. (`push_pipeline_to_hub` stages a full pipeline, hence this.)"""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from pmf_diffusers.hub import HubPushError, check_repo_id, resolve_token

    repo_id = check_repo_id(repo_id)
    if huggingface_hub.constants.is_offline_mode():
        raise HubPushError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push")
    token = resolve_token(token)
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    needle = token.encode()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if needle in path.read_bytes():
            raise HubPushError(f"refusing to upload: the access token appears in {path.name}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except HfHubHTTPError as error:
        raise HubPushError(f"the Hub refused the push to {repo_id}: {str(error).strip().splitlines()[0]}") from error
    logger.info(f"Pushed the adapter to {repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit


@torch.no_grad()
def log_validation(
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema: MultiEMA | None,
    ema_key: str | None,
    noise_scale: float,
    classes: list[int],
    per_class: int,
    guidance_scale: float,
    guidance_interval: tuple[float, float],
    seed: int,
    output_dir: Path,
    step: int,
    ema_params: list[torch.nn.Parameter] | None = None,
) -> Path:
    """One-step samples with the EMA weights: rows = classes, columns = fixed seeds. Main process only.
    `ema_params`: the parameters the EMA tracks (default: all of them; with LoRA: the trained ones)."""
    unwrapped = unwrap_model(accelerator, model)
    params = list(unwrapped.parameters()) if ema_params is None else list(ema_params)
    if ema is not None and ema_key is not None:
        ema.store(params)
        ema.copy_to(params, ema_key)
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        pipeline = PMFPipeline(unwrapped, PMFScheduler(noise_scale=noise_scale))
        pipeline.set_progress_bar_config(disable=True)
        labels = [c for c in classes for _ in range(per_class)]
        generators = [
            torch.Generator(device=accelerator.device).manual_seed(seed + j) for _ in classes for j in range(per_class)
        ]
        with accelerator.autocast():
            images = pipeline(
                class_labels=labels,
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                generator=generators,
                output_type="pt",
            ).images
    finally:
        unwrapped.train(was_training)
        if ema is not None and ema_key is not None:
            ema.restore(params)
    images = images.float().cpu()
    path = save_image_grid(images, output_dir / "samples" / f"step_{step:07d}.png", nrow=per_class,
                           value_range=(0.0, 1.0), scale=max(1, 64 // images.shape[-1]))
    # Trackers get the saved grid (rows = classes), not loose images that they would re-tile their own way.
    grid = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": grid[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step)
    return path


# ---------------------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    output_dir = Path(args.output_dir)
    if args.preset is None and args.pretrained_model is None:
        raise TrainingSetupError(f"Pass --preset (one of: {', '.join(TRAINING_PRESETS)}) or --pretrained_model.")
    try:
        preset = get_training_preset(args.preset) if args.preset is not None else None
    except ValueError as err:
        raise TrainingSetupError(str(err)) from None
    if args.pretrained_model is not None and any(getattr(args, name) is not None for name in SHAPE_FLAGS):
        raise TrainingSetupError("With --pretrained_model the model shape comes from the checkpoint: drop the shape flags.")

    report_to = None if args.report_to in (None, "none", "") else args.report_to
    if report_to == "wandb" and not is_wandb_available():
        raise TrainingSetupError("--report_to wandb needs `pip install wandb` (then `wandb login` or WANDB_MODE=offline).")
    if report_to == "all":
        # accelerate's "all" would also start any other tracker it finds installed (mlflow, comet_ml, ...).
        report_to = ["tensorboard", "wandb"] if is_wandb_available() else ["tensorboard"]
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project_config,
    )
    try:
        return _train(args, accelerator, preset, output_dir)
    finally:
        accelerator.end_training()


def _train(args, accelerator: Accelerator, preset: TrainingPreset | None, output_dir: Path) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise TrainingSetupError(
            f"{accelerator.distributed_type} is not supported: the Muon optimizer, the EMA and pmf_loss's no-grad JVP "
            "pass work with plain or FSDP2-sharded (DTensor) weights. Use DDP (`accelerate launch --multi_gpu`) or "
            "FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`, docs/training.md)."
        )
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and not accelerator.is_fsdp2:
        raise TrainingSetupError("FSDP1 is not supported: launch with --fsdp_version 2 (or fsdp_version: 2 in the "
                                 "accelerate config).")
    if sharded and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
        raise TrainingSetupError("FSDP cpu_ram_efficient_loading (on by default in `accelerate launch`) only works for "
                                 "🤗 Transformers models: pass --fsdp_cpu_ram_efficient_loading false.")
    if sharded and args.lora_rank is not None:
        raise TrainingSetupError("--lora_rank is not supported with FSDP (the adapter is small): use DDP "
                                 "(`accelerate launch --multi_gpu`).")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank, world = accelerator.process_index, accelerator.num_processes

    if preset is not None:  # cheap checks first
        resolve_batch_sizes(args, preset, world)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"No complete checkpoint in {output_dir}: starting a new training run.")
    label_set = read_new_label_set(args.new_label_set) if args.new_label_set is not None else None

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".tmp-checkpoint-*"):
            logger.warning(f"Removing {stale}: an interrupted checkpoint save (never renamed, so never used).")
            shutil.rmtree(stale, ignore_errors=True)
    set_seed(args.seed)

    # ---- model: from a preset or a pretrained pipeline -----------------------------------------------------------
    pretrained_info = None
    if args.pretrained_model is not None:
        model, pretrained_info = load_pretrained(args.pretrained_model, args.v_head_init)
        if preset is None:
            name = infer_preset_name(dict(model.config))
            if name is None:
                raise TrainingSetupError(
                    f"--pretrained_model {args.pretrained_model} matches no official size: pass --preset to choose the recipe."
                )
            preset = get_training_preset(name)
            logger.info(f"Using the {name} recipe for the pretrained model.")
    lora_config = setup_lora(model, args, label_set) if pretrained_info is not None else None
    loss_config = build_loss_config(preset, args, pretrained_info["noise_scale"] if pretrained_info else None)
    per_device_batch, global_batch = resolve_batch_sizes(args, preset, world)

    # ---- perceptual networks first: a missing download fails before any data or model work --------------------
    perceptual = None
    if loss_config.lpips_lambda > 0 or loss_config.convnext_lambda > 0:
        from pmf_diffusers.training.perceptual import PerceptualLoss, PerceptualWeightsNotFoundError

        try:
            with accelerator.main_process_first():  # one download, then the other processes read the cache
                perceptual = PerceptualLoss.from_pretrained(
                    lpips=loss_config.lpips_lambda > 0,
                    convnext=loss_config.convnext_lambda > 0,
                    vgg_path=args.vgg_path,
                    lpips_weights_path=args.lpips_weights_path,
                    convnext_path=args.convnext_path,
                )
        except PerceptualWeightsNotFoundError as err:
            raise PerceptualWeightsNotFoundError(
                f"{err}\nTo train without the perceptual losses pass --no_perceptual (or --lpips_lambda 0 "
                "--convnext_lambda 0)."
            ) from None
        perceptual = perceptual.to(accelerator.device).eval().requires_grad_(False)  # never prepared / checkpointed

    # ---- data -----------------------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        data = load_training_dataset(
            train_data_dir=args.train_data_dir,
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            split=args.dataset_split,
            image_column=args.image_column,
            label_column=args.label_column,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
            num_classes=args.num_classes,
            max_train_samples=args.max_train_samples,
            seed=args.seed,
        )
    label_index = None  # model class id of each dataset class (None: the identity)
    if pretrained_info is None:
        model_config = build_model_config(preset, args, data.num_classes)
        model = PMFTransformer2DModel(**model_config)
    else:
        label_index = dataset_label_index(args, data, label_set, pretrained_info["id2label"])
    if label_index is not None:
        logger.info(f"Dataset classes → model classes: {len(set(label_index))} of {model.config.num_classes} classes.")
    elif pretrained_info is not None:
        if data.num_classes > model.config.num_classes:
            raise TrainingSetupError(
                f"The dataset has {data.num_classes} classes but --pretrained_model has {model.config.num_classes}."
            )
        if data.num_classes < model.config.num_classes:
            logger.warning(
                f"The dataset has {data.num_classes} classes, the pretrained model {model.config.num_classes}: labels "
                f"0..{data.num_classes - 1} reuse the first class embeddings."
            )
    model_config = _config_for_compare(model.config)
    resolution = model.config.sample_size
    num_classes = model.config.num_classes
    if label_set is not None:
        id2label = dict(label_set)
    elif label_index is not None:  # LoRA on the base model's classes, matched by name: the base names
        id2label = {int(k): v for k, v in pretrained_info["id2label"].items()}
    else:
        id2label = resolve_id2label(data.class_names, pretrained_info["id2label"] if pretrained_info else None)
    if len(id2label) < num_classes:
        id2label = {**{i: str(i) for i in range(num_classes)}, **id2label}
    adapter_id2label = dict(label_set) if label_set is not None else None  # names saved with a LoRA adapter
    base_model_name = args.pretrained_model if _is_repo_id(args.pretrained_model) else None  # Hub ids only
    guidance_scale = args.guidance_scale if args.guidance_scale is not None else (
        pretrained_info["guidance_scale"] if pretrained_info else preset.guidance_scale
    )
    guidance_interval = tuple(args.guidance_interval) if args.guidance_interval is not None else tuple(
        pretrained_info["guidance_interval"] if pretrained_info else preset.guidance_interval
    )

    collator = ImageCollator(
        resolution, data.image_column, data.label_column, data.label_to_id, args.allow_upscale,
        num_classes=num_classes if label_index is None else data.num_classes,
    )
    if label_index is not None:
        collator = RemappedCollator(collator, label_index)
    # Fail fast (before the model is prepared) on an unusable first image, e.g. one that is too small.
    first = next(iter(data.dataset)) if data.streaming else data.dataset[0]
    try:
        preprocess_image(first[data.image_column], resolution, args.allow_upscale)
    except OSError:
        pass  # a corrupt image is skipped during training, not fatal

    if data.streaming:
        from datasets.distributed import split_dataset_by_node

        stream = data.dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        stream = split_dataset_by_node(stream, rank=rank, world_size=world)  # accelerate must not shard this again
        train_dataloader = None
    else:
        if data.num_examples < global_batch // args.gradient_accumulation_steps:
            raise DatasetError(
                f"The dataset has {data.num_examples} images, fewer than one batch over all processes "
                f"({global_batch // args.gradient_accumulation_steps}). Lower the batch size or add data."
            )
        sampler = EpochShuffleSampler(data.num_examples, seed=args.seed)
        train_dataloader = torch.utils.data.DataLoader(
            data.dataset,
            sampler=sampler,
            batch_size=per_device_batch,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            drop_last=True,
            persistent_workers=args.dataloader_num_workers > 0,
        )

    # ---- optimisation ---------------------------------------------------------------------------------------------
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    learning_rate = args.learning_rate if args.learning_rate is not None else preset.learning_rate
    adam_beta2 = args.adam_beta2 if args.adam_beta2 is not None else preset.adam_beta2
    optimizer = Muon(
        muon_param_groups(model, lr=learning_rate),
        lr=learning_rate,
        momentum=args.muon_momentum,
        adam_betas=(args.adam_beta1, adam_beta2),
        weight_decay=args.weight_decay,
    )

    if args.max_train_steps is not None:
        max_train_steps = args.max_train_steps
    elif args.num_train_epochs is None and preset.max_train_steps is not None:
        max_train_steps = preset.max_train_steps
    elif data.streaming:
        raise TrainingSetupError("With --streaming the epoch length is unknown: pass --max_train_steps.")
    else:
        epochs = args.num_train_epochs or preset.num_train_epochs
        batches_per_epoch = math.ceil((data.num_examples // per_device_batch) / world)
        max_train_steps = epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=max_train_steps * world,
    )

    if train_dataloader is not None:
        model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler
        )
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        if len(train_dataloader) == 0:
            raise DatasetError("The dataloader is empty: fewer images than one batch per process.")
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        updates_per_epoch = None
    unwrapped = unwrap_model(accelerator, model)

    # The EMA tracks what is trained: every parameter in full training, the adapter (+ class table) with LoRA.
    if lora_config is not None:
        _, ema_params = trainable_parameters(unwrapped)
    else:
        ema_params = list(unwrapped.parameters())
    num_trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    half_lives = list(args.ema_half_lives_kimg) if args.ema_half_lives_kimg is not None else list(preset.ema_half_lives_kimg)
    ema = None
    if half_lives:
        ema = MultiEMA(
            ema_params,
            half_lives_kimg=half_lives,
            ref_batch=args.ema_ref_batch if args.ema_ref_batch is not None else preset.ema_ref_batch,
        )
    if args.export_ema == "preset":
        export_hl = preset.export_ema_kimg if preset.official else (min(half_lives) if half_lives else None)
        if export_hl is not None and MultiEMA.key_for(export_hl) not in (ema.keys() if ema else ()):
            export_hl = min(half_lives) if half_lives else None
    else:
        export_hl = args.export_ema
    ema_key = MultiEMA.key_for(export_hl) if export_hl is not None else None
    if ema_key is not None and (ema is None or ema_key not in ema.keys()):
        raise TrainingSetupError(f"--export_ema {export_hl:g} is not one of the EMA half-lives {half_lives}.")

    objective_rng = ObjectiveRNG(args.seed, accelerator.device)
    accelerator.register_for_checkpointing(objective_rng)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    ema_keys = list(ema.keys()) if ema is not None else []

    # ---- resume ---------------------------------------------------------------------------------------------------
    global_step = 0
    data_state = {"epoch": 0, "batches_in_epoch": 0}
    if resume_path is not None:
        meta = check_checkpoint_compatible(resume_path, model_config, ema_keys, lora_config)
        if meta.get("seed") not in (None, args.seed):
            logger.warning(f"{resume_path} was trained with --seed {meta['seed']}, this run has --seed {args.seed}: the "
                           "objective draws keep the checkpoint's seed, the data order follows --seed.")
        if meta.get("num_processes") not in (None, world):
            logger.warning(f"{resume_path} was written by {meta['num_processes']} process(es), this run has {world}: "
                           "the data order and objective draws will differ from an uninterrupted run.")
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = int(meta["global_step"])
        state_file = resume_path / f"data_state_rank{rank}.json"
        if state_file.is_file():
            data_state = json.loads(state_file.read_text())
    if updates_per_epoch is not None:  # map-style: the data position is a function of the step
        data_state = {
            "epoch": global_step // updates_per_epoch,
            "batches_in_epoch": min(
                (global_step % updates_per_epoch) * args.gradient_accumulation_steps, len(train_dataloader)
            ),
        }

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    resolved = {
        "preset": preset.name,
        "per_device_batch_size": per_device_batch,
        "global_batch_size": global_batch,
        "num_processes": world,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "max_train_steps": max_train_steps,
        "learning_rate": learning_rate,
        "adam_beta2": adam_beta2,
        "ema_half_lives_kimg": half_lives,
        "export_ema_kimg": export_hl,
        "loss_config": loss_config.to_dict(),
        "transformer_config": model_config,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "num_trainable_parameters": num_trainable,
        "lora": lora_config,
        "new_label_set": {"file": args.new_label_set, "num_classes": len(label_set)} if label_set is not None else None,
        "dataset": data.source,
        "num_examples": data.num_examples,
        "class_names": data.class_names,
        "guidance_scale": guidance_scale,
        "guidance_interval": list(guidance_interval),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "datasets": datasets.__version__},
    }
    safe_args = {k: v for k, v in vars(args).items() if "token" not in k.lower()}
    training_args = {"args": safe_args, "command": args.command_line, "resolved": resolved}
    if accelerator.is_main_process:
        (output_dir / "training_args.json").write_text(json.dumps(training_args, indent=2, default=str) + "\n")
        tracker_config = {k: v for k, v in {**safe_args, **resolved, **loss_config.to_dict()}.items()
                          if isinstance(v, (int, float, str, bool))}
        # The wandb run folder goes next to the tensorboard logs unless WANDB_DIR says otherwise.
        wandb_dir = os.environ.get("WANDB_DIR", str(output_dir / args.logging_dir))
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config,
                                  init_kwargs={"wandb": {"dir": wandb_dir}})
    metrics_file = output_dir / args.logging_dir / "metrics.jsonl"

    validation_steps = args.validation_steps if args.validation_steps is not None else preset.validation_steps
    checkpointing_steps = args.checkpointing_steps if args.checkpointing_steps is not None else preset.checkpointing_steps
    if args.validation_classes is not None:
        bad = [c for c in args.validation_classes if not 0 <= c < num_classes]
        if bad:
            raise TrainingSetupError(f"--validation_classes {bad} outside [0, {num_classes}).")
        validation_classes = list(args.validation_classes)
    elif label_index is not None:  # the classes of the data
        validation_classes = sorted(set(label_index))[:10]
    elif num_classes == 1000:
        validation_classes = OFFICIAL_SAMPLE_CLASSES
    else:
        validation_classes = list(range(min(num_classes, 10)))

    logger.info("***** Running training *****")
    logger.info(f"  Preset = {preset.name}; parameters = {resolved['num_parameters'] / 1e6:.2f}M; recipe = {loss_config}")
    logger.info(f"  Examples = {data.num_examples if data.num_examples is not None else 'streaming'}; classes = {num_classes}")
    logger.info(f"  Batch: {per_device_batch} per device × {world} process(es) × {args.gradient_accumulation_steps} "
                f"accumulation = {global_batch} per step; steps = {max_train_steps}; start step = {global_step}")
    logger.info(f"  Trainable parameters = {num_trainable:,} of {resolved['num_parameters']:,} "
                f"({100 * num_trainable / max(resolved['num_parameters'], 1):.2f}%); EMA over {len(ema_params)} tensors")
    if lora_config is not None:
        logger.info(f"  LoRA: rank {lora_config['rank']}, alpha {lora_config['alpha']:g} (scale "
                    f"{lora_config['alpha'] / lora_config['rank']:g}), target {lora_config['target']} = "
                    f"{lora_config['target_modules']}, class table "
                    f"{'new label set' if label_set is not None else 'trained' if lora_config['train_class_embeddings'] else 'frozen'}")
    if label_set is not None:
        logger.info(f"  New label set ({len(label_set)} classes) from {args.new_label_set}: {list(label_set.values())[:10]}")

    last_checkpoint = [resume_path]

    def save_checkpoint(step: int) -> Path:
        # Refuse to save diverged weights (e.g. an inf gradient that left a finite loss).
        local = [p.to_local() if isinstance(p, DTensor) else p for p in unwrapped.parameters()]  # FSDP: own shard
        finite = torch.tensor(float(all(torch.isfinite(p).all() for p in local)), device=accelerator.device)
        if accelerator.reduce(finite, "sum").item() < world:
            raise NonFiniteLossError(
                f"Non-finite weights after step {step}: not saving a checkpoint. Last good checkpoint: "
                f"{last_checkpoint[0] or 'none'}."
            )
        final = output_dir / f"checkpoint-{step}"
        tmp = output_dir / f".tmp-checkpoint-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        (tmp / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))
        if args.export_at_checkpoints and lora_config is not None:
            export_lora(tmp / "lora", accelerator, model, ema, ema_key, ema_params, adapter_id2label,
                        not args.export_drop_v_head, base_model_name)
        elif args.export_at_checkpoints:
            export_pipeline(tmp / "pipeline", accelerator, model, ema, ema_key, loss_config.noise_scale, id2label,
                            guidance_scale, guidance_interval, args.export_drop_v_head)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {
                "global_step": step,
                "transformer_config": model_config,
                "ema_keys": ema_keys,
                "lora": lora_config,
                "num_processes": world,
                "seed": args.seed,
                "preset": preset.name,
                "loss_config": loss_config.to_dict(),
                "command": args.command_line,
            }
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(meta, indent=2, default=str) + "\n")  # written last
            if final.exists():
                (final / CHECKPOINT_MARKER).unlink(missing_ok=True)
                shutil.rmtree(final)
            os.replace(tmp, final)
            if args.checkpoints_total_limit is not None:
                for old in complete_checkpoints(output_dir)[: -max(args.checkpoints_total_limit, 1)]:
                    logger.info(f"Removing old checkpoint {old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                    (old / CHECKPOINT_MARKER).unlink(missing_ok=True)  # first: a half-deleted folder is never "complete"
                    shutil.rmtree(old, ignore_errors=True)
            logger.info(f"Saved {final}")
        accelerator.wait_for_everyone()
        last_checkpoint[0] = final
        return final

    def run_validation(step: int) -> Path | None:
        path = None
        sampler, sampler_ema = model, ema
        if sharded:  # sample with a gathered copy on the main process (an FSDP forward would need every process)
            state_dict = full_state_dict(accelerator, model, ema, ema_key)
            if accelerator.is_main_process:
                sampler, sampler_ema = PMFTransformer2DModel.from_config(unwrapped.config), None
                sampler.load_state_dict(state_dict, strict=True)
                sampler.to(accelerator.device)
        if accelerator.is_main_process:
            path = log_validation(accelerator, sampler, sampler_ema, ema_key, loss_config.noise_scale,
                                  validation_classes, args.validation_images_per_class, guidance_scale,
                                  guidance_interval, args.seed, output_dir, step,
                                  ema_params=ema_params if sampler is model else None)
        accelerator.wait_for_everyone()
        return path

    def batches():
        """Yield (batch, epoch) forever (map-style: until the caller stops), tracking `data_state` for exact resumes."""
        while True:
            epoch, skip = data_state["epoch"], data_state["batches_in_epoch"]
            if data.streaming:
                source = stream.skip(skip * per_device_batch) if skip else stream
                source.set_epoch(epoch)  # the shuffle buffer's seed is seed + epoch
                loader = torch.utils.data.DataLoader(
                    source, batch_size=per_device_batch, collate_fn=collator, num_workers=args.dataloader_num_workers,
                    drop_last=True,
                )
            else:
                train_dataloader.set_epoch(epoch)  # sets the sampler's epoch (accelerate re-applies it on __iter__)
                loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            yielded = 0
            for batch in loader:
                yielded += 1
                data_state["batches_in_epoch"] += 1
                yield batch, epoch
            if yielded == 0 and skip == 0:
                raise DatasetError(f"No batch of {per_device_batch} images could be read from {data.source}.")
            data_state["epoch"], data_state["batches_in_epoch"] = epoch + 1, 0

    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    history: collections.deque = collections.deque(maxlen=10_000)  # recent steps, returned to callers (tests)
    corrupt_seen: dict[str, int] = {}
    corrupt_total = 0
    step_start = train_start = time.perf_counter()
    images_this_step = 0.0
    micro_step = 0
    last_validation = None
    last_validation_grid = None

    if global_step >= max_train_steps:
        logger.info(f"Already at step {global_step} ≥ {max_train_steps}: nothing to train.")
    else:
        for batch, epoch in batches():
            for path, reason in batch["corrupt"]:
                if path not in corrupt_seen:
                    logger.warning(f"Skipping unreadable image {path}: {reason}", main_process_only=False)
                corrupt_seen[path] = corrupt_seen.get(path, 0) + 1
            images, labels = batch["pixel_values"], batch["class_labels"]
            if images.shape[0] == 0:
                raise DatasetError(f"Every image of a batch was unreadable ({[p for p, _ in batch['corrupt']]}).")
            images, labels = images.to(accelerator.device, non_blocking=True), labels.to(accelerator.device)

            with accelerator.accumulate(model):
                generator = objective_rng.for_step(global_step, micro_step, rank)
                with accelerator.autocast():
                    out = pmf_loss(model, images, labels, loss_config, generator=generator, perceptual=perceptual)
                loss = out.loss
                if args.debug_inject_nan_at_step == global_step + 1 and accelerator.is_main_process:
                    loss = loss * float("nan")
                stats = torch.stack([
                    loss.detach().float(), out.loss_u.float(), out.loss_v.float(), out.loss_lpips.float(),
                    out.loss_convnext.float(),
                    (~torch.isfinite(loss.detach())).float(),
                    torch.tensor(float(images.shape[0]), device=accelerator.device),
                    torch.tensor(float(len(batch["corrupt"])), device=accelerator.device),
                ])
                stats = accelerator.reduce(stats, "sum")
                if stats[5].item() > 0:
                    raise NonFiniteLossError(
                        f"Non-finite loss ({stats[0].item()}) at step {global_step + 1} (epoch {epoch}) on "
                        f"{int(stats[5].item())} process(es). Training stopped; no checkpoint was written after the "
                        f"divergence. Last good checkpoint: {last_checkpoint[0] or 'none (none saved yet)'}. Resume "
                        "from it with a lower --learning_rate, more warmup (--lr_warmup_steps), or --mixed_precision no."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            images_this_step += stats[6].item()
            corrupt_total += int(stats[7].item())

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            micro_step = 0
            if ema is not None:
                ema.step(ema_params, global_step=global_step)
            now = time.perf_counter()
            img_per_sec = images_this_step / max(now - step_start, 1e-9)
            step_start, images_this_step = now, 0.0
            values = stats[:5] / world
            logs = {
                "loss": values[0].item(), "loss_u": values[1].item(), "loss_v": values[2].item(),
                "loss_lpips": values[3].item(), "loss_convnext": values[4].item(),
                "lr": lr_scheduler.get_last_lr()[0], "img_per_sec": img_per_sec, "epoch": epoch,
                "corrupt_images": corrupt_total,
            }
            history.append({"step": global_step, **logs})
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{logs['loss']:.3f}", loss_u=f"{logs['loss_u']:.4f}", img_s=f"{img_per_sec:.0f}")
            if global_step % args.logging_steps == 0:
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    metrics_file.parent.mkdir(parents=True, exist_ok=True)
                    with metrics_file.open("a") as handle:
                        handle.write(json.dumps({"step": global_step, **logs}) + "\n")

            if validation_steps and global_step % validation_steps == 0:
                last_validation_grid = run_validation(global_step)
                last_validation = global_step
            if checkpointing_steps and global_step % checkpointing_steps == 0:
                save_checkpoint(global_step)
            if global_step >= max_train_steps:
                break
            if args.max_train_minutes is not None:
                over = torch.tensor(float(time.perf_counter() - train_start > 60 * args.max_train_minutes),
                                    device=accelerator.device)
                if accelerator.reduce(over, "sum").item() > 0:  # every process stops at the same step
                    logger.info(f"--max_train_minutes {args.max_train_minutes} reached at step {global_step}.")
                    break
    progress_bar.close()

    # ---- end: final checkpoint (so a time-boxed or shortened run can be continued), samples, export, hub ----------
    if checkpointing_steps and global_step > 0 and global_step % checkpointing_steps and (
        last_checkpoint[0] is None or checkpoint_step(last_checkpoint[0]) != global_step
    ):
        save_checkpoint(global_step)
    if last_validation != global_step:
        last_validation_grid = run_validation(global_step)
    pipeline_dir = lora_dir = None
    if lora_config is None:
        pipeline_dir = export_pipeline(output_dir / "pipeline", accelerator, model, ema, ema_key,
                                       loss_config.noise_scale, id2label, guidance_scale, guidance_interval,
                                       args.export_drop_v_head)
    else:
        card = None
        if accelerator.is_main_process:
            sample_info = None
            if last_validation_grid is not None:
                per_class = args.validation_images_per_class
                sample_info = {
                    "sample_grid": "samples.png",
                    "sample_labels": ", ".join(f"{id2label.get(c, c)} ({c})" for c in validation_classes),
                    "sample_seeds": f"{args.seed}…{args.seed + per_class - 1} (one row per class, column j uses seed "
                                    f"{args.seed} + j)",
                }
            card = adapter_model_card(
                args, data, preset, loss_config, resolved, global_step, lora_config, num_classes, resolution,
                model_config["patch_size"], id2label,
                guidance_scale, guidance_interval, sample_info, args.hub_model_id or str(output_dir / "lora"),
            )
        lora_dir = export_lora(output_dir / "lora", accelerator, model, ema, ema_key, ema_params, adapter_id2label,
                               not args.export_drop_v_head, base_model_name, card=card, samples=last_validation_grid)
    if corrupt_seen:
        logger.warning(f"Skipped {sum(corrupt_seen.values())} unreadable image read(s) ({len(corrupt_seen)} distinct "
                       f"file(s)) on process {rank}: {sorted(corrupt_seen)[:10]}", main_process_only=False)
    if args.debug_dump_weights_hash:
        lines = [f"model {weights_sha256(unwrapped.parameters())}"]
        if ema is not None:
            lines += [f"{key} {weights_sha256(ema[key].shadow_params)}" for key in ema.keys()]
        (output_dir / f"weights_hash_rank{rank}.txt").write_text("\n".join(lines) + "\n")
    if accelerator.is_main_process and args.push_to_hub and lora_config is not None:
        push_adapter_to_hub(lora_dir, args.hub_model_id, private=args.hub_private,
                            commit_message=f"pMF LoRA training: step {global_step}")
    elif accelerator.is_main_process and args.push_to_hub:
        from pmf_diffusers.hub import push_pipeline_to_hub  # imported lazily: only needed here

        push_pipeline_to_hub(
            str(pipeline_dir),
            args.hub_model_id,
            private=args.hub_private,
            token=None,  # huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); never passed on the CLI
            commit_message=f"pMF training: step {global_step}",
            card_kind="trained",
            card_info=model_card_info(args, data, preset, loss_config, resolved, global_step),
        )
    accelerator.wait_for_everyone()
    if lora_config is None:
        logger.info(f"Done at step {global_step}; pipeline in {output_dir / 'pipeline'}")
    else:
        logger.info(f"Done at step {global_step}; LoRA adapter in {output_dir / 'lora'} (load it with "
                    "PMFPipeline.from_pretrained(<base>).load_lora_weights(<adapter>))")
    return {
        "global_step": global_step,
        "history": list(history),
        "pipeline_dir": output_dir / "pipeline" if lora_config is None else None,
        "lora_dir": output_dir / "lora" if lora_config is not None else None,
        "last_checkpoint": last_checkpoint[0],
        "corrupt_images": dict(corrupt_seen),
        "corrupt_total": corrupt_total,
        "model": unwrapped,
        "ema": ema,
    }


def cli(argv: list[str] | None = None) -> int:
    from pmf_diffusers.training.perceptual import PerceptualWeightsNotFoundError

    args = parse_args(argv)
    try:
        main(args)
    except (TrainingSetupError, DatasetError, PerceptualWeightsNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
