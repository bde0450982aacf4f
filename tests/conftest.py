"""Shared fixtures: the official tiny reference models (tinyA / tinyB) converted to pmf-diffusers pipelines.

The reference oracles live in `shared/reference/` next to the repository root (see its README.md). They are produced
by the official pMF code and must never be modified; tests compare against them with fixed tolerances.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# CI runs on a fresh clone with `shared/` as a sibling of the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"

needs_reference = pytest.mark.skipif(
    not (REFERENCE_DIR / "tinyA_state_dict.safetensors").is_file(),
    reason=f"official reference data not found at {REFERENCE_DIR}",
)

# noise_scale under which the official generator ran each tiny model (README: tinyA as pmfDiT_B_16, tinyB as B_32).
NOISE_SCALE = {"tinyA": 1.0, "tinyB": 2.0}
GENERATE_SETTINGS = [  # (key, steps, ω, (t_min, t_max)), from tiny_torch_meta.json
    ("sample_s1_w7.5_i0.1-0.8", 1, 7.5, (0.1, 0.8)),
    ("sample_s2_w7.5_i0.1-0.8", 2, 7.5, (0.1, 0.8)),
    ("sample_s2_w1.0_i0.0-1.0", 2, 1.0, (0.0, 1.0)),
    ("sample_s4_w3.0_i0.2-0.6", 4, 3.0, (0.2, 0.6)),
]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e| (relative to the tensor's scale; robust to entries near zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def load_reference(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REFERENCE_DIR / f"{name}.safetensors"))


_CACHE: dict[str, object] = {}


def _cached(key, factory):
    if key not in _CACHE:
        _CACHE[key] = factory()
    return _CACHE[key]


def official_state_dict(name: str, prefix: str = "", v_head: bool = True) -> dict[str, torch.Tensor]:
    """A tiny model's official (torch-branch) state dict; `prefix="net."` gives the released `.pt` layout, `v_head=False`
    the eval-mode key set (no `v_heads.*` / `v_final_layer.*`)."""
    state_dict = _cached(f"{name}_sd", lambda: load_reference(f"{name}_state_dict"))
    return {
        prefix + key: value.clone()
        for key, value in state_dict.items()
        if v_head or not key.startswith(("v_heads.", "v_final_layer."))
    }


def converted(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from pmf_diffusers.conversion import convert_official_state_dict

    config, state_dict = _cached(f"{name}_conv", lambda: convert_official_state_dict(official_state_dict(name)))
    return dict(config), {key: value.clone() for key, value in state_dict.items()}


def make_pipeline(name: str, with_v_head: bool = True, **kwargs):
    """A fresh pipeline around the tiny reference weights (own tensors, so tests may mutate it)."""
    from pmf_diffusers.conversion import build_pipeline

    config, state_dict = converted(name)
    if not with_v_head:
        config["with_v_head"] = False
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("v_head_blocks.", "v_norm_out.", "v_proj_out."))}
    kwargs.setdefault("noise_scale", NOISE_SCALE[name])
    pipe = build_pipeline(config, state_dict, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True, scope="session")
def diffusers_logs_reach_caplog():
    """pmf_diffusers loggers hang under diffusers' library logger, which does not propagate by default; pytest's
    caplog listens on the root logger."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    yield
    diffusers_logging.disable_propagation()


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one intra-op thread (restored afterwards).

    The tiny reference models do ~1e5-FLOP matmuls; with several OpenMP threads on a loaded 2-core CI machine each call
    spends milliseconds spin-waiting (measured: 1.5 s vs 0.02 s for a 2-step tinyA sample). The official oracles
    were also produced with one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture
def tiny_pipeline():
    """tinyA (10 classes, 32×32, patch 8) converted from the official state dict, noise_scale 1.0."""
    if not (REFERENCE_DIR / "tinyA_state_dict.safetensors").is_file():
        pytest.skip(f"official reference data not found at {REFERENCE_DIR}")
    return make_pipeline("tinyA")


@pytest.fixture
def tiny_b_pipeline():
    """tinyB (7 classes, 64×64, patch 16, non-default token counts) with noise_scale 2.0."""
    if not (REFERENCE_DIR / "tinyB_state_dict.safetensors").is_file():
        pytest.skip(f"official reference data not found at {REFERENCE_DIR}")
    return make_pipeline("tinyB")


@pytest.fixture
def imagenet_pipeline():
    """A tiny random 1000-class model with the ImageNet `id2label` (for class-name handling; no reference data)."""
    from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel, load_imagenet_id2label

    torch.manual_seed(0)
    transformer = PMFTransformer2DModel(
        sample_size=16, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=8,
        mlp_hidden_dim=32, bottleneck_dim=8, num_classes=1000, frequency_embedding_dim=16, with_v_head=False,
    ).eval()
    pipe = PMFPipeline(transformer, PMFScheduler(), id2label=load_imagenet_id2label())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """tinyA saved like a released `.pt`: flat state dict, `net.` prefix, eval-mode keys, torch.save."""
    if not (REFERENCE_DIR / "tinyA_state_dict.safetensors").is_file():
        pytest.skip(f"official reference data not found at {REFERENCE_DIR}")
    path = tmp_path / "tinyA.pt"
    torch.save(official_state_dict("tinyA", prefix="net.", v_head=False), path)
    return path


@pytest.fixture
def tiny_preset():
    """An OfficialPreset describing the tinyA shape (for `check_preset`, `load_official`, the CLI)."""
    from pmf_diffusers.conversion import OfficialPreset

    return OfficialPreset(
        name="tiny/A", filename="tinyA.pt", sample_size=32, patch_size=8, hidden_size=64, num_layers=2,
        noise_scale=1.0, guidance_scale=7.5, guidance_interval=(0.1, 0.8), fid=float("nan"),
    )


def load_train_script(module_name: str):
    """Import `examples/train_pmf.py` as a module (it is an example script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "examples" / "train_pmf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as `import` does (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def isolated_accelerate():
    """Fresh accelerate singletons per run; one torch thread (much faster than 2 on a shared 2-core machine)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# FSDP2 over the blocks, as docs/training.md recommends; accelerate's cpu_ram_efficient_loading is for Transformers only.
FSDP2_LAUNCH_FLAGS = (
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "PMFTransformerBlock", "--fsdp_cpu_ram_efficient_loading", "false",
)


def launch_train_script(*script_args: str, fsdp: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` `examples/train_pmf.py` on two CPU processes (gloo): DDP, or FSDP2 with `fsdp=True`, through
    `tests/launch_train_pmf.py` (the `tiny-test` preset, FSDP on CPU processes, weight hashes at the end)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    mode = FSDP2_LAUNCH_FLAGS if fsdp else ("--multi_gpu",)
    script = REPO_ROOT / "tests" / "launch_train_pmf.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script),
        *script_args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
