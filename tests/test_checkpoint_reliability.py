"""Reliability of `examples/train_pmf.py`'s checkpoints and data (issue 12, items 1, 5, 6, 7 and 14). CPU only.

* No code from a checkpoint: pickles that would run code (in `custom_checkpoint_*.pkl`, accelerate's RNG states, a DCP
  folder) are refused before anything is loaded — even when the attacker also rewrote the checksums of the marker.
* Damaged checkpoints (truncated files, a 0-byte marker, a flipped byte) are refused with one line naming the
  checkpoint and the file; `latest` falls back to the previous complete checkpoint with a warning.
* A full disk while saving says so, where, and that the previous checkpoint is intact; saves are fsynced before the
  rename.
* A resume cuts `logs/metrics.jsonl` back to the checkpoint's step; images smaller than the resolution are skipped
  and reported instead of stopping the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from pmf_diffusers.training.toy_data import TOY_CLASS_FOLDERS
from conftest import load_train_script
from train_utils import add_tiny_test_preset, make_toy_subset, recording_accelerator

T = load_train_script("train_pmf_reliability")
TRAINED: list[dict] = []


@pytest.fixture(autouse=True)
def _isolated(isolated_accelerate, monkeypatch):
    add_tiny_test_preset(monkeypatch)
    monkeypatch.setattr(T, "Accelerator", recording_accelerator(T.Accelerator, TRAINED))
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def toy4(workdir) -> Path:
    return make_toy_subset(workdir / "toy4", images_per_class=16, size=32)


def argv(output_dir: Path, data: Path, cache: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--preset", "tiny-test", "--train_data_dir", str(data), "--output_dir", str(output_dir),
            "--max_train_steps", str(steps), "--report_to", "none", "--validation_steps", "0",
            "--checkpointing_steps", "2", "--cache_dir", str(cache), *extra]


def train(*args: str, steps: int = 4) -> dict:
    return {**T.main(T.parse_args(argv(*args, steps=steps))), **TRAINED[-1]}


@pytest.fixture(scope="module")
def base_run(workdir, toy4) -> Path:
    """4 steps with checkpoints at 2 and 4 (each test works on its own copy)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `isolated_accelerate` does for the resumed runs, whose results are compared
    with pytest.MonkeyPatch.context() as patch:
        add_tiny_test_preset(patch)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        T.main(T.parse_args(argv(workdir / "base", toy4, workdir / "hf_cache")))
    torch.set_num_threads(threads)
    return workdir / "base"


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def resume(run_dir: Path, data: Path, cache: Path, checkpoint: str = "latest", steps: int = 6) -> dict:
    return train(run_dir, data, cache, "--resume_from_checkpoint", checkpoint, steps=steps)


def resign(checkpoint: Path) -> None:
    """What an attacker who can write the checkpoint does too: record the current files' checksums in the marker."""
    marker = checkpoint / "pmf_checkpoint.json"
    meta = json.loads(marker.read_text())
    meta["files"] = {
        path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size,
                                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path in sorted(checkpoint.rglob("*")) if path.is_file() and path.name != marker.name
    }
    marker.write_text(json.dumps(meta))


class CreatesFile:
    """A pickle payload: unpickling it calls `open(target, "w")`, i.e. creates a file."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


# --------------------------------------------------------------------------------------------- no code from a file


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_pickle_payloads_are_refused_before_loading(run_copy, toy4, workdir, tmp_path, name):
    """A pickle that would create a file — in the EMA/sampler state file of older versions, or in accelerate's RNG
    state (which accelerate reads with weights_only=True but, on failure, skips with an info line and resumes with
    other random states) — is refused naming the file, with the marker's checksums rewritten to match; the file is
    never created."""
    target = tmp_path / "pwned"
    checkpoint = run_copy / "checkpoint-4"
    torch.save({"seed": CreatesFile(target)}, checkpoint / name)
    resign(checkpoint)
    with pytest.raises(ValueError, match=rf"checkpoint-4 is refused: {re.escape(name)} holds pickled objects"):
        resume(run_copy, toy4, workdir / "hf_cache", str(checkpoint))
    assert not target.exists()


def test_dcp_metadata_and_entries_are_checked(tmp_path):
    """FSDP2 checkpoints are DCP folders, whose `.metadata` torch reads with `pickle.load` and whose non-tensor entries
    (e.g. the optimizer's param groups) with `torch.load(weights_only=False)`: both are checked first."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from pmf_diffusers.training.checkpoint_files import check_pickles

    state = {"model": {"w": torch.randn(3, 4)}, "optim": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]}}
    folder = tmp_path / "ckpt" / "optimizer_0"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder))
    check_pickles(tmp_path / "ckpt")  # a genuine DCP folder passes

    target = tmp_path / "pwned"
    good = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(pickle.dumps(CreatesFile(target)))
    with pytest.raises(ValueError, match=r"optimizer_0/.metadata holds pickled objects .*open is not allowed"):
        check_pickles(tmp_path / "ckpt")

    # Genuine metadata pointing an entry at a payload (a DCP entry is a torch.save'd object).
    torch.save(CreatesFile(target), folder / "extra.distcp")
    metadata = pickle.loads(good)
    index = next(index for index in metadata.storage_data if index.fqn == "optim.param_groups.0.lr")
    metadata.storage_data[index] = type(metadata.storage_data[index])(
        relative_path="extra.distcp", offset=0, length=(folder / "extra.distcp").stat().st_size)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"extra.distcp \(entry optim.param_groups.0.lr\) holds pickled objects"):
        check_pickles(tmp_path / "ckpt")
    assert not target.exists()


# ------------------------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: _truncate(c / "model.safetensors"), r"model.safetensors has \d+ bytes, \d+ were written"),
        (lambda c: _truncate(c / "optimizer.bin"), r"optimizer.bin has \d+ bytes"),
        (lambda c: (c / "pmf_checkpoint.json").write_bytes(b""), r"its completion marker pmf_checkpoint.json is empty"),
        (lambda c: (c / "model.safetensors").write_bytes(  # one flipped byte in the weights, same size
            (c / "model.safetensors").read_bytes()[:-1] + bytes([(c / "model.safetensors").read_bytes()[-1] ^ 1])),
         r"model.safetensors does not match the sha256 recorded when it was saved"),
    ],
    ids=["truncated-weights", "truncated-optimizer", "empty-marker", "flipped-byte"],
)
def test_damaged_checkpoint_named_in_one_line(run_copy, toy4, workdir, damage, message):
    checkpoint = run_copy / "checkpoint-4"
    damage(checkpoint)
    with pytest.raises(ValueError, match=rf"^Checkpoint {re.escape(str(checkpoint))} is damaged: {message}") as error:
        resume(run_copy, toy4, workdir / "hf_cache", str(checkpoint))
    assert "\n" not in str(error.value)
    assert T.cli(argv(run_copy, toy4, workdir / "hf_cache", "--resume_from_checkpoint", str(checkpoint))) == 2


def test_latest_falls_back_to_the_previous_complete_checkpoint(run_copy, base_run, toy4, workdir, caplog):
    """With checkpoint-4 damaged, `latest` warns and resumes from checkpoint-2; the run then ends exactly like the
    undamaged one (checkpoint-4 is written again)."""
    _truncate(run_copy / "checkpoint-4" / "model.safetensors")
    caplog.set_level("WARNING")
    resumed = resume(run_copy, toy4, workdir / "hf_cache", steps=4)
    assert "checkpoint-4 is damaged: model.safetensors" in caplog.text
    assert "Falling back to the previous complete checkpoint" in caplog.text
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert (run_copy / "checkpoint-4" / "model.safetensors").read_bytes() == (
        base_run / "checkpoint-4" / "model.safetensors").read_bytes()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(run_copy, toy4, workdir):
    for step in (2, 4):
        (run_copy / f"checkpoint-{step}" / "pmf_checkpoint.json").write_bytes(b"")
    with pytest.raises(ValueError, match="Every checkpoint in .* is damaged"):
        resume(run_copy, toy4, workdir / "hf_cache")


def test_checkpoints_of_older_versions_are_upgraded_not_unpickled(run_copy, base_run, toy4, workdir, tmp_path):
    """A checkpoint in the old layout (pickled EMA / sampler state, no checksums) is refused with the upgrade command;
    `upgrade_checkpoint` converts it without unpickling code, and the resume is then exact."""
    from pmf_diffusers.training.checkpointing import read_training_state, upgrade_checkpoint

    checkpoint = run_copy / "checkpoint-2"
    states = read_training_state(checkpoint)
    torch.save(states["objective_rng"], checkpoint / "custom_checkpoint_0.pkl")
    torch.save(states["ema"], checkpoint / "custom_checkpoint_1.pkl")
    for name in ("training_state.safetensors", "training_state.json"):
        (checkpoint / name).unlink()
    meta = json.loads((checkpoint / "pmf_checkpoint.json").read_text())
    del meta["files"]
    (checkpoint / "pmf_checkpoint.json").write_text(json.dumps(meta))
    shutil.rmtree(run_copy / "checkpoint-4")

    with pytest.raises(ValueError, match=r"older train_pmf.py.*custom_checkpoint_0.pkl.*upgrade_checkpoint\("):
        resume(run_copy, toy4, workdir / "hf_cache", steps=4)
    upgrade_checkpoint(checkpoint)
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    resumed = resume(run_copy, toy4, workdir / "hf_cache", steps=4)
    assert (run_copy / "checkpoint-4" / "model.safetensors").read_bytes() == (
        base_run / "checkpoint-4" / "model.safetensors").read_bytes()
    assert resumed["global_step"] == 4


# --------------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"),
     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1476")],
    ids=["ENOSPC", "torch-zip-writer"],
)
def test_disk_full_during_a_save(tmp_path, toy4, workdir, monkeypatch, failure):
    """The second save (checkpoint-4) fails in torch.save: one line says the disk is full, where, and that
    checkpoint-2 is intact; the partial folder is gone and `latest` resumes from checkpoint-2."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-checkpoint-4" in str(f):
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    tmp, previous = re.escape(str(out / ".tmp-checkpoint-4")), re.escape(str(out / "checkpoint-2"))
    with pytest.raises(OSError, match=rf"^Cannot save checkpoint-4: the disk is full .* while writing {tmp} .*"
                                      rf"the previous checkpoint {previous} is intact") as error:
        train(out, toy4, workdir / "hf_cache")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    monkeypatch.setattr(torch, "save", real_save)
    assert resume(out, toy4, workdir / "hf_cache", steps=3)["global_step"] == 3


def test_saves_are_fsynced_before_the_rename(tmp_path, toy4, workdir, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        renamed.append((str(src), len(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    train(out, toy4, workdir / "hf_cache", steps=2)
    tmp = str(out / ".tmp-checkpoint-2")
    before = synced[: next(count for src, count in renamed if src == tmp)]
    for name in ("model.safetensors", "optimizer.bin", "training_state.safetensors", "pmf_checkpoint.json", ""):
        assert os.path.join(tmp, name).rstrip("/") in before, name  # every file, and the folder itself
    assert str(out) in synced[len(before):]  # the parent folder, after the rename


# ------------------------------------------------------------------------------------------------ logs and data


def test_resume_cuts_metrics_back_to_the_checkpoint(run_copy, toy4, workdir):
    """The killed run logged steps 1-4 after checkpoint-2; resuming from checkpoint-2 logs 3-6 again: each step once."""
    metrics = run_copy / "logs" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 5, "loss": 1.')  # a line cut by the kill
    resume(run_copy, toy4, workdir / "hf_cache", str(run_copy / "checkpoint-2"), steps=6)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_small_images_are_skipped_and_reported(tmp_path, toy4, workdir, caplog):
    """Decision (issue 12, item 14): an image smaller than the resolution is skipped and reported like an unreadable
    one — the run never stops mid-training; only data that is *all* too small (the first 64 images' headers) stops it
    up front (tests/test_train_script.py::test_images_smaller_than_resolution)."""
    data = tmp_path / "toy_small"
    shutil.copytree(toy4, data)
    small = [data / TOY_CLASS_FOLDERS[i] / "zz_small.png" for i in (1, 3)]
    for path in small:
        Image.new("RGB", (8, 12), (200, 10, 10)).save(path)
    caplog.set_level("WARNING")
    result = train(tmp_path / "out", data, workdir / "hf_cache", "--checkpointing_steps", "0", steps=17)  # > 2 epochs
    assert result["global_step"] == 17
    assert set(result["too_small_images"]) == {str(p) for p in small} and not result["corrupt_images"]
    assert f"Skipping image {small[0]}: Image {small[0]} is 8×12, smaller than the training resolution" in caplog.text
    assert result["history"][-1]["too_small_images"] == sum(result["too_small_images"].values()) > 0
