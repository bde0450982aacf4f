"""Tests for the self-generated toy dataset and its judge classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pmf_diffusers.image_grid import image_grid, save_image_grid
from pmf_diffusers.toy.judge import (
    ToyClassifier,
    evaluate_per_class_accuracy,
    load_image_folder,
    load_toy_classifier,
    save_toy_classifier,
    train_toy_classifier,
)
from pmf_diffusers.toy.shapes import (
    TOY_CLASS_FOLDERS,
    TOY_CLASS_NAMES,
    generate_toy_arrays,
    make_toy_dataset,
    render_toy_image,
)
from pmf_diffusers.training.toy_data import main as toy_data_main  # the old entry point, now `pmf toy-data`

NUM_CLASSES = len(TOY_CLASS_NAMES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- data


def test_class_names_and_folders():
    assert len(TOY_CLASS_NAMES) == 10 and len(set(TOY_CLASS_NAMES)) == 10
    assert list(TOY_CLASS_FOLDERS) == sorted(TOY_CLASS_FOLDERS)  # sorted order == class-id order
    for i, (name, folder) in enumerate(zip(TOY_CLASS_NAMES, TOY_CLASS_FOLDERS)):
        assert folder == f"{i:02d}_{name}"


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_deterministic(size):
    for c in range(NUM_CLASSES):
        a = render_toy_image(c, np.random.default_rng([7, c]), size)
        b = render_toy_image(c, np.random.default_rng([7, c]), size)
        assert a.mode == "RGB" and a.size == (size, size)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # intra-class variation: different rng states give different images
    imgs = [np.asarray(render_toy_image(0, np.random.default_rng(s), size)) for s in range(4)]
    assert all(not np.array_equal(imgs[0], im) for im in imgs[1:])
    with pytest.raises(ValueError):
        render_toy_image(NUM_CLASSES, np.random.default_rng(0), size)


def test_make_toy_dataset_byte_identical_and_seed_dependent(tmp_path):
    a = make_toy_dataset(tmp_path / "a", images_per_class=4, seed=0)
    b = make_toy_dataset(tmp_path / "b", images_per_class=4, seed=0)
    c = make_toy_dataset(tmp_path / "c", images_per_class=4, seed=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    pngs = [k for k in fa if k.endswith(".png")]
    assert len(pngs) == 4 * NUM_CLASSES
    assert all(fa[k] != fc[k] for k in pngs)  # every image changes with the seed
    # the in-memory generator renders exactly the same pixels
    arrays, labels = generate_toy_arrays(4, 32, seed=0)
    imgs, labs, _ = load_image_folder(a)
    assert np.array_equal(arrays, imgs) and np.array_equal(labels, labs)


def test_folder_layout_metadata_and_class_order(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", images_per_class=3, size=32, seed=5)
    assert sorted(p.name for p in root.iterdir()) == sorted([*TOY_CLASS_FOLDERS, "metadata.json"])
    for folder in TOY_CLASS_FOLDERS:
        files = sorted(p.name for p in (root / folder).iterdir())
        assert files == ["00000.png", "00001.png", "00002.png"]
        with Image.open(root / folder / "00000.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["class_names"] == list(TOY_CLASS_NAMES)
    assert meta["class_folders"] == list(TOY_CLASS_FOLDERS)
    assert (meta["seed"], meta["size"], meta["images_per_class"], meta["num_images"]) == (5, 32, 3, 30)
    # sorted-folder label ids (what imagefolder loaders use) == class ids
    _, labels, folders = load_image_folder(root)
    assert folders == list(TOY_CLASS_FOLDERS)
    assert labels.tolist() == [c for c in range(NUM_CLASSES) for _ in range(3)]


def test_datasets_imagefolder_label_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = make_toy_dataset(tmp_path / "toy", images_per_class=2)
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].names == list(TOY_CLASS_FOLDERS)
    expected, _ = generate_toy_arrays(2, 32, seed=0)
    for row in ds:
        # find the image among the rendered ones and check its label
        arr = np.asarray(row["image"].convert("RGB"))
        idx = [i for i in range(len(expected)) if np.array_equal(expected[i], arr)]
        assert len(idx) == 1 and idx[0] // 2 == row["label"]


def test_non_empty_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make_toy_dataset(out, images_per_class=1)
    # overwrite never deletes files that a toy dataset did not write
    with pytest.raises(FileExistsError, match="refusing"):
        make_toy_dataset(out, images_per_class=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"

    toy = make_toy_dataset(tmp_path / "toy", images_per_class=3)
    with pytest.raises(FileExistsError):
        make_toy_dataset(toy, images_per_class=2)
    make_toy_dataset(toy, images_per_class=2, seed=3, overwrite=True)
    assert all(len(list((toy / f).iterdir())) == 2 for f in TOY_CLASS_FOLDERS)
    assert json.loads((toy / "metadata.json").read_text())["seed"] == 3


def test_cli_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pmf_diffusers.training.toy_data", "--help"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in ("--images-per-class", "--size", "--seed", "--overwrite", "examples:", "00_red_circle"):
        assert text in r.stdout


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [str(out), "--images-per-class", "2", "--size", "16", "--seed", "4", "--grid", str(tmp_path / "g.png")]
    assert toy_data_main(args) == 0
    assert _files(out) == _files(make_toy_dataset(tmp_path / "api", images_per_class=2, size=16, seed=4))
    assert (tmp_path / "g.png").is_file()
    capsys.readouterr()
    assert toy_data_main([str(out), "--images-per-class", "2"]) == 2  # non-empty folder: one-line error
    err = capsys.readouterr().err
    assert "not empty" in err and len(err.strip().splitlines()) == 1


def test_save_image_grid(tmp_path):
    arrays, _ = generate_toy_arrays(3, 32, seed=0)  # 30 images
    p = save_image_grid(arrays, tmp_path / "grid.png", nrow=8, padding=2)
    with Image.open(p) as im:
        assert im.size == (8 * 32 + 9 * 2, 4 * 32 + 5 * 2)
        # first tile equals the first image
        assert np.array_equal(np.asarray(im.convert("RGB"))[2:34, 2:34], arrays[0])
    # float tensors in [-1, 1] (N,3,H,W) and PIL lists give the same grid
    t = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
    p2 = save_image_grid(t, tmp_path / "grid2.png", nrow=8)
    p3 = save_image_grid([Image.fromarray(a) for a in arrays], tmp_path / "grid3.png", nrow=8)
    assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(p2)))
    assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(p3)))


def test_image_grid_tile_sizes_and_background():
    arrays, _ = generate_toy_arrays(1, 16, seed=0)  # 10 images of 16x16
    tiles = [Image.fromarray(a) for a in arrays]
    grid = image_grid(tiles[:5], columns=3, background="black")  # 2 rows, one empty cell
    assert grid.size == (48, 32)
    cells = np.asarray(grid)
    assert np.array_equal(cells[16:, 16:32], arrays[4]) and not cells[16:, 32:].any()
    assert image_grid(tiles).size == (4 * 16, 3 * 16)  # default: ceil(sqrt(10)) columns
    # min_tile: integer nearest-neighbour upscaling; max_tile: downscaling that keeps the aspect ratio
    upscaled = image_grid(tiles[:2], min_tile=40)
    assert upscaled.size == (2 * 48, 48)
    assert np.array_equal(np.asarray(upscaled)[:48, :48], np.repeat(np.repeat(arrays[0], 3, axis=0), 3, axis=1))
    assert image_grid([tile.resize((64, 32)) for tile in tiles[:2]], max_tile=32).size == (2 * 32, 16)
    # uint8 NCHW tensors are taken as they are (not rescaled from value_range)
    as_tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    assert np.array_equal(np.asarray(image_grid(as_tensor, columns=5)), np.asarray(image_grid(tiles, columns=5)))
    with pytest.raises(ValueError, match="same size"):
        image_grid([tiles[0], tiles[1].resize((8, 8))])


# --------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_toy_dataset(tmp_path_factory.mktemp("toy") / "train", images_per_class=100, seed=0, progress=False)
    clf = train_toy_classifier(root, epochs=6, seed=0, num_threads=1)
    heldout = generate_toy_arrays(30, 32, seed=1)  # a fresh split: different seed
    return clf, heldout


def test_classifier_heldout_accuracy(trained):
    clf, (x, y) = trained
    assert clf.class_names == list(TOY_CLASS_NAMES)  # taken from metadata.json
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    acc = evaluate_per_class_accuracy(clf, images, torch.from_numpy(y))
    assert sorted(acc) == list(range(NUM_CLASSES))
    assert min(acc.values()) >= 0.98, acc
    # still right when it also has to be confident
    acc_conf = evaluate_per_class_accuracy(clf, images, y, min_confidence=0.5)
    assert min(acc_conf.values()) >= 0.98, acc_conf


def test_classifier_does_not_credit_noise(trained):
    clf, (x, _) = trained
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(200, 3, 32, 32, generator=g).clamp(-1, 1)
    labels = torch.arange(200) % NUM_CLASSES  # claim every class equally often
    # a judge that just said "class k" for everything would give class k 100 %
    acc = evaluate_per_class_accuracy(clf, noise, labels, min_confidence=0.5)
    assert max(acc.values()) <= 0.05, acc
    # plain argmax: noise cannot be right for all classes (chance is 10 %)
    plain = evaluate_per_class_accuracy(clf, noise, labels)
    assert np.mean(list(plain.values())) <= 0.3, plain
    # and noise gets far lower confidence than real images
    conf_noise = clf.predict_proba(noise).max(dim=1).values.mean().item()
    conf_real = clf.predict_proba(x).max(dim=1).values.mean().item()
    assert conf_noise < 0.5 < conf_real and conf_real - conf_noise > 0.4, (conf_noise, conf_real)


def test_classifier_save_load_roundtrip(trained, tmp_path):
    clf, (x, _) = trained
    d = save_toy_classifier(clf, tmp_path / "clf")
    assert (d / "model.safetensors").is_file()
    config = json.loads((d / "config.json").read_text())
    assert config["num_classes"] == NUM_CLASSES and config["class_names"] == list(TOY_CLASS_NAMES)
    loaded = load_toy_classifier(d)
    assert isinstance(loaded, ToyClassifier) and not loaded.training
    assert torch.equal(loaded.predict_proba(x), clf.predict_proba(x))
    # works on 64x64 inputs too
    assert loaded(torch.zeros(2, 3, 64, 64)).shape == (2, NUM_CLASSES)


def test_classifier_training_is_deterministic():
    data = generate_toy_arrays(8, 32, seed=2)
    a, b, c = (train_toy_classifier(data, epochs=1, seed=s, batch_size=32, num_threads=1) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
