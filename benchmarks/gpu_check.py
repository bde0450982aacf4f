# Copyright 2026 The pmf-diffusers developers. MIT License.
"""GPU readiness check: parity, sampling speed, training speed and memory, and an accelerate run, in one command.

Sections (run in priority order, each under its own time limit, the JSON and the markdown table rewritten after
every measurement, so a run that is killed keeps what it measured):

* parity      the official oracles on this device at fp32 with TF32 off, with the CPU tests' tolerances: tinyA /
              tinyB forward and sampling (official torch `generate`), and the JAX training loss, intermediates and
              parameter gradients (explicit JVP and `torch.func.jvp`). bf16 deviations are reported, not judged.
* gemm        the measured GEMM peak (bf16, fp32 with the run's TF32 policy, fp32 IEEE) that GFLOP/s are set against.
* sampling    one-step sampling images/s of the released shapes (B/16 … H/32) at several batch sizes: PMFPipeline in
              fp32 and bf16, eager and torch.compile (regional, `compile_repeated_blocks`), every attention backend of
              diffusers' dispatcher that works here, side by side with the official torch `pixelMeanFlow.generate`
              (same random weights, same noise; `--official-path`), with GFLOP/s and the deviation from the official
              (or, without it, from our fp32) output.
* training    one training step (objective + backward) of `pmf_loss` against the literal port of
              `benchmarks/bench_train.py` (three no-grad target passes + `torch.func.jvp`), same weights and draws:
              loss/gradient agreement at fp32, then step time, images/s and peak memory under bf16 autocast (the
              JVP of `pmf_loss` stays fp32), gradient checkpointing on/off, the largest batch that fits, and the
              host-device synchronisations of one step (CUDA's sync debug mode, with the line of each). An extra
              row runs `pmf_loss` with its JVP attention compiled (`PMFLossConfig(jvp_attention="compiled")`,
              checked against the default explicit one at fp32) to decide whether that option should be on.
* accelerate  `accelerate launch` (1 process) of examples/train_pmf.py for a few steps with checkpoints, then a
              resume from the middle checkpoint; weights, EMA export and losses compared (deterministic algorithms).

Out of memory at a batch is recorded as "OOM" and the check moves on. On a GPU (≤ 8 minutes on one H200):

    python benchmarks/gpu_check.py --device cuda --reference-dir path/to/reference \\
        --official-path path/to/pMF-torch --output gpu_check.json

CI runs the same code on tiny shapes on the CPU (`--device cpu --quick`, < 90 s on 2 cores); those numbers test the
script, they measure nothing. docs/benchmarks.md ("GPU") describes the run and its results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_pmf.py"
WORKER_FLAG = "--_train-script-worker"

SECTIONS = ("parity", "gemm", "sampling", "training", "accelerate")
OFFICIAL_SHAPES = ("B/16", "B/32", "L/16", "L/32", "H/16", "H/32")
# The CPU tests' tolerances (tests/test_transformer.py, test_pipeline.py, test_objective.py).
FORWARD_TOLERANCE = 1e-5
TRAINING_TOLERANCE = 1e-4
# Literal port vs pmf_loss: the issue's bar for "same loss and gradients".
EQUIVALENCE_TOLERANCE = 1e-4
# The training-step implementations of `pmf_loss` measured, with their PMFLossConfig overrides ("literal" is the port).
COMPILED_JVP_ATTENTION = "pmf_loss, compiled JVP attention"
PMF_LOSS_VARIANTS = {"pmf_loss": {}, COMPILED_JVP_ATTENTION: {"jvp_attention": "compiled"}}
SAMPLING_GUIDANCE = (7.5, (0.1, 0.8))  # the official torch README's evaluation settings
# Backends of diffusers' dispatcher tried with `--attention-backends auto`. The `*_hub` kernels are downloaded from the
# Hub on first use (unreachable offline); name them explicitly to try them.
AUTO_ATTENTION_BACKENDS = (
    "native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math", "flex",
    "flash", "_flash_3", "sage", "xformers",
)
# Files of the official torch branch that the comparison imports; the `main`/`hsdp` branches hold the JAX code.
OFFICIAL_FILES = ("pmf.py", "models/pmfDiT.py", "models/embedder.py", "models/torch_models.py")
OFFICIAL_CLONE_HINT = "git clone -b torch https://github.com/Lyy-iiis/pMF"


class GPUCheckError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What each mode measures. `full` is sized for ≤ 8 minutes on one H200; `quick` for < 90 s on a 2-core CPU."""

    shapes: tuple
    batch_sizes: tuple
    compile_batch_sizes: tuple
    compile_backend: str
    train_shapes: tuple
    train_batch_sizes: tuple
    train_steps: int
    equivalence_batch: int
    search_start: int
    search_cap: int
    search_granularity: int
    launch_shape: str
    launch_batch: int
    gemm_size: int
    min_repeats: int
    max_repeats: int
    target_seconds: float
    time_limit: float
    phase_limits: dict


FULL = Settings(
    shapes=OFFICIAL_SHAPES, batch_sizes=(1, 16, 64, 256), compile_batch_sizes=(64,),
    compile_backend="inductor", train_shapes=("B/16", "L/16"), train_batch_sizes=(32, 64, 128), train_steps=3,
    equivalence_batch=8, search_start=128, search_cap=4096, search_granularity=64, launch_shape="B/16",
    launch_batch=32, gemm_size=8192, min_repeats=3, max_repeats=10, target_seconds=1.0, time_limit=450.0,
    phase_limits={"parity": 60, "gemm": 20, "sampling:primary": 130, "training:primary": 110, "accelerate": 130,
                  "sampling:other": 220, "training:largest": 100, "training:other": 100},
)
# Quick: tiny shapes; the compile rows trace with dynamo only (backend "eager": inductor's CPU code generation alone
# takes ~20 s per graph on 2 cores). Limits are generous so that CI never skips a section.
QUICK = Settings(
    shapes=("tiny",), batch_sizes=(1, 4), compile_batch_sizes=(4,), compile_backend="eager", train_shapes=("tiny",),
    train_batch_sizes=(2, 8), train_steps=2, equivalence_batch=4, search_start=2, search_cap=8, search_granularity=1,
    launch_shape="toy", launch_batch=4, gemm_size=256, min_repeats=2, max_repeats=3, target_seconds=0.05,
    time_limit=600.0, phase_limits={},
)

PHASES = (  # (phase, section), in the order they run: what the issue's targets need comes first
    ("parity", "parity"),
    ("gemm", "gemm"),
    ("sampling:primary", "sampling"),
    ("training:primary", "training"),
    ("accelerate", "accelerate"),
    ("sampling:other", "sampling"),
    ("training:largest", "training"),
    ("training:other", "training"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --quick for CI)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: tests the script (CI)")
    parser.add_argument(
        "--reference-dir", type=Path,
        help="folder with the official oracle files (tinyA_*/tinyB_*, jax_train_*, tiny_torch_meta.json, "
        "jax_train_meta.json); needed by the parity section",
    )
    parser.add_argument(
        "--official-path", type=Path,
        help=f"a checkout of the torch branch of github.com/Lyy-iiis/pMF ({OFFICIAL_CLONE_HINT}); its "
        "pixelMeanFlow.generate is timed side by side. Without it the official columns are skipped.",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--shapes", nargs="+", help="sampling shapes (default: B/16 B/32 L/16 L/32 H/16 H/32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="sampling batch sizes (default: 1 16 64 256)")
    parser.add_argument(
        "--attention-backends", nargs="+", default=["auto"],
        help="diffusers attention backends timed at the first shape ('auto': every installed native/flash/flex/"
        "sage/xformers backend; a named backend that is not installed is an error)",
    )
    parser.add_argument("--compile-batch-sizes", type=int, nargs="+", help="batch sizes timed with torch.compile")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; quick: eager)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for inductor")
    parser.add_argument(
        "--fp32-matmul", choices=["tf32", "ieee"], default="tf32",
        help="fp32 matmul policy for the timed rows (the official evaluate.py enables TF32); parity always runs IEEE",
    )
    parser.add_argument("--train-shapes", nargs="+", help="training shapes (default: B/16 L/16)")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", help="per-GPU training batches (default: 32 64 128)")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole check (default 450; quick 600)")
    parser.add_argument(
        "--phase-limit", action="append", default=[], metavar="PHASE=SECONDS",
        help=f"override one phase's time limit ({', '.join(phase for phase, _ in PHASES)})",
    )
    parser.add_argument("--work-dir", type=Path, help="where the accelerate runs write (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=Path("gpu_check.json"), help="the JSON results")
    parser.add_argument("--table", type=Path, help="the markdown table (default: --output with .md)")
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    overrides = {
        "shapes": args.shapes, "batch_sizes": args.batch_sizes, "compile_batch_sizes": args.compile_batch_sizes,
        "compile_backend": args.compile_backend, "train_shapes": args.train_shapes,
        "train_batch_sizes": args.train_batch_sizes, "time_limit": args.time_limit,
    }
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in overrides.items() if value is not None}
    settings = replace(settings, **given)
    limits = dict(settings.phase_limits)
    phases = {phase for phase, _ in PHASES}
    for item in args.phase_limit:
        name, _, value = item.partition("=")
        if name not in phases:
            raise GPUCheckError(f"--phase-limit {item}: unknown phase {name!r}; phases: {', '.join(sorted(phases))}.")
        try:
            limits[name] = float(value)
        except ValueError:
            raise GPUCheckError(f"--phase-limit {item}: expected PHASE=SECONDS, e.g. sampling:other=120.") from None
    for name in settings.shapes + settings.train_shapes:
        shape_config(name)  # validates the name
    return replace(settings, phase_limits=limits)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GPUCheckError(f"--device {name}: not a device name; use cuda, cuda:N or cpu.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise GPUCheckError(
                f"--device {name}: torch {torch.__version__} ({build}) sees no CUDA device; run on a GPU machine, or "
                "test the script with --device cpu --quick."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GPUCheckError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    elif device.type != "cpu":
        raise GPUCheckError(f"--device {name}: this check supports cuda and cpu.")
    return device


def check_reference_dir(path: Path | None) -> Path:
    needed = ["tiny_torch_meta.json", "jax_train_meta.json"] + [
        f"{name}_{kind}.safetensors" for name in ("tinyA", "tinyB") for kind in ("state_dict", "forward", "generate")
    ] + [f"jax_train_{s}{suffix}.safetensors" for s in ("S1", "S2") for suffix in ("", "_grads_torchkeys")]
    if path is None:
        raise GPUCheckError("the parity section needs --reference-dir (the folder with tinyA_state_dict.safetensors and "
                            "the other official oracle files), or leave it out with --sections.")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise GPUCheckError(f"--reference-dir {path}: missing {', '.join(missing[:3])}"
                            f"{' …' if len(missing) > 3 else ''}; pass the official reference-data folder.")
    return path


def load_official_code(path: Path) -> SimpleNamespace:
    """Import the official torch branch (`pmf.pixelMeanFlow`, `models.pmfDiT`) from a checkout, after checking it."""
    if not path.is_dir():
        raise GPUCheckError(f"--official-path {path}: no such folder; pass a checkout of the official torch code "
                            f"({OFFICIAL_CLONE_HINT}).")
    missing = [name for name in OFFICIAL_FILES if not (path / name).is_file()]
    source = (path / "pmf.py").read_text(errors="replace") if (path / "pmf.py").is_file() else ""
    is_jax = any(marker in source for marker in ("import jax", "from jax", "import flax", "from flax"))
    if missing or "class pixelMeanFlow(nn.Module)" not in source or "def generate(" not in source or is_jax:
        found = f"missing {', '.join(missing)}" if missing else "its pmf.py is not the torch pixelMeanFlow"
        raise GPUCheckError(f"--official-path {path} is not the torch branch of github.com/Lyy-iiis/pMF ({found}; the "
                            f"main and hsdp branches hold the JAX code): `git -C {path} checkout torch`.")
    # The official code imports its siblings as top-level `models.*`: import it under those names, keep the module
    # objects, and take the generic names out of sys.modules again (nothing else here should see them).
    root = str(path.resolve())
    taken = [name for name in sys.modules if name in ("pmf", "models") or name.startswith("models.")]
    if taken:
        raise GPUCheckError(f"--official-path {path}: a module named {taken[0]!r} is already imported in this process; "
                            "run the check in a fresh process.")
    sys.path.insert(0, root)
    try:
        pmf = importlib.import_module("pmf")
        pmfDiT = importlib.import_module("models.pmfDiT")
    finally:
        sys.path.remove(root)
        for name in [name for name in sys.modules if name in ("pmf", "models") or name.startswith("models.")]:
            del sys.modules[name]
    if not str(Path(pmf.__file__).resolve()).startswith(root):
        raise GPUCheckError(f"--official-path {path}: `import pmf` found {pmf.__file__} instead.")
    return SimpleNamespace(path=root, pmf=pmf, pmfDiT=pmfDiT)


def resolve_attention_backends(names: list[str]) -> tuple[list[str], dict]:
    """The backends to time ("native" first) and, for `auto`, why the others were left out. Entering diffusers'
    `attention_backend` context checks that a backend's package is installed (and fetches `*_hub` kernels)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    known = {member.value for member in AttentionBackendName}
    explicit = names != ["auto"]
    candidates = names if explicit else list(AUTO_ATTENTION_BACKENDS)
    chosen, skipped = [], {}
    for name in candidates:
        if name not in known:
            raise GPUCheckError(
                f"--attention-backends: unknown backend {name!r}; diffusers offers {', '.join(sorted(known))}."
            )
        try:
            with attention_backend(name):
                pass
        except RuntimeError as err:
            if explicit:
                raise GPUCheckError(f"--attention-backends: {name} is not installed here ({_first_line(err)})") from None
            skipped[name] = f"not installed: {_first_line(err)}"
            continue
        chosen.append(name)
    if "native" in chosen:  # the default backend is always timed first
        chosen.remove("native")
    return ["native", *chosen], skipped


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


def _load_benchmark(name: str):
    """A sibling benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"pmf_benchmarks_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def bench_train():
    return _load_benchmark("bench_train")  # the literal port and the tiny training shape


@functools.cache
def bench_inference():
    return _load_benchmark("bench_inference")  # the analytic FLOP count


def shape_config(name: str) -> dict:
    """`PMFTransformer2DModel` kwargs (with the v-head) of a released size, or of `tiny` (the tinyA test shape)."""
    if name == "tiny":
        return dict(bench_train().SHAPES["tiny"], with_v_head=True)
    from pmf_diffusers.official import official_model_config, resolve_preset

    try:
        preset = resolve_preset(name)
    except ValueError as err:
        raise GPUCheckError(f"unknown shape {name!r}: {err} (or 'tiny')") from None
    return dict(official_model_config(preset.name), num_classes=1000)


def official_model_name(name: str) -> str:
    """The official constructor (`pmfDiT_B_16` …); `tiny` borrows B/16's, whose noise scale is 1 (as the oracles did)."""
    if name == "tiny":
        return "pmfDiT_B_16"
    from pmf_diffusers.official import resolve_preset

    return "pmfDiT_" + resolve_preset(name).name.removeprefix("pMF-").replace("/", "_")


def noise_scale(name: str) -> float:
    if name == "tiny":
        return 1.0
    from pmf_diffusers.official import resolve_preset

    return resolve_preset(name).noise_scale


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e|, in float64."""
    actual, expected = actual.detach().double(), expected.detach().to(actual.device).double()
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch {tuple(actual.shape)} vs {tuple(expected.shape)}")
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device memory; with `collect`, first free what only reference cycles still hold (after an OOM,
    or once models were dropped)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def fp32_matmul(policy: str):
    """TF32 on or off for fp32 matmuls and convolutions inside the block; the previous settings come back after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = policy == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def time_calls(fn, device: torch.device, settings: Settings, warmup: int = 1, repeats: int | None = None):
    """Seconds per call (after `warmup` calls): `repeats` calls, or between min and max repeats until the timed calls
    add up to `target_seconds`. Returns (seconds, the last output)."""
    output = None
    for _ in range(warmup):
        output = fn()
    synchronize(device)
    seconds = []
    while True:
        start = time.perf_counter()
        output = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if repeats is not None:
            if len(seconds) >= repeats:
                break
        elif len(seconds) >= settings.max_repeats or (
            len(seconds) >= settings.min_repeats and sum(seconds) >= settings.target_seconds
        ):
            break
    return seconds, output


def guarded(fn, device: torch.device):
    """(status, value): "ok", "OOM" (memory freed, the check goes on) or "error: <first line>"."""
    try:
        return "ok", fn()
    except torch.OutOfMemoryError:
        free_memory(device, collect=True)
        return "OOM", None
    except Exception as err:  # noqa: BLE001 - a failing variant is a result, not the end of the check
        free_memory(device, collect=True)
        return f"error: {type(err).__name__}: {_first_line(err)}", None


@torch.no_grad()
def perturb_constant_parameters(module: torch.nn.Module, seed: int) -> None:
    """Make a freshly initialised pMF network non-degenerate, by a rule that does not depend on parameter names (so the
    official network and ours get the same treatment): every parameter that the official init leaves constant
    (zero residual gates and output layer, unit norms, zero biases) gets N(0, s²) added, s = 1/√fan_in for matrices
    and 0.1 for vectors. Randomly initialised parameters keep their init."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for parameter in module.parameters():
        if parameter.numel() > 1 and bool(parameter.min() == parameter.max()):
            std = 1 / math.sqrt(parameter.shape[-1]) if parameter.ndim >= 2 else 0.1
            noise = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
            parameter.add_(noise * std)


def device_info(device: torch.device) -> dict:
    import diffusers

    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 1e9,
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    return info


# ----------------------------------------------------------------------------------------------------------------
# Results: one JSON and one markdown table, rewritten after every measurement
# ----------------------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, json_path: Path, table_path: Path, header: dict):
        self.json_path, self.table_path = json_path, table_path
        self.data = {**header, "status": "running", "sections": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def add(self, section: str, key: str, row: dict) -> dict:
        self.section(section).setdefault(key, []).append(row)
        self.save()
        brief = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if not isinstance(v, (list, dict))}
        print(f"  {section}/{key}: {brief}", flush=True)
        return row

    def save(self) -> None:
        for path, text in ((self.json_path, json.dumps(self.data, indent=1, default=str)),
                           (self.table_path, render_markdown(self.data))):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)


class Clock:
    """The whole check's deadline and each phase's own."""

    def __init__(self, settings: Settings):
        self.start = time.perf_counter()
        self.deadline = self.start + settings.time_limit
        self.limits = settings.phase_limits

    def phase_deadline(self, phase: str) -> float:
        limit = self.limits.get(phase)
        return self.deadline if limit is None else min(self.deadline, time.perf_counter() + limit)

    @staticmethod
    def left(deadline: float) -> float:
        return deadline - time.perf_counter()


@dataclass
class Context:
    args: argparse.Namespace
    settings: Settings
    device: torch.device
    report: Report
    clock: Clock
    official: SimpleNamespace | None
    attention_backends: list
    attention_skipped: dict
    gemm: dict


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official oracles
# ----------------------------------------------------------------------------------------------------------------
def tiny_reference_model(reference_dir: Path, name: str, device: torch.device):
    from safetensors.torch import load_file

    from pmf_diffusers import PMFTransformer2DModel
    from pmf_diffusers.conversion import convert_official_state_dict

    config, state_dict = convert_official_state_dict(load_file(reference_dir / f"{name}_state_dict.safetensors"))
    model = PMFTransformer2DModel(**config)
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def loss_config_from_oracle(defaults: dict):
    """`PMFLossConfig` of a JAX scenario (`jax_train_meta.json`); every draw is injected, so these mostly document."""
    from pmf_diffusers.training import PMFLossConfig

    config = PMFLossConfig(
        p_mean=defaults["P_mean"], p_std=defaults["P_std"], noise_scale=defaults["noise_scale"],
        data_proportion=defaults["data_proportion"], tr_uniform=defaults["tr_uniform"], cfg_max=defaults["cfg_max"],
        cfg_beta=defaults["cfg_beta"], class_dropout_prob=defaults["class_dropout_prob"],
        class_dropout_mode="first_k", norm_p=defaults["norm_p"], norm_eps=defaults["norm_eps"],
    )
    # The oracles ran without the perceptual terms (their weights were not reachable).
    return replace(config, lpips_lambda=config.lpips_lambda if defaults["lpips"] else 0.0,
                   convnext_lambda=config.convnext_lambda if defaults["convnext"] else 0.0)


def run_parity(ctx: Context, deadline: float) -> None:
    from safetensors.torch import load_file

    from pmf_diffusers import PMFPipeline, PMFScheduler
    from pmf_diffusers.conversion import convert_official_state_dict
    from pmf_diffusers.training import PMFDraws, pmf_loss

    reference, device = ctx.args.reference_dir, ctx.device
    section = ctx.report.section("parity")
    section.update(tolerances={"forward_and_sampling": FORWARD_TOLERANCE, "training": TRAINING_TOLERANCE},
                   precision="fp32, TF32 off (bf16 rows: deviation only)")

    def check(name: str, error: float, tolerance: float | None):
        row = {"check": name, "max_rel_err": error}
        if tolerance is None:
            row["judged"] = False
        else:
            row.update(tolerance=tolerance, passed=error <= tolerance)
        ctx.report.add("parity", "rows" if tolerance is not None else "bf16", row)

    def load(name):
        return load_file(reference / f"{name}.safetensors", device=str(device))

    meta = json.loads((reference / "tiny_torch_meta.json").read_text())
    with fp32_matmul("ieee"):
        for name in ("tinyA", "tinyB"):
            model = tiny_reference_model(reference, name, device)
            forward = load(f"{name}_forward")
            inputs = (forward["z_t"], forward["t"], forward["r"], forward["labels"], forward["omega"],
                      forward["t_min"], forward["t_max"])
            with torch.no_grad():
                out = model(*inputs, head="both")
            for head, output in (("u", out.sample), ("v", out.v_sample)):
                check(f"{name} forward: {head}-head x-prediction", max_rel_err(output, forward[f"{head}_head_xpred"]),
                      FORWARD_TOLERANCE)

            generated = load(f"{name}_generate")
            labels = generated["labels"].tolist()
            scale = meta[name]["noise_scale"]
            pipe = PMFPipeline(model, PMFScheduler(noise_scale=scale))
            pipe.set_progress_bar_config(disable=True)
            for setting in meta[name]["generate_settings"]:
                sample = pipe(labels, num_inference_steps=setting["num_steps"], guidance_scale=setting["omega"],
                              guidance_interval=(setting["t_min"], setting["t_max"]),
                              latents=scale * generated["noise_unscaled"], output_type="latent").images
                check(f"{name} sample {setting['key']}", max_rel_err(sample, generated[setting["key"]]), FORWARD_TOLERANCE)

            # bf16: a cast copy of the model (what `pmf generate --dtype bf16` runs); reported, not judged.
            model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
            with torch.no_grad():
                out = model_bf16(inputs[0].bfloat16(), *inputs[1:], head="both")
            check(f"{name} forward bf16: u-head x-prediction", max_rel_err(out.sample.float(), forward["u_head_xpred"]),
                  None)
            pipe_bf16 = PMFPipeline(model_bf16, PMFScheduler(noise_scale=scale))
            pipe_bf16.set_progress_bar_config(disable=True)
            first = meta[name]["generate_settings"][0]
            sample = pipe_bf16(labels, num_inference_steps=first["num_steps"], guidance_scale=first["omega"],
                               guidance_interval=(first["t_min"], first["t_max"]),
                               latents=scale * generated["noise_unscaled"], output_type="latent").images
            check(f"{name} sample bf16 {first['key']}", max_rel_err(sample.float(), generated[first["key"]]), None)

        scenarios = json.loads((reference / "jax_train_meta.json").read_text())
        for scenario in ("S1", "S2"):
            oracle = load(f"jax_train_{scenario}")
            nchw = {key: value.permute(0, 3, 1, 2) if value.ndim == 4 and value.shape[-1] == 3 else value
                    for key, value in oracle.items()}
            draws = PMFDraws(t=oracle["t"].flatten(), r=oracle["r"].flatten(), omega=oracle["omega"].flatten(),
                             t_min=oracle["t_min"].flatten(), t_max=oracle["t_max"].flatten(),
                             drop_mask=oracle["drop_mask"].bool(), noise=nchw["e"])
            # The oracle's gradients, converted to our parameter names like a checkpoint.
            _, expected_grads = convert_official_state_dict(load(f"jax_train_{scenario}_grads_torchkeys"))
            base = loss_config_from_oracle(scenarios[scenario]["official_defaults_used"])
            for explicit in (True, False):
                jvp = "explicit JVP" if explicit else "torch.func.jvp"
                for dtype in (torch.float32, torch.bfloat16):
                    model = tiny_reference_model(reference, "tinyA", device).train()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        out = pmf_loss(model, nchw["x"], oracle["labels"].long(), replace(base, explicit_jvp=explicit),
                                       draws=draws)
                    out.loss.backward()
                    tolerance = TRAINING_TOLERANCE if dtype == torch.float32 else None
                    label = f"JAX {scenario} ({jvp}{', bf16 autocast' if tolerance is None else ''})"
                    check(f"{label}: loss", max_rel_err(out.loss.reshape(1), oracle["loss"]), tolerance)
                    if tolerance is not None:
                        check(f"{label}: loss_u", max_rel_err(out.loss_u.reshape(1), oracle["metric_loss_u"]), tolerance)
                        for key in ("du_dt", "V", "v_g", "v_c", "v_u"):
                            check(f"{label}: {key}", max_rel_err(getattr(out, key), nchw[key]), tolerance)
                    check(f"{label}: gradients (worst of {len(expected_grads)})",
                          worst_gradient_error(model, expected_grads), tolerance)
    rows = section.get("rows", [])
    section["passed"] = bool(rows) and all(row["passed"] for row in rows)
    ctx.report.save()


def worst_gradient_error(model: torch.nn.Module, expected: dict) -> float:
    """Worst relative error over the parameters; an exactly-zero expected gradient must be exactly zero (∞ if not)."""
    worst = 0.0
    for name, parameter in model.named_parameters():
        grad, reference = parameter.grad, expected[name]
        if grad is None:
            return math.inf
        if bool(reference.abs().max() == 0):
            worst = max(worst, 0.0 if bool(grad.abs().max() == 0) else math.inf)
        else:
            worst = max(worst, max_rel_err(grad, reference))
    return worst


# ----------------------------------------------------------------------------------------------------------------
# GEMM peak
# ----------------------------------------------------------------------------------------------------------------
def run_gemm(ctx: Context, deadline: float) -> None:
    """Square GEMMs: bf16, fp32 under the run's TF32 policy (what the fp32 rows are set against) and, on a GPU with
    TF32 on, fp32 IEEE too. The best call counts as the peak."""
    size, device = ctx.settings.gemm_size, ctx.device
    flops = 2 * size**3
    variants = [("bfloat16", torch.bfloat16, "ieee"), ("float32", torch.float32, ctx.args.fp32_matmul)]
    if device.type == "cuda" and ctx.args.fp32_matmul != "ieee":
        variants.append(("float32_ieee", torch.float32, "ieee"))
    for name, dtype, policy in variants:
        if Clock.left(deadline) <= 0:
            break
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, generator=generator, device=device).to(dtype)
        b = torch.randn(size, size, generator=generator, device=device).to(dtype)
        with fp32_matmul(policy):
            seconds, _ = time_calls(lambda: torch.mm(a, b), device, ctx.settings, warmup=5, repeats=20)
        ctx.gemm[name] = flops / min(seconds) / 1e9
        label = f"{name} (TF32 matmul)" if dtype == torch.float32 and policy == "tf32" and device.type == "cuda" else name
        ctx.report.add("gemm", "rows", {"dtype": label, "size": size, "seconds": seconds,
                                        "gflops_median": flops / statistics.median(seconds) / 1e9,
                                        "gflops_best": ctx.gemm[name]})
        del a, b


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
class FixedNoise:
    """The `rng` argument of the official `generate`: hands back the noise we drew, so both samplers start equal."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def randn(self, size, **kwargs):
        if tuple(size) != tuple(self.noise.shape):
            raise ValueError(f"official generate asked for noise {tuple(size)}, prepared {tuple(self.noise.shape)}")
        return self.noise.clone()


@contextlib.contextmanager
def official_constructor(code: SimpleNamespace, shape: str, config: dict):
    """The official `pixelMeanFlow` builds its network by name. For `tiny` (no released name), the tinyA constructor
    is registered under `pmfDiT_B_16` while it is built, as the reference oracles were made."""
    if shape != "tiny":
        yield
        return
    name = official_model_name(shape)
    original = getattr(code.pmfDiT, name)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    setattr(code.pmfDiT, name, functools.partial(
        code.pmfDiT.pmfDiT, patch_size=config["patch_size"], hidden_size=hidden,
        depth=config["num_layers"] + config["num_head_layers"], num_heads=config["num_attention_heads"],
        aux_head_depth=config["num_head_layers"], mlp_ratio=config["mlp_hidden_dim"] / hidden,
    ))
    try:
        yield
    finally:
        setattr(code.pmfDiT, name, original)


def build_sampling_models(ctx: Context, shape: str):
    """(official sampler or None, our fp32 transformer): the same random weights, on the device."""
    from pmf_diffusers import PMFTransformer2DModel
    from pmf_diffusers.conversion import convert_official_state_dict

    config = dict(shape_config(shape), with_v_head=False)
    official = None
    if ctx.official is not None:
        with official_constructor(ctx.official, shape, config), torch.device(ctx.device):
            official = ctx.official.pmf.pixelMeanFlow(official_model_name(shape), img_size=config["sample_size"],
                                                      num_classes=config["num_classes"])
        official = official.to(ctx.device).eval()
        perturb_constant_parameters(official.net, seed=1)
        converted_config, state_dict = convert_official_state_dict(official.net.state_dict())
        with torch.device(ctx.device):
            model = PMFTransformer2DModel(**converted_config)
        model.load_state_dict(state_dict)
    else:
        with torch.device(ctx.device):
            model = PMFTransformer2DModel(**config)
        perturb_constant_parameters(model, seed=1)
    return official, model.eval()


def make_pipeline(transformer, shape: str):
    from pmf_diffusers import PMFPipeline, PMFScheduler

    pipe = PMFPipeline(transformer, PMFScheduler(noise_scale=noise_scale(shape)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_inputs(config, shape: str, batch: int, device: torch.device) -> SimpleNamespace:
    """Noise and labels of one batch, drawn on the CPU (fixed seed), then moved to the device; both samplers get them."""
    generator = torch.Generator().manual_seed(batch)
    noise = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
    noise = noise.to(device)
    return SimpleNamespace(batch=batch, noise=noise, latents=noise_scale(shape) * noise, labels=labels.to(device),
                           label_list=labels.tolist())


def official_sampler(official, inputs):
    omega, (t_min, t_max) = SAMPLING_GUIDANCE
    return lambda: official.generate(inputs.batch, FixedNoise(inputs.noise), 1, omega, t_min, t_max, labels=inputs.labels)


def our_sampler(pipe, inputs, backend: str | None = None):
    from diffusers.models.attention_dispatch import attention_backend

    omega, interval = SAMPLING_GUIDANCE

    def run():
        with attention_backend(backend) if backend else contextlib.nullcontext():
            return pipe(inputs.label_list, num_inference_steps=1, guidance_scale=omega, guidance_interval=interval,
                        latents=inputs.latents, output_type="latent").images

    return run


def check_parity_at_scale(ctx: Context, official, pipe, shape: str) -> None:
    """The released shape with random weights: PMFPipeline against the official generate, fp32 with TF32 off."""
    inputs = sampling_inputs(pipe.transformer.config, shape, min(16, max(ctx.settings.batch_sizes)), ctx.device)
    with fp32_matmul("ieee"), torch.inference_mode():
        status, outputs = guarded(lambda: (official_sampler(official, inputs)(), our_sampler(pipe, inputs)()), ctx.device)
    row = {"check": f"{shape} one-step sample, batch {inputs.batch}, random weights: PMFPipeline vs official generate",
           "tolerance": FORWARD_TOLERANCE, "status": status}
    if status == "ok":
        row["max_rel_err"] = max_rel_err(outputs[1], outputs[0])
        row["passed"] = row["max_rel_err"] <= FORWARD_TOLERANCE
    ctx.report.add("parity", "at_scale", row)


def run_sampling(ctx: Context, deadline: float, shapes: tuple, primary: bool) -> None:
    """Per shape and batch: the official sampler (the reference output), then PMFPipeline fp32 and bf16; at the first
    shape also every attention backend and torch.compile."""
    section = ctx.report.section("sampling")
    section.setdefault("settings", {
        "guidance": SAMPLING_GUIDANCE, "steps": 1, "fp32_matmul": ctx.args.fp32_matmul,
        "compile": f"transformer.compile_repeated_blocks(fullgraph=True, backend={ctx.settings.compile_backend!r}"
                   + (f", mode={ctx.args.compile_mode!r})" if ctx.settings.compile_backend == "inductor" else ")"),
        "official": ctx.official.path if ctx.official else "not compared: no --official-path",
        "attention_backends": ctx.attention_backends, "attention_backends_skipped": ctx.attention_skipped,
    })
    for shape in shapes:
        if Clock.left(deadline) <= 0:
            ctx.report.add("sampling", "skipped", {"shape": shape, "reason": "time limit"})
            continue
        status, models = guarded(lambda: build_sampling_models(ctx, shape), ctx.device)
        if status != "ok":
            ctx.report.add("sampling", "rows", {"shape": shape, "status": status, "variant": "model build"})
            continue
        official, model = models
        pipes = {torch.float32: make_pipeline(model, shape)}
        status, bf16_model = guarded(lambda: copy.deepcopy(model).to(torch.bfloat16), ctx.device)
        if status == "ok":
            pipes[torch.bfloat16] = make_pipeline(bf16_model, shape)
        if primary and official is not None:
            check_parity_at_scale(ctx, official, pipes[torch.float32], shape)
        compiled, failed = {}, {}
        for batch in ctx.settings.batch_sizes:
            inputs = sampling_inputs(model.config, shape, batch, ctx.device)
            variants = []  # (sampler, dtype, mode, attention, callable)
            if official is not None:
                variants.append(("official generate", torch.float32, "eager", "einsum (official)",
                                 official_sampler(official, inputs)))
            backends = ctx.attention_backends if primary else ["native"]
            for backend in backends:
                for dtype, pipe in pipes.items():
                    variants.append(("PMFPipeline", dtype, "eager", backend,
                                     our_sampler(pipe, inputs, None if backend == "native" else backend)))
            if primary and batch in ctx.settings.compile_batch_sizes:
                for dtype, pipe in pipes.items():
                    if dtype not in compiled:
                        status, compiled[dtype] = guarded(lambda: compile_pipeline(ctx, pipe, shape), ctx.device)
                        if status != "ok":
                            ctx.report.add("sampling", "rows", {"shape": shape, "variant": "compile", "status": status})
                    if compiled[dtype] is not None:
                        variants.append(("PMFPipeline", dtype, "compile", "native", our_sampler(compiled[dtype], inputs)))
            measure_sampling(ctx, deadline, shape, inputs, model.config, variants, failed)
            del inputs
            free_memory(ctx.device)
        del official, model, pipes, compiled
        free_memory(ctx.device, collect=True)


def measure_sampling(ctx: Context, deadline: float, shape: str, inputs, config, variants: list, failed: dict) -> None:
    """Time each variant; the first successful output is the reference of the others' deviation (the official one
    when it ran). A variant that failed with an error at a smaller batch is not tried again."""
    batch = inputs.batch
    flops = bench_inference().analytic_flops(config, batch)["total"]
    reference = reference_name = official_seconds = None
    for name, dtype, mode, attention, run in variants:
        row = {"shape": shape, "batch": batch, "sampler": name, "dtype": str(dtype).removeprefix("torch."),
               "mode": mode, "attention": attention}
        key = (name, row["dtype"], mode, attention)
        if Clock.left(deadline) <= 0:
            ctx.report.add("sampling", "rows", {**row, "status": "skipped: time limit"})
            continue
        if key in failed:
            ctx.report.add("sampling", "rows", {**row, "status": f"skipped: failed at batch {failed[key]}"})
            continue
        start = time.perf_counter()
        with fp32_matmul(ctx.args.fp32_matmul), torch.inference_mode():
            status, result = guarded(lambda: time_calls(run, ctx.device, ctx.settings), ctx.device)
        row["status"] = status
        if status.startswith("error"):
            failed[key] = batch
        if status == "ok":
            seconds, output = result
            median = statistics.median(seconds)
            row.update(seconds=seconds, median_s=median, images_per_s=batch / median, gflops=flops / median / 1e9,
                       first_call_s=time.perf_counter() - start - sum(seconds))
            if ctx.gemm.get("bfloat16"):
                row["percent_of_bf16_gemm_peak"] = 100 * row["gflops"] / ctx.gemm["bfloat16"]
            if ctx.gemm.get("float32") and dtype == torch.float32:
                row["percent_of_fp32_gemm_peak"] = 100 * row["gflops"] / ctx.gemm["float32"]
            if reference is None:
                reference, reference_name = output.float(), f"{name} {row['dtype']}"
                if name == "official generate":
                    official_seconds = median
            else:
                row["max_rel_dev"] = max_rel_err(output.float(), reference)
                row["deviation_from"] = reference_name
            if official_seconds is not None and name != "official generate":
                row["speedup_vs_official"] = official_seconds / median
        ctx.report.add("sampling", "rows", row)


def compile_pipeline(ctx: Context, pipe, shape: str):
    """A copy of the pipeline with its transformer blocks compiled (regional compilation: one compiled block graph
    serves every block, so compiling costs seconds rather than minutes)."""
    transformer = copy.deepcopy(pipe.transformer)
    kwargs = {"fullgraph": True, "backend": ctx.settings.compile_backend}
    if ctx.settings.compile_backend == "inductor":
        kwargs["mode"] = ctx.args.compile_mode
    transformer.compile_repeated_blocks(**kwargs)
    return make_pipeline(transformer, shape)


# ----------------------------------------------------------------------------------------------------------------
# Training step: pmf_loss vs the literal port
# ----------------------------------------------------------------------------------------------------------------
def training_model(shape: str, device: torch.device):
    from pmf_diffusers import PMFTransformer2DModel

    with torch.device(device):
        model = PMFTransformer2DModel(**shape_config(shape))
    perturb_constant_parameters(model, seed=2)
    return model.train()


def training_batch(model, batch: int, device: torch.device, seed: int = 0):
    """Images, labels and draws for one step; the same for both implementations."""
    from pmf_diffusers.training import PMFLossConfig, sample_draws

    config = PMFLossConfig(lpips_lambda=0.0, convnext_lambda=0.0)  # the perceptual nets need downloaded weights
    size, classes = model.config.sample_size, model.config.num_classes
    generator = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: large probes stay fast
    images = torch.rand(batch, 3, size, size, generator=generator, device=device) * 2 - 1
    labels = torch.randint(0, classes, (batch,), generator=generator, device=device)
    draws = sample_draws(batch, config, generator, (3, size, size), device=device)
    return images, labels, config, draws


def train_step(model, implementation: str, images, labels, config, draws, autocast: bool) -> torch.Tensor:
    """Objective + backward of one batch (no optimizer step, as benchmarks/bench_train.py)."""
    from pmf_diffusers.training import pmf_loss

    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        if implementation in PMF_LOSS_VARIANTS:
            config = replace(config, **PMF_LOSS_VARIANTS[implementation])
            loss = pmf_loss(model, images, labels, config, draws=draws).loss
        else:
            loss = bench_train().straightforward_loss(model, images, labels, config, draws)
    loss.backward()
    return loss.detach()


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def compare_implementations(model, batch: int, device: torch.device, autocast: bool, implementation: str = "pmf_loss",
                            reference: str = "literal") -> dict:
    """Loss and worst per-parameter gradient error of `implementation` (pmf_loss) against `reference` (the literal
    port), same weights and draws."""
    images, labels, config, draws = training_batch(model, batch, device)
    reference_loss = train_step(model, reference, images, labels, config, draws, autocast)
    expected = gradients(model)
    ours_loss = train_step(model, implementation, images, labels, config, draws, autocast)
    ours = gradients(model)
    model.zero_grad(set_to_none=True)
    missing = sorted(set(expected) ^ set(ours))
    errors = {name: max_rel_err(ours[name], expected[name]) for name in expected if name in ours
              and bool(expected[name].abs().max() > 0)}
    if not errors:
        raise RuntimeError("no parameter received a non-zero gradient")
    worst = max(errors, key=errors.get)
    return {f"loss_{implementation}": float(ours_loss), f"loss_{reference}": float(reference_loss),
            "loss_rel_err": abs(float(ours_loss) - float(reference_loss)) / abs(float(reference_loss)),
            "max_grad_rel_err": errors[worst], "worst_parameter": worst, "parameters_compared": len(errors),
            "parameters_missing_a_gradient": missing}


def count_syncs(model, batch: int, device: torch.device) -> dict:
    """Host-device synchronisations in one training step as examples/train_pmf.py runs it (draws from a device
    generator inside `pmf_loss`, bf16 autocast, backward, Muon step), found by CUDA's sync debug mode. Each is
    attributed to the innermost frame of this repository's code on the stack."""
    import traceback
    import warnings
    from collections import Counter

    from pmf_diffusers.training import Muon, muon_param_groups, pmf_loss

    images, labels, config, _ = training_batch(model, batch, device)
    generator = torch.Generator(device=device)
    optimizer = Muon(muon_param_groups(model, lr=1e-4), lr=1e-4)

    def step():
        generator.manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = pmf_loss(model, images, labels, config, generator=generator).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first step: optimizer state and library handles are created lazily
    synchronize(device)
    sites = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(str(REPO_ROOT)) and
                  not f.filename.endswith("gpu_check.py")]
        where = frames[-1] if frames else None
        sites[f"{Path(where.filename).relative_to(REPO_ROOT)}:{where.lineno} {where.line}" if where else
              f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return {"batch": batch, "syncs": sum(sites.values()), "sites": dict(sites.most_common()),
            "scope": "pmf_loss (draws inside) + backward + Muon step; not the script's logging / NaN guard"}


def record_host_syncs(ctx: Context, model) -> None:
    section = ctx.report.section("training")
    if ctx.device.type != "cuda":
        section["host_syncs"] = {"status": "not measured: CUDA's sync debug mode needs a GPU"}
    else:
        saved = {key: value.detach().clone() for key, value in model.state_dict().items()}  # the Muon step changes them
        batch = ctx.settings.train_batch_sizes[0]
        status, result = guarded(lambda: count_syncs(model, batch, ctx.device), ctx.device)
        model.load_state_dict(saved)
        del saved
        section["host_syncs"] = {"status": status, **(result or {})}
    ctx.report.save()


def run_training(ctx: Context, deadline: float, shapes: tuple, equivalence: bool) -> None:
    section = ctx.report.section("training")
    section.setdefault("settings", {
        "step": "pmf_loss / literal objective + backward (no optimizer step), bf16 autocast; pmf_loss runs its JVP in "
                "fp32 (PMFLossConfig.jvp_in_fp32); perceptual losses off",
        "fp32_matmul": ctx.args.fp32_matmul, "steps_timed": ctx.settings.train_steps, "warmup_steps": 1,
    })
    for shape in shapes:
        if Clock.left(deadline) <= 0:
            ctx.report.add("training", "skipped", {"shape": shape, "reason": "time limit"})
            continue
        status, model = guarded(lambda: training_model(shape, ctx.device), ctx.device)
        if status != "ok":
            ctx.report.add("training", "rows", {"shape": shape, "status": status})
            continue
        if equivalence:
            with fp32_matmul("ieee"):
                batch = ctx.settings.equivalence_batch
                status, result = guarded(lambda: compare_implementations(model, batch, ctx.device, autocast=False),
                                         ctx.device)
            row = {"shape": shape, "batch": batch, "precision": "fp32, TF32 off", "status": status,
                   "tolerance": EQUIVALENCE_TOLERANCE, **(result or {})}
            if result:
                row["passed"] = result["loss_rel_err"] <= EQUIVALENCE_TOLERANCE and (
                    result["max_grad_rel_err"] <= EQUIVALENCE_TOLERANCE and not result["parameters_missing_a_gradient"])
            ctx.report.add("training", "equivalence", row)
            with fp32_matmul(ctx.args.fp32_matmul):
                status, result = guarded(lambda: compare_implementations(model, batch, ctx.device, autocast=True),
                                         ctx.device)
            ctx.report.add("training", "equivalence", {"shape": shape, "batch": batch, "status": status,
                                                       "precision": "bf16 autocast (deviation only)", **(result or {})})
            record_host_syncs(ctx, model)

        for checkpointing in (False, True):  # without checkpointing first: the targets' rows
            for batch in ctx.settings.train_batch_sizes:
                for implementation in ("pmf_loss", "literal"):
                    row = {"shape": shape, "batch": batch, "implementation": implementation,
                           "gradient_checkpointing": checkpointing, "fp32_matmul": ctx.args.fp32_matmul}
                    if Clock.left(deadline) <= 0:
                        ctx.report.add("training", "rows", {**row, "status": "skipped: time limit"})
                        continue
                    ctx.report.add("training", "rows", measure_training(ctx, model, shape, batch, implementation,
                                                                         checkpointing, row))
            if not checkpointing:
                measure_compiled_jvp_attention(ctx, model, shape, deadline)
        del model
        free_memory(ctx.device, collect=True)


def measure_compiled_jvp_attention(ctx: Context, model, shape: str, deadline: float) -> None:
    """After the targets' rows (its first call compiles): `pmf_loss` with the compiled JVP attention against the
    explicit one at fp32 (TF32 off), then its step time at each batch (the JVP is no-grad, so checkpointing changes
    nothing in it: off only)."""
    batch = ctx.settings.train_batch_sizes[0]  # the first timed batch: the quick CPU run compiles once
    row = {"shape": shape, "batch": batch, "precision": "fp32, TF32 off", "tolerance": EQUIVALENCE_TOLERANCE}
    if Clock.left(deadline) <= 0:
        ctx.report.add("training", "jvp_attention", {**row, "status": "skipped: time limit"})
        return
    with fp32_matmul("ieee"):
        status, result = guarded(lambda: compare_implementations(
            model, batch, ctx.device, autocast=False, implementation=COMPILED_JVP_ATTENTION, reference="pmf_loss"),
            ctx.device)
    row.update(status=status, **(result or {}))
    if result:
        row["passed"] = max(result["loss_rel_err"], result["max_grad_rel_err"]) <= EQUIVALENCE_TOLERANCE and (
            not result["parameters_missing_a_gradient"])
    ctx.report.add("training", "jvp_attention", row)
    for batch in ctx.settings.train_batch_sizes:
        row = {"shape": shape, "batch": batch, "implementation": COMPILED_JVP_ATTENTION,
               "gradient_checkpointing": False, "fp32_matmul": ctx.args.fp32_matmul}
        if Clock.left(deadline) <= 0:
            ctx.report.add("training", "rows", {**row, "status": "skipped: time limit"})
            continue
        ctx.report.add("training", "rows", measure_training(ctx, model, shape, batch, COMPILED_JVP_ATTENTION, False,
                                                             row))


def measure_training(ctx: Context, model, shape: str, batch: int, implementation: str, checkpointing: bool,
                     row: dict) -> dict:
    device = ctx.device
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        row["model_memory_gb"] = torch.cuda.memory_allocated(device) / 1e9

    def measure():
        images, labels, config, draws = training_batch(model, batch, device)
        with fp32_matmul(row.get("fp32_matmul", ctx.args.fp32_matmul)):
            return time_calls(lambda: train_step(model, implementation, images, labels, config, draws, autocast=True),
                              device, ctx.settings, repeats=ctx.settings.train_steps)

    status, result = guarded(measure, device)
    model.zero_grad(set_to_none=True)
    model.disable_gradient_checkpointing()
    row["status"] = status
    if status == "ok":
        seconds, loss = result
        median = statistics.median(seconds)
        row.update(seconds=seconds, median_step_s=median, images_per_s=batch / median, loss=float(loss))
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    free_memory(device)
    return row


def largest_batch(ctx: Context, model, implementation: str, checkpointing: bool, deadline: float) -> dict:
    """Double the batch until a step runs out of memory (or the cap), then bisect down to the granularity."""
    settings, device = ctx.settings, ctx.device
    probes = []

    def fits(batch: int) -> bool | None:
        if Clock.left(deadline) <= 0:
            return None
        if checkpointing:
            model.enable_gradient_checkpointing()

        def step():
            images, labels, config, draws = training_batch(model, batch, device)
            with fp32_matmul(ctx.args.fp32_matmul):
                train_step(model, implementation, images, labels, config, draws, autocast=True)
            synchronize(device)

        status, _ = guarded(step, device)
        model.zero_grad(set_to_none=True)
        model.disable_gradient_checkpointing()
        free_memory(device)
        probes.append({"batch": batch, "status": status})
        if status not in ("ok", "OOM"):
            raise RuntimeError(status)
        return status == "ok"

    largest, smallest_failing = 0, None
    batch = settings.search_start
    result = {"implementation": implementation, "gradient_checkpointing": checkpointing, "probes": probes}
    try:
        while batch <= settings.search_cap:
            ok = fits(batch)
            if ok is None:
                return {**result, "largest_fitting": largest or None, "note": "time limit during the search"}
            if not ok:
                smallest_failing = batch
                break
            largest, batch = batch, batch * 2
        if smallest_failing is None:
            return {**result, "largest_fitting": largest, "note": f"no OOM up to the cap {settings.search_cap}"}
        while smallest_failing - largest > settings.search_granularity:
            middle = (largest + smallest_failing) // 2
            middle -= middle % settings.search_granularity
            if middle <= largest:
                break
            ok = fits(middle)
            if ok is None:
                return {**result, "largest_fitting": largest or None, "smallest_oom": smallest_failing,
                        "note": "time limit during the search"}
            largest, smallest_failing = (middle, smallest_failing) if ok else (largest, middle)
    except RuntimeError as err:
        return {**result, "largest_fitting": largest or None, "note": str(err)}
    return {**result, "largest_fitting": largest or None, "smallest_oom": smallest_failing}


def run_largest_batch(ctx: Context, deadline: float) -> None:
    shape = ctx.settings.train_shapes[0]
    status, model = guarded(lambda: training_model(shape, ctx.device), ctx.device)
    if status != "ok":
        ctx.report.add("training", "largest_batch", {"shape": shape, "status": status})
        return
    for implementation, checkpointing in (("pmf_loss", False), ("literal", False), ("pmf_loss", True)):
        if Clock.left(deadline) <= 0:
            ctx.report.add("training", "largest_batch", {"shape": shape, "implementation": implementation,
                                                         "gradient_checkpointing": checkpointing,
                                                         "note": "skipped: time limit"})
            continue
        row = {"shape": shape, **largest_batch(ctx, model, implementation, checkpointing, deadline)}
        ctx.report.add("training", "largest_batch", row)
    del model
    free_memory(ctx.device, collect=True)


# ----------------------------------------------------------------------------------------------------------------
# accelerate launch of examples/train_pmf.py: a few steps, checkpoint, resume
# ----------------------------------------------------------------------------------------------------------------
def make_image_folder(root: Path, classes: int = 4, per_class: int = 16, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def launch_shape_args(shape: str, batch: int) -> list[str]:
    """train_pmf.py flags: an official preset, or `toy` (the toy-cpu recipe on a 16-pixel, one-block network)."""
    if shape == "toy":
        return ["--preset", "toy-cpu", "--resolution", "16", "--patch_size", "4", "--num_layers", "1",
                "--num_head_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "16",
                "--mlp_hidden_dim", "64", "--bottleneck_dim", "16", "--train_batch_size", str(batch)]
    return ["--preset", shape, "--no_perceptual", "--allow_upscale", "--train_batch_size", str(batch)]


def launch_train_script(ctx: Context, output_dir: Path, data: Path, steps: int, extra: list[str], deterministic: bool,
                        timeout: float) -> dict:
    cpu = ctx.device.type == "cpu"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           # cuBLAS needs a fixed workspace for deterministic GEMMs (read when CUDA initialises in the child).
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    if ctx.device.type == "cuda" and ctx.device.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(ctx.device.index)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "bf16", "--dynamo_backend", "no", *(["--cpu"] if cpu else []),
               str(Path(__file__).resolve()), WORKER_FLAG, *(["--deterministic"] if deterministic else []), "--",
               *launch_shape_args(ctx.settings.launch_shape, ctx.settings.launch_batch),
               "--train_data_dir", str(data), "--output_dir", str(output_dir), "--cache_dir", str(output_dir.parent / "hf"),
               "--report_to", "none", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
               "--validation_steps", "0", "--ema_half_lives_kimg", "500", "--seed", "0", *extra]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        parts = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                 for part in (err.stdout, err.stderr)]
        returncode, output = f"killed after {timeout:.0f} s (time limit)", "".join(parts)
    result = {"returncode": returncode, "wall_s": time.perf_counter() - start, "deterministic_algorithms": deterministic}
    metrics = output_dir / "logs" / "metrics.jsonl"
    if metrics.is_file():
        result["history"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if returncode != 0:
        result["output_tail"] = output[-3000:]
    return result


def safetensors_deviation(first: Path, second: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)
    if set(a) != set(b):
        return {"error": f"different tensors: {sorted(set(a) ^ set(b))[:5]}"}
    worst = max((float((a[k].double() - b[k].double()).abs().max()), k) for k in a)
    return {"tensors": len(a), "max_abs_diff": worst[0], "worst_tensor": worst[1],
            "bit_exact": all(torch.equal(a[k], b[k]) for k in a)}


def run_accelerate(ctx: Context, deadline: float) -> None:
    section = ctx.report.section("accelerate")
    if importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("datasets") is None:
        section["status"] = "error: the training extras (accelerate, datasets) are not installed"
        ctx.report.save()
        return
    work = Path(ctx.args.work_dir) if ctx.args.work_dir else Path(tempfile.mkdtemp(prefix="pmf_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = 4
    section.update(shape=ctx.settings.launch_shape, batch=ctx.settings.launch_batch, steps=steps, mixed_precision="bf16",
                   how="run A: 4 steps, checkpoints at 2 and 4; run B: --resume_from_checkpoint A/checkpoint-2 to step "
                       "4; compared: checkpoint-4 weights, the exported EMA pipeline and the step 3-4 losses")
    try:
        data = make_image_folder(work / "data", per_class=max(8, ctx.settings.launch_batch))
        # Deterministic algorithms first (bit-exactness can then be expected); if an op has no deterministic
        # implementation on this device, once more without them, and the deviation is what gets measured.
        for deterministic in (True, False):
            for name in ("a", "b"):
                shutil.rmtree(work / name, ignore_errors=True)
            straight = launch_train_script(ctx, work / "a", data, steps, [], deterministic, Clock.left(deadline))
            section["run_a"] = straight
            ctx.report.save()
            # torch's message for an op without a deterministic kernel names the switch.
            needs_retry = deterministic and straight["returncode"] != 0 and (
                "use_deterministic_algorithms" in straight.get("output_tail", ""))
            if not needs_retry:
                break
            section["deterministic_failure"] = straight["output_tail"][-800:]
        section["deterministic_algorithms"] = deterministic
        if straight["returncode"] != 0:
            section["status"] = f"error: run A exited with {straight['returncode']}"
            return
        if Clock.left(deadline) <= 0:
            section["status"] = "skipped: time limit before the resume run"
            return
        resumed = launch_train_script(ctx, work / "b", data, steps,
                                      ["--resume_from_checkpoint", str(work / "a" / "checkpoint-2")], deterministic,
                                      Clock.left(deadline))
        section["run_b"] = resumed
        if resumed["returncode"] != 0:
            section["status"] = f"error: run B (resume) exited with {resumed['returncode']}"
            return
        section["weights"] = safetensors_deviation(work / "a" / "checkpoint-4" / "model.safetensors",
                                                   work / "b" / "checkpoint-4" / "model.safetensors")
        exported = Path("pipeline") / "transformer" / "diffusion_pytorch_model.safetensors"
        section["ema_export"] = safetensors_deviation(work / "a" / exported, work / "b" / exported)
        losses_a = {row["step"]: row["loss_u"] for row in straight.get("history", [])}
        losses_b = {row["step"]: row["loss_u"] for row in resumed.get("history", [])}
        common = sorted(set(losses_a) & set(losses_b))
        section["loss_u_steps_compared"] = common
        section["loss_u_max_abs_diff"] = max((abs(losses_a[s] - losses_b[s]) for s in common), default=None)
        exact = bool(section["weights"].get("bit_exact") and section["ema_export"].get("bit_exact") and common
                     and section["loss_u_max_abs_diff"] == 0)
        section["bit_exact"] = exact
        section["status"] = "ok: resume is bit-exact" if exact else "ok: resume deviates (see max_abs_diff)"
    finally:
        ctx.report.save()
        if not ctx.args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def train_script_worker(argv: list[str]) -> int:
    """Inside `accelerate launch`: optionally switch on deterministic algorithms, then run examples/train_pmf.py."""
    deterministic = "--deterministic" in argv[: argv.index("--")]
    if deterministic:
        torch.use_deterministic_algorithms(True)
    sys.argv = [str(TRAIN_SCRIPT), *argv[argv.index("--") + 1:]]
    try:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _met(value: float | None, bar: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    return "yes" if (value >= bar if higher_is_better else value <= bar) else "**no**"


def target_summary(data: dict) -> list[tuple[str, str, str]]:
    """The targets of issue 14 (one H200), read off the measured rows of the first shape."""
    sections, settings = data.get("sections", {}), data.get("settings", {})
    rows = []
    sampling = sections.get("sampling", {}).get("rows", [])
    shapes, batches = settings.get("shapes") or [None], settings.get("batch_sizes") or [None]
    shape, batch = shapes[0], 64 if 64 in batches else max(b for b in batches if b is not None)

    def sample_row(sampler, dtype, mode):
        return next((r for r in sampling if r.get("shape") == shape and r.get("batch") == batch and r.get("status") == "ok"
                     and r.get("sampler") == sampler and r.get("dtype") == dtype and r.get("mode") == mode
                     and r.get("attention") in ("native", "einsum (official)")), None)

    official = sample_row("official generate", "float32", "eager")
    for mode, bar in (("eager", 3.0), ("compile", 4.0)):
        ours = sample_row("PMFPipeline", "bfloat16", mode)
        ratio = ours["images_per_s"] / official["images_per_s"] if ours and official else None
        measured = f"{ratio:.2f}× ({ours['images_per_s']:.0f} vs {official['images_per_s']:.0f} img/s)" if ratio else "–"
        rows.append((f"sampling {shape} batch {batch}: bf16 {mode} ≥ {bar:g}× the official fp32 generate", measured,
                     _met(ratio, bar)))
    parity = sections.get("parity", {})
    fp32_rows = [r for r in parity.get("rows", []) if not r["check"].startswith("JAX")] + [
        r for r in parity.get("at_scale", []) if r.get("status") == "ok"]
    worst = max((r["max_rel_err"] for r in fp32_rows), default=None)
    rows.append((f"sampling parity on {data.get('device_info', {}).get('device')} fp32 ≤ 1e-5 relative",
                 f"{worst:.1e} (worst of {len(fp32_rows)})" if worst is not None else "–", _met(worst, 1e-5, False)))

    training = sections.get("training", {})
    train_shapes = settings.get("train_shapes") or [None]
    train_batches = settings.get("train_batch_sizes") or [None]
    train_batch = 64 if 64 in train_batches else train_batches[len(train_batches) // 2]

    def step_row(implementation):
        return next((r for r in training.get("rows", []) if r.get("shape") == train_shapes[0] and r.get("status") == "ok"
                     and r.get("batch") == train_batch and r.get("implementation") == implementation
                     and not r.get("gradient_checkpointing")), None)

    ours, literal = step_row("pmf_loss"), step_row("literal")
    ratio = literal["median_step_s"] / ours["median_step_s"] if ours and literal else None
    rows.append((f"training {train_shapes[0]} batch {train_batch}: step ≥ 2× the literal port",
                 f"{ratio:.2f}× ({ours['median_step_s']:.3f} vs {literal['median_step_s']:.3f} s)" if ratio else "–",
                 _met(ratio, 2.0)))
    equivalence = next((r for r in training.get("equivalence", []) if r.get("passed") is not None), None)
    if equivalence:
        worst = max(equivalence["loss_rel_err"], equivalence["max_grad_rel_err"])
        rows.append(("training: same loss and gradients as the literal port (≤ 1e-4, fp32)", f"{worst:.1e}",
                     _met(worst, EQUIVALENCE_TOLERANCE, False)))
    searches = {(r.get("implementation"), r.get("gradient_checkpointing")): r for r in training.get("largest_batch", [])}
    ours, literal = searches.get(("pmf_loss", False), {}), searches.get(("literal", False), {})
    ours_max, literal_max = ours.get("largest_fitting"), literal.get("largest_fitting")
    ratio = ours_max / literal_max if ours_max and literal_max else None
    met = _met(ratio, 2.0)
    if ratio is not None and ratio < 2 and ours.get("smallest_oom") is None:
        met = "not determined: no OOM up to the search cap"
    rows.append((f"training {train_shapes[0]}: largest batch that fits ≥ 2× the literal port's",
                 f"{ours_max} vs {literal_max}" if ours_max or literal_max else "–", met))
    return rows


def jvp_attention_lines(training: dict) -> list[str]:
    """The compiled JVP attention against the default explicit one: agreement at fp32 and step-time ratios."""
    checks = training.get("jvp_attention", [])
    rows = [r for r in training.get("rows", []) if r.get("status") == "ok"]
    ratios = []
    for compiled in (r for r in rows if r.get("implementation") == COMPILED_JVP_ATTENTION):
        explicit = next((r for r in rows if r.get("implementation") == "pmf_loss" and r["shape"] == compiled["shape"]
                         and r["batch"] == compiled["batch"] and
                         r["gradient_checkpointing"] == compiled["gradient_checkpointing"]), None)
        if explicit:
            ratios.append(f"{compiled['shape']} batch {compiled['batch']} (grad ckpt "
                          f"{'on' if compiled['gradient_checkpointing'] else 'off'}): "
                          f"{explicit['median_step_s'] / compiled['median_step_s']:.2f}×")
    if not checks and not ratios:
        return []
    lines = ["", "JVP attention compiled (`PMFLossConfig(jvp_attention=\"compiled\")`, off by default) against the "
             "default explicit one:"]
    for r in checks:
        if r.get("status") != "ok":
            lines.append(f"- {r['shape']} batch {r['batch']}, {r['precision']}: {r['status'][:90]}")
            continue
        passed = {True: "passed", False: "**FAILED**"}.get(r.get("passed"), "")
        lines.append(f"- {r['shape']} batch {r['batch']}, {r['precision']}: loss rel diff {r['loss_rel_err']:.1e}, "
                     f"worst grad rel diff {r['max_grad_rel_err']:.1e} ({r['worst_parameter']}), tolerance "
                     f"{r['tolerance']:.0e}: {passed}")
    if ratios:
        lines.append("- step-time speed-up of compiled over explicit: " + "; ".join(ratios))
    return lines


def render_markdown(data: dict) -> str:
    info = data.get("device_info", {})
    lines = [f"# pMF GPU check ({data.get('status')})", "",
             f"{data.get('date')} · {info.get('gpu', info.get('device'))} · torch {info.get('torch')} (CUDA "
             f"{info.get('cuda')}) · diffusers {info.get('diffusers')} · mode {data.get('mode')}", "",
             f"`{data.get('command')}`", ""]
    sections = data.get("sections", {})
    targets = target_summary(data)
    if targets:
        lines += ["## The issue's targets", ""]
        if data.get("mode") == "quick":
            lines += ["Quick mode (tiny shapes): the targets are meant for the full run on one H200; these rows only "
                      "show that the summary is computed.", ""]
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {met} |" for target, measured, met in targets]
        lines.append("")

    parity = sections.get("parity")
    if parity:
        lines += ["## Parity with the official oracles (fp32, TF32 off)", ""]
        if "passed" in parity:
            lines += [f"All oracle checks within tolerance: **{parity['passed']}**", ""]
        lines += ["| check | max rel err | tolerance | passed |", "|---|---|---|---|"]
        lines += [f"| {r['check']} | {r['max_rel_err']:.2e} | {r['tolerance']:.0e} | {'yes' if r['passed'] else '**NO**'} |"
                  for r in parity.get("rows", [])]
        for r in parity.get("at_scale", []):
            if r["status"] == "ok":
                lines.append(f"| {r['check']} | {r['max_rel_err']:.2e} | {r['tolerance']:.0e} | "
                             f"{'yes' if r['passed'] else '**NO**'} |")
            else:
                lines.append(f"| {r['check']} | {r['status'][:90]} | {r['tolerance']:.0e} | – |")
        if parity.get("bf16"):
            lines += ["", "bf16 deviation (reported, not judged):", "", "| check | max rel dev |", "|---|---|"]
            lines += [f"| {r['check']} | {r['max_rel_err']:.2e} |" for r in parity["bf16"]]
        lines.append("")

    gemm = sections.get("gemm")
    if gemm:
        lines += ["## GEMM peak", "", "| dtype | size | GFLOP/s (median) | GFLOP/s (best) |", "|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['size']} | {r['gflops_median']:.0f} | {r['gflops_best']:.0f} |"
                  for r in gemm.get("rows", [])]
        lines.append("")

    sampling = sections.get("sampling")
    if sampling:
        settings = sampling.get("settings", {})
        lines += ["## Sampling (one step)", "",
                  f"Official: {settings.get('official')}. fp32 matmul: {settings.get('fp32_matmul')}. Compile: "
                  f"`{settings.get('compile')}`. Attention backends skipped: "
                  f"{', '.join(settings.get('attention_backends_skipped') or {}) or 'none'}.", "",
                  "| shape | batch | sampler | dtype | mode | attention | img/s | GFLOP/s | % bf16 GEMM peak | "
                  "% fp32 GEMM peak | vs official | max rel dev (vs) | first call s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sampling.get("rows", []):
            if r.get("status") != "ok":
                lines.append(f"| {r['shape']} | {r.get('batch', '–')} | {r.get('sampler', r.get('variant'))} | "
                             f"{r.get('dtype', '–')} | {r.get('mode', '–')} | {r.get('attention', '–')} | "
                             f"{r['status'] if r['status'] == 'OOM' else r['status'][:80]} | | | | | | |")
                continue
            dev = f"{r['max_rel_dev']:.1e} ({r['deviation_from']})" if "max_rel_dev" in r else "reference"
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['sampler']} | {r['dtype']} | {r['mode']} | {r['attention']} | "
                f"{r['images_per_s']:.1f} | {r['gflops']:.0f} | {_fmt(r.get('percent_of_bf16_gemm_peak'), '.0f')} | "
                f"{_fmt(r.get('percent_of_fp32_gemm_peak'), '.0f')} | "
                f"{_fmt(r.get('speedup_vs_official'), '.2f')}{'×' if 'speedup_vs_official' in r else ''} | {dev} | "
                f"{r['first_call_s']:.1f} |")
        lines += [f"- {r['shape']}: skipped ({r['reason']})" for r in sampling.get("skipped", [])]
        lines.append("")

    training = sections.get("training")
    if training:
        lines += ["## Training step (pmf_loss vs literal port)", "", training.get("settings", {}).get("step", ""), ""]
        if training.get("equivalence"):
            lines += ["| shape | batch | precision | loss rel err | worst grad rel err (parameter) | passed |",
                      "|---|---|---|---|---|---|"]
            for r in training["equivalence"]:
                if r.get("status") != "ok":
                    lines.append(f"| {r['shape']} | {r['batch']} | {r['precision']} | {r['status']} | | |")
                    continue
                passed = {True: "yes", False: "**NO**"}.get(r.get("passed"), "–")
                lines.append(f"| {r['shape']} | {r['batch']} | {r['precision']} | {r['loss_rel_err']:.1e} | "
                             f"{r['max_grad_rel_err']:.1e} ({r['worst_parameter']}) | {passed} |")
            lines.append("")
        lines += ["| shape | batch | implementation | grad ckpt | step s | img/s | peak GB | speed-up vs literal |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = training.get("rows", [])
        for r in rows:
            if "implementation" not in r:
                lines.append(f"| {r['shape']} | | model build | | {r['status']} | | | |")
                continue
            checkpointing = "on" if r["gradient_checkpointing"] else "off"
            head = f"| {r['shape']} | {r['batch']} | {r['implementation']} | {checkpointing} |"
            if r["status"] != "ok":
                lines.append(f"{head} {r['status'] if r['status'] == 'OOM' else r['status'][:90]} | | | |")
                continue
            literal = next((o for o in rows if o.get("implementation") == "literal" and o["shape"] == r["shape"] and
                            o.get("batch") == r["batch"] and o.get("status") == "ok" and
                            o["gradient_checkpointing"] == r["gradient_checkpointing"]), None)
            speedup = None
            if literal and r["implementation"] in PMF_LOSS_VARIANTS:
                speedup = literal["median_step_s"] / r["median_step_s"]
            lines.append(f"{head} {r['median_step_s']:.3f} | {r['images_per_s']:.1f} | "
                         f"{_fmt(r.get('peak_memory_gb'), '.1f')} | {_fmt(speedup, '.2f')}{'×' if speedup else ''} |")
        lines += jvp_attention_lines(training)
        syncs = training.get("host_syncs")
        if syncs:
            lines += ["", f"Host syncs in one training step: {syncs.get('syncs', syncs.get('status'))}"
                      + (f" ({syncs['scope']})" if "scope" in syncs else "")]
            lines += [f"- {count}× {site}" for site, count in syncs.get("sites", {}).items()]
        if training.get("largest_batch"):
            lines += ["", "| shape | implementation | grad ckpt | largest batch that fits | smallest OOM | note |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['shape']} | {r.get('implementation', '–')} | "
                      f"{'on' if r.get('gradient_checkpointing') else 'off'} | {_fmt(r.get('largest_fitting'))} | "
                      f"{_fmt(r.get('smallest_oom'))} | {r.get('note', r.get('status', ''))} |"
                      for r in training["largest_batch"]]
        lines += [f"- {r['shape']}: skipped ({r['reason']})" for r in training.get("skipped", [])]
        lines.append("")

    launch = sections.get("accelerate")
    if launch:
        lines += ["## accelerate launch examples/train_pmf.py: checkpoint and resume", "",
                  f"Status: **{launch.get('status', 'running')}**. {launch.get('how', '')}", ""]
        for key in ("run_a", "run_b"):
            run = launch.get(key)
            if run:
                speeds = [row["img_per_sec"] for row in run.get("history", [])[1:]]
                lines.append(f"- {key}: exit {run['returncode']}, {run['wall_s']:.1f} s wall"
                             + (f", {statistics.median(speeds):.1f} img/s (median after step 1)" if speeds else ""))
        for key in ("weights", "ema_export"):
            if key in launch:
                lines.append(f"- {key}: bit-exact {launch[key].get('bit_exact')}, max abs diff "
                             f"{_fmt(launch[key].get('max_abs_diff'), '.2e')}")
        if "loss_u_max_abs_diff" in launch:
            lines.append(f"- loss_u at steps {launch['loss_u_steps_compared']}: max abs diff "
                         f"{launch['loss_u_max_abs_diff']}")
        bare = next((r for r in (training or {}).get("rows", []) if r.get("status") == "ok" and r.get("shape") ==
                     launch.get("shape") and r.get("batch") == launch.get("batch") and r.get("implementation") ==
                     "pmf_loss" and not r.get("gradient_checkpointing")), None)
        if bare:
            lines.append(f"- the bare step (objective + backward) at the same shape and batch: {bare['images_per_s']:.1f} "
                         "img/s (the script adds data loading, Muon, EMA, logging and its host syncs)")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = resolve_settings(args)
    device = resolve_device(args.device)
    if "parity" in args.sections:
        check_reference_dir(args.reference_dir)
    official = load_official_code(args.official_path) if args.official_path is not None else None
    backends, skipped = resolve_attention_backends(args.attention_backends)

    import diffusers
    from diffusers.models.attention_dispatch import attention_backend  # noqa: F401  (the heavy imports, done once)

    import pmf_diffusers.training  # noqa: F401

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # per-call notes of the dispatcher and of `.to(dtype)`
    # Everything imported so far lives for the whole run: keep it out of the cycle collector's scans, so the
    # collections after an OOM cost milliseconds rather than a second.
    gc.freeze()
    table = args.table or args.output.with_suffix(".md")
    header = {"schema": 1, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "mode": "quick" if args.quick else "full", "device_info": device_info(device),
              "settings": {key: value for key, value in vars(settings).items()}}
    report = Report(args.output, table, header)
    ctx = Context(args, settings, device, report, Clock(settings), official, backends, skipped, {})
    report.save()
    threads = torch.get_num_threads()
    if args.quick and device.type == "cpu":
        # Tiny shapes on a shared small CPU: several OpenMP threads mostly spin-wait (the tests run them on one).
        torch.set_num_threads(1)

    runners = {
        "parity": lambda deadline: run_parity(ctx, deadline),
        "gemm": lambda deadline: run_gemm(ctx, deadline),
        "sampling:primary": lambda deadline: run_sampling(ctx, deadline, settings.shapes[:1], primary=True),
        "training:primary": lambda deadline: run_training(ctx, deadline, settings.train_shapes[:1], equivalence=True),
        "accelerate": lambda deadline: run_accelerate(ctx, deadline),
        "sampling:other": lambda deadline: run_sampling(ctx, deadline, settings.shapes[1:], primary=False),
        "training:largest": lambda deadline: run_largest_batch(ctx, deadline),
        "training:other": lambda deadline: run_training(ctx, deadline, settings.train_shapes[1:], equivalence=False),
    }
    phase_seconds = report.data.setdefault("phase_seconds", {})
    try:
        for phase, section in PHASES:
            if section not in args.sections:
                continue
            start = time.perf_counter()
            deadline = ctx.clock.phase_deadline(phase)
            if Clock.left(deadline) <= 0:
                report.section(section).setdefault("skipped_phases", []).append(f"{phase}: time limit")
            else:
                print(f"# {phase} ({Clock.left(deadline):.0f} s left for it)", flush=True)
                runners[phase](deadline)
            phase_seconds[phase] = time.perf_counter() - start
            report.save()
        report.data["status"] = "complete"
    except BaseException:
        report.data["status"] = "interrupted"
        raise
    finally:
        torch.set_num_threads(threads)
        diffusers.utils.logging.set_verbosity(verbosity)
        gc.unfreeze()
        report.data["total_seconds"] = time.perf_counter() - ctx.clock.start
        report.save()
    print(render_markdown(report.data))
    print(f"\nwrote {args.output} and {table}")
    return report.data


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        return train_script_worker(argv[1:])
    # `timeout` sends SIGTERM: exit through the `finally` that marks the saved results "interrupted".
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main(argv)
    except GPUCheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
