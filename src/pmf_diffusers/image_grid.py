# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The one image-grid utility of the package (sample grids of `pmf generate`, the Hub card, the Space, evaluation,
the toy dataset preview and training validation).

`image_grid` accepts what the package produces: a list of PIL images, a uint8 array/tensor, or a float array/tensor
with values in `value_range`, laid out NHWC or NCHW. It normalises them to equally sized RGB tiles, resizes the tiles
if asked (`min_tile`: integer nearest-neighbour upscaling so that tiny 32×32 samples stay visible; `max_tile`:
LANCZOS downscaling so that a published grid stays small) and places them row by row with
`diffusers.utils.make_image_grid`.

Example::

    from pmf_diffusers.image_grid import image_grid

    images = pipe(class_labels=[207, 360, 387, 974]).images
    image_grid(images, columns=2).save("grid.png")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["image_grid", "save_image_grid"]

Color = str | int | tuple[int, int, int]


def _to_uint8_hwc_list(images: Any, value_range: tuple[float, float]) -> list[np.ndarray]:
    """Normalise PIL images / arrays / tensors to a list of uint8 H×W×3 arrays."""
    if isinstance(images, Image.Image):
        images = [images]
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch.Tensor, without importing torch
        images = images.detach().cpu()
        # numpy has no bfloat16: floats go through float32; uint8 stays exact
        images = images.numpy() if str(images.dtype) == "torch.uint8" else images.float().numpy()
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"expected a batch of images with 4 dims, got shape {images.shape}")
        if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):  # NCHW -> NHWC
            array = array.transpose(0, 2, 3, 1)
        if array.dtype != np.uint8:
            low, high = value_range
            array = np.clip((array.astype(np.float64) - low) / (high - low), 0.0, 1.0)
            array = np.rint(array * 255.0).astype(np.uint8)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        return list(array)
    arrays = []
    for image in images:
        if isinstance(image, Image.Image):
            arrays.append(np.asarray(image.convert("RGB")))
        else:
            arrays.extend(_to_uint8_hwc_list(image if hasattr(image, "detach") else np.asarray(image), value_range))
    return arrays


def _resize_tiles(tiles: list[Image.Image], min_tile: int | None, max_tile: int | None) -> list[Image.Image]:
    width, height = tiles[0].size
    longest = max(width, height)
    if min_tile is not None and longest < min_tile:
        # An integer factor with nearest-neighbour keeps every pixel of a small sample sharp.
        scale = math.ceil(min_tile / longest)
        return [tile.resize((width * scale, height * scale), Image.Resampling.NEAREST) for tile in tiles]
    if max_tile is not None and longest > max_tile:
        scale = max_tile / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return [tile.resize(size, Image.Resampling.LANCZOS) for tile in tiles]
    return tiles


def image_grid(
    images: Any,
    columns: int | None = None,
    min_tile: int | None = None,
    max_tile: int | None = None,
    *,
    padding: int = 0,
    background: Color = "white",
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Image.Image:
    """Tile images into one RGB PIL image, row by row.

    Args:
        images: A list of PIL images, a uint8 array/tensor `(N, H, W, 3)` or `(N, 3, H, W)`, or a float array/tensor
            with values in `value_range` (default `[-1, 1]`, the pipeline's raw output). All images must share one size.
        columns: Images per row (capped at the number of images); default `ceil(sqrt(N))`.
        min_tile: Upscale tiles whose longer side is below this by the smallest integer factor that reaches it
            (nearest-neighbour).
        max_tile: Downscale tiles whose longer side exceeds this to fit it (LANCZOS, aspect ratio kept).
        padding: Pixels between the tiles and around the grid.
        background: Colour of the padding and of the empty cells of an incomplete last row.
        value_range: Value range of float inputs, mapped to 0..255.
    """
    arrays = _to_uint8_hwc_list(images, value_range)
    if not arrays:
        raise ValueError("no images to put in a grid")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min_tile is not None and max_tile is not None and min_tile > max_tile:
        raise ValueError(f"min_tile ({min_tile}) must not exceed max_tile ({max_tile})")
    if any(array.shape[:2] != arrays[0].shape[:2] for array in arrays):
        raise ValueError("all images in a grid must have the same size")
    if isinstance(background, int):  # a grey level (PIL would read a bare int as the red channel of RGB)
        background = (background,) * 3

    tiles = _resize_tiles([Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arrays], min_tile, max_tile)
    columns = min(columns or math.ceil(math.sqrt(len(tiles))), len(tiles))
    rows = math.ceil(len(tiles) / columns)
    # Padding on the left and top of every cell, plus one strip on the right and bottom of the whole grid, gives
    # equal gaps between tiles and around the grid.
    cells = [ImageOps.expand(tile, border=(padding, padding, 0, 0), fill=background) for tile in tiles]
    cells += [Image.new("RGB", cells[0].size, background)] * (rows * columns - len(cells))
    from diffusers.utils import make_image_grid

    grid = make_image_grid(cells, rows=rows, cols=columns)
    return ImageOps.expand(grid, border=(0, 0, padding, padding), fill=background)


def save_image_grid(
    images: Any,
    path: str | Path,
    nrow: int = 8,
    *,
    padding: int = 2,
    scale: int = 1,
    pad_value: Color = 255,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Save :func:`image_grid` of `images` to `path` (parent folders created) and return the path.

    The defaults follow `torchvision.utils.save_image`: `nrow` images per row, 2 px of white padding. `scale`
    enlarges each image by that integer factor (nearest-neighbour; handy for 32×32 images in docs).
    """
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError("nrow and scale must be >= 1 and padding >= 0")
    tiles = [Image.fromarray(a, "RGB") for a in _to_uint8_hwc_list(images, value_range)]
    min_tile = scale * max(tiles[0].size) if tiles and scale > 1 else None
    grid = image_grid(tiles, columns=nrow, min_tile=min_tile, padding=padding, background=pad_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
