# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Training data for pixel MeanFlow: the official ADM center crop, robust decoding, `datasets` loading, collation.

Everything here is plain PIL / numpy / torch (no torchvision).

* :func:`adm_center_crop` — the crop of the official pMF / ADM / JiT ImageNet pipeline: while the short side is at
  least 2·S, downsample by 2 with a BOX filter; bicubic-resize the short side to S; center crop S×S.
* :func:`decode_image` — opens an image from a `datasets.Image(decode=False)` cell (``{"bytes", "path"}``) and forces
  the full decode, so that a truncated or corrupt file raises :class:`CorruptImageError` naming its path.
* :func:`load_training_dataset` — an image folder (``load_dataset("imagefolder", data_dir=...)``) or a Hub dataset,
  optionally streamed, with the image column cast to ``decode=False`` (we decode ourselves to know the path).
* :class:`ImageCollator` — the DataLoader ``collate_fn``: decode → RGB → crop → uint8 → [-1, 1] NCHW; corrupt images
  and images smaller than the resolution (without ``allow_upscale``) are dropped from the batch and reported (path +
  reason) in the batch dict, never silently, so one bad file cannot stop a run after hours of training.
* :func:`check_first_images` — the fail-fast check before training: when the first images of the dataset are *all*
  smaller than the resolution (read from their headers, without decoding), the data is at the wrong resolution.
* :class:`EpochShuffleSampler` — a seeded permutation per epoch (``torch.randperm`` with seed + epoch), so data order
  is a pure function of (seed, epoch) and an exact resume only needs to skip batches.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageTooSmallError",
    "CorruptImageError",
    "TrainingDatasetInfo",
    "adm_center_crop",
    "decode_image",
    "loader_options",
    "pil_to_tensor",
    "preprocess_image",
    "check_first_images",
    "check_image_folder",
    "image_size",
    "load_training_dataset",
    "ImageCollator",
    "EpochShuffleSampler",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")


class DatasetError(ValueError):
    """The training data cannot be used (missing/empty folder, missing column, too few images, ...)."""


class ImageTooSmallError(DatasetError):
    """An image is smaller than the training resolution and upscaling was not allowed."""


class CorruptImageError(OSError):
    """An image file cannot be decoded (the message names its path)."""


# --------------------------------------------------------------------------------------------------- transforms


def adm_center_crop(image: Image.Image, size: int, allow_upscale: bool = False, path: str | None = None) -> Image.Image:
    """The ADM / official pMF center crop to ``size``×``size``.

    While the short side is ≥ 2·size the image is halved with ``Image.BOX`` (cheap anti-aliasing), then the short side
    is resized to ``size`` with ``Image.BICUBIC`` and the center ``size``×``size`` square is cropped (offsets
    ``(dim − size) // 2``, as in ADM's ``center_crop_arr``).

    Args:
        image: a PIL image (any mode; converted to RGB).
        size: output side S.
        allow_upscale: if False (default) an image whose short side is below ``size`` raises
            :class:`ImageTooSmallError`; if True it is bicubic-upscaled like the official pipeline does.
        path: used in error messages only.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    width, height = image.size
    if min(width, height) < size and not allow_upscale:
        where = f" {path}" if path else ""
        raise ImageTooSmallError(
            f"Image{where} is {width}×{height}, smaller than the training resolution {size}×{size}. Train at a lower "
            f"resolution (`size=N`, at most {min(width, height)} for this image), remove such images, or pass "
            "`allow_upscale=True` to bicubic-upscale them (the official ImageNet pipeline does this)."
        )
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr_w, arr_h = image.size
    top, left = (arr_h - size) // 2, (arr_w - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB (palette / alpha images are composited on black, 16-bit greyscale is rescaled)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr / peak * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, "L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = arr * 255.0 if arr.max() <= 1.0 else arr
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W) in [-1, 1] (uint8 / 127.5 − 1)."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_image(cell: Any) -> tuple[Image.Image, str]:
    """Decode a `datasets.Image(decode=False)` cell (``{"bytes": ..., "path": ...}``), a path or a PIL image.

    Returns ``(image, description)`` where the description is the path (or ``"<in-memory bytes>"``). The image is fully
    loaded (``Image.load()``) so truncated files fail here. Raises :class:`CorruptImageError` naming the path.
    """
    if isinstance(cell, Image.Image):
        return cell, getattr(cell, "filename", "") or "<PIL image>"
    if isinstance(cell, (str, os.PathLike)):
        cell = {"path": os.fspath(cell), "bytes": None}
    if not isinstance(cell, dict):
        raise CorruptImageError(f"Unsupported image cell of type {type(cell).__name__}.")
    path, data = cell.get("path"), cell.get("bytes")
    where = path or "<in-memory bytes>"
    try:
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path:
            image = Image.open(path)
        else:
            raise CorruptImageError("the cell has neither bytes nor a path")
        image.load()
    except CorruptImageError as err:
        raise CorruptImageError(f"Cannot decode image {where}: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"Cannot decode image {where}: {type(err).__name__}: {err}") from None
    return image, where


def preprocess_image(cell: Any, size: int, allow_upscale: bool = False) -> torch.Tensor:
    """Decode + RGB + ADM center crop + [-1, 1] CHW tensor (no flip: the official recipe never flips)."""
    image, where = decode_image(cell)
    return pil_to_tensor(adm_center_crop(image, size, allow_upscale=allow_upscale, path=where))


def image_size(cell: Any) -> tuple[tuple[int, int], str]:
    """((width, height), description) of an image cell, read from its header (PIL opens lazily: no decoding)."""
    if isinstance(cell, Image.Image):
        return cell.size, getattr(cell, "filename", "") or "<PIL image>"
    if isinstance(cell, (str, os.PathLike)):
        cell = {"path": os.fspath(cell), "bytes": None}
    path, data = (cell.get("path"), cell.get("bytes")) if isinstance(cell, dict) else (None, None)
    where = path or "<in-memory bytes>"
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.size, where
    except Exception as err:
        raise CorruptImageError(f"Cannot read the header of image {where}: {type(err).__name__}: {err}") from None


def check_first_images(rows, image_column: str, size: int, allow_upscale: bool = False) -> None:
    """Raise :class:`ImageTooSmallError` when every readable image among `rows` (e.g. the first 64 of the dataset) is
    smaller than ``size`` without ``allow_upscale``: the dataset is at a lower resolution than the run. Single small
    images are skipped (and reported) during training instead. Unreadable ones are left to the training loop."""
    if allow_upscale:
        return
    small, readable = [], 0
    for row in rows:
        try:
            (width, height), where = image_size(row[image_column])
        except CorruptImageError:
            continue
        readable += 1
        if min(width, height) < size:
            small.append((where, width, height))
    if small and len(small) == readable:
        where, width, height = small[0]
        raise ImageTooSmallError(
            f"All {readable} images checked (the first of the dataset) are smaller than the training resolution "
            f"{size}×{size}, e.g. {where} ({width}×{height}). Train at a lower resolution (`size=N`, at most "
            f"{min(width, height)} for this image), or pass `allow_upscale=True` to bicubic-upscale them (the official "
            "ImageNet pipeline does this)."
        )


def loader_options(device: torch.device) -> dict:
    """DataLoader options for batches bound for `device`: pinned (page-locked) host memory on CUDA, so that the
    copy to the GPU (`non_blocking=True`) runs asynchronously instead of stalling the host."""
    return {"pin_memory": torch.device(device).type == "cuda"}


# ---------------------------------------------------------------------------------------------------- datasets


@dataclass
class TrainingDatasetInfo:
    """What the trainer needs to know about the dataset."""

    dataset: Any
    image_column: str
    label_column: str | None
    class_names: list[str]
    streaming: bool
    label_to_id: dict | None = None  # for string labels
    source: str = ""
    num_examples: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_image_folder(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, on a missing, non-directory or image-less training folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(
            f"`train_data_dir` {root} does not exist. Point it at a folder with one sub-folder per class "
            "(e.g. data/toy/00_red_circle/*.png); `python -m pmf_diffusers.training.toy_data data/toy` writes a toy one."
        )
    if not root.is_dir():
        raise DatasetError(f"`train_data_dir` {root} is not a directory.")
    for _, _, files in os.walk(root):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return root
    raise DatasetError(
        f"`train_data_dir` {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)} recursively). "
        "Expected one sub-folder per class with image files inside."
    )


def load_training_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    num_classes: int | None = None,
    max_train_samples: int | None = None,
    seed: int = 0,
) -> TrainingDatasetInfo:
    """Load the training set with `datasets`, images undecoded (``datasets.Image(decode=False)``).

    Exactly one of ``train_data_dir`` (an image folder: one sub-folder per class) and ``dataset_name`` (Hub id or local
    dataset script/folder) must be given. Labels: a `ClassLabel` column gives the class names; an int column gives
    ``num_classes`` (argument, else max + 1, not available when streaming); a string column is mapped to sorted ids.
    Without a label column every image gets label 0 (one class; unconditional training with the null label for CFG).
    """
    import datasets

    if (train_data_dir is None) == (dataset_name is None):
        raise DatasetError("Give exactly one of `train_data_dir` (an image folder) and `dataset_name` (a Hub dataset).")
    if train_data_dir is not None:
        root = check_image_folder(train_data_dir)
        source = str(root)
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=str(root), split=split, streaming=streaming, cache_dir=cache_dir
        )
    else:
        source = dataset_name
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
        )

    features = dataset.features
    columns = list(features) if features is not None else list(getattr(dataset, "column_names", None) or [])
    if image_column is None:
        image_column = "image" if "image" in columns else next(
            (c for c in columns if isinstance(features[c], datasets.Image)), None
        ) if features is not None else None
        if image_column is None:
            raise DatasetError(f"No image column found in {source}; columns are {columns}. Pass `image_column`.")
    elif image_column not in columns:
        raise DatasetError(f"`image_column` {image_column!r} not found in {source}; columns are {columns}.")
    explicit_label = label_column is not None
    if label_column is None:
        label_column = "label" if "label" in columns else None
    elif label_column not in columns:
        raise DatasetError(f"`label_column` {label_column!r} not found in {source}; columns are {columns}.")
    if not explicit_label and label_column is None:
        logger.warning(f"No `label` column in {source}: training with a single class (id 0).")

    if features is not None and not isinstance(features[image_column], datasets.Image):
        raise DatasetError(f"Column {image_column!r} of {source} is {features[image_column]}, not an image column.")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if max_train_samples is not None:
        if streaming:
            dataset = dataset.take(max_train_samples)
        else:
            dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))

    label_to_id = None
    if label_column is None:
        class_names = ["image"]
    else:
        feature = features[label_column] if features is not None else None
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        elif feature is not None and getattr(feature, "dtype", "") == "string":
            if streaming:
                raise DatasetError(
                    f"Label column {label_column!r} holds strings; with `streaming` the class set cannot be listed. "
                    "Use a ClassLabel/int column, or drop `streaming`."
                )
            class_names = sorted(set(dataset[label_column]))
            label_to_id = {name: i for i, name in enumerate(class_names)}
        else:
            if num_classes is None:
                if streaming:
                    raise DatasetError(
                        f"Label column {label_column!r} is not a ClassLabel; with `streaming` pass `num_classes`."
                    )
                num_classes = int(max(dataset.unique(label_column))) + 1
            class_names = [str(i) for i in range(num_classes)]
    if num_classes is not None and num_classes != len(class_names):
        if num_classes < len(class_names):
            raise DatasetError(f"`num_classes={num_classes}` is below the {len(class_names)} classes of {source}.")
        class_names = class_names + [str(i) for i in range(len(class_names), num_classes)]

    num_examples = None if streaming else len(dataset)
    if num_examples == 0:
        raise DatasetError(f"The dataset {source} (split {split!r}) is empty.")
    return TrainingDatasetInfo(
        dataset=dataset,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        streaming=streaming,
        label_to_id=label_to_id,
        source=source,
        num_examples=num_examples,
    )


class ImageCollator:
    """``collate_fn`` turning raw rows into ``{"pixel_values", "class_labels", "corrupt"}``.

    ``pixel_values`` is (B', 3, S, S) in [-1, 1]; ``class_labels`` (B',) int64; ``corrupt`` and ``too_small`` lists
    of ``(path, reason)`` for the rows that could not be decoded, or are smaller than ``size`` (without
    ``allow_upscale``), and were dropped (B' = B − len(corrupt) − len(too_small)).
    """

    def __init__(
        self,
        size: int,
        image_column: str = "image",
        label_column: str | None = "label",
        label_to_id: dict | None = None,
        allow_upscale: bool = False,
        num_classes: int | None = None,
    ):
        self.size = int(size)
        self.image_column = image_column
        self.label_column = label_column
        self.label_to_id = label_to_id
        self.allow_upscale = allow_upscale
        self.num_classes = num_classes

    def _label(self, row: dict) -> int:
        if self.label_column is None:
            return 0
        label = row[self.label_column]
        if self.label_to_id is not None:
            label = self.label_to_id[label]
        label = int(label)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise DatasetError(f"Label {label} is outside [0, {self.num_classes}) (column {self.label_column!r}).")
        return label

    def __call__(self, rows: Sequence[dict]) -> dict:
        pixels, labels, corrupt, too_small = [], [], [], []
        for row in rows:
            try:
                tensor = preprocess_image(row[self.image_column], self.size, self.allow_upscale)
            except (CorruptImageError, ImageTooSmallError) as err:
                cell = row[self.image_column]
                path = cell.get("path") if isinstance(cell, dict) else str(cell)
                (corrupt if isinstance(err, CorruptImageError) else too_small).append(
                    (path or "<in-memory bytes>", str(err))
                )
                continue
            pixels.append(tensor)
            labels.append(self._label(row))
        if pixels:
            pixel_values = torch.stack(pixels).contiguous()
        else:
            pixel_values = torch.empty(0, 3, self.size, self.size)
        return {
            "pixel_values": pixel_values,
            "class_labels": torch.tensor(labels, dtype=torch.long),
            "corrupt": corrupt,
            "too_small": too_small,
        }


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A new random permutation per epoch, a pure function of ``(seed, epoch)``: ``set_epoch(e)`` before iterating."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
