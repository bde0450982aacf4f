# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Feature extractors for FID / IS: the FID Inception-v3 in plain torch, torch-fidelity's module where importable,
and a tiny random network for tests and smoke runs.

Why a built-in Inception-v3
---------------------------
Every maintained FID package on the registry declares torchvision as a hard requirement, and torchvision cannot be
used with the CPU torch wheel this project pins (the registry torchvision is a CUDA build whose import fails there
and breaks transformers/peft imports; details and evidence in docs/evaluation.md):

* ``torch-fidelity`` 0.4.0 and 0.3.0 (the metric the official code calls): ``Requires-Dist: torchvision``;
  ``pip install --dry-run torch-fidelity`` would replace the CPU torch by a CUDA torch + torchvision + nvidia
  packages; ``import torch_fidelity.feature_extractor_inceptionv3`` runs the package ``__init__``, which imports the
  CLIP/DINOv2/VGG extractors and fails with ``ModuleNotFoundError: No module named 'torchvision'``.
* ``pytorch-fid`` 0.3.0 (``inception.py`` imports torchvision at the top) and ``clean-fid`` 0.1.35 (``cleanfid.fid``
  imports torchvision via ``cleanfid.utils``): same.
* ``torchmetrics``' FID wraps torch-fidelity's extractor (extra ``image`` = torch-fidelity + torchvision).

So this module carries a plain-torch implementation of the FID Inception-v3 (the TensorFlow 2015-12-05 graph as
ported by pytorch-fid / torch-fidelity: TF-style average pools without padded zeros, max pool in the last block,
TF1 bilinear resize to 299, ``(x - 128) / 128`` input scaling, 1008-way classifier). Its parameter names follow
torch-fidelity's module, so it loads the standard weight file unchanged: torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` carries the same
sha256 prefix). Where torch-fidelity *is* importable (a machine with a working torchvision),
``feature_extractor="torch-fidelity"`` runs its own module instead; ``tests/test_evaluation.py`` compares the two
there. No weights are downloaded unless asked (``download=True``, ``--download-inception``); a missing file is a
clear error naming the file and its URL.

The extractor is pluggable: any callable ``uint8 (B, 3, H, W) -> (features (B, D), logits (B, C))`` works;
:class:`RandomFeatureExtractor` is a tiny seeded random network that runs the same code path (its numbers mean
nothing).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import INCEPTION_WEIGHTS_FILENAME

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "ImageFeatureExtractor",
    "InceptionV3FeatureExtractor",
    "RandomFeatureExtractor",
    "TorchFidelityFeatureExtractor",
    "build_feature_extractor",
    "feature_extractor_dims",
    "resolve_inception_weights",
    "tf1_bilinear_resize",
]

INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILENAME}"
# The same network as converted by pytorch-fid (same sha256 prefix; accepted too).
INCEPTION_WEIGHTS_ALT_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ALT_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_WEIGHTS_ENV = "PMF_INCEPTION_WEIGHTS"

FeatureExtractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def tf1_bilinear_resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float (B, C, H, W) tensor as TensorFlow 1.x does it (align_corners=False, no half-pixel
    centres): output pixel j samples input coordinate j · (in / out); the +1 neighbour is clamped at the border.

    This is the resize inside the FID Inception graph (torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`,
    "slow" method; same arithmetic order, so bit-identical on CPU).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"Expected a float (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}.")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = images.shape[-2:]

    def axis(in_size: int, out_size: int):
        coords = torch.arange(out_size, dtype=images.dtype, device=images.device)
        coords = coords * torch.tensor(in_size / out_size, dtype=torch.float32, device=images.device)
        lo = coords.long()
        hi = (lo + 1).clamp_max(in_size - 1)
        return lo, hi, coords - lo.to(coords.dtype)

    y_lo, y_hi, dy = axis(in_h, out_h)
    x_lo, x_hi, dx = axis(in_w, out_w)
    top, bottom = images[:, :, y_lo, :], images[:, :, y_hi, :]
    top_left, top_right = top[..., x_lo], top[..., x_hi]
    bottom_left, bottom_right = bottom[..., x_lo], bottom[..., x_hi]
    dx = dx.view(1, 1, 1, out_w)
    upper = top_left + (top_right - top_left) * dx
    lower = bottom_left + (bottom_right - bottom_left) * dx
    return upper + (lower - upper) * dy.view(1, 1, out_h, 1)


class ImageFeatureExtractor(nn.Module):
    """Base class: uint8 images (B, 3, H, W) → (features (B, feature_dim), logits (B, num_logits)), both float32.

    Subclasses set `name`, `feature_dim`, `num_logits`, `input_size` and implement `forward_float(x)` on the
    preprocessed input (resized to `input_size` with :func:`tf1_bilinear_resize`, scaled to (x − 128) / 128).
    """

    name = "base"
    feature_dim = 0
    num_logits = 0
    input_size = 299

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}.")
        weight = next(self.parameters())
        x = images.to(device=weight.device, dtype=weight.dtype)
        x = tf1_bilinear_resize(x, self.input_size)
        x = (x - 128) / 128
        features, logits = self.forward_float(x)
        return features.float(), logits.float()

    def forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps=1e-3) → ReLU, with the parameter names of the FID Inception checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3×3 "SAME" average pool ignores the padded zeros.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35×35 blocks (Mixed_5b/5c/5d)
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedB(nn.Module):  # 35 → 17 reduction (Mixed_6a)
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _MixedC(nn.Module):  # 17×17 blocks with factorised 7×7 convolutions (Mixed_6b..6e)
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedD(nn.Module):  # 17 → 8 reduction (Mixed_7a)
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        tower = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1
        )


class _MixedE(nn.Module):  # 8×8 blocks with split 1×3 / 3×1 outputs (Mixed_7b: TF avg pool, Mixed_7c: max pool)
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TF graph's last block max-pools where the paper average-pools; the FID network keeps that quirk.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve_inception_weights(path: str | Path | None = None, *, download: bool = False) -> Path:
    """Locate the FID Inception-v3 weight file.

    Order: `path` (`EvalConfig.inception_weights`), ``$PMF_INCEPTION_WEIGHTS``, then torch-fidelity's or pytorch-fid's
    file in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). If none exists, ``download=True`` fetches
    torch-fidelity's file there (hash-checked); otherwise a ``FileNotFoundError`` names the file and its URL.
    """
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {str(path)!r} not found. Fetch {INCEPTION_WEIGHTS_FILENAME} on a connected machine "
                f"from {INCEPTION_WEIGHTS_URL} (or {INCEPTION_WEIGHTS_ALT_FILENAME} from {INCEPTION_WEIGHTS_ALT_URL}) "
                "and pass its path as `inception_weights`."
            )
        return path
    candidates = []
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidates.append(Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser())
    candidates += [hub_dir / INCEPTION_WEIGHTS_FILENAME, hub_dir / INCEPTION_WEIGHTS_ALT_FILENAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if download:
        hub_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            INCEPTION_WEIGHTS_URL, str(hub_dir / INCEPTION_WEIGHTS_FILENAME), hash_prefix=INCEPTION_WEIGHTS_SHA256_PREFIX
        )
        return hub_dir / INCEPTION_WEIGHTS_FILENAME
    raise FileNotFoundError(
        f"The FID Inception-v3 weights are not available offline. On a connected machine download "
        f"{INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL} (95 MB; pytorch-fid's "
        f"{INCEPTION_WEIGHTS_ALT_FILENAME} from {INCEPTION_WEIGHTS_ALT_URL} also works), then pass it with "
        f"`inception_weights=PATH`, set ${INCEPTION_WEIGHTS_ENV}, or put it in {hub_dir}. "
        "(`download_inception` fetches it when the machine has internet access.)"
    )


class InceptionV3FeatureExtractor(ImageFeatureExtractor):
    """The FID Inception-v3 (TF 2015-12-05 graph) in plain torch: 2048-d pool features and 1008 unbiased logits.

    Loads torch-fidelity's / pytorch-fid's weight file (`weights_path`; ``None`` keeps random weights, for tests
    only). Logits are ``features @ fc.weight.T`` without the bias, as torch-fidelity feeds them to the IS.
    """

    name = "inception-v3-fid"
    feature_dim = 2048
    num_logits = 1008
    input_size = 299

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_path = None
        self.weights_sha256 = None
        if weights_path is not None:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, weights_path: str | Path) -> None:
        weights_path = Path(weights_path)
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"Cannot read Inception weights {str(weights_path)!r}: {error}") from error
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("AuxLogits.")}
        result = self.load_state_dict(state_dict, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{str(weights_path)!r} is not an FID Inception-v3 checkpoint ({len(missing)} missing keys, e.g. "
                f"{missing[:3]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]}). "
                f"Expected {INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}."
            )
        self.weights_path = str(weights_path)
        self.weights_sha256 = _file_sha256(weights_path)
        if not self.weights_sha256.startswith(INCEPTION_WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{str(weights_path)!r} loads into the FID Inception-v3 but its sha256 ({self.weights_sha256[:12]}…) does "
                f"not start with {INCEPTION_WEIGHTS_SHA256_PREFIX} like the standard file: FIDs will not be comparable.",
                stacklevel=2,
            )

    def forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147×147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 73×73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71×71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 35×35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)
        return features, features @ self.fc.weight.T


class RandomFeatureExtractor(ImageFeatureExtractor):
    """A tiny, seeded random conv net with the Inception extractor's interface and preprocessing (tests, smoke runs).

    Deterministic for a given `seed` and independent of the global RNG. Its FID/IS values are meaningless.
    """

    name = "random-test"

    def __init__(self, feature_dim: int = 16, num_logits: int = 10, input_size: int = 32, seed: int = 0):
        super().__init__()
        self.feature_dim, self.num_logits, self.input_size = feature_dim, num_logits, input_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, feature_dim, 3, stride=2, padding=1)
            self.fc = nn.Linear(feature_dim, num_logits)
        self.weights_path = None
        self.weights_sha256 = None
        self.requires_grad_(False)
        self.eval()

    def forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tanh(self.conv2(F.relu(self.conv1(x))))
        features = x.mean(dim=(2, 3))
        return features, features @ self.fc.weight.T


class TorchFidelityFeatureExtractor(nn.Module):
    """torch-fidelity's own `FeatureExtractorInceptionV3` ('2048' and 'logits_unbiased'), where it is importable.

    Needs torch-fidelity with a working torchvision (not available in this project's CPU environment).
    """

    name = "torch-fidelity-inception-v3-compat"
    feature_dim = 2048
    num_logits = 1008

    def __init__(self, weights_path: str | Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError on a broken install
            raise ValueError(
                "`feature_extractor=torch-fidelity` needs the torch-fidelity package with a working torchvision "
                f"(import failed: {type(error).__name__}: {error}); the default built-in extractor needs neither."
            ) from error
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
        )
        self.weights_path = str(weights_path)
        self.weights_sha256 = _file_sha256(Path(weights_path))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.model(images.to(next(self.model.parameters()).device))
        return features.float(), logits.float()


def build_feature_extractor(
    kind: str = "inception", *, weights_path: str | Path | None = None, download: bool = False, device="cpu"
) -> nn.Module:
    """``"inception"`` (built-in FID Inception-v3), ``"torch-fidelity"`` (its module) or ``"random"`` (tests)."""
    if kind == "random":
        extractor = RandomFeatureExtractor()
    elif kind == "inception":
        extractor = InceptionV3FeatureExtractor(resolve_inception_weights(weights_path, download=download))
    elif kind == "torch-fidelity":
        extractor = TorchFidelityFeatureExtractor(resolve_inception_weights(weights_path, download=download))
    else:
        raise ValueError(f"Unknown feature extractor {kind!r}: use 'inception', 'torch-fidelity' or 'random'.")
    return extractor.to(device)


def feature_extractor_dims(extractor: FeatureExtractor, device="cpu") -> tuple[int, int]:
    """`(feature_dim, num_logits)` of an extractor: its attributes, or the shapes of one dummy batch."""
    feature_dim, num_logits = getattr(extractor, "feature_dim", None), getattr(extractor, "num_logits", None)
    if feature_dim and num_logits is not None:
        return int(feature_dim), int(num_logits)
    with torch.no_grad():
        features, logits = extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device))
    return features.shape[1], logits.shape[1]
