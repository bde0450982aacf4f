"""The `pmf` command line (`pmf_diffusers.cli`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, load_reference, max_rel_err, needs_reference, official_state_dict

from pmf_diffusers.cli import build_parser, main
from pmf_diffusers.commands import convert as convert_command

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(capsys, *argv):
    capsys.readouterr()  # drop what earlier steps of the test printed
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pmf: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_parser_structure():
    parser = build_parser()
    args = parser.parse_args(["--debug", "convert", "a.pt", "out", "--guidance-interval", "0.1", "0.7"])
    assert args.debug is True and args.command == "convert" and args.guidance_interval == [0.1, 0.7]
    assert args.func is convert_command.run
    assert parser.parse_args(["convert", "a.pt", "out"]).debug is False
    assert parser.parse_args(["convert", "a.pt", "out", "--debug"]).debug is True


def test_help_via_subprocess():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "pmf_diffusers.cli", "convert", "--help"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: pmf convert" in result.stdout
    assert "examples:" in result.stdout and "pmf convert pMF-B/16" in result.stdout
    assert "--overwrite" in result.stdout and "--guidance-interval A B" in result.stdout


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "convert" in out and "--debug" in out and "examples:" in out


@needs_reference
def test_convert_local_checkpoint(tmp_path, capsys, tiny_checkpoint):
    from pmf_diffusers import PMFPipeline

    output = tmp_path / "pipe"
    code, out, err = _run(
        capsys, "convert", str(tiny_checkpoint), str(output),
        "--noise-scale", "1.0", "--guidance-scale", "7.5", "--guidance-interval", "0.1", "0.8",
    )
    assert code == 0, err
    assert f"Wrote PMFPipeline to {output}" in out
    assert "32x32 px, patch 8, hidden 64, 2+2 blocks, 0.3M params (329,472), 10 classes" in out
    index = json.loads((output / "model_index.json").read_text())
    class_name = index["_class_name"]  # "PMFPipeline", or diffusers' list form [module, "PMFPipeline"]
    assert (class_name[-1] if isinstance(class_name, list) else class_name) == "PMFPipeline"
    assert index["default_guidance_scale"] == 7.5

    pipe = PMFPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    ref = load_reference("tinyA_generate")
    sample = pipe(ref["labels"].tolist(), latents=ref["noise_unscaled"], output_type="latent").images
    assert max_rel_err(sample, ref["sample_s1_w7.5_i0.1-0.8"]) <= 1e-5

    # Non-empty output folder: refused unless --overwrite.
    code, out, err = _run(capsys, "convert", str(tiny_checkpoint), str(output), "--noise-scale", "2")
    _assert_one_line_error(code, err, "not empty", "--overwrite")
    code, out, err = _run(capsys, "convert", str(tiny_checkpoint), str(output), "--noise-scale", "2", "--overwrite")
    assert code == 0, err
    assert "noise scale 2" in out
    assert PMFPipeline.from_pretrained(output).scheduler.config.noise_scale == 2.0


@needs_reference
def test_convert_errors(tmp_path, capsys, tiny_checkpoint):
    # A preset whose shapes contradict the checkpoint.
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "a"), "--preset", "pMF-B/16")
    _assert_one_line_error(code, err, "contradicts preset pMF-B/16", "image size 32 (preset 256)")
    assert not (tmp_path / "a").exists()
    # Missing file.
    code, _, err = _run(capsys, "convert", str(tmp_path / "missing.pt"), str(tmp_path / "b"))
    _assert_one_line_error(code, err, "checkpoint file not found", "missing.pt")
    # Broken checkpoint: the keys are named.
    broken = official_state_dict("tinyA", prefix="net.", v_head=False)
    del broken["net.u_final_layer.norm.weight"]
    torch.save(broken, tmp_path / "broken.pt")
    code, _, err = _run(capsys, "convert", str(tmp_path / "broken.pt"), str(tmp_path / "c"))
    _assert_one_line_error(code, err, "missing keys: u_norm_out.weight")
    # Not plain weights.
    torch.save({"net.pos_embed": os.system}, tmp_path / "pickle.pt")
    code, _, err = _run(capsys, "convert", str(tmp_path / "pickle.pt"), str(tmp_path / "d"))
    _assert_one_line_error(code, err, "not a plain weights file")
    # Unknown preset, bad values, usage errors.
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "e"), "--preset", "pMF-XL/2")
    _assert_one_line_error(code, err, "Unknown pMF size 'pMF-XL/2'")
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "e"), "--guidance-scale", "0.5")
    _assert_one_line_error(code, err, "--guidance-scale must be a finite number ≥ 1")
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "e"), "--guidance-interval", "0.8", "0.2")
    _assert_one_line_error(code, err, "--guidance-interval")
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint))
    _assert_one_line_error(code, err, "OUTPUT_DIR")
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "e"), "--noise-scale", "abc")
    _assert_one_line_error(code, err, "invalid float value")
    code, _, err = _run(capsys)
    _assert_one_line_error(code, err, "COMMAND")
    code, _, err = _run(capsys, "frobnicate")
    _assert_one_line_error(code, err, "invalid choice")
    assert not (tmp_path / "e").exists()


@needs_reference
def test_convert_overwrite_keeps_the_input_and_foreign_files(tmp_path, capsys, tiny_checkpoint):
    """Issue 12, item 3: `pmf convert CKPT DIR --overwrite` used to delete DIR, the checkpoint inside it included."""
    import shutil

    from pmf_diffusers import PMFPipeline

    checkpoint = tmp_path / "work" / "tinyA.pt"
    checkpoint.parent.mkdir()
    shutil.copyfile(tiny_checkpoint, checkpoint)
    data = checkpoint.read_bytes()
    code, _, err = _run(capsys, "convert", str(checkpoint), str(checkpoint.parent), "--overwrite")
    _assert_one_line_error(code, err, "contains the checkpoint", "another folder")
    assert checkpoint.read_bytes() == data

    output = tmp_path / "out"
    assert _run(capsys, "convert", str(checkpoint), str(output))[0] == 0
    (output / "notes.txt").write_text("mine")
    code, out, err = _run(capsys, "convert", str(checkpoint), str(output), "--noise-scale", "2", "--overwrite")
    assert code == 0, err
    assert (output / "notes.txt").read_text() == "mine" and checkpoint.read_bytes() == data
    assert PMFPipeline.from_pretrained(output).scheduler.config.noise_scale == 2.0


@needs_reference
@pytest.mark.parametrize(
    "option, message",
    [
        (["--noise-scale", "inf"], "--noise-scale must be a finite number > 0, got inf"),
        (["--noise-scale", "nan"], "--noise-scale must be a finite number > 0, got nan"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number ≥ 1"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number ≥ 1"),
        (["--guidance-interval", "0.1", "nan"], "--guidance-interval A B must satisfy"),
    ],
)
def test_convert_refuses_non_finite_settings(tmp_path, capsys, tiny_checkpoint, option, message):
    """Issue 12, item 9: `--noise-scale inf` used to write `Infinity` into the scheduler config."""
    code, _, err = _run(capsys, "convert", str(tiny_checkpoint), str(tmp_path / "out"), *option)
    _assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


@needs_reference
def test_debug_shows_the_traceback(tmp_path, tiny_checkpoint):
    from pmf_diffusers.conversion import CheckpointConversionError

    with pytest.raises(CheckpointConversionError):
        main(["--debug", "convert", str(tiny_checkpoint), str(tmp_path / "out"), "--preset", "pMF-B/16"])
    with pytest.raises(CheckpointConversionError):
        main(["convert", str(tiny_checkpoint), str(tmp_path / "out"), "--preset", "pMF-B/16", "--debug"])


@needs_reference
def test_convert_size_name_downloads_from_the_hub(tmp_path, capsys, monkeypatch, tiny_preset):
    """`pmf convert pMF-B/16 OUT` fetches the preset's file with hf_hub_download (here: a fake offline Hub cache, with
    the B/16 preset swapped for the tiny shape) and applies the preset."""
    import dataclasses

    from huggingface_hub import constants

    from pmf_diffusers import PMFPipeline
    from pmf_diffusers.conversion import OFFICIAL_PRESETS, OFFICIAL_REPO_ID

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    # Offline and not cached: one clear line.
    code, _, err = _run(capsys, "convert", "pMF-B/16", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "could not download Lyy0725/pMF/pMF-B-16.pt", "offline")

    commit = "f" * 40
    repo_dir = hub / f"models--{OFFICIAL_REPO_ID.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    torch.save(official_state_dict("tinyA", prefix="net.", v_head=False), repo_dir / "snapshots" / commit / "pMF-B-16.pt")

    # The real B/16 preset contradicts the tiny file ...
    code, _, err = _run(capsys, "convert", "pMF-B/16", str(tmp_path / "out"))
    _assert_one_line_error(code, err, "contradicts preset pMF-B/16")
    # ... a tiny-shaped stand-in registered under the same name converts, with the preset's settings.
    tiny_b16 = dataclasses.replace(tiny_preset, name="pMF-B/16", filename="pMF-B-16.pt", guidance_scale=8.5,
                                   guidance_interval=(0.1, 0.7))
    monkeypatch.setitem(OFFICIAL_PRESETS, "pMF-B/16", tiny_b16)
    code, out, err = _run(capsys, "convert", "pmf-b-16", str(tmp_path / "out"))
    assert code == 0, err
    assert "Wrote PMFPipeline as pMF-B/16" in out
    pipe = PMFPipeline.from_pretrained(tmp_path / "out")
    assert pipe.config.default_guidance_scale == 8.5
    assert list(pipe.config.default_guidance_interval) == [0.1, 0.7]
    # A size name and a different --preset disagree.
    code, _, err = _run(capsys, "convert", "pMF-B/16", str(tmp_path / "out2"), "--preset", "pMF-L/16")
    _assert_one_line_error(code, err, "CHECKPOINT is pMF-B/16 but --preset is pMF-L/16")
