"""A tiny, self-generated toy dataset of coloured shapes ("pmf-toy-shapes").

The dataset exists so that tests, demos and CPU training runs of pixel MeanFlow
have data that needs no download. Every class is defined by BOTH a shape and a
colour, so a sample stays recognisable even when a small one-step generator
produces it slightly blurred. Intra-class variation comes from the random
position, size, small rotation, colour jitter and a random dark,
low-saturation background with a soft gradient.

Rendering is deterministic: image ``index`` of class ``class_id`` is drawn from
``numpy.random.default_rng([seed, class_id, index])``, so the same arguments
always give byte-identical PNG files, and any single image can be reproduced
without generating the others.

Example::

    from pmf_diffusers.training.toy_data import make_toy_dataset
    root = make_toy_dataset("data/toy", images_per_class=200)   # ~2000 PNGs, a few seconds
    # datasets.load_dataset("imagefolder", data_dir=str(root)) gives labels 0..9
    # in the order of TOY_CLASS_NAMES.

Command line::

    python -m pmf_diffusers.training.toy_data data/toy --images-per-class 200
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "TOY_CLASS_NAMES",
    "TOY_CLASS_COLORS",
    "TOY_CLASS_FOLDERS",
    "TOY_DATASET_NAME",
    "toy_class_folder_name",
    "render_toy_image",
    "generate_toy_arrays",
    "make_toy_dataset",
    "save_image_grid",
    "main",
]

TOY_DATASET_NAME = "pmf-toy-shapes"
TOY_DATASET_VERSION = 1

#: Human-readable class names; the list index is the class id.
TOY_CLASS_NAMES: tuple[str, ...] = (
    "red_circle",
    "blue_square",
    "green_triangle",
    "yellow_plus",
    "cyan_ring",
    "magenta_stripes",
    "orange_diamond",
    "white_x",
    "pink_frame",
    "purple_star",
)

#: Base RGB colour of each class (jittered per image).
TOY_CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (225, 45, 45),  # red
    (45, 95, 235),  # blue
    (50, 190, 70),  # green
    (235, 215, 45),  # yellow
    (45, 210, 225),  # cyan
    (215, 55, 205),  # magenta
    (245, 135, 30),  # orange
    (235, 235, 235),  # white
    (250, 150, 185),  # pink
    (140, 75, 230),  # purple
)

_SUPERSAMPLE = 4
_NUM_CLASSES = len(TOY_CLASS_NAMES)
# Shape "radius" as a fraction of the image side, and how far the drawn shape
# may reach beyond that radius (used to keep shapes inside the frame).
_RADIUS_RANGE = (0.20, 0.32)
_EXTENT = 1.15


def _check_class_id(class_id: int) -> None:
    if not isinstance(class_id, (int, np.integer)) or not 0 <= int(class_id) < _NUM_CLASSES:
        raise ValueError(f"class_id must be an int in [0, {_NUM_CLASSES - 1}], got {class_id!r}")


def toy_class_folder_name(class_id: int) -> str:
    """Folder name of a class, e.g. ``"00_red_circle"``; sorts in class-id order."""
    _check_class_id(class_id)
    return f"{class_id:02d}_{TOY_CLASS_NAMES[class_id]}"


#: Folder names in class-id order (also their sorted order).
TOY_CLASS_FOLDERS: tuple[str, ...] = tuple(toy_class_folder_name(i) for i in range(_NUM_CLASSES))


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
    _check_class_id(class_id)
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
    images = np.empty((_NUM_CLASSES * n, int(size), int(size), 3), dtype=np.uint8)
    labels = np.repeat(np.arange(_NUM_CLASSES, dtype=np.int64), n)
    with _progress(len(images), "rendering toy images", progress) as bar:
        for c in range(_NUM_CLASSES):
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
        raise FileExistsError(
            f"output directory {out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it"
        )
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

    with _progress(_NUM_CLASSES * n, "writing toy dataset", progress) as bar:
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
        "generator": "pmf_diffusers.training.toy_data",
        "class_names": list(TOY_CLASS_NAMES),
        "class_folders": list(TOY_CLASS_FOLDERS),
        "seed": seed,
        "size": size,
        "images_per_class": n,
        "num_images": _NUM_CLASSES * n,
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------- grids


def _to_uint8_hwc_list(images: Any, value_range: tuple[float, float]) -> list[np.ndarray]:
    """Normalise PIL images / arrays / tensors to a list of uint8 HxWx3 arrays."""
    if isinstance(images, Image.Image):
        images = [images]
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # torch.Tensor, without importing torch
        images = images.detach().cpu().float().numpy()
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"expected a batch of images with 4 dims, got shape {images.shape}")
        if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):  # NCHW -> NHWC
            arr = arr.transpose(0, 2, 3, 1)
        if arr.dtype != np.uint8:
            lo, hi = value_range
            arr = np.clip((arr.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
            arr = np.rint(arr * 255.0).astype(np.uint8)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return list(arr)
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(np.asarray(im.convert("RGB")))
        else:
            out.extend(_to_uint8_hwc_list(im if hasattr(im, "detach") else np.asarray(im), value_range))
    return out


def save_image_grid(
    images: Any,
    path: str | Path,
    nrow: int = 8,
    *,
    padding: int = 2,
    scale: int = 1,
    pad_value: int | tuple[int, int, int] = 255,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Save a grid of images to ``path`` (PIL only, no torchvision).

    ``images``: a sequence of PIL images, a ``uint8`` array ``(N,H,W,3)``, or a
    float array / torch tensor ``(N,3,H,W)`` with values in ``value_range``
    (default ``[-1, 1]``). ``nrow`` images are placed per row (as in
    ``torchvision.utils.make_grid``). ``scale`` enlarges each image with
    nearest-neighbour resampling (handy for 32×32 images in docs).
    """
    arrays = _to_uint8_hwc_list(images, value_range)
    if not arrays:
        raise ValueError("no images to save")
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError("nrow and scale must be >= 1 and padding >= 0")
    h, w = arrays[0].shape[:2]
    if any(a.shape[:2] != (h, w) for a in arrays):
        raise ValueError("all images in a grid must have the same size")
    h, w = h * scale, w * scale
    ncol = min(nrow, len(arrays))
    nrows = math.ceil(len(arrays) / nrow)
    fill = (pad_value,) * 3 if isinstance(pad_value, int) else tuple(pad_value)
    grid = Image.new("RGB", (ncol * w + (ncol + 1) * padding, nrows * h + (nrows + 1) * padding), fill)
    for k, a in enumerate(arrays):
        tile = Image.fromarray(np.ascontiguousarray(a), "RGB")
        if scale != 1:
            tile = tile.resize((w, h), Image.Resampling.NEAREST)
        row, col = divmod(k, nrow)
        grid.paste(tile, (padding + col * (w + padding), padding + row * (h + padding)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# --------------------------------------------------------------------------- CLI

_EPILOG = """\
classes (folder name = label id):
  {classes}

examples:
  # 2000 images (200 per class) at 32x32, seed 0
  python -m pmf_diffusers.training.toy_data data/toy

  # a larger 64x64 set with another seed, replacing an earlier one
  python -m pmf_diffusers.training.toy_data data/toy64 --images-per-class 1000 --size 64 --seed 1 --overwrite

  # also save a preview grid (8 samples per class, one row per class)
  python -m pmf_diffusers.training.toy_data data/toy --grid docs/images/toy_dataset_grid.png

  # load it with datasets:  load_dataset("imagefolder", data_dir="data/toy")
"""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pmf_diffusers.training.toy_data",
        description=f"Generate the {TOY_DATASET_NAME} toy image-folder dataset (10 classes of coloured shapes).",
        epilog=_EPILOG.format(classes="\n  ".join(TOY_CLASS_FOLDERS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output_dir", type=Path, help="folder to create (must be empty or absent unless --overwrite)")
    p.add_argument("--images-per-class", type=int, default=200, help="images per class (default: 200)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy dataset in output_dir")
    p.add_argument("--grid", type=Path, default=None, help="also save a preview grid PNG (8 per class) here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        out = make_toy_dataset(
            args.output_dir,
            images_per_class=args.images_per_class,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(TOY_CLASS_NAMES) * args.images_per_class} images to {out}")
    if args.grid is not None:
        images, _ = generate_toy_arrays(min(8, args.images_per_class), args.size, args.seed)
        save_image_grid(images, args.grid, nrow=min(8, args.images_per_class), scale=2 if args.size <= 32 else 1)
        print(f"wrote preview grid to {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
