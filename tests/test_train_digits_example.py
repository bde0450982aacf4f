"""examples/train_digits.py end to end on a two-step DDP run, and the CPU launch helper it shares with
examples/toy_shapes_demo.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture
def cpu_launch(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import cpu_launch

    return cpu_launch


def test_cpu_launch_starts_ddp_for_more_than_one_process(cpu_launch, tmp_path):
    one = cpu_launch.cpu_train_command("digits-cpu", tmp_path / "data", tmp_path / "out", 0)
    assert "--cpu" in one and one[one.index("--num_processes") + 1] == "1"
    assert cpu_launch.cpu_train_env(1) == {}
    # `accelerate launch --cpu --num_processes 2` starts a single process: DDP on CPU is --multi_gpu + ACCELERATE_USE_CPU.
    two = cpu_launch.cpu_train_command("digits-cpu", tmp_path / "data", tmp_path / "out", 0, num_processes=2,
                                       max_train_steps=5, extra_args="--validation_steps 0")
    assert "--cpu" not in two and "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    assert two[-4:] == ["--max_train_steps", "5", "--validation_steps", "0"]
    assert cpu_launch.cpu_train_env(2) == {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with pytest.raises(ValueError, match="num_processes"):
        cpu_launch.cpu_train_command("digits-cpu", tmp_path, tmp_path, 0, num_processes=0)


def test_train_digits_refuses_a_bad_process_count_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_digits.py"), "--output-dir", str(tmp_path),
                             "--num-processes", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--num-processes: expected a whole number of processes >= 1, got '0'" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_train_digits_runs_end_to_end_with_two_processes(tmp_path):
    output = tmp_path / "digits"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), "--output-dir", str(output), "--max-train-steps", "2",
         "--guidance-scales", "1", "--grid-columns", "2", "--extra-train-args",
         "--validation_steps 0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DistributedType.MULTI_CPU" in result.stderr + result.stdout  # two processes, not two copies of one
    report = json.loads((output / "report.json").read_text())
    assert report["split"]["train"] == 1257 and report["split"]["heldout"] == 540
    assert report["training_steps"] == 2 and report["train_command"].startswith("ACCELERATE_USE_CPU=1 ")
    assert set(report["guidance"]) == {"1.0", str(report["default_guidance_scale"])}
    scores = report["guidance"]["1.0"]
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["fd_ratio"] > 1.0  # two steps: far from real digits
    assert (output / "samples_vs_heldout.png").is_file() and (output / "report.md").is_file()
