"""`examples/train_pmf.py --report_to wandb|all`: what reaches a Weights & Biases run. CPU only, no network.

W&B runs in offline mode (the run is only written to disk). The scalars and the config are read back from the run's
`.wandb` file, the sample grid from the run's media folder.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import wandb
from PIL import Image
from wandb.proto import wandb_internal_pb2

from pmf_diffusers.training.toy_data import TOY_CLASS_FOLDERS, make_toy_dataset
from conftest import load_train_script
from train_utils import add_tiny_test_preset

T = load_train_script("train_pmf_wandb_under_test")

SCALARS = ("loss", "loss_u", "loss_v", "loss_lpips", "loss_convnext", "lr", "img_per_sec")


@pytest.fixture(autouse=True)
def _offline_wandb(isolated_accelerate, tmp_path, monkeypatch):
    """Offline mode (no login, no upload) and wandb's settings, cache and data folders inside tmp_path; the tests'
    tiny-test preset."""
    add_tiny_test_preset(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the script's default: --output_dir/logs
    yield


@pytest.fixture(scope="module")
def toy4(tmp_path_factory) -> Path:
    root = make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy4", images_per_class=4, size=16, seed=0)
    for folder in TOY_CLASS_FOLDERS[4:]:
        shutil.rmtree(root / folder)
    return root


def train(output_dir: Path, data: Path, report_to: str) -> dict:
    """3 steps of the tiny-test preset, a sample grid at steps 2 and 3 (the end of training)."""
    argv = [
        "--preset", "tiny-test", "--train_data_dir", str(data), "--output_dir", str(output_dir),
        "--max_train_steps", "3", "--report_to", report_to, "--validation_steps", "2", "--checkpointing_steps", "0",
        "--cache_dir", str(output_dir.parent / "hf_cache"),
    ]
    return T.main(T.parse_args(argv))


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's `.wandb` file (wandb has no public reader for it): a 7-byte W&B
    header, then a LevelDB-format log of 32 KiB blocks holding chunks (checksum, little-endian length, type)."""
    block, full, last = 32768, 1, 4
    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, payload, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes are padding when a chunk header does not fit
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (full, last):
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def items(entries) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entries}


@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_scalars_config_and_sample_grid_reach_wandb(tmp_path, toy4, report_to):
    out = tmp_path / "run"
    result = train(out, toy4, report_to)
    # run.finish() (accelerator.end_training) can return before wandb-core has written the `.wandb` file out; stopping
    # the service, as happens at interpreter exit, waits for it.
    wandb.teardown()

    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    config = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update(items(record.config.update))

    # Every training step's scalars, as the script computed them.
    assert [row["_step"] for row in history] == [1, 2, 3]
    for row, expected in zip(history, result["history"]):
        assert {key: row[key] for key in SCALARS} == pytest.approx({key: expected[key] for key in SCALARS})

    # The run config: arguments and the resolved recipe.
    assert config["preset"] == "tiny-test" and config["max_train_steps"] == 3 and config["report_to"] == report_to
    assert config["global_batch_size"] == 8 and config["p_mean"] == 0.0

    # One image per validation: the same grid as samples/step_XXXXXXX.png.
    for row in history[1:]:
        assert row["samples/_type"] == "images/separated" and row["samples/count"] == 1
        (filename,) = row["samples/filenames"]
        logged = np.asarray(Image.open(run_dir / "files" / filename).convert("RGB"))
        saved = np.asarray(Image.open(out / "samples" / f"step_{row['_step']:07d}.png").convert("RGB"))
        assert np.array_equal(logged, saved)
    assert "samples/_type" not in history[0]

    # --report_to all: tensorboard as well.
    assert bool(list((out / "logs").rglob("events.out.tfevents.*"))) == (report_to == "all")


def test_missing_wandb(tmp_path, toy4, monkeypatch):
    """--report_to wandb stops with an install hint; --report_to all falls back to tensorboard alone."""
    monkeypatch.setattr(T, "is_wandb_available", lambda: False)
    with pytest.raises(T.TrainingSetupError, match="pip install wandb"):
        train(tmp_path / "wandb", toy4, "wandb")

    out = tmp_path / "all"
    assert train(out, toy4, "all")["global_step"] == 3
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert not (out / "logs" / "wandb").exists()
