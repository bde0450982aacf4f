"""Tests for the official-pMF optimiser (Muon + Nesterov AdamW) and the EDM power-function EMA."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

from pmf_diffusers.training.ema import MultiEMA, PowerEMA, edm_ema_beta
from pmf_diffusers.training.optimizer import Muon, muon_param_groups, newton_schulz_orthogonalize

from conftest import REFERENCE_DIR

REF = REFERENCE_DIR
ROUTING = REF / "tinyA_muon_param_routing.json"
needs_ref = pytest.mark.skipif(not ROUTING.exists(), reason="reference data not available")


# --------------------------------------------------------------------------------------------------------------
# Muon oracle (optax.contrib.muon(learning_rate=1e-3, adam_b2=0.95), two steps on tinyA)
# --------------------------------------------------------------------------------------------------------------
def _load(name):
    from safetensors.torch import load_file

    return load_file(str(REF / name))


def _routing():
    return json.loads(ROUTING.read_text())


def _build(routing, start):
    params = {k: nn.Parameter(start[k].clone()) for k in routing}
    groups = [
        {"params": [params[k] for k in routing if routing[k]["optimizer"] == "muon"], "use_muon": True},
        {"params": [params[k] for k in routing if routing[k]["optimizer"] == "adam"], "use_muon": False},
    ]
    return params, groups


GRAD_FILES = ["jax_train_S1_grads_torchkeys.safetensors", "jax_train_S2_grads_torchkeys.safetensors"]


@needs_ref
def test_muon_matches_optax_oracle_two_steps():
    routing = _routing()
    start = _load("tinyA_state_dict.safetensors")
    oracle = _load("tinyA_muon_two_steps_torchkeys.safetensors")
    params, groups = _build(routing, start)
    opt = Muon(groups)  # defaults = the official call
    prev = {k: start[k].clone() for k in routing}
    for step, gfile in enumerate(GRAD_FILES, start=1):
        grads = _load(gfile)
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
        for k, p in params.items():
            ours, ref = p.detach(), oracle[f"step{step}/{k}"]
            assert ours.shape == ref.shape, k
            # (1) parameters: 1e-5 relative per tensor, and elementwise (measured ~1e-7, i.e. 1-2 fp32 ulps).
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (step, k)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"step{step} {k}: {m}")
            # (2) the update itself (lr-sized, so much more sensitive to the formula).  The stored oracle
            # parameters are rounded to fp32 around |p| ~ 1, which limits this to ~1e-4 of the update (measured
            # worst 3.5e-4 on Muon weights at step 2); a wrong Nesterov/bias-correction gives errors > 0.3.
            d_ours, d_ref = ours - prev[k], ref - prev[k]
            assert (d_ours - d_ref).abs().max() <= 1e-3 * d_ref.abs().max(), (step, k)
        prev = {k: oracle[f"step{step}/{k}"].clone() for k in routing}


@needs_ref
def test_muon_state_dict_resume_is_exact():
    routing = _routing()
    start = _load("tinyA_state_dict.safetensors")
    g1, g2 = (_load(f) for f in GRAD_FILES)

    params, groups = _build(routing, start)
    opt = Muon(groups)
    for grads in (g1, g2):
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
    straight = {k: p.detach().clone() for k, p in params.items()}

    params_a, groups_a = _build(routing, start)
    opt_a = Muon(groups_a)
    for k, p in params_a.items():
        p.grad = g1[k].clone()
    opt_a.step()
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "params": {k: p.detach() for k, p in params_a.items()}}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    params_b, groups_b = _build(routing, ckpt["params"])
    opt_b = Muon(groups_b)
    opt_b.load_state_dict(ckpt["opt"])
    for k, p in params_b.items():
        p.grad = g2[k].clone()
    opt_b.step()
    for k in routing:
        assert torch.equal(params_b[k].detach(), straight[k]), k
    # step counters restored
    some_muon = groups_b[0]["params"][0]
    assert int(opt_b.state[some_muon]["step"]) == 2


@needs_ref
def test_routing_json_muon_set_is_linear_weights_except_embedding():
    routing = _routing()
    muon = {k for k, v in routing.items() if v["optimizer"] == "muon"}
    expected = {
        k
        for k in routing
        if k.endswith("._flax_linear.weight")
    }
    assert "y_embedder.embedding_table._flax_embedding.weight" not in expected
    assert routing["y_embedder.embedding_table._flax_embedding.weight"]["optimizer"] == "adam"
    assert muon == expected
    # and muon <=> Flax rank 2
    for k, v in routing.items():
        assert (v["optimizer"] == "muon") == (len(v["flax_shape"]) == 2), k


class _RMSNormLike(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class _ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=2, stride=2)
        self.tokens = nn.Parameter(torch.zeros(1, 4, 8))  # 3-D token group
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, 8))
        self.labels = nn.Embedding(11, 8)  # 2-D in torch but Adam
        self.norm = _RMSNormLike(8)
        self.gate = nn.Parameter(torch.zeros(8))
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.matrix_not_linear = nn.Parameter(torch.zeros(8, 8))  # 2-D but not an nn.Linear weight


def test_muon_param_groups_routes_by_module_type():
    net = _ToyNet()
    groups = muon_param_groups(net, lr=2e-3)
    assert [g["use_muon"] for g in groups] == [True, False]
    assert all(g["lr"] == 2e-3 for g in groups)
    muon_ids = {id(p) for p in groups[0]["params"]}
    adam_ids = {id(p) for p in groups[1]["params"]}
    assert muon_ids == {id(net.fc1.weight), id(net.fc2.weight)}
    assert adam_ids == {
        id(p)
        for p in (
            net.proj.weight,
            net.proj.bias,
            net.tokens,
            net.pos_embed,
            net.labels.weight,
            net.norm.weight,
            net.gate,
            net.fc1.bias,
            net.matrix_not_linear,
        )
    }
    # frozen params excluded, nothing duplicated
    n_trainable = sum(1 for p in net.parameters() if p.requires_grad)
    assert len(muon_ids) + len(adam_ids) == n_trainable == len(groups[0]["params"]) + len(groups[1]["params"])

    opt = Muon(groups)
    x = torch.randn(2, 3, 8, 8)
    feats = net.proj(x).flatten(2).transpose(1, 2) + net.pos_embed
    feats = torch.cat([net.tokens.expand(2, -1, -1), feats], 1) * net.norm.weight + net.gate
    out = net.fc2(torch.tanh(net.fc1(feats + net.labels(torch.tensor([1, 3]))[:, None]))).sum()
    out = out + net.matrix_not_linear.square().sum()
    out.backward()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        if n.startswith("frozen"):
            assert torch.equal(p, before[n])
        elif n != "matrix_not_linear":  # zero grad there
            assert not torch.equal(p, before[n]), n


def test_muon_group_rejects_non_matrix():
    with pytest.raises(ValueError):
        Muon([{"params": [nn.Parameter(torch.zeros(3, 4, 5))], "use_muon": True}])


def test_muon_single_step_formula_and_orientation():
    """First step from scratch: g_hat = g (bias-corrected Nesterov), update = -lr*sqrt(max(1,out/in))*NS(g)."""
    torch.manual_seed(0)
    for shape in [(48, 16), (16, 48), (32, 32)]:
        p = nn.Parameter(torch.randn(shape))
        g = torch.randn(shape)
        p.grad = g.clone()
        p0 = p.detach().clone()
        Muon([{"params": [p], "use_muon": True}], lr=1e-2).step()
        # s=1, m1 = (1-beta) g:  beta*m1/(1-beta^2) + (1-beta)*g/(1-beta) = beta*(1-beta)*g/(1-beta^2) + g
        beta = 0.95
        g_hat = beta * (1 - beta) * g / (1 - beta**2) + g
        flax = g_hat.T  # optax works on the (in, out) kernel
        o = newton_schulz_orthogonalize(flax).T
        expected = p0 - 1e-2 * math.sqrt(max(1.0, shape[0] / shape[1])) * o
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        # NS output is close to the orthogonal polar factor: singular values in roughly [0.6, 1.2]
        sv = torch.linalg.svdvals(o)
        assert sv.min() > 0.5 and sv.max() < 1.3


def test_adam_nesterov_formula():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(5, 3))
    p0 = p.detach().clone()
    b1, b2, lr, eps = 0.9, 0.95, 1e-3, 1e-8
    opt = Muon([{"params": [p], "use_muon": False}], lr=lr)
    m = torch.zeros_like(p0, dtype=torch.float64)
    v = torch.zeros_like(m)
    ref = p0.double()
    for s in range(1, 5):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        gd = g.double()
        m = b1 * m + (1 - b1) * gd
        v = b2 * v + (1 - b2) * gd**2
        m_hat = b1 * m / (1 - b1 ** (s + 1)) + (1 - b1) * gd / (1 - b1**s)
        v_hat = v / (1 - b2**s)
        ref = ref - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hl_kimg, beta_ss, quoted_step",
    [(500, 0.998581, 9766), (1000, 0.999290, 19531), (2000, 0.999645, 39062)],
)
def test_ema_schedule(hl_kimg, beta_ss, quoted_step):
    ema = PowerEMA([torch.zeros(1)], half_life_kimg=hl_kimg)
    ss = 0.5 ** (1024 / (hl_kimg * 1000))
    assert round(ss, 6) == beta_ss
    # The spec quotes 9766 / 19531 / 39062: at those steps beta equals the steady state to 6 decimals.  The
    # ramp (s * 51.2 images) reaches the half-life exactly at ceil(hl / 51.2) = 9766 / 19532 / 39063.
    assert round(ema.decay_at(quoted_step), 6) == beta_ss
    first_steady = math.ceil(hl_kimg * 1000 / 51.2)
    assert abs(first_steady - quoted_step) <= 1
    assert ema.decay_at(first_steady) == ss
    assert ema.decay_at(first_steady + 12345) == ss
    assert ema.decay_at(first_steady - 1) < ss
    # ramp-up: hl = s * 1024 * 0.05 images
    assert ema.decay_at(first_steady - 1) == pytest.approx(0.5 ** (1024 / ((first_steady - 1) * 51.2)), rel=1e-15)
    # step 1: hl = 51.2 images -> beta = 0.5**20
    assert ema.decay_at(1) == pytest.approx(0.5**20, rel=1e-14)
    assert edm_ema_beta(1, hl_kimg) == ema.decay_at(1)
    # monotone non-decreasing
    betas = [ema.decay_at(s) for s in range(1, first_steady + 10, 97)]
    assert all(a <= b for a, b in zip(betas, betas[1:]))


def test_ema_ref_batch_configurable():
    ema = PowerEMA([torch.zeros(1)], half_life_kimg=500, ref_batch=256)
    assert ema.decay_at(10**6) == pytest.approx(0.5 ** (256 / 500000), rel=1e-15)
    assert ema.decay_at(3) == pytest.approx(0.5 ** (256 / (3 * 256 * 0.05)), rel=1e-15)
    assert PowerEMA([torch.zeros(1)], rampup_ratio=None).decay_at(1) == pytest.approx(0.5 ** (1024 / 5e5))


def test_ema_rampup_ratio_sets_the_short_run_window():
    # During the ramp-up the half-life is `rampup_ratio` of the steps taken, whatever the reference batch.
    for ref_batch in (32, 1024):
        ema = MultiEMA([torch.zeros(1)], half_lives_kimg=(500, 1000), ref_batch=ref_batch, rampup_ratio=0.25)
        for key in ema:
            assert ema[key].decay_at(400) == pytest.approx(0.5 ** (1 / 100), rel=1e-12)  # half-life 100 steps
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="rampup_ratio"):
            PowerEMA([torch.zeros(1)], rampup_ratio=bad)


def test_ema_exact_update_copy_store_restore():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    theta0 = [p.detach().clone() for p in lin.parameters()]
    ema = PowerEMA(lin.parameters(), half_life_kimg=0.5)  # 500 images: steady state from step 10
    # shadow = theta_0, fp32, separate storage
    for s, t in zip(ema.shadow_params, theta0):
        assert s.dtype == torch.float32 and torch.equal(s, t)
        assert s.data_ptr() != t.data_ptr()
    ref = [t.double() for t in theta0]
    for step in range(1, 16):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        beta = ema.step(lin.parameters())
        expected_beta = 0.5 ** (1024 / max(min(500.0, step * 1024 * 0.05), 1e-8))
        assert beta == expected_beta
        ref = [beta * r + (1 - beta) * p.detach().double() for r, p in zip(ref, lin.parameters())]
        for s, r in zip(ema.shadow_params, ref):
            torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 15

    # exact fp32 arithmetic of one update
    shadow_before = [s.clone() for s in ema.shadow_params]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    beta = ema.step(lin.parameters())
    for s, s0, p in zip(ema.shadow_params, shadow_before, lin.parameters()):
        # fp32 beta*ema + (1-beta)*theta (the fused multiply-add may differ by an ulp from separate roundings)
        torch.testing.assert_close(s, s0 * beta + p.detach() * (1 - beta), rtol=2.5e-7, atol=0)

    train = [p.detach().clone() for p in lin.parameters()]
    ema.store(lin.parameters())
    ema.copy_to(lin.parameters())
    for p, s in zip(lin.parameters(), ema.shadow_params):
        assert torch.equal(p.detach(), s)
    ema.restore(lin.parameters())
    for p, t in zip(lin.parameters(), train):
        assert torch.equal(p.detach(), t)
    with pytest.raises(RuntimeError):
        ema.restore(lin.parameters())

    # explicit global step
    b = ema.step(lin.parameters(), global_step=3)
    assert ema.num_updates == 3 and b == ema.decay_at(3)


def test_ema_state_dict_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    ema = PowerEMA(lin.parameters(), half_life_kimg=1.0)
    for _ in range(7):
        with torch.no_grad():
            for p in lin.parameters():
                p.mul_(0.9).add_(0.1)
        ema.step(lin.parameters())
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    other = PowerEMA(nn.Linear(4, 3).parameters(), half_life_kimg=1.0)
    other.load_state_dict(sd)
    assert other.num_updates == 7
    for a, b in zip(other.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)
    # continue identically
    ema.step(lin.parameters())
    other.step(lin.parameters())
    for a, b in zip(other.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)
    # state dict is a snapshot, not a view
    snap = ema.state_dict()
    ema.step(lin.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(snap["shadow_params"], ema.shadow_params))


def test_multi_ema():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    multi = MultiEMA(lin.parameters(), half_lives_kimg=(500, 1000, 2000))
    assert list(multi.keys()) == ["ema_500", "ema_1000", "ema_2000"]
    singles = {hl: PowerEMA(lin.parameters(), half_life_kimg=hl) for hl in (500, 1000, 2000)}
    for _ in range(5):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        betas = multi.step(lin.parameters())
        for hl, e in singles.items():
            assert betas[f"ema_{hl}"] == e.step(lin.parameters())
    for hl, e in singles.items():
        for a, b in zip(multi[hl].shadow_params, e.shadow_params):
            assert torch.equal(a, b)
        assert multi[f"ema_{hl}"] is multi[hl]
    assert multi.num_updates == 5
    assert multi.decay_at(10**6) == {
        "ema_500": 0.5 ** (1024 / 5e5),
        "ema_1000": 0.5 ** (1024 / 1e6),
        "ema_2000": 0.5 ** (1024 / 2e6),
    }

    train = [p.detach().clone() for p in lin.parameters()]
    multi.store(lin.parameters())
    multi.copy_to(lin.parameters(), "ema_1000")
    for p, s in zip(lin.parameters(), multi["ema_1000"].shadow_params):
        assert torch.equal(p.detach(), s)
    multi.restore(lin.parameters())
    for p, t in zip(lin.parameters(), train):
        assert torch.equal(p.detach(), t)

    buf = io.BytesIO()
    torch.save(multi.state_dict(), buf)
    buf.seek(0)
    other = MultiEMA(nn.Linear(3, 2).parameters())
    other.load_state_dict(torch.load(buf, weights_only=True))
    for k in multi.keys():
        assert other[k].num_updates == 5
        for a, b in zip(other[k].shadow_params, multi[k].shadow_params):
            assert torch.equal(a, b)
    with pytest.raises(KeyError):
        MultiEMA(lin.parameters(), half_lives_kimg=(500,)).load_state_dict(multi.state_dict())


def test_ema_with_accelerate_checkpointing(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = Muon(muon_param_groups(model))
    model, opt = acc.prepare(model, opt)
    multi = MultiEMA(model.parameters(), half_lives_kimg=(1, 2))
    acc.register_for_checkpointing(multi)
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        multi.step(model.parameters())
    acc.save_state(str(tmp_path / "ckpt"))
    saved = copy.deepcopy(multi.state_dict())
    saved_params = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    multi.step(model.parameters())
    after_one = [p.detach().clone() for p in model.parameters()]

    acc.load_state(str(tmp_path / "ckpt"))
    for p, s in zip(model.parameters(), saved_params):
        assert torch.equal(p.detach(), s)
    for k in multi.keys():
        assert multi[k].num_updates == 3
        for a, b in zip(multi[k].shadow_params, saved[k]["shadow_params"]):
            assert torch.equal(a, b)
    model(x).square().sum().backward()
    opt.step()
    for p, s in zip(model.parameters(), after_one):
        assert torch.equal(p.detach(), s)


SHARDED_WORKER = r'''
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from pmf_diffusers.training.ema import MultiEMA
from pmf_diffusers.training.optimizer import Muon

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
# Odd row counts: uneven shards (3 + 2 rows, 2 + 1 rows), as FSDP2 makes them.
full = [torch.randn(5, 3), torch.randn(3, 7), torch.randn(5)]
grads = [[torch.randn_like(p) for p in full] for _ in range(3)]


def shard(tensor):
    return distribute_tensor(tensor.clone(), mesh, [Shard(0)], src_data_rank=None)


plain = [torch.nn.Parameter(p.clone()) for p in full]
sharded = [torch.nn.Parameter(shard(p)) for p in full]
optimizers, emas = [], []
for params in (plain, sharded):
    optimizers.append(Muon([{"params": params[:2], "use_muon": True}, {"params": params[2:], "use_muon": False}], lr=0.02))
    emas.append(MultiEMA(params, half_lives_kimg=(0.5,), ref_batch=64))
for step_grads in grads:
    for params, optimizer, ema, to_grad in zip((plain, sharded), optimizers, emas, (torch.clone, shard)):
        for param, grad in zip(params, step_grads):
            param.grad = to_grad(grad)
        optimizer.step()
        ema.step(params)

# Shard-local elementwise work and Newton-Schulz on the gathered matrix: the same arithmetic as unsharded.
assert all(torch.equal(q.full_tensor(), p) for p, q in zip(plain, sharded)), "weights differ"
state = emas[1].state_dict()  # collective: full tensors
assert all(type(s) is torch.Tensor for s in state["ema_0.5"]["shadow_params"])
assert all(torch.equal(a, b) for a, b in zip(state["ema_0.5"]["shadow_params"], emas[0]["ema_0.5"].shadow_params))
restored = MultiEMA([torch.nn.Parameter(shard(torch.zeros_like(p))) for p in full], half_lives_kimg=(0.5,), ref_batch=64)
restored.load_state_dict(state)
assert all(torch.equal(a.full_tensor(), b) for a, b in zip(restored["ema_0.5"].shadow_params, emas[0]["ema_0.5"].shadow_params))
if dist.get_rank() == 0:
    print("SHARDED OK")
# Both ranks finish all communication before gloo is torn down (tearing down while the peer still talks can abort).
dist.barrier()
dist.destroy_process_group()
'''


def test_muon_and_ema_on_fsdp2_shards_equal_unsharded(tmp_path):
    """Two gloo processes: Muon (Newton-Schulz on the gathered update, this process's rows applied) and Adam on
    `DTensor` shards with uneven rows give exactly the unsharded weights after 3 steps; the EMA checkpoints full tensors
    and loads them back into shards."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    script = tmp_path / "sharded_worker.py"
    script.write_text(SHARDED_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED OK" in result.stdout
