# Copyright 2026 The pmf-diffusers developers. MIT License.
"""A tiny, self-generated toy dataset of coloured shapes ("pmf-toy-shapes").

The dataset exists so that tests, demos and CPU training runs of pixel MeanFlow have data that needs no download.
The ten classes (a shape AND a colour each) are listed in :mod:`pmf_diffusers.toy.classes`. Intra-class variation
comes from the random position, size, small rotation, colour jitter and a random dark, low-saturation background
with a soft gradient.

Rendering is deterministic: image ``index`` of class ``class_id`` is drawn from
``numpy.random.default_rng([seed, class_id, index])``, so the same arguments always give byte-identical PNG files,
and any single image can be reproduced without generating the others.

Example::

    from pmf_diffusers.toy.shapes import make_toy_dataset
    root = make_toy_dataset("data/toy", images_per_class=200)   # 2000 PNGs
    # datasets.load_dataset("imagefolder", data_dir=str(root)) gives labels 0..9
    # in the order of TOY_CLASS_NAMES.

Command line::

    pmf toy-data data/toy --images-per-class 200
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .classes import (
    NUM_TOY_CLASSES,
    TOY_CLASS_COLORS,
    TOY_CLASS_FOLDERS,
    TOY_CLASS_NAMES,
    TOY_DATASET_NAME,
    TOY_DATASET_VERSION,
    check_class_id,
    toy_class_folder_name,
)

__all__ = [
    "TOY_CLASS_NAMES",
    "TOY_CLASS_COLORS",
    "TOY_CLASS_FOLDERS",
    "TOY_DATASET_NAME",
    "toy_class_folder_name",
    "render_toy_image",
    "generate_toy_arrays",
    "make_toy_dataset",
]

_SUPERSAMPLE = 4
# Shape "radius" as a fraction of the image side, and how far the drawn shape
# may reach beyond that radius (used to keep shapes inside the frame).
_RADIUS_RANGE = (0.20, 0.32)
_EXTENT = 1.15


# --------------------------------------------------------------------------- shapes
# Each shape function draws white (255) onto an "L" mask, black (0) for holes.
# ``cx, cy, r`` are in supersampled pixels, ``rot`` in radians.


def _poly(cx: float, cy: float, points: Sequence[tuple[float, float]], rot: float) -> list[tuple[float, float]]:
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _rect(hw: float, hh: float, dx: float = 0.0, dy: float = 0.0) -> list[tuple[float, float]]:
    return [(dx - hw, dy - hh), (dx + hw, dy - hh), (dx + hw, dy + hh), (dx - hw, dy + hh)]


def _draw_circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _draw_square(d, cx, cy, r, rot):
    d.polygon(_poly(cx, cy, _rect(0.88 * r, 0.88 * r), rot), fill=255)


def _draw_triangle(d, cx, cy, r, rot):
    rr = 1.12 * r
    pts = [(rr * math.cos(a), rr * math.sin(a) + 0.12 * r) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    d.polygon(_poly(cx, cy, pts, rot), fill=255)


def _draw_plus(d, cx, cy, r, rot):
    t = 0.32 * r
    d.polygon(_poly(cx, cy, _rect(r, t), rot), fill=255)
    d.polygon(_poly(cx, cy, _rect(t, r), rot), fill=255)


def _draw_ring(d, cx, cy, r, rot):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    ri = 0.55 * r
    d.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)


def _draw_stripes(d, cx, cy, r, rot):
    # three horizontal bars inside a square of half-side r
    h = 2 * r / 5
    for k in (0, 2, 4):
        dy = -r + (k + 0.5) * h
        d.polygon(_poly(cx, cy, _rect(r, h / 2, 0.0, dy), rot), fill=255)


def _draw_diamond(d, cx, cy, r, rot):
    rr = 1.12 * r
    pts = [(0.0, -rr), (0.8 * rr, 0.0), (0.0, rr), (-0.8 * rr, 0.0)]
    d.polygon(_poly(cx, cy, pts, rot), fill=255)


def _draw_x(d, cx, cy, r, rot):
    t = 0.27 * r
    for a in (math.pi / 4, -math.pi / 4):
        d.polygon(_poly(cx, cy, _rect(1.1 * r, t), rot + a), fill=255)


def _draw_frame(d, cx, cy, r, rot):
    d.polygon(_poly(cx, cy, _rect(0.9 * r, 0.9 * r), rot), fill=255)
    d.polygon(_poly(cx, cy, _rect(0.5 * r, 0.5 * r), rot), fill=0)


def _draw_star(d, cx, cy, r, rot):
    ro, ri = 1.12 * r, 0.46 * r
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rad = ro if k % 2 == 0 else ri
        pts.append((rad * math.cos(a), rad * math.sin(a) + 0.08 * r))
    d.polygon(_poly(cx, cy, pts, rot), fill=255)


# (draw function, max rotation in degrees) per class
_SHAPES = (
    (_draw_circle, 0.0),
    (_draw_square, 12.0),
    (_draw_triangle, 10.0),
    (_draw_plus, 8.0),
    (_draw_ring, 0.0),
    (_draw_stripes, 6.0),
    (_draw_diamond, 8.0),
    (_draw_x, 8.0),
    (_draw_frame, 10.0),
    (_draw_star, 12.0),
)


# --------------------------------------------------------------------------- rendering


def render_toy_image(class_id: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Render one RGB image of class ``class_id`` at ``size``×``size``.

    Deterministic given the state of ``rng`` (a :class:`numpy.random.Generator`);
    the image is drawn at 4× resolution and downsampled with LANCZOS
    (anti-aliasing).
    """
    check_class_id(class_id)
    class_id = int(class_id)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if int(size) < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    size = int(size)
    big = size * _SUPERSAMPLE

    # --- background: dark, low saturation, with a soft linear gradient
    base = rng.uniform(12.0, 60.0)
    tint = rng.uniform(-8.0, 8.0, size=3)
    grad_amp = rng.uniform(0.0, 20.0)
    grad_dir = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(big, dtype=np.float64) + 0.5) / big - 0.5
    ramp = math.cos(grad_dir) * coords[None, :] + math.sin(grad_dir) * coords[:, None]  # in [-0.71, 0.71]
    bg = base + tint[None, None, :] + grad_amp * ramp[:, :, None]
    bg = np.clip(np.rint(bg), 0, 255).astype(np.uint8)

    # --- foreground colour with jitter
    brightness = rng.uniform(0.85, 1.05)
    jitter = rng.uniform(-12.0, 12.0, size=3)
    color = np.clip(np.rint(np.asarray(TOY_CLASS_COLORS[class_id], np.float64) * brightness + jitter), 0, 255)
    color = tuple(int(c) for c in color)

    # --- geometry (in target pixels, then scaled)
    r = rng.uniform(*_RADIUS_RANGE) * size
    margin = _EXTENT * r + 0.5
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    draw_fn, max_rot = _SHAPES[class_id]
    rot = math.radians(rng.uniform(-max_rot, max_rot)) if max_rot > 0 else 0.0

    mask = Image.new("L", (big, big), 0)
    draw_fn(ImageDraw.Draw(mask), cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, r * _SUPERSAMPLE, rot)

    img = Image.composite(Image.new("RGB", (big, big), color), Image.fromarray(bg, "RGB"), mask)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _image_rng(seed: int, class_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(class_id), int(index)])


def _check_common(images_per_class: int, size: int, seed: int) -> None:
    if int(images_per_class) < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if int(size) < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _progress(total: int, desc: str, show: bool | None):
    from tqdm.auto import tqdm

    if show is None:
        show = total >= 500
    return tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False)


def generate_toy_arrays(
    images_per_class: int = 200,
    size: int = 32,
    seed: int = 0,
    *,
    progress: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the toy dataset in memory (no files).

    Returns ``(images, labels)``: ``images`` is ``uint8`` of shape
    ``(N, size, size, 3)``, ``labels`` is ``int64`` of shape ``(N,)``, class-major
    order (all of class 0, then class 1, ...). Pixel-identical to the PNGs that
    :func:`make_toy_dataset` writes for the same arguments.
    """
    _check_common(images_per_class, size, seed)
    n = int(images_per_class)
    images = np.empty((NUM_TOY_CLASSES * n, int(size), int(size), 3), dtype=np.uint8)
    labels = np.repeat(np.arange(NUM_TOY_CLASSES, dtype=np.int64), n)
    with _progress(len(images), "rendering toy images", progress) as bar:
        for c in range(NUM_TOY_CLASSES):
            for i in range(n):
                images[c * n + i] = np.asarray(render_toy_image(c, _image_rng(seed, c, i), size))
                bar.update(1)
    return images, labels


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.exists():
        return
    entries = sorted(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass `overwrite=True` to replace it")
    # Safety: only ever delete what a previous toy dataset could have written.
    known = set(TOY_CLASS_FOLDERS) | {"metadata.json"}
    foreign = [e.name for e in entries if e.name not in known]
    if foreign:
        raise FileExistsError(
            f"refusing to overwrite {out}: it holds entries that are not part of a toy dataset "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose another folder"
        )
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()


def make_toy_dataset(
    output_dir: str | Path,
    images_per_class: int = 200,
    size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    *,
    progress: bool | None = None,
) -> Path:
    """Write the toy dataset as an image folder and return its path.

    Layout::

        output_dir/
          metadata.json
          00_red_circle/00000.png, 00001.png, ...
          01_blue_square/...
          ...

    Folder names sort in class-id order, so an ``imagefolder`` loader assigns
    label ``k`` to ``TOY_CLASS_NAMES[k]``. The same arguments give byte-identical
    files. A non-empty ``output_dir`` is refused unless ``overwrite`` is true (and
    even then only if it holds nothing but a previous toy dataset).
    ``progress=None`` shows a tqdm bar for 500 images or more.
    """
    _check_common(images_per_class, size, seed)
    out = Path(output_dir)
    _prepare_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    n, size, seed = int(images_per_class), int(size), int(seed)

    with _progress(NUM_TOY_CLASSES * n, "writing toy dataset", progress) as bar:
        for c, folder in enumerate(TOY_CLASS_FOLDERS):
            class_dir = out / folder
            class_dir.mkdir()
            for i in range(n):
                img = render_toy_image(c, _image_rng(seed, c, i), size)
                img.save(class_dir / f"{i:05d}.png", format="PNG")
                bar.update(1)

    metadata = {
        "name": TOY_DATASET_NAME,
        "version": TOY_DATASET_VERSION,
        "generator": "pmf_diffusers.toy.shapes",
        "class_names": list(TOY_CLASS_NAMES),
        "class_folders": list(TOY_CLASS_FOLDERS),
        "seed": seed,
        "size": size,
        "images_per_class": n,
        "num_images": NUM_TOY_CLASSES * n,
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return out
