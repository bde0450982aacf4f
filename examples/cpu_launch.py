"""The CPU training run shared by the example pipelines (toy_shapes_demo.py, train_digits.py)."""

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def process_count(text: str) -> int:
    """argparse type of --num-processes: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}")
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_train_command(preset: str, data_dir: Path, output_dir: Path, seed: int, *, num_processes: int = 1,
                      max_train_steps=None, max_train_minutes=None, extra_args: str = "") -> list[str]:
    """`accelerate launch` of examples/train_pmf.py with the settings of a small CPU run: no perceptual losses, the
    exported pipeline without the (training-only) v-head; one process (`--cpu`), or `num_processes` DDP processes over
    gloo (`--multi_gpu` with the environment of `cpu_train_env`: `accelerate launch --cpu` always starts one)."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    mode = ["--cpu"] if num_processes == 1 else ["--multi_gpu", "--main_process_port", str(_free_port())]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "examples" / "train_pmf.py"),
        "--preset", preset, "--train_data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--no_perceptual", "--seed", str(seed), "--export_drop_v_head",
    ]
    if max_train_steps:
        command += ["--max_train_steps", str(max_train_steps)]
    if max_train_minutes is not None:
        command += ["--max_train_minutes", str(max_train_minutes)]
    return command + shlex.split(extra_args)


def cpu_train_env(num_processes: int = 1) -> dict[str, str]:
    """Environment additions of `cpu_train_command`: DDP on CPU needs ACCELERATE_USE_CPU=1 (gloo), and one thread per
    process keeps the processes from competing for the cores."""
    return {} if num_processes == 1 else {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def run_cpu_training(preset: str, data_dir: Path, output_dir: Path, seed: int, *, num_processes: int = 1,
                     **options) -> dict:
    """Run `cpu_train_command` (printed first); return the command as a shell line and the wall time in seconds."""
    command = cpu_train_command(preset, data_dir, output_dir, seed, num_processes=num_processes, **options)
    env = cpu_train_env(num_processes)
    line = " ".join([*(f"{name}={value}" for name, value in env.items()), *(shlex.quote(part) for part in command)])
    print("running:", line, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, **env})
    return {"train_command": line, "training_seconds": time.perf_counter() - start}
