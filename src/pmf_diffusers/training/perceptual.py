# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Perceptual losses of pMF training (docs/algorithm.md, "Perceptual losses"): LPIPS-VGG and a ConvNeXt-V2 distance.

Both losses compare x̂ = z − t·u with the clean image x on the *same* paired random-resized crop (224×224).

* :class:`LPIPSVGG` is LPIPS v0.1 with a VGG16 trunk written in plain PyTorch (no ``torchvision``, no ``lpips``
  import). Given the same weights it reproduces ``lpips.LPIPS(net='vgg')`` of the ``lpips`` package 0.1.4 (BSD-2)
  on inputs in [-1, 1]. The calibrated linear layers are read from that package's ``weights/v0.1/vgg.pth``
  (``pip install --no-deps lpips==0.1.4``), the trunk from the torchvision checkpoint ``vgg16-397923af.pth``.
* :class:`ConvNeXtV2Features` is the squared distance between the ``pooler_output`` features of transformers'
  ``ConvNextV2Model`` (``facebook/convnextv2-base-22k-224`` in pMF), fed the [-1, 1] crops directly.

Networks are frozen (no parameter gradients, always in eval mode) but differentiable w.r.t. their inputs.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import hub_offline

if TYPE_CHECKING:
    from transformers import ConvNextV2Config, ConvNextV2Model

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILENAME = "vgg16-397923af.pth"
LPIPS_PIP_HINT = "pip install --no-deps lpips==0.1.4"
CONVNEXT_V2_DEFAULT = "facebook/convnextv2-base-22k-224"

# torchvision `vgg16().features` up to relu5_3 ("M" = 2×2 max-pool); LPIPS taps relu1_2 … relu5_3.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class PerceptualWeightsNotFoundError(FileNotFoundError):
    """Pretrained weights of a perceptual network are not available locally and cannot be downloaded."""


class _FrozenModule(nn.Module):
    """A fixed network: parameters never require grad and the module stays in eval mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


def _load_lpips_linear_weights(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    if path is None:
        spec = importlib.util.find_spec("lpips")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [Path(loc) / "weights" / "v0.1" / "vgg.pth" for loc in locations]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise PerceptualWeightsNotFoundError(
                "LPIPS linear weights `lpips/weights/v0.1/vgg.pth` not found (no installed `lpips` package provides "
                f"it). Install the package files with `{LPIPS_PIP_HINT}` (it is never imported), or pass "
                "`lpips_weights_path=` pointing to that file."
            )
    elif not Path(path).is_file():
        raise PerceptualWeightsNotFoundError(
            f"LPIPS linear weights not found at {path}: put the file `lpips/weights/v0.1/vgg.pth` of the lpips 0.1.4 "
            f"wheel there (`{LPIPS_PIP_HINT}` installs it), or pass `lpips_weights_path=None` to use the installed one."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_vgg16_state_dict(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    where = f"Put the torchvision ImageNet checkpoint `{VGG16_FILENAME}` ({VGG16_URL}) at {cached}"
    if path is None:
        if cached.is_file():
            path = cached
        elif hub_offline():
            raise PerceptualWeightsNotFoundError(
                f"VGG16 trunk weights for LPIPS not found and HF_HUB_OFFLINE is set. {where}, or pass `vgg_path=`."
            )
        else:
            try:
                return torch.hub.load_state_dict_from_url(
                    VGG16_URL, map_location="cpu", check_hash=True, weights_only=True
                )
            except OSError as err:
                raise PerceptualWeightsNotFoundError(
                    f"VGG16 trunk weights for LPIPS could not be downloaded ({err}). {where}, or pass `vgg_path=`."
                ) from err
    elif not Path(path).is_file():
        raise PerceptualWeightsNotFoundError(
            f"VGG16 trunk weights for LPIPS not found at {path}: put the torchvision ImageNet checkpoint "
            f"`{VGG16_FILENAME}` ({VGG16_URL}) there, or pass `vgg_path=None` to use {cached}."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPSVGG(_FrozenModule):
    r"""
    LPIPS v0.1 with a VGG16 trunk (``lpips.LPIPS(net='vgg')``), in plain PyTorch.

    d(x0, x1) = Σ_k mean_hw( w_k · (n_k(x0) − n_k(x1))² ), where n_k are the relu1_2, relu2_2, relu3_3, relu4_3 and
    relu5_3 features of the shifted/scaled input, unit-normalised over channels (``f / (‖f‖ + 1e-10)``), and w_k
    the calibrated non-negative 1×1 weights.

    Args:
        vgg_state_dict (`Mapping[str, torch.Tensor]`, *optional*):
            Trunk weights in torchvision naming: a full ``vgg16()`` state dict (``features.0.weight`` …,
            ``classifier.*`` is ignored) or a ``vgg16().features`` state dict (``0.weight`` …). Default PyTorch
            initialisation when omitted.
        linear_weights (`Mapping[str, torch.Tensor]`, *optional*):
            The calibrated linear layers as stored in ``lpips/weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``),
            an ``lpips.LPIPS`` state dict (``lins.{k}.model.1.weight``) or this module's (``lins.{k}.weight``).
            Default PyTorch initialisation when omitted.
    """

    def __init__(
        self,
        vgg_state_dict: Mapping[str, torch.Tensor] | None = None,
        linear_weights: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        layers, in_channels = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if vgg_state_dict is not None:
            self.load_vgg_state_dict(vgg_state_dict)
        if linear_weights is not None:
            self.load_linear_weights(linear_weights)
        self._freeze()

    @classmethod
    def from_pretrained(
        cls, vgg_path: str | os.PathLike | None = None, lpips_weights_path: str | os.PathLike | None = None
    ) -> LPIPSVGG:
        r"""
        Build the pretrained LPIPS-VGG.

        Args:
            vgg_path (`str` or `os.PathLike`, *optional*):
                torchvision VGG16 checkpoint. Default: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``
                (``torch.hub.get_dir()``), downloaded from download.pytorch.org when missing unless
                ``HF_HUB_OFFLINE`` is set.
            lpips_weights_path (`str` or `os.PathLike`, *optional*):
                The lpips ``weights/v0.1/vgg.pth`` file. Default: the one of the installed ``lpips`` package,
                located without importing it.

        Raises:
            PerceptualWeightsNotFoundError: naming every missing file and where to put it.
        """
        errors, loaded = [], []
        for load, path in ((_load_vgg16_state_dict, vgg_path), (_load_lpips_linear_weights, lpips_weights_path)):
            try:
                loaded.append(load(path))
            except PerceptualWeightsNotFoundError as err:
                errors.append(str(err))
        if errors:
            raise PerceptualWeightsNotFoundError("\n".join(errors))
        return cls(vgg_state_dict=loaded[0], linear_weights=loaded[1])

    def load_vgg_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision ``vgg16()`` / ``vgg16().features`` weights into the trunk (``classifier.*`` ignored)."""
        trunk = {k.removeprefix("features."): v for k, v in state_dict.items() if not k.startswith("classifier.")}
        # torchvision's features go on to a 6th max-pool (index 30) which has no weights; nothing else may differ.
        self.features.load_state_dict(trunk)

    def load_linear_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the calibrated 1×1 weights (see the class docstring for the accepted key names)."""
        for k, lin in enumerate(self.lins):
            names = (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight", f"lins.{k}.weight")
            name = next((n for n in names if n in state_dict), None)
            if name is None:
                raise KeyError(f"No LPIPS linear weight for layer {k}: expected one of {names}.")
            with torch.no_grad():
                lin.weight.copy_(state_dict[name].reshape(lin.weight.shape))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                taps.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + 1e-10))
        return taps

    def feature_diffs(self, x0: torch.Tensor, x1: torch.Tensor) -> list[torch.Tensor]:
        """The five (B, C_k, H_k, W_k) maps of squared differences of the unit-normalised features."""
        return [(f0 - f1) ** 2 for f0, f1 in zip(self._taps(x0), self._taps(x1))]

    def forward(
        self, x0: torch.Tensor, x1: torch.Tensor, return_per_layer: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        r"""
        Args:
            x0, x1 (`torch.Tensor`): images (B, 3, H, W) in [-1, 1].
            return_per_layer (`bool`): also return the five per-layer (B,) terms.

        Returns:
            The (B,) distances (and the list of per-layer terms, which sum to it).
        """
        layers = [lin(d).mean(dim=(2, 3)).flatten() for lin, d in zip(self.lins, self.feature_diffs(x0, x1))]
        dist = layers[0]
        for term in layers[1:]:
            dist = dist + term
        return (dist, layers) if return_per_layer else dist


class ConvNeXtV2Features(_FrozenModule):
    r"""
    Squared Euclidean distance between ConvNeXt-V2 ``pooler_output`` features (final LayerNorm of the globally
    pooled last stage). Inputs are fed as given (pMF feeds [-1, 1] crops, no ImageNet normalisation).

    Args:
        config_or_model (`ConvNextV2Config` or `ConvNextV2Model`):
            A config (randomly initialised network, e.g. for tests) or an already built/loaded model.
    """

    def __init__(self, config_or_model: ConvNextV2Config | ConvNextV2Model):
        from transformers import ConvNextV2Model

        super().__init__()
        if isinstance(config_or_model, ConvNextV2Model):
            self.model = config_or_model
        else:
            self.model = ConvNextV2Model(config_or_model)
        self._freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = CONVNEXT_V2_DEFAULT, **kwargs) -> ConvNeXtV2Features:
        """Load ``ConvNextV2Model.from_pretrained(name_or_path, **kwargs)`` (an image-classification checkpoint's
        head is dropped); raises :class:`PerceptualWeightsNotFoundError` when it is not available."""
        from huggingface_hub.constants import HF_HUB_CACHE
        from transformers import ConvNextV2Model

        try:
            model = ConvNextV2Model.from_pretrained(name_or_path, **kwargs)
        except OSError as err:
            if Path(name_or_path).is_dir():
                hint = f"Put `config.json` and `model.safetensors` of `{CONVNEXT_V2_DEFAULT}` into {name_or_path}."
            else:
                hint = (
                    f"On a machine with internet run `hf download {name_or_path}` and copy its cache folder "
                    f"`models--{str(name_or_path).replace('/', '--')}` into {HF_HUB_CACHE} on this machine, or "
                    "pass a local folder containing `config.json` and `model.safetensors`."
                )
            raise PerceptualWeightsNotFoundError(
                f"ConvNeXt-V2 weights '{name_or_path}' are not available ({err}).\n{hint}"
            ) from err
        return cls(model)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hidden_sizes[-1]) features of images (B, 3, H, W)."""
        return self.model(pixel_values=x.to(self.model.dtype)).pooler_output

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """(B,) distances Σ (f(x0) − f(x1))²."""
        return ((self.features(x0) - self.features(x1)) ** 2).sum(dim=-1)


def sample_crop_boxes(
    batch: int, height: int, width: int, generator: torch.Generator | None = None
) -> list[tuple[int, int, int, int]]:
    r"""
    Random-resized-crop boxes ``(top, left, h, w)``, one per sample: area fraction ~ U(0.08, 1), aspect ratio w/h
    log-uniform in [3/4, 4/3], side lengths rounded and clipped to the image, top/left uniform integers.

    All draws (one ``(batch, 4)`` float64 ``torch.rand``) come from ``generator``, which may be on any device.
    """
    device = generator.device if generator is not None else "cpu"
    draws = torch.rand(batch, 4, generator=generator, device=device, dtype=torch.float64).tolist()
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    boxes = []
    for u_area, u_ratio, u_top, u_left in draws:
        area = height * width * (0.08 + 0.92 * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = min(max(round(math.sqrt(area * ratio)), 1), width)
        h = min(max(round(math.sqrt(area / ratio)), 1), height)
        top = min(int(u_top * (height - h + 1)), height - h)
        left = min(int(u_left * (width - w + 1)), width - w)
        boxes.append((top, left, h, w))
    return boxes


def paired_random_resized_crop(
    x_hat: torch.Tensor, x: torch.Tensor, size: int = 224, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Random-resized crop with one box per sample (:func:`sample_crop_boxes`), shared by ``x_hat`` and ``x``
    (docs/algorithm.md, "Perceptual losses"). Each crop is resampled to ``size``×``size`` with bicubic interpolation and antialiasing.
    Differentiable w.r.t. both images.

    The official JAX code resamples with ``jax.image.scale_and_translate`` (bicubic, antialias) on the whole image,
    whereas this crops first and uses ``F.interpolate(mode="bicubic", antialias=True)``. Both use the Keys a=−0.5
    kernel, so values are close but not bit-identical: away from the border they agree to ~1e-5, while the outer
    few output rows/columns differ (up to ~0.2 on noisy, strongly enlarged crops) because JAX's kernel also reads
    the pixels just outside the box.

    Args:
        x_hat, x (`torch.Tensor`): images (B, C, H, W) of the same shape.
        size (`int`): output side length.
        generator (`torch.Generator`, *optional*): source of all random draws (may live on another device than
            the images).

    Returns:
        The two (B, C, size, size) crops.
    """
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat and x must have the same shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}.")
    batch, _, height, width = x.shape
    crops_hat, crops = [], []
    for i, (top, left, h, w) in enumerate(sample_crop_boxes(batch, height, width, generator)):
        for src, out in ((x_hat, crops_hat), (x, crops)):
            box = src[i : i + 1, :, top : top + h, left : left + w]
            out.append(F.interpolate(box, size=(size, size), mode="bicubic", antialias=True, align_corners=False))
    return torch.cat(crops_hat), torch.cat(crops)


class PerceptualLoss(nn.Module):
    r"""
    The pMF perceptual terms on one shared paired random-resized crop.

    Args:
        lpips (`LPIPSVGG`, *optional*): LPIPS network; its term is zero when ``None``.
        convnext (`ConvNeXtV2Features`, *optional*): ConvNeXt-V2 network; its term is zero when ``None``.
        crop_size (`int`): side length of the resampled crops.
    """

    def __init__(
        self, lpips: LPIPSVGG | None = None, convnext: ConvNeXtV2Features | None = None, crop_size: int = 224
    ):
        super().__init__()
        self.lpips = lpips
        self.convnext = convnext
        self.crop_size = crop_size

    @classmethod
    def from_pretrained(
        cls,
        lpips: bool = True,
        convnext: bool = True,
        vgg_path: str | os.PathLike | None = None,
        lpips_weights_path: str | os.PathLike | None = None,
        convnext_path: str | os.PathLike = CONVNEXT_V2_DEFAULT,
        crop_size: int = 224,
        **convnext_kwargs,
    ) -> PerceptualLoss:
        """Build the enabled networks with :meth:`LPIPSVGG.from_pretrained` and
        :meth:`ConvNeXtV2Features.from_pretrained` (``convnext_kwargs`` go to the latter)."""
        return cls(
            lpips=LPIPSVGG.from_pretrained(vgg_path, lpips_weights_path) if lpips else None,
            convnext=ConvNeXtV2Features.from_pretrained(convnext_path, **convnext_kwargs) if convnext else None,
            crop_size=crop_size,
        )

    def forward(
        self, x_hat: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        r"""
        Args:
            x_hat (`torch.Tensor`): predicted images (B, 3, H, W) in [-1, 1] (gradients flow through it).
            x (`torch.Tensor`): clean images, same shape.
            generator (`torch.Generator`, *optional*): drives the crop boxes.

        Returns:
            `dict` with per-sample (B,) tensors ``"lpips"`` and ``"convnext"``.
        """
        zeros = x_hat.new_zeros(x_hat.shape[0])
        if self.lpips is None and self.convnext is None:
            return {"lpips": zeros, "convnext": zeros}
        crop_hat, crop = paired_random_resized_crop(x_hat, x, self.crop_size, generator)
        return {
            "lpips": self.lpips(crop_hat, crop) if self.lpips is not None else zeros,
            "convnext": self.convnext(crop_hat, crop) if self.convnext is not None else zeros,
        }
