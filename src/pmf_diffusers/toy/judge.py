# Copyright 2026 The pmf-diffusers developers. MIT License.
"""A small, independent CNN that judges whether images look like toy-dataset classes.

It is trained on the REAL toy images (see :mod:`pmf_diffusers.toy.shapes`) with augmentation (small
shifts/scales/rotations, flips, brightness/contrast and colour jitter, blur, Gaussian noise) so that it also
recognises slightly imperfect generated samples. Benchmarks then report per-class accuracy of generated images (a
sample of class ``k`` counts as correct when the judge says ``k``).

Example::

    from pmf_diffusers.toy.shapes import make_toy_dataset
    from pmf_diffusers.toy.judge import (
        train_toy_classifier, evaluate_per_class_accuracy, save_toy_classifier, load_toy_classifier)

    root = make_toy_dataset("data/toy", images_per_class=200)
    clf = train_toy_classifier(root, epochs=6, seed=0)
    save_toy_classifier(clf, "checkpoints/toy_classifier")
    clf = load_toy_classifier("checkpoints/toy_classifier")
    acc = evaluate_per_class_accuracy(clf, samples, labels)     # samples: (N,3,H,W) in [-1, 1]

Command line::

    pmf train-judge data/toy checkpoints/toy_classifier
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "ToyClassifier",
    "load_image_folder",
    "train_toy_classifier",
    "evaluate_per_class_accuracy",
    "save_toy_classifier",
    "load_toy_classifier",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


# --------------------------------------------------------------------------- model


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ToyClassifier(nn.Module):
    """Small CNN: 4 conv blocks (conv-BN-ReLU, 2 max-pools) + global average pooling + linear.

    Inputs are ``(N, 3, H, W)`` float tensors in ``[-1, 1]``; any ``H, W`` ≥ 8
    works (trained at 32, fine at 64 thanks to global pooling). About 75 k
    parameters and 11 MMACs per 32×32 image at ``width=24``.
    """

    def __init__(self, num_classes: int = 10, width: int = 24, class_names: Sequence[str] | None = None):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.class_names = list(class_names) if class_names is not None else None
        w = self.width
        self.features = nn.Sequential(
            _conv_block(3, w),
            nn.MaxPool2d(2),
            _conv_block(w, 2 * w),
            _conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _conv_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, self.num_classes)

    @property
    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "width": self.width, "class_names": self.class_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict_proba(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Softmax probabilities ``(N, num_classes)`` on CPU (model put in eval mode)."""
        self.eval()
        x = _to_model_input(images)
        device = next(self.parameters()).device
        out = [F.softmax(self(x[i : i + batch_size].to(device)), dim=1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def predict(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids ``(N,)`` (int64, CPU)."""
        return self.predict_proba(images, batch_size).argmax(dim=1)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_toy_classifier(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ToyClassifier:
        return load_toy_classifier(directory, device=device)


# --------------------------------------------------------------------------- data


def _to_model_input(images: Any) -> torch.Tensor:
    """Float32 NCHW tensor in [-1, 1] from a tensor/array (uint8 NHWC/NCHW or float in [-1, 1])."""
    if isinstance(images, Image.Image):
        images = np.asarray(images.convert("RGB"))[None]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    return x.float().contiguous()


def load_image_folder(
    folder: str | Path, image_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load an image folder (``folder/<class>/<image>``) with PIL.

    Class ids follow the sorted sub-folder names (as ``datasets`` imagefolder
    does). Returns ``(images uint8 (N,H,W,3), labels int64 (N,), class_folder_names)``.
    Images are resized (LANCZOS) to ``image_size`` if given, else they must all
    share one size.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders")
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                im = im.convert("RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
                images.append(np.asarray(im))
            labels.append(label)
    if not images:
        raise ValueError(f"no images found under {root}")
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(f"images under {root} have different sizes {sorted(shapes)}; pass image_size=")
    return np.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs]


def _load_training_data(data: Any, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    if isinstance(data, (str, Path)):
        imgs, labels, names = load_image_folder(data, image_size)
        meta = Path(data) / "metadata.json"
        if meta.is_file():  # a toy dataset: use the human-readable names
            try:
                names = list(json.loads(meta.read_text(encoding="utf-8"))["class_names"]) or names
            except (ValueError, KeyError, TypeError):
                pass
        return _to_model_input(imgs), torch.as_tensor(labels, dtype=torch.long), names
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x = _to_model_input(data[0])
        y = torch.as_tensor(np.asarray(data[1]), dtype=torch.long).reshape(-1)
        if image_size is not None and x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        return x, y, None
    raise TypeError("data must be an image-folder path or an (images, labels) pair")


# --------------------------------------------------------------------------- augmentation


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Batch augmentation of ``x`` (N,3,H,W) in [-1, 1]; all randomness from ``g``."""
    n, _, h, w = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    # geometry: shift ±3/32 of the side, scale ±10 %, rotation ±10°, horizontal flip
    angle = u(-10.0, 10.0, n) * math.pi / 180
    scale = u(0.9, 1.1, n)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    tx, ty = u(-0.1875, 0.1875, n), u(-0.1875, 0.1875, n)  # normalised coords: 2 == full side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # photometric: brightness / contrast / per-channel gain / offset
    x01 = (x + 1) * 0.5
    mean = x01.mean(dim=(1, 2, 3), keepdim=True)
    x01 = (x01 - mean) * u(0.75, 1.25, n, 1, 1, 1) + mean
    x01 = x01 * u(0.8, 1.15, n, 1, 1, 1) * u(0.9, 1.1, n, 3, 1, 1) + u(-0.06, 0.06, n, 1, 1, 1)
    x = x01 * 2 - 1

    # blur (about 40 % of the batch), per-sample gaussian sigma, up to roughly the
    # softness of an image upsampled from a quarter of its resolution
    sigma = u(0.35, 1.6, n) * (h / 32)
    blur = torch.rand(n, generator=g) < 0.4
    if blur.any():
        r = max(2, int(math.ceil(2 * float(sigma.max()))))
        k = torch.arange(-r, r + 1, dtype=torch.float32)
        k1 = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)
        k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, dim=0)[:, None]  # (3n,1,2r+1,2r+1)
        xb = F.conv2d(F.pad(x.reshape(1, 3 * n, h, w), (r, r, r, r), mode="replicate"), k2, groups=3 * n)
        x = torch.where(blur[:, None, None, None], xb.reshape(n, 3, h, w), x)

    # gaussian noise, std up to 0.1 (in [-1, 1] units)
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.1, n, 1, 1, 1)
    return x.clamp_(-1.0, 1.0)


def _negatives(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Images that belong to NO class (for outlier exposure), (n,3,size,size) in [-1, 1].

    A mix of Gaussian noise, uniform noise, smooth large-scale random colour
    fields and blank dark backgrounds with a gradient (a toy background with no
    shape).
    """

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    kinds = torch.randint(0, 4, (n,), generator=g)
    gauss = torch.randn(n, 3, size, size, generator=g) * u(0.1, 1.0, n, 1, 1, 1) + u(-0.8, 0.3, n, 1, 1, 1)
    unif = (torch.rand(n, 3, size, size, generator=g) * 2 - 1) * u(0.3, 1.0, n, 1, 1, 1)
    low = torch.randn(n, 3, 4, 4, generator=g)
    low = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    smooth = low * u(0.2, 0.7, n, 1, 1, 1) + u(-0.7, 0.0, n, 1, 1, 1)
    ramp = torch.linspace(-0.5, 0.5, size)
    a = u(0.0, 2 * math.pi, n)
    grad = torch.cos(a)[:, None, None] * ramp[None, None, :] + torch.sin(a)[:, None, None] * ramp[None, :, None]
    blank = u(-0.9, -0.5, n, 1, 1, 1) + u(-0.06, 0.06, n, 3, 1, 1) + u(0.0, 0.15, n, 1, 1, 1) * grad[:, None]
    blank = blank + torch.randn(n, 3, size, size, generator=g) * u(0.0, 0.05, n, 1, 1, 1)
    k = kinds[:, None, None, None]
    x = torch.where(k == 0, gauss, torch.where(k == 1, unif, torch.where(k == 2, smooth, blank)))
    return x.clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------- training


def train_toy_classifier(
    data: str | Path | tuple[Any, Any],
    epochs: int = 6,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    width: int = 24,
    image_size: int | None = None,
    augment: bool = True,
    label_smoothing: float = 0.05,
    outlier_exposure: float = 0.5,
    val_fraction: float = 0.0,
    progress: bool = False,
    num_threads: int | None = None,
) -> ToyClassifier:
    """Train a :class:`ToyClassifier` on real toy images and return it (in eval mode).

    ``data`` is an image folder (``folder/<class>/*.png``, loaded with PIL) or an
    ``(images, labels)`` pair (images: float ``(N,3,H,W)`` in ``[-1, 1]`` or
    ``uint8`` ``(N,H,W,3)`` as from ``generate_toy_arrays``). Deterministic for a
    given ``seed`` (same device and thread count). With ``val_fraction > 0`` a
    random split is held out and its accuracy recorded.

    ``outlier_exposure`` (weight, 0 disables) adds images that belong to no
    class (noise, smooth random colour fields, blank backgrounds; a quarter of
    each batch) trained towards the uniform distribution, so that garbage gets
    LOW confidence instead of a confident arbitrary class; combine with
    ``evaluate_per_class_accuracy(..., min_confidence=0.5)``. A summary (time, final
    loss, validation accuracy) is stored in ``classifier.training_summary``.

    ``num_threads`` temporarily sets ``torch.set_num_threads`` during training
    (1 is often fastest on a small, busy CPU; ``None`` keeps the current setting).
    """
    if num_threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return train_toy_classifier(
                data, epochs, seed, device, batch_size=batch_size, lr=lr, weight_decay=weight_decay, width=width,
                image_size=image_size, augment=augment, label_smoothing=label_smoothing,
                outlier_exposure=outlier_exposure, val_fraction=val_fraction, progress=progress, num_threads=None,
            )
        finally:
            torch.set_num_threads(previous)
    t0 = time.perf_counter()
    device = torch.device(device)
    x, y, class_names = _load_training_data(data, image_size)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    num_classes = len(class_names) if class_names is not None else int(y.max()) + 1
    g = torch.Generator().manual_seed(int(seed))

    x_val = y_val = None
    if val_fraction > 0:
        perm = torch.randperm(len(x), generator=g)
        n_val = max(1, int(round(len(x) * val_fraction)))
        x_val, y_val = x[perm[:n_val]], y[perm[:n_val]]
        x, y = x[perm[n_val:]], y[perm[n_val:]]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = ToyClassifier(num_classes, width, class_names)
    model.to(device)

    steps_per_epoch = math.ceil(len(x) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="toy classifier", disable=not progress, leave=False)
    last_loss = float("nan")
    model.train()
    for _epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        run_loss, run_n = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            xb = _augment(x[idx], g) if augment else x[idx]
            n_neg = max(1, len(idx) // 4) if outlier_exposure > 0 else 0
            if n_neg:
                xb = torch.cat([xb, _negatives(n_neg, xb.shape[-1], g)])
            logits = model(xb.to(device))
            loss = cls_loss = loss_fn(logits[: len(idx)], y[idx].to(device))
            if n_neg:  # cross-entropy towards the uniform distribution
                loss = loss + outlier_exposure * (-F.log_softmax(logits[len(idx) :], dim=1).mean(dim=1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += cls_loss.item() * len(idx)
            run_n += len(idx)
            bar.update(1)
        last_loss = run_loss / max(run_n, 1)
        bar.set_postfix(loss=f"{last_loss:.3f}")
    bar.close()
    model.eval()

    summary: dict[str, Any] = {
        "seed": int(seed),
        "epochs": int(epochs),
        "num_train_images": len(x),
        "image_size": int(x.shape[-1]),
        "final_train_loss": round(last_loss, 5),
        "outlier_exposure": float(outlier_exposure),
    }
    if x_val is not None:
        summary["val_accuracy"] = float((model.predict(x_val) == y_val).double().mean())
        summary["num_val_images"] = len(x_val)
    summary["train_seconds"] = round(time.perf_counter() - t0, 2)
    model.training_summary = summary
    return model


@torch.no_grad()
def evaluate_per_class_accuracy(
    classifier: ToyClassifier,
    images: Any,
    labels: Any,
    batch_size: int = 256,
    *,
    min_confidence: float = 0.0,
) -> dict[int, float]:
    """Per-class accuracy ``{class_id: fraction of that class's images predicted as it}``.

    ``images``: ``(N,3,H,W)`` float in ``[-1, 1]`` (uint8 NHWC also accepted);
    ``labels``: ``(N,)`` ints. Only classes present in ``labels`` appear in the
    result (sorted by class id). With ``min_confidence > 0`` an image only counts
    as correct if the classifier's probability for its class is at least that
    (0.5 is a good choice for judging generated samples: garbage such as noise
    or blank images then counts as wrong instead of as a lucky guess).
    """
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)).long().reshape(-1)
    x = _to_model_input(images)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    proba = classifier.predict_proba(x, batch_size=batch_size)
    pred = proba.argmax(dim=1)
    if min_confidence > 0:
        pred = torch.where(proba.max(dim=1).values >= min_confidence, pred, torch.full_like(pred, -1))
    return {int(c): float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()}


# --------------------------------------------------------------------------- save / load


def save_toy_classifier(classifier: ToyClassifier, directory: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` to ``directory``; return it."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"model_type": "pmf_toy_classifier", **classifier.config}
    summary = getattr(classifier, "training_summary", None)
    if summary:
        config["training_summary"] = summary
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_toy_classifier(directory: str | Path, device: str | torch.device = "cpu") -> ToyClassifier:
    """Load a classifier written by :func:`save_toy_classifier` (returned in eval mode)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / WEIGHTS_NAME).is_file() or not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d} does not contain {WEIGHTS_NAME} and {CONFIG_NAME}")
    config = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    model = ToyClassifier(config["num_classes"], config["width"], config.get("class_names"))
    model.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    if "training_summary" in config:
        model.training_summary = config["training_summary"]
    return model.to(device).eval()
