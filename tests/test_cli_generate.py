"""`pmf generate` (the README's main job), `pmf push` / `pmf eval` wiring, and `pmf --help` as a map."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pmf_diffusers.bundled import bundled_model_path
from pmf_diffusers.cli import main


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_with_the_bundled_model_writes_pngs_and_a_grid(tmp_path, capsys):
    assert bundled_model_path().is_dir()  # shipped inside the package, no environment override needed
    code, out, err = run(["generate", "--class-labels", "0", "red_circle", "--images-per-class", "2",
                          "--output", str(tmp_path), "--seed", "3"], capsys)
    assert code == 0, err
    pngs = sorted(tmp_path.glob("*_class*.png"))
    assert len(pngs) == 4 and (tmp_path / "grid.png").is_file()
    assert Image.open(pngs[0]).size == (32, 32)
    assert str(tmp_path) in out and "ms per image" in out
    # Deterministic for a fixed seed.
    again = tmp_path / "again"
    assert run(["generate", "--class-labels", "0", "red_circle", "--images-per-class", "2",
                "--output", str(again), "--seed", "3"], capsys)[0] == 0
    for first, second in zip(pngs, sorted(again.glob("*_class*.png"))):
        assert torch.equal(torch.tensor(list(Image.open(first).getdata())), torch.tensor(list(Image.open(second).getdata())))


def test_generate_compiled_gives_the_same_images(tmp_path, capsys):
    argv = ["generate", "--class-labels", "0", "5", "--output"]
    assert run([*argv, str(tmp_path / "eager")], capsys)[0] == 0
    code, out, err = run([*argv, str(tmp_path / "compiled"), "--compile"], capsys)
    assert code == 0, err
    assert "compiled" in out
    for eager, compiled in zip(sorted((tmp_path / "eager").glob("*_class*.png")),
                               sorted((tmp_path / "compiled").glob("*_class*.png")), strict=True):
        difference = np.asarray(Image.open(eager), dtype=np.int16) - np.asarray(Image.open(compiled), dtype=np.int16)
        assert np.abs(difference).max() <= 1  # fp32 rounding may move a pixel by one uint8 level


def test_generate_from_a_folder_with_bf16(tmp_path, capsys):
    code, out, err = run(["generate", "--model", str(bundled_model_path()), "--class-labels", "3",
                          "--dtype", "bf16", "--no-images", "--output", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "grid.png").is_file() and not list(tmp_path.glob("*_class*.png"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "no-such-model"], "unknown model"),
        (["generate", "--model", "bad repo id!"], "unknown model"),
        (["generate", "--class-labels", "no such class"], "Unknown class name"),
        (["generate", "--class-labels", "99"], "out of range"),
        (["generate", "--steps", "0"], "--steps must be"),
        (["generate", "--guidance-scale", "0.5"], "guidance_scale"),
    ],
)
def test_generate_bad_input_is_one_line(argv, message, capsys, tmp_path):
    code, out, err = run(argv + ["--output", str(tmp_path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pmf: error:") and message in err
    assert "Traceback" not in err


def test_generate_reports_a_batch_that_does_not_fit(monkeypatch, capsys, tmp_path):
    from pmf_diffusers.pipelines.pipeline_pmf import PMFPipeline

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(PMFPipeline, "__call__", out_of_memory)
    code, _, err = run(["generate", "--batch-size", "64", "--output", str(tmp_path)], capsys)
    assert code == 2 and "smaller --batch-size" in err


def test_help_is_a_map_of_the_project():
    result = subprocess.run([sys.executable, "-m", "pmf_diffusers.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "convert", "push", "eval", "train_pmf.py", "spaces_app/app.py"):
        assert command in result.stdout
    for command in ("generate", "push", "eval"):
        sub = subprocess.run([sys.executable, "-m", "pmf_diffusers.cli", command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: pmf " + command in sub.stdout
