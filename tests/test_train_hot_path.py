"""The training step never waits for the device (issue 14, item 2), checked on the CPU.

A host sync is any read of a device tensor on the host: `.item()`, `float(t)`, `int(t)`, `if t:` (all dispatch
`aten._local_scalar_dense`), an op whose output size depends on the data (`nonzero`, `masked_select`, `unique`, ...),
or a copy to host memory (`.tolist()`, `.numpy()`, `.cpu()`). On a GPU each one stalls the host until every queued
kernel has run. The recorder below sees all of them — the first two kinds at the dispatcher, so also inside torch,
accelerate and the library — while `examples/train_pmf.py` trains the tiny model, and files each under the optimizer
step being computed. Only logging steps may sync (one gather of the statistics); the other steps must not.
docs/training.md ("Host syncs in the training step") lists what was removed and what remains.
"""

from __future__ import annotations

import collections
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pmf_diffusers.training.toy_data import TOY_CLASS_FOLDERS, make_toy_dataset
from conftest import load_train_script
from train_utils import add_tiny_test_preset

T = load_train_script("train_pmf_hot_path")
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
            aten.unique_consecutive, aten.is_nonzero, aten.equal}
HOST_COPIES = ("tolist", "numpy", "cpu")


class SyncRecorder(TorchDispatchMode):
    """Records every host sync as `(op, where)` under `current["step"]` in `events`."""

    def __init__(self, events: dict, current: dict, monkeypatch):
        super().__init__()
        self.events, self.current = events, current
        for name in HOST_COPIES:
            self._wrap(monkeypatch, name)

    def _wrap(self, monkeypatch, name: str) -> None:
        real = getattr(torch.Tensor, name)

        def method(tensor, *args, **kwargs):
            if self.current["recording"]:
                self.record(f"Tensor.{name}")
            return real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, method)

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "pmf" in f.filename and "test_train_hot_path" not in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.events[self.current["step"]].append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.current["recording"] and func.overloadpacket in SYNC_OPS:
            self.record(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def toy4(tmp_path_factory) -> Path:
    root = make_toy_dataset(tmp_path_factory.mktemp("hot_path") / "toy4", images_per_class=16, size=32, seed=0)
    for folder in TOY_CLASS_FOLDERS[4:]:
        shutil.rmtree(root / folder)
    return root


def syncs_per_step(monkeypatch, argv: list[str]) -> dict[int, list[str]]:
    """Run the script; the host syncs of its training loop, by optimizer step (0: before the first step)."""
    events, current = collections.defaultdict(list), {"step": 0, "recording": False}
    real_step, real_loop = T.training_step, T.train_loop

    def training_step(run, *args, **kwargs):
        current["step"] = run.global_step + 1
        return real_step(run, *args, **kwargs)

    def train_loop(run):
        current["recording"] = True
        try:
            with SyncRecorder(events, current, monkeypatch):
                return real_loop(run)
        finally:
            current["recording"] = False

    monkeypatch.setattr(T, "training_step", training_step)
    monkeypatch.setattr(T, "train_loop", train_loop)
    T.main(T.parse_args(argv))
    return dict(events)


def fake_perceptual(monkeypatch):
    """Small randomly initialised LPIPS / ConvNeXt nets in place of the pretrained ones; the crop boxes must come from
    a CPU generator (the host needs them as numbers), read without the recorder."""
    from transformers import ConvNextV2Config

    from pmf_diffusers.training import perceptual as perceptual_module

    def from_pretrained(cls, lpips=True, convnext=True, **kwargs):
        torch.manual_seed(0)
        tiny = ConvNextV2Config(num_channels=3, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], image_size=32)
        return cls(lpips=perceptual_module.LPIPSVGG(), convnext=perceptual_module.ConvNeXtV2Features(tiny), crop_size=32)

    real_boxes = perceptual_module.sample_crop_boxes
    crop_devices = []

    def sample_crop_boxes(batch, height, width, generator=None):
        crop_devices.append(generator.device.type)
        with monkeypatch.context() as unwrapped:
            unwrapped.setattr(torch.Tensor, "tolist", torch._C.TensorBase.tolist)
            return real_boxes(batch, height, width, generator)

    monkeypatch.setattr(perceptual_module.PerceptualLoss, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(perceptual_module, "sample_crop_boxes", sample_crop_boxes)
    return crop_devices


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--class_dropout_mode", "first_k", "--max_grad_norm", "1.0", "--gradient_accumulation_steps", "2",
         "--global_batch_size", "8", "--max_train_minutes", "100", "--mixed_precision", "bf16"),
        ("--lpips_lambda", "0.4", "--convnext_lambda", "0.1"),
    ],
    ids=["default", "first_k-clipping-accumulation-time_budget-bf16", "perceptual"],
)
def test_only_logging_steps_sync(tmp_path, toy4, monkeypatch, isolated_accelerate, extra):
    add_tiny_test_preset(monkeypatch)
    crop_devices = fake_perceptual(monkeypatch) if "--lpips_lambda" in extra else None
    argv = ["--preset", "tiny-test", "--train_data_dir", str(toy4), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "8", "--logging_steps", "4", "--report_to", "none", "--validation_steps", "0",
            "--checkpointing_steps", "0", "--cache_dir", str(tmp_path / "hf_cache"), *extra]
    events = syncs_per_step(monkeypatch, argv)
    hot = {step: found for step, found in events.items() if step not in (0, 4, 8)}
    assert not hot, "host syncs in non-logging steps:\n" + "\n".join(
        f"step {step}: {collections.Counter(found).most_common()}" for step, found in sorted(hot.items()))
    # The recorder works: the logging steps read the statistics back (one gather + one .tolist()).
    assert any("Tensor.tolist" in e for e in events[4]) and events[8], events
    if crop_devices is not None:
        assert crop_devices and set(crop_devices) == {"cpu"}


def test_no_per_step_host_to_device_constants(tmp_path, toy4, monkeypatch, isolated_accelerate):
    """`torch.tensor(python values, device=...)` is a copy from pageable host memory (synchronous on CUDA): none in
    the training step once the optimizer state exists (Muon creates its step counters, on the CPU, in step 1)."""
    add_tiny_test_preset(monkeypatch)
    created, current = [], {"step": None}
    real_tensor, real_step = torch.tensor, T.training_step

    def tensor(*args, **kwargs):
        if current["step"] is not None and current["step"] > 1:
            created.append("".join(traceback.format_stack(limit=3)[:-1]))
        return real_tensor(*args, **kwargs)

    def training_step(run, *args, **kwargs):
        current["step"] = run.global_step + 1
        try:
            return real_step(run, *args, **kwargs)
        finally:
            current["step"] = None

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(T, "training_step", training_step)
    T.main(T.parse_args(["--preset", "tiny-test", "--train_data_dir", str(toy4), "--output_dir", str(tmp_path / "out"),
                         "--max_train_steps", "3", "--report_to", "none", "--validation_steps", "0",
                         "--cache_dir", str(tmp_path / "hf_cache")]))
    assert not created, created


def test_dataloader_pins_memory_for_cuda_and_tf32_is_explicit(monkeypatch):
    """Batches bound for a GPU come from pinned memory (asynchronous copies); the TF32 policy is set both ways by the
    script, never by the library."""
    from pmf_diffusers.training.data import loader_options

    assert loader_options(torch.device("cuda", 0)) == {"pin_memory": True}
    assert loader_options(torch.device("cpu")) == {"pin_memory": False}
    source = (Path(T.__file__)).read_text()
    assert "torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32" in source
    library = Path(T.__file__).resolve().parents[1] / "src" / "pmf_diffusers" / "training"
    assert not [p.name for p in library.glob("*.py") if "torch.backends" in p.read_text()]
