# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The metric maths: feature statistics, Fréchet distance (FID), Inception Score and improved precision/recall.

Fréchet distance: ``scipy.linalg.sqrtm`` with the usual ``eps · I`` retry when scipy is installed (what
torch-fidelity 0.3 / pytorch-fid / JiT's torch-fidelity fork do), otherwise the eigenvalues of ``Σ1 Σ2`` (what
torch-fidelity 0.4 does: ``tr sqrt(Σ1 Σ2) = Σ sqrt(λ_i)``); both in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .config import DEFAULT_IS_SPLITS, DEFAULT_PR_NEIGHBORHOOD, FID_METHODS, IS_SHUFFLE_SEED

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall", "resolve_fid_method"]


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N − 1) covariance of (N, D) features, in float64."""
    feats = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    feats = feats.astype(np.float64, copy=False)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"Need (N ≥ 2, D) features for statistics, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _has_scipy() -> bool:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_fid_method(method: str = "auto") -> str:
    """The matrix square-root method :func:`frechet_distance` uses: ``"auto"`` is scipy if installed, else eig."""
    if method not in FID_METHODS:
        raise ValueError(f"Unknown Fréchet distance method {method!r}: use 'auto', 'scipy' or 'eig'.")
    if method == "auto":
        return "scipy" if _has_scipy() else "eig"
    return method


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    import scipy.linalg

    def sqrtm(matrix):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check finiteness ourselves
            root = scipy.linalg.sqrtm(matrix)
        return root[0] if isinstance(root, tuple) else root

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: the usual eps offset on both diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(Σ1 Σ2) has a large imaginary component ({np.abs(covmean.imag).max():.3g}); "
                "are both covariances symmetric positive semi-definite?"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eig(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    if not np.isfinite(eigenvalues).all():
        offset = np.eye(sigma1.shape[0]) * eps
        eigenvalues = np.linalg.eigvals((sigma1 + offset) @ (sigma2 + offset))
    # Σ1 Σ2 is similar to the PSD matrix Σ1^½ Σ2 Σ1^½, so its eigenvalues are real and ≥ 0 up to rounding: tiny
    # negative or complex ones contribute (almost) nothing through the real part of the complex square root.
    return float(np.sqrt(eigenvalues.astype(np.complex128)).real.sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, method: str = "auto", eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 − mu2|² + tr(Σ1) + tr(Σ2) − 2 tr sqrt(Σ1 Σ2)``. `method`: ``"scipy"`` (``scipy.linalg.sqrtm``; retried
    with ``eps · I`` added to both covariances if the product is singular; a tiny imaginary part is dropped, a large
    one is an error), ``"eig"`` (sum of square roots of the eigenvalues of Σ1 Σ2, same eps retry) or ``"auto"``
    (scipy if installed, else eig).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"Mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}.")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"Covariances must be {dim}×{dim} to match the means, got {sigma1.shape} and {sigma2.shape}.")
    if resolve_fid_method(method) == "scipy":
        tr_covmean = _trace_sqrt_product_scipy(sigma1, sigma2, eps)
    else:
        tr_covmean = _trace_sqrt_product_eig(sigma1, sigma2, eps)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(
    logits: torch.Tensor | np.ndarray | None = None,
    *,
    probs: torch.Tensor | np.ndarray | None = None,
    splits: int = DEFAULT_IS_SPLITS,
    shuffle: bool = True,
    shuffle_seed: int = IS_SHUFFLE_SEED,
) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) from classifier logits or class probabilities (N, C).

    Matches torch-fidelity: rows shuffled with ``np.random.RandomState(shuffle_seed).permutation(N)`` (disable with
    ``shuffle=False``), float64, split ``i`` = rows ``[i·N//splits, (i+1)·N//splits)``, score
    ``exp(mean_x KL(p(y|x) ‖ p(y)))``, std is the population std (``np.std``). Zero probabilities are allowed.
    """
    if (logits is None) == (probs is None):
        raise ValueError("Pass exactly one of `logits` or `probs`.")
    values = logits if logits is not None else probs
    values = torch.as_tensor(values).detach().cpu().double()
    if values.ndim != 2:
        raise ValueError(f"Expected (N, C) {'logits' if logits is not None else 'probabilities'}, got {tuple(values.shape)}.")
    num = values.shape[0]
    if not 1 <= splits <= num:
        raise ValueError(f"Need 1 ≤ splits ≤ number of samples, got splits={splits} for {num} samples.")
    if shuffle:
        values = values[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(num))]
    if logits is not None:
        log_p = values.log_softmax(dim=1)
        p = log_p.exp()
    else:
        if (values < 0).any():
            raise ValueError("Probabilities must be ≥ 0.")
        p = values / values.sum(dim=1, keepdim=True)
        log_p = p.log()
    scores = []
    for i in range(splits):
        lo, hi = i * num // splits, (i + 1) * num // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        log_q = p_chunk.mean(dim=0, keepdim=True).log()
        kl = torch.where(p_chunk > 0, p_chunk * (log_p_chunk - log_q), torch.zeros_like(p_chunk))
        scores.append(kl.sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # Distance to the k-th nearest *other* point (the point itself is the 1st, at distance 0).
    return torch.cat([torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)])


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = [(torch.cdist(chunk, centres) <= radii.unsqueeze(0)).any(dim=1) for chunk in queries.split(batch_size)]
    return torch.cat(inside).double().mean().item()


@torch.no_grad()
def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    k: int = DEFAULT_PR_NEIGHBORHOOD,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds on (N, D) features.

    precision = fraction of generated samples inside some real sample's k-NN ball; recall = fraction of real
    samples inside some generated sample's k-NN ball (torch-fidelity's `prc` convention). Runs on the tensors'
    device in float32, `batch_size` rows of the distance matrix at a time.
    """
    real = torch.as_tensor(real_features).float()
    fake = torch.as_tensor(fake_features).float().to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"Need (N, D) feature matrices of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if min(real.shape[0], fake.shape[0]) < k + 1:
        raise ValueError(f"Precision/recall with k={k} needs at least {k + 1} real and generated samples.")
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    f_score = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f_score": f_score}
