"""Evaluation: Fréchet distance, Inception Score, precision/recall, protocol rules, reference statistics, the FID
Inception-v3 port, and `run_eval` end to end with a tiny random pipeline and a tiny random feature extractor."""

from __future__ import annotations

import argparse
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pmf_diffusers import evaluation as ev
from pmf_diffusers.evaluation.protocol import _gather_in_order

pytestmark = pytest.mark.usefixtures("single_thread")

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
FID_METHODS = ["eig", pytest.param("scipy", marks=pytest.mark.skipif(not HAS_SCIPY, reason="scipy not installed"))]


def _spd(rng, dim, rank=None):
    a = rng.standard_normal((dim, rank or dim + 3))
    return a @ a.T / a.shape[1]


def _fd_reference(mu1, s1, mu2, s2):
    """Independent float64 reference: tr sqrt(Σ1 Σ2) = tr sqrt(Σ1^½ Σ2 Σ1^½) via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", FID_METHODS)
def test_frechet_distance_closed_form_for_diagonal_covariances(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    d1, d2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert ev.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", FID_METHODS)
def test_frechet_distance_of_identical_distributions_is_zero(method):
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(8), _spd(rng, 8)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9
    singular = _spd(rng, 8, rank=3)  # rank-deficient, as with fewer samples than dimensions
    assert abs(ev.frechet_distance(mu, singular, mu, singular, method=method)) < 1e-6


@pytest.mark.parametrize("method", FID_METHODS)
def test_frechet_distance_random_spd_pair_matches_eigh_reference(method):
    rng = np.random.default_rng(2)
    for dim in (3, 16, 64):
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        s1, s2 = _spd(rng, dim), _spd(rng, dim)
        expected = _fd_reference(mu1, s1, mu2, s2)
        assert ev.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-8, abs=1e-9)
        # float32 inputs are promoted to float64
        got32 = ev.frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2, method=method)
        assert got32 == pytest.approx(expected, rel=1e-5)
    # singular covariances (rank 4 of 16): finite and close to the reference
    s1, s2 = _spd(rng, 16, rank=4), _spd(rng, 16, rank=4)
    mu = np.zeros(16)
    assert ev.frechet_distance(mu, s1, mu, s2, method=method) == pytest.approx(_fd_reference(mu, s1, mu, s2), rel=1e-4)


def test_frechet_distance_rejects_mismatched_shapes_and_methods():
    with pytest.raises(ValueError, match="equal length"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="Covariances"):
        ev.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="Unknown"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    feats = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = ev.feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Inception Score, precision/recall
# ----------------------------------------------------------------------------------------------------------------
def test_inception_score_on_known_tables():
    uniform = torch.full((40, 10), 0.1)
    assert ev.inception_score(probs=uniform) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = torch.eye(12)  # every sample confident and a different class: IS = number of classes
    assert ev.inception_score(probs=one_hot, splits=1)[0] == pytest.approx(12.0, rel=1e-12)
    # 10 splits of 2 distinct classes each (no shuffle): 2 per split, std 0
    cyclic = torch.eye(20)
    assert ev.inception_score(probs=cyclic, splits=10, shuffle=False) == pytest.approx((2.0, 0.0), abs=1e-12)
    # logits path = softmax probabilities path; shuffle only changes the split membership
    logits = torch.randn(30, 7, generator=torch.Generator().manual_seed(0)) * 3
    by_logits = ev.inception_score(logits, splits=3)
    by_probs = ev.inception_score(probs=logits.double().softmax(1), splits=3)
    assert by_logits == pytest.approx(by_probs, rel=1e-10)
    assert ev.inception_score(logits, splits=1)[0] == pytest.approx(ev.inception_score(logits, splits=1, shuffle=False)[0])
    with pytest.raises(ValueError, match="splits"):
        ev.inception_score(logits, splits=31)
    with pytest.raises(ValueError, match="exactly one"):
        ev.inception_score(logits, probs=logits)


def test_precision_recall_on_known_point_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g)
    assert ev.precision_recall(real, real.clone()) == pytest.approx({"precision": 1.0, "recall": 1.0, "f_score": 1.0})
    far = real + 100.0
    out = ev.precision_recall(real, far)
    assert out["precision"] == 0.0 and out["recall"] == 0.0
    # generated samples collapsed onto a few real points: all realistic (precision 1), little coverage (recall < 1)
    collapsed = real[:5].repeat(8, 1)
    out = ev.precision_recall(real, collapsed, k=3, batch_size=7)
    assert out["precision"] == 1.0 and out["recall"] < 0.5
    with pytest.raises(ValueError, match="at least"):
        ev.precision_recall(real[:3], real[:3], k=3)


# ----------------------------------------------------------------------------------------------------------------
# Protocol: labels, seeds, sharding, uint8
# ----------------------------------------------------------------------------------------------------------------
def test_class_balanced_labels_follow_the_official_rule():
    labels = ev.class_balanced_labels(50_000, 1000)
    assert labels.shape == (50_000,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.arange(50_000) // 50)
    np.testing.assert_array_equal(np.bincount(labels), np.full(1000, 50))
    np.testing.assert_array_equal(ev.class_balanced_labels(12, 4), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert ev.images_per_class(8, 4) == 2
    with pytest.raises(ValueError, match="`per_class=N` instead"):  # the library names API parameters
        ev.images_per_class(10, 4)


def test_image_seeds_follow_the_official_xor_rule():
    assert [ev.image_seed(i) for i in (0, 1, 42, 43)] == [42, 43, 0, 1]  # default sample_seed 42
    assert ev.image_seed(5, 0) == 5 and ev.image_seed(2**32 + 7, 0) == 7 and ev.image_seed(0, -1) == 2**32 - 1
    for index, generator in zip([0, 7, 49_999], ev.make_generators([0, 7, 49_999], 42)):
        assert generator.device.type == "cpu"
        expected = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed((index ^ 42) % 2**32))
        assert torch.equal(torch.randn(3, 4, 4, generator=generator), expected)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_sharding_covers_every_index_exactly_once(num_processes):
    for total in (0, 1, 2, 7, 10, 50_000):
        shards = [ev.shard_indices(total, num_processes, rank) for rank in range(num_processes)]
        assert [i for shard in shards for i in shard] == list(range(total))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        ev.shard_indices(10, 2, 2)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_gather_restores_global_order_across_uneven_shards(num_processes):
    """`_gather_in_order` with a thread-simulated accelerator: padded, gathered, de-padded, in index order."""
    total = 7
    barrier = threading.Barrier(num_processes)
    slots: dict[int, torch.Tensor] = {}
    results = {}

    class FakeAccelerator:
        def __init__(self, rank):
            self.process_index, self.num_processes = rank, num_processes

        def gather_for_metrics(self, tensor):
            slots[self.process_index] = tensor
            barrier.wait()
            out = torch.cat([slots[r] for r in range(num_processes)])
            barrier.wait()
            return out

    def worker(rank):
        shard = ev.shard_indices(total, num_processes, rank)
        rows = torch.tensor([[float(i), 10.0 * i] for i in shard]).reshape(-1, 2)
        results[rank] = _gather_in_order(FakeAccelerator(rank), shard, {"x": rows}, total, "cpu")["x"]

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(num_processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    expected = torch.tensor([[float(i), 10.0 * i] for i in range(total)])
    assert all(torch.equal(results[rank], expected) for rank in range(num_processes))


def test_to_uint8_matches_the_official_numpy_formula():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 1 / 255, 0.5, 1.0, 3.0]).repeat(2, 3, 1, 1)
    x = torch.cat([x, torch.randn(2, 3, 1, 8, generator=torch.Generator().manual_seed(0))], dim=2)
    official = np.round(np.clip((x.numpy() + 1) / 2 * 255, 0, 255)).astype(np.uint8)
    out = ev.to_uint8(x)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), official)


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------------------
def test_load_reference_stats_resolution_rules(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4)
    by_name = tmp_path / "jit_in256_stats.npz"
    np.savez(by_name, mu=mu, sigma=sigma)
    stats = ev.load_reference_stats(by_name, 256)
    assert (stats.resolution, stats.resolution_source, stats.feature_dim) == (256, "filename", 4)
    np.testing.assert_array_equal(stats.mu, mu)
    with pytest.raises(ValueError, match=r"256×256 images \(the file name\).*512×512.*jit_in512_stats.npz"):
        ev.load_reference_stats(by_name, 512)

    in_file = tmp_path / "stats.npz"
    ev.save_reference_stats(in_file, mu, sigma, resolution=32, num_images=10, feature_extractor="x")
    assert ev.load_reference_stats(in_file, 32).num_images == 10
    with pytest.raises(ValueError, match="'resolution' entry"):
        ev.load_reference_stats(in_file, 64)
    with pytest.raises(ValueError, match="`reference_resolution` says 64"):
        ev.load_reference_stats(in_file, resolution=64)

    unnamed = tmp_path / "reference.npz"
    np.savez(unnamed, mean=mu, cov=sigma)  # alternative key names are accepted
    assert ev.load_reference_stats(unnamed).resolution is None  # nothing to check against
    with pytest.raises(ValueError, match="`reference_resolution=64`"):
        ev.load_reference_stats(unnamed, 64)
    assert ev.load_reference_stats(unnamed, 64, resolution=64).resolution_source == "user"
    with pytest.raises(ValueError, match="2048-dimensional"):
        ev.load_reference_stats(unnamed, feature_dim=2048)

    assert ev.infer_resolution_from_filename("VIRTUAL_imagenet512_labeled.npz") == 512
    assert ev.infer_resolution_from_filename("fid_stats_2048.npz") is None
    assert ev.infer_resolution_from_filename("in256_to_512.npz") is None  # ambiguous


def test_load_reference_stats_key_and_file_errors(tmp_path):
    wrong_keys = tmp_path / "jit_in256_stats.npz"
    np.savez(wrong_keys, mean_features=np.zeros(3), covariance=np.eye(3))
    with pytest.raises(ValueError, match=r"lack the keys 'mu' and 'sigma' \(found: \['covariance', 'mean_features'\]\)"):
        ev.load_reference_stats(wrong_keys, 256)
    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ev.load_reference_stats(bad_shape)
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(ValueError, match="Cannot read"):
        ev.load_reference_stats(not_npz)
    with pytest.raises(FileNotFoundError, match="jit_in256_stats.npz"):
        ev.load_reference_stats(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------
def test_tf1_bilinear_resize_matches_direct_formula():
    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4) ** 1.5
    assert torch.equal(ev.tf1_bilinear_resize(x, (5, 4)), x)
    out = ev.tf1_bilinear_resize(x, (7, 3)).double()
    ref = torch.empty(2, 3, 7, 3, dtype=torch.float64)
    xd = x.double()
    for i in range(7):
        for j in range(3):
            sy, sx = i * 5 / 7, j * 4 / 3  # TF1: no half-pixel offset, clamp the +1 neighbour
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            top = xd[..., y0, x0] * (1 - fx) + xd[..., y0, x1] * fx
            bottom = xd[..., y1, x0] * (1 - fx) + xd[..., y1, x1] * fx
            ref[..., i, j] = top * (1 - fy) + bottom * fy
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)


def test_inception_v3_port_shapes_and_weight_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(ev.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"weights-inception-2015-12-05-6726825d\.pth.*https://github\.com/toshas"):
        ev.resolve_inception_weights()
    with pytest.raises(FileNotFoundError, match="`inception_weights`"):
        ev.resolve_inception_weights(tmp_path / "nope.pth")

    torch.manual_seed(0)
    model = ev.InceptionV3FeatureExtractor()
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # as torch-fidelity's module (566 state-dict keys)
    assert len(model.state_dict()) == 566
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["AuxLogits.fc.weight"] = torch.zeros(1)  # torchvision-style extras are ignored
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="sha256"):
        loaded = ev.InceptionV3FeatureExtractor(path)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features, logits = loaded(images)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()  # pooled ReLU outputs
    torch.testing.assert_close(logits, features @ loaded.fc.weight.T)  # "unbiased" logits (no fc bias)
    with pytest.raises(ValueError, match="uint8"):
        loaded(images.float())

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 checkpoint"):
        ev.InceptionV3FeatureExtractor(tmp_path / "other.pth")
    # found through $PMF_INCEPTION_WEIGHTS and the torch hub cache
    monkeypatch.setenv(ev.INCEPTION_WEIGHTS_ENV, str(path))
    assert ev.resolve_inception_weights() == path


def _torch_fidelity_importable() -> bool:
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or torchvision broken
        return False
    return True


@pytest.mark.skipif(not _torch_fidelity_importable(), reason="torch-fidelity (with a working torchvision) not importable")
def test_inception_v3_port_is_bit_identical_to_torch_fidelity(tmp_path):
    torch.manual_seed(0)
    ours = ev.InceptionV3FeatureExtractor()
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.pth")
    with pytest.warns(UserWarning):
        ours = ev.InceptionV3FeatureExtractor(tmp_path / "w.pth")
    theirs = ev.TorchFidelityFeatureExtractor(tmp_path / "w.pth")
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for a, b in zip(ours(images), theirs(images)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_random_feature_extractor_is_deterministic():
    images = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = ev.RandomFeatureExtractor(seed=3), ev.RandomFeatureExtractor(seed=3)
    torch.manual_seed(123)
    assert all(torch.equal(x, y) for x, y in zip(a(images), b(images)))
    assert a(images)[0].shape == (3, 16) and a(images)[1].shape == (3, 10)


# ----------------------------------------------------------------------------------------------------------------
# run_eval end to end (tiny random pipeline, tiny random feature extractor)
# ----------------------------------------------------------------------------------------------------------------
def _args(*argv):
    return ev.add_eval_arguments(argparse.ArgumentParser()).parse_args(["--device", "cpu", "--num-workers", "0", *argv])


@pytest.fixture
def tiny_model_dir(tmp_path):
    from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel

    transformer = PMFTransformer2DModel(
        sample_size=32, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=16,
        mlp_hidden_dim=64, bottleneck_dim=16, num_classes=4, with_v_head=False,
    ).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere (the zero-initialised gates would give constant images)
        for name, param in transformer.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if "norm" in name else 0.0))
    pipe = PMFPipeline(transformer=transformer, scheduler=PMFScheduler(), id2label={i: f"class {i}" for i in range(4)})
    pipe.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def reference_dir(tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-60, 60, size=(32, 32, 3))
        PIL.Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_run_eval_end_to_end(tmp_path, tiny_model_dir, reference_dir):
    extractor = ev.RandomFeatureExtractor()
    stats = tmp_path / "ref_stats.npz"
    assert ev.run_eval(_args("--compute-stats-from", str(reference_dir), "--stats-out", str(stats)), extractor) == 0
    with np.load(stats) as data:
        assert data["mu"].shape == (16,) and data["sigma"].shape == (16, 16)
        assert int(data["resolution"]) == 32 and int(data["num_images"]) == 24

    # the reference folder against its own statistics: FID ≈ 0
    self_report = tmp_path / "self.json"
    args = _args("--images", str(reference_dir), "--reference-stats", str(stats), "--output", str(self_report))
    assert ev.run_eval(args, extractor) == 0
    report = json.loads(self_report.read_text())
    assert abs(report["fid"]) < 1e-6 and report["num_images"] == 24 and report["reference"]["resolution"] == 32

    # sample from the model: 2 per class × 4 classes, batches of 3 (uneven), P/R against the reference folder
    out = tmp_path / "model.json"
    saved = tmp_path / "samples"
    args = _args(
        "--model", str(tiny_model_dir), "--per-class", "2", "--batch-size", "3", "--reference-stats", str(stats),
        "--reference-images", str(reference_dir), "--precision-recall", "--save-images", str(saved),
        "--grid", str(tmp_path / "grid.png"), "--grid-size", "4", "--output", str(out), "--guidance-scale", "2.0",
    )
    assert ev.run_eval(args, extractor) == 0
    report = json.loads(out.read_text())
    assert np.isfinite(report["fid"]) and report["fid"] > 0
    assert report["inception_score"] >= 1.0 and report["is_splits"] == 8
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
    assert report["num_images"] == 8 and report["sampling"]["images_per_class"] == 2
    assert report["sampling"]["guidance_scale"] == 2.0 and report["feature_extractor"]["name"] == "random-test"
    assert sorted(p.name for p in saved.iterdir()) == [f"{i:05d}.png" for i in range(8)]
    assert PIL.Image.open(tmp_path / "grid.png").size == (64, 64)

    # image 5 is class 5 // 2 with seed 5 XOR 42, whatever batch it was sampled in
    from pmf_diffusers import PMFPipeline

    pipe = PMFPipeline.from_pretrained(tiny_model_dir)
    alone = pipe(class_labels=[2], guidance_scale=2.0, generator=ev.make_generators([5]), output_type="latent").images
    saved_5 = torch.from_numpy(np.array(PIL.Image.open(saved / "00005.png"))).permute(2, 0, 1)
    assert (ev.to_uint8(alone)[0].int() - saved_5.int()).abs().max() <= 1

    # evaluating the saved PNGs gives the same numbers as evaluating while sampling
    again = tmp_path / "again.json"
    args = _args("--images", str(saved), "--reference-stats", str(stats), "--output", str(again))
    assert ev.run_eval(args, extractor) == 0
    assert json.loads(again.read_text())["fid"] == pytest.approx(report["fid"], rel=1e-3)


def test_run_evaluation_takes_a_config_object(tmp_path, reference_dir):
    extractor = ev.RandomFeatureExtractor()
    stats = tmp_path / "stats.npz"
    config = ev.EvalConfig(compute_stats_from=str(reference_dir), stats_out=str(stats), device="cpu", num_workers=0)
    result = ev.run_evaluation(config, extractor)
    assert result["num_images"] == 24 and result["resolution"] == 32 and stats.is_file()
    report = ev.run_evaluation(
        ev.EvalConfig(images=str(reference_dir), reference_stats=str(stats), output=str(tmp_path / "r.json"),
                      device="cpu", num_workers=0), extractor
    )
    assert abs(report["fid"]) < 1e-6 and json.loads((tmp_path / "r.json").read_text())["fid"] == report["fid"]
    # the command line builds the same config from its options
    from pmf_diffusers.commands.eval import config_from_args

    assert config_from_args(_args("--compute-stats-from", str(reference_dir), "--stats-out", str(stats))) == ev.EvalConfig(
        compute_stats_from=str(reference_dir), stats_out=str(stats), device="cpu", num_workers=0
    )
    with pytest.raises(ValueError, match="guidance_scale"):
        ev.run_evaluation(ev.EvalConfig(model="bundled", guidance_scale=0.5), extractor)
    with pytest.raises(ValueError, match="Unknown dtype"):
        ev.run_evaluation(ev.EvalConfig(model="bundled", dtype="int8"), extractor)


def test_run_eval_rejects_bad_references_before_sampling(tmp_path, tiny_model_dir):
    extractor = ev.RandomFeatureExtractor()
    wrong_res = tmp_path / "jit_in64_stats.npz"
    np.savez(wrong_res, mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(ValueError, match="64×64 images.*32×32"):
        ev.run_eval(_args("--model", str(tiny_model_dir), "--reference-stats", str(wrong_res)), extractor)
    missing_keys = tmp_path / "jit_in32_stats.npz"
    np.savez(missing_keys, mean_features=np.zeros(16))
    with pytest.raises(ValueError, match="lack the keys 'mu' and 'sigma'"):
        ev.run_eval(_args("--model", str(tiny_model_dir), "--reference-stats", str(missing_keys)), extractor)
    other_network = tmp_path / "jit_in32_other.npz"
    np.savez(other_network, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-dimensional.*16-dimensional"):
        ev.run_eval(_args("--model", str(tiny_model_dir), "--reference-stats", str(other_network)), extractor)
    with pytest.raises(ValueError, match="multiple of the number of classes.*use --per-class N instead"):
        ev.run_eval(_args("--model", str(tiny_model_dir), "--num-images", "10"), extractor)
    stated_32 = tmp_path / "stats_32.npz"
    np.savez(stated_32, mu=np.zeros(16), sigma=np.eye(16), resolution=32)
    with pytest.raises(ValueError, match="--reference-resolution says 64"):  # the command names its options
        ev.run_eval(_args("--model", str(tiny_model_dir), "--reference-stats", str(stated_32),
                          "--reference-resolution", "64"), extractor)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        ev.run_eval(_args("--model", str(tiny_model_dir), "--inception-weights", str(tmp_path / "nope.pth")))
    with pytest.raises(ValueError, match="--reference-images"):
        ev.run_eval(_args("--model", str(tiny_model_dir), "--precision-recall"), extractor)
    with pytest.raises(ValueError, match="exactly one"):
        ev.run_eval(_args(), extractor)
    with pytest.raises(ValueError, match="--stats-out"):
        ev.run_eval(_args("--compute-stats-from", str(tmp_path)), extractor)


def test_example_script_reports_errors_in_one_line(tmp_path, tiny_model_dir, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_pmf", Path(__file__).parents[1] / "examples" / "evaluate_pmf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    wrong = tmp_path / "jit_in512_stats.npz"
    np.savez(wrong, mu=np.zeros(16), sigma=np.eye(16))
    code = script.main(["--model", str(tiny_model_dir), "--reference-stats", str(wrong), "--device", "cpu",
                        "--feature-extractor", "random"])
    assert code == 2
    assert "error: Wrong reference statistics" in capsys.readouterr().err
