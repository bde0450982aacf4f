"""CPU training throughput: one process against DDP processes of one thread each, on the real digits.

Runs `examples/train_pmf.py` (through `examples/cpu_launch.py`, the launch the CPU examples use) for `--steps` steps
in each layout, the layouts alternating round by round so a change in the machine's speed hits both, and reads the
training loop's own time from its progress bar (start-up excluded). The global batch is the preset's in every layout.

    python benchmarks/bench_cpu_processes.py --steps 120 --rounds 2 --output bench_cpu_processes.json

docs/benchmarks.md ("CPU training: processes") has the results.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from cpu_launch import cpu_train_command, cpu_train_env  # noqa: E402
from train_digits import prepare_digits_folder  # noqa: E402

# The progress bar's final line: "N/N [MM:SS<..." (tqdm's elapsed time of the training loop).
PROGRESS = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def loop_seconds(log: str, steps: int) -> float:
    finished = [m for m in PROGRESS.finditer(log) if int(m.group(1)) == int(m.group(2)) == steps]
    if not finished:
        raise RuntimeError(f"no finished progress bar for {steps} steps in the training log:\n{log[-2000:]}")
    hours, minutes, seconds = (int(g or 0) for g in finished[-1].groups()[2:])
    return 3600 * hours + 60 * minutes + seconds


def run(layout: int, data_dir: Path, work: Path, preset: str, steps: int) -> float:
    command = cpu_train_command(preset, data_dir, work / f"p{layout}", 0, num_processes=layout, max_train_steps=steps,
                                extra_args="--validation_steps 0 --checkpointing_steps 0 --report_to none")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **cpu_train_env(layout)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return loop_seconds(result.stderr + result.stdout, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits-cpu")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 1], help="layouts to compare")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_digits_folder(work / "data")
        seconds = {layout: [] for layout in args.processes}
        for round_index in range(args.rounds):
            for layout in args.processes:
                seconds[layout].append(run(layout, work / "data" / "train", work, args.preset, args.steps))
                print(f"round {round_index}: {layout} process(es): {seconds[layout][-1]:.0f} s", flush=True)
    single = statistics.median(seconds[min(args.processes)])
    report = {
        "preset": args.preset,
        "steps": args.steps,
        "loop_seconds": {str(k): v for k, v in seconds.items()},
        "steps_per_second": {str(k): args.steps / statistics.median(v) for k, v in seconds.items()},
        "speedup_vs_fewest_processes": {str(k): single / statistics.median(v) for k, v in seconds.items()},
    }
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
