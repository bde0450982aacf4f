"""`pmf generate` (the README's main job), `pmf push` / `pmf eval` wiring, and `pmf --help` as a map."""

import json
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


def test_generate_with_the_bundled_digits_model(tmp_path, capsys):
    """`--model digits` is the second bundled model (real handwritten digits), found by name, offline."""
    code, out, err = run(["generate", "--model", "digits", "--class-labels", "seven", "3", "--images-per-class", "2",
                          "--output", str(tmp_path)], capsys)
    assert code == 0, err
    names = sorted(path.name for path in tmp_path.glob("*_class*.png"))
    assert len(names) == 4 and sum("_class7_" in name for name in names) == 2, names
    image = np.asarray(Image.open(tmp_path / names[0]))
    assert image.shape[:2] == (32, 32) and (tmp_path / "grid.png").is_file()


def test_generate_batch_size_bounds_memory_not_the_images(tmp_path, capsys):
    """--batch-size is the pipeline's `max_batch_size`: image i keeps seed + i (its noise); the network sees other
    batch shapes, so a pixel may move by float rounding (one uint8 level), no more."""
    argv = ["generate", "--class-labels", "0", "3", "7", "--images-per-class", "2", "--seed", "5", "--no-grid"]
    for batch_size in ("2", "16"):
        assert run([*argv, "--batch-size", batch_size, "--output", str(tmp_path / batch_size)], capsys)[0] == 0
    small, large = sorted((tmp_path / "2").glob("*.png")), sorted((tmp_path / "16").glob("*.png"))
    assert len(small) == 6 and [path.name for path in small] == [path.name for path in large]
    for first, second in zip(small, large):
        difference = np.asarray(Image.open(first), dtype=np.int16) - np.asarray(Image.open(second), dtype=np.int16)
        assert np.abs(difference).max() <= 1


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
        (["generate", "--guidance-scale", "0.5"], "--guidance-scale (ω) must be a finite number ≥ 1"),
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
    for command in ("generate", "convert", "push", "push-space", "eval", "train_pmf.py", "spaces_app/app.py"):
        assert command in result.stdout
    for command in ("generate", "push", "push-space", "eval"):
        sub = subprocess.run([sys.executable, "-m", "pmf_diffusers.cli", command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: pmf " + command in sub.stdout
        assert "examples:" in sub.stdout


def test_generate_refuses_a_non_empty_folder_without_overwrite(tmp_path, capsys):
    """Issue 12, item 4: same-named PNGs are never replaced silently."""
    argv = ["generate", "--class-labels", "0", "--output", str(tmp_path)]
    assert run(argv + ["--seed", "1"], capsys)[0] == 0
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    (tmp_path / "notes.txt").write_text("mine")

    code, _, err = run(argv + ["--seed", "2"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"output folder '{tmp_path}' is not empty" in err and "--overwrite" in err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name != "notes.txt"} == written

    code, _, err = run(argv + ["--seed", "2", "--overwrite"], capsys)
    assert code == 0, err
    png = next(name for name in written if name.endswith("_class0_red_circle.png"))
    assert (tmp_path / png).read_bytes() != written[png]  # replaced with the seed-2 image
    assert (tmp_path / "notes.txt").read_text() == "mine"

    (tmp_path / "file").write_text("x")
    code, _, err = run(["generate", "--output", str(tmp_path / "file")], capsys)
    assert code == 2 and "exists and is not a folder" in err


def test_generate_class_id_and_model_file_errors_name_the_fix(tmp_path, capsys):
    """Issue 12, item 11: a negative id is an id out of range (not an unknown name); a file is not a Hub id."""
    code, _, err = run(["generate", "--class-labels", "-1", "--output", str(tmp_path / "a")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "Class id -1 is out of range" in err and "0..9" in err and "10 = unconditional" in err
    assert "Unknown class name" not in err

    checkpoint = tmp_path / "pMF-B-16.pt"
    checkpoint.write_bytes(b"not a folder")
    code, _, err = run(["generate", "--model", str(checkpoint), "--output", str(tmp_path / "b")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"'{checkpoint}' is a file" in err and "pmf convert" in err and "Hub" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_images_skips_the_grid_that_generate_writes(tmp_path, capsys):
    """Issue 11, item 6: `pmf eval --images` on a `pmf generate` folder evaluates the samples, not grid.png."""
    samples = tmp_path / "samples"
    assert run(["generate", "--class-labels", "0", "1", "--output", str(samples)], capsys)[0] == 0
    assert (samples / "grid.png").is_file()
    report = tmp_path / "eval.json"
    code, _, err = run(["eval", "--images", str(samples), "--feature-extractor", "random", "--device", "cpu",
                        "--output", str(report)], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["num_images"] == 2
