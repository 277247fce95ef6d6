"""Distances between two sets of Inception features: FID (the Frechet distance between their Gaussians) and
KID (an unbiased kernel two-sample statistic), computed in float64.
"""
from __future__ import annotations

import numpy as np
import torch


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix; eigenvalues below zero (rounding) count as zero."""
    eigenvalues, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     sqrt_sigma2: np.ndarray | None = None) -> float:
    """``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64.

    ``Tr (sigma1 sigma2)^(1/2)`` is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``sigma2^(1/2) sigma1 sigma2^(1/2)`` (same eigenvalues), so no imaginary parts arise, and singular
    covariances (fewer samples than feature dimensions, the usual case) need no ``eps`` offset: rounding's
    tiny negative eigenvalues count as zero. ``sqrt_sigma2`` may pass a precomputed ``sigma2^(1/2)``.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("FID statistics are not finite (NaN or infinite features)")
    root2 = sqrt_psd(sigma2) if sqrt_sigma2 is None else np.asarray(sqrt_sigma2, dtype=np.float64)
    middle = root2 @ sigma1 @ root2
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's polynomial kernel ``k(a, b) = (a . b / d + 1)^3`` between all rows: [n_a, d], [n_b, d] -> [n_a, n_b]."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _pair_sums(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``wa[:, s]^T K(a, b) wb[:, s]`` for each column s of the 0/1 indicators ``wa`` [n_a, S], ``wb`` [n_b, S]."""
    total, chunk = torch.zeros(wa.shape[1], dtype=a.dtype, device=a.device), max(1, (1 << 24) // len(b))
    for start in range(0, len(a), chunk):  # [chunk, n_b] kernel rows at a time
        total += ((_kernel(a[start:start + chunk], b) @ wb) * wa[start:start + chunk]).sum(0)
    return total


def _kid_sums_gram(x: torch.Tensor, y: torch.Tensor, draws: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Per subset [S]: off-diagonal kernel sums within x's and y's subsets, and the cross sum; from the full
    kernels with subset indicators, which costs ``(n1^2 + n2^2 + n1 n2) d`` instead of ``3 S m^2 d``."""
    num_subsets = len(draws[0])
    w = [torch.zeros(len(f), num_subsets, dtype=f.dtype, device=f.device) for f in (x, y)]
    for wi, idx in zip(w, draws):
        wi[torch.as_tensor(idx.T, device=wi.device), torch.arange(num_subsets, device=wi.device)] = 1
    diag = [(f * f).sum(1) / f.shape[1] + 1 for f in (x, y)]  # k(f_i, f_i)^(1/3), [n]
    xx, yy = (_pair_sums(f, f, wi, wi) - wi.T @ dg ** 3 for f, wi, dg in zip((x, y), w, diag))
    return xx, yy, _pair_sums(x, y, w[0], w[1])


def _kid_sums_subsets(x: torch.Tensor, y: torch.Tensor, draws: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The same sums as ``_kid_sums_gram``, from each subset's own kernels (cheaper for sets far larger than m)."""
    sums = []
    for i1, i2 in zip(*(torch.as_tensor(idx, device=x.device) for idx in draws)):
        kxx, kyy = _kernel(x[i1], x[i1]), _kernel(y[i2], y[i2])
        sums.append(torch.stack([kxx.sum() - kxx.diagonal().sum(), kyy.sum() - kyy.diagonal().sum(),
                                 _kernel(x[i1], y[i2]).sum()]))
    return tuple(torch.stack(sums).T)


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """KID: the unbiased squared MMD with kernel ``(x . y / d + 1)^3``, averaged over random subsets.

    Same estimator as clean-fid's ``kernel_distance`` (Binkowski et al. 2018): ``num_subsets`` draws of
    ``m = min(n1, n2, subset_size)`` rows without replacement from each set, and per draw
    ``(sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``.
    Computed in float64 on ``device``; subsets are drawn from ``seed``, so the result is reproducible.
    """
    x = torch.as_tensor(np.asarray(feats1), dtype=torch.float64, device=device)
    y = torch.as_tensor(np.asarray(feats2), dtype=torch.float64, device=device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected features [n1, d] and [n2, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    draws = [np.stack([rng.choice(len(f), m, replace=False) for _ in range(num_subsets)]) for f in (x, y)]
    gram_cheaper = len(x) ** 2 + len(y) ** 2 + len(x) * len(y) <= 3 * num_subsets * m * m
    xx, yy, xy = (_kid_sums_gram if gram_cheaper else _kid_sums_subsets)(x, y, draws)
    return float(((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)).mean())
