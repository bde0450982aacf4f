"""benchmarks/gpu_check.py, the prepared GPU readiness check, run on the CPU in its quick mode (tiny shapes).

The quick run exercises every section on the code paths the GPU run takes: the official oracles (parity), the sampling
rows side by side with an official sampler, the training step against the literal port (including a simulated
out-of-memory batch), and an `accelerate launch` of examples/train_pmf.py with checkpoint + resume. The official torch
code is not available in CI, so the comparison runs against a test double written into a temporary folder with the
official layout (`pmf.py` + `models/pmfDiT.py`, official parameter names); its forward pass is pmf_diffusers' own, so
that part checks the plumbing (import, layout check, same weights and noise, timing rows), not the numbers — those
are checked against the real official oracles in the parity section.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE_DIR, needs_reference, official_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pmf_gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
G = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = G  # dataclasses look their module up there
_spec.loader.exec_module(G)

FAKE_PMF = '''
import torch
from torch import nn

from models import pmfDiT


class pixelMeanFlow(nn.Module):
    """Test double of the official torch `pixelMeanFlow` (same constructor and `generate` signature)."""

    def __init__(self, model_str, dtype=torch.float32, img_size=256, img_channels=3, num_classes=1000, eval=True):
        super().__init__()
        self.dtype, self.img_size, self.img_channels = dtype, img_size, img_channels
        self.net = getattr(pmfDiT, model_str)(input_size=img_size, in_channels=img_channels, num_classes=num_classes,
                                              eval_mode=eval)
        self.noise_scale = {"pmfDiT_B_16": 1.0}[model_str]

    @torch.no_grad()
    def generate(self, n_sample, rng, num_steps, omega, t_min, t_max, labels=None):
        z = rng.randn((n_sample, self.img_channels, self.img_size, self.img_size)).to(self.dtype) * self.noise_scale
        t_steps = torch.linspace(1.0, 0.0, num_steps + 1, device=z.device)
        for i in range(num_steps):
            t, r = t_steps[i].expand(n_sample), t_steps[i + 1].expand(n_sample)
            full = lambda value: torch.full_like(t, value)
            u = self.net(z, t, t - r, full(omega), full(t_min), full(t_max), labels)[0]
            z = z - (t - r)[:, None, None, None] * u
        return z
'''

FAKE_PMFDIT = '''
import json
import math
from pathlib import Path

import torch
from torch import nn

KEYS = json.loads((Path(__file__).parent / "official_keys.json").read_text())


class pmfDiT(nn.Module):
    """Test double of the official network: the official eval-mode parameter names and shapes of tinyA, with the
    forward pass delegated to pmf_diffusers through the official-checkpoint converter."""

    def __init__(self, input_size=32, patch_size=8, in_channels=3, hidden_size=64, depth=4, num_heads=4,
                 mlp_ratio=8 / 3, num_classes=10, aux_head_depth=2, eval_mode=False):
        super().__init__()
        for name, shape in KEYS.items():
            module = self
            *parents, leaf = name.split(".")
            for part in parents:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            value = torch.zeros(shape) if len(shape) == 1 else torch.randn(shape) / math.sqrt(shape[-1])
            module.register_parameter(leaf, nn.Parameter(value))

    def forward(self, x, t, h, w, t_min, t_max, y):
        from pmf_diffusers import PMFTransformer2DModel
        from pmf_diffusers.conversion import convert_official_state_dict

        config, state_dict = convert_official_state_dict(self.state_dict())
        model = PMFTransformer2DModel(**config).to(x.device)
        model.load_state_dict(state_dict)
        x_pred = model(x, t, t - h, y, w, t_min, t_max).sample
        return (x - x_pred) / t.clamp(min=0.05)[:, None, None, None], None


pmfDiT_B_16 = None  # the check registers the tiny constructor under this name while it builds the sampler
'''


@pytest.fixture
def fake_official(tmp_path) -> Path:
    root = tmp_path / "pMF-torch"
    (root / "models").mkdir(parents=True)
    (root / "pmf.py").write_text(textwrap.dedent(FAKE_PMF))
    (root / "models" / "pmfDiT.py").write_text(textwrap.dedent(FAKE_PMFDIT))
    for name in ("embedder.py", "torch_models.py"):
        (root / "models" / name).write_text("")
    keys = {key: list(value.shape) for key, value in official_state_dict("tinyA", v_head=False).items()}
    (root / "models" / "official_keys.json").write_text(json.dumps(keys))
    return root


@needs_reference
def test_quick_cpu_run(tmp_path, fake_official, monkeypatch):
    # A training step above batch 4 "runs out of memory": recorded as OOM, the check goes on, the search bisects.
    real_train_step = G.train_step

    def train_step(model, implementation, images, *args, **kwargs):
        if images.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test)")
        return real_train_step(model, implementation, images, *args, **kwargs)

    monkeypatch.setattr(G, "train_step", train_step)
    output = tmp_path / "out" / "gpu_check.json"
    data = G.main(["--device", "cpu", "--quick", "--reference-dir", str(REFERENCE_DIR), "--official-path",
                   str(fake_official), "--output", str(output), "--work-dir", str(tmp_path / "work")])
    assert json.loads(output.read_text())["status"] == data["status"] == "complete"
    sections = data["sections"]

    parity = sections["parity"]
    checks = [row["check"] for row in parity["rows"]]
    assert parity["passed"] and all(row["passed"] for row in parity["rows"])
    assert sum("forward" in c for c in checks) == 4 and sum("sample" in c for c in checks) == 8
    assert any("gradients" in c and "explicit JVP" in c for c in checks)
    assert any("gradients" in c and "torch.func.jvp" in c for c in checks)
    assert {row["max_rel_err"] <= 1e-5 for row in parity["rows"] if "JAX" not in row["check"]} == {True}
    assert all(0 < row["max_rel_err"] < 0.1 for row in parity["bf16"] if "gradients" in row["check"])
    (at_scale,) = parity["at_scale"]
    assert at_scale["status"] == "ok" and at_scale["passed"]

    assert {row["dtype"] for row in sections["gemm"]["rows"]} == {"bfloat16", "float32"}

    rows = [row for row in sections["sampling"]["rows"] if row.get("status") == "ok"]
    for batch in (1, 4):
        official = [r for r in rows if r["batch"] == batch and r["sampler"] == "official generate"]
        ours = [r for r in rows if r["batch"] == batch and r["sampler"] == "PMFPipeline" and r["attention"] == "native"]
        assert len(official) == 1
        assert {(r["dtype"], r["mode"]) for r in ours} >= {("float32", "eager"), ("bfloat16", "eager")}
        for row in ours:
            assert row["speedup_vs_official"] > 0 and row["images_per_s"] > 0 and row["gflops"] > 0
            assert row["max_rel_dev"] <= (1e-5 if row["dtype"] == "float32" else 0.1)
    compiled = [r for r in rows if r["mode"] == "compile"]
    assert {r["dtype"] for r in compiled} == {"float32", "bfloat16"} and all(r["max_rel_dev"] <= 0.1 for r in compiled)
    assert {r["attention"] for r in rows} >= {"native", "_native_math"}

    training = sections["training"]
    fp32, bf16 = training["equivalence"]
    assert fp32["passed"] and fp32["max_grad_rel_err"] <= 1e-4 and fp32["loss_rel_err"] <= 1e-4
    assert bf16["status"] == "ok" and "passed" not in bf16
    statuses = {(r["batch"], r["implementation"], r["gradient_checkpointing"]): r["status"] for r in training["rows"]}
    assert statuses[(2, "pmf_loss", False)] == statuses[(2, "literal", False)] == statuses[(2, "pmf_loss", True)] == "ok"
    assert {status for (batch, *_), status in statuses.items() if batch == 8} == {"OOM"}
    (compiled_attention,) = training["jvp_attention"]  # PMFLossConfig(jvp_attention="compiled") vs the explicit JVP
    assert compiled_attention["passed"] and compiled_attention["max_grad_rel_err"] <= 1e-4
    assert statuses[(2, G.COMPILED_JVP_ATTENTION, False)] == "ok" and (2, G.COMPILED_JVP_ATTENTION, True) not in statuses
    assert training["host_syncs"]["status"].startswith("not measured")  # CUDA's sync debug mode
    searches = {(r["implementation"], r["gradient_checkpointing"]): r for r in training["largest_batch"]}
    assert [probe["batch"] for probe in searches[("pmf_loss", False)]["probes"]] == [2, 4, 8, 6, 5]
    assert searches[("pmf_loss", False)]["largest_fitting"] == 4 and searches[("pmf_loss", False)]["smallest_oom"] == 5
    assert searches[("literal", False)]["largest_fitting"] == 4

    launch = sections["accelerate"]
    assert launch["run_a"]["returncode"] == 0 and launch["run_b"]["returncode"] == 0, launch
    assert [row["step"] for row in launch["run_b"]["history"]] == [3, 4]
    assert launch["bit_exact"] and launch["weights"]["bit_exact"] and launch["ema_export"]["bit_exact"]

    table = output.with_suffix(".md").read_text()
    for heading in ("## The issue's targets", "## Parity", "## GEMM peak", "## Sampling", "## Training step",
                    "## accelerate launch"):
        assert heading in table
    assert "| OOM |" in table and "official generate" in table
    assert "step-time speed-up of compiled over explicit: tiny batch 2" in table


def _error_line(capsys, argv) -> str:
    assert G.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_gets_one_line(tmp_path, capsys):
    base = ["--quick", "--sections", "gemm", "--output", str(tmp_path / "never.json")]
    if not torch.cuda.is_available():
        assert "sees no CUDA device" in _error_line(capsys, ["--device", "cuda", *base])
    assert "not a device name" in _error_line(capsys, ["--device", "gpu0", *base])
    cpu = ["--device", "cpu", *base]
    assert "needs --reference-dir" in _error_line(capsys, [*cpu, "--sections", "parity"])
    assert "missing tiny_torch_meta.json" in _error_line(capsys, [*cpu, "--sections", "parity", "--reference-dir",
                                                                  str(tmp_path)])
    assert "no such folder" in _error_line(capsys, [*cpu, "--official-path", str(tmp_path / "absent")])
    jax_branch = tmp_path / "pMF-main"
    (jax_branch / "models").mkdir(parents=True)
    (jax_branch / "pmf.py").write_text("import jax\nimport flax.linen as nn\n\nclass pixelMeanFlow(nn.Module):\n    pass\n")
    for name in ("pmfDiT.py", "embedder.py", "torch_models.py"):
        (jax_branch / "models" / name).write_text("import jax\n")
    assert "is not the torch branch" in _error_line(capsys, [*cpu, "--official-path", str(jax_branch)])
    assert "unknown backend 'fast'" in _error_line(capsys, [*cpu, "--attention-backends", "fast"])
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash is not installed here" in _error_line(capsys, [*cpu, "--attention-backends", "native", "flash"])
    assert "unknown shape 'X/9'" in _error_line(capsys, [*cpu, "--shapes", "X/9"])
    assert "unknown phase" in _error_line(capsys, [*cpu, "--phase-limit", "sampling=3"])
    assert not (tmp_path / "never.json").exists()


def test_time_limits_are_recorded(tmp_path):
    """A phase without time left is skipped and says so; the finished JSON still renders."""
    output = tmp_path / "check.json"
    data = G.main(["--device", "cpu", "--quick", "--sections", "gemm", "sampling", "--phase-limit",
                   "sampling:primary=0", "--phase-limit", "sampling:other=0", "--output", str(output)])
    assert data["status"] == "complete" and len(data["sections"]["gemm"]["rows"]) == 2
    assert data["sections"]["sampling"]["skipped_phases"] == ["sampling:primary: time limit", "sampling:other: time limit"]
    assert "## GEMM peak" in output.with_suffix(".md").read_text()
