"""The CPU training command shared by the example pipelines (toy_shapes_demo.py, train_digits.py)."""

import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_train_command(preset: str, data_dir: Path, output_dir: Path, seed: int, *, max_train_steps=None,
                      max_train_minutes=None, extra_args: str = "") -> list[str]:
    """`accelerate launch --cpu` of examples/train_pmf.py with the settings of a small CPU run: one process, no
    perceptual losses, the exported pipeline without the (training-only) v-head."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "examples" / "train_pmf.py"),
        "--preset", preset, "--train_data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--no_perceptual", "--seed", str(seed), "--export_drop_v_head",
    ]
    if max_train_steps:
        command += ["--max_train_steps", str(max_train_steps)]
    if max_train_minutes is not None:
        command += ["--max_train_minutes", str(max_train_minutes)]
    return command + shlex.split(extra_args)
