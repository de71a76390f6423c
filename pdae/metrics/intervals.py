"""Sampling intervals for set-to-set metrics (Fréchet distance, KID) and the ranking rule that uses them.

A figure such as "FID 75.4 vs 78.1" only ranks two models if the difference is larger than the metric's sampling
noise at the set sizes used. Every function here returns a plain JSON-ready dict

    {"value": float, "low": float, "high": float, "level": float, "n_boot": int, "method": str}

where ``value`` is the statistic on the full sets and [low, high] is a bootstrap interval: both sets are resampled
with replacement (independently), the statistic is recomputed, and the (1 - level)/2 and (1 + level)/2 quantiles
are taken. For the Fréchet distance the quantiles are re-centred on ``value`` (method "bootstrap, re-centred"): a
resample holds ~63% distinct rows, and the Fréchet distance's upward bias grows like D/N, so raw bootstrap
quantiles sit above the full-set value (often far enough not to contain it); shifting them by (value - mean of the
resamples) keeps their spread, which is what a comparison needs. KID is unbiased, and its resamples leave out pairs
of one original point twice, so its plain percentile interval is used. `compare` ranks two intervals only when they
do not overlap.

Costs: the Fréchet distance bootstrap works on Gram matrices when the feature dimension exceeds the set sizes
(Inception pool3: D = 2048 > N), so a resample costs one eigen-decomposition of a min(N, M)-square matrix and no
D-sized work; KID resamples index precomputed kernel matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pdae.errors import PdaeError

NO_DIFFERENCE = "no difference at this size"
Interval = dict[str, Any]


def _as_array(feats: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    arr = feats.detach().double().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if arr.ndim != 2 or len(arr) < 2:
        raise PdaeError(f"{what}: features must be (N >= 2, D), got shape {arr.shape}.")
    return arr


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise PdaeError(f"interval level must be in (0, 1), got {level}.")
    if n_boot < 2:
        raise PdaeError(f"n_boot must be >= 2 for a bootstrap interval, got {n_boot}.")


def _interval(value: float, boots: Sequence[float], level: float, recentre: bool = False) -> Interval:
    arr = np.asarray(boots, np.float64)
    lo, hi = np.quantile(arr, [(1 - level) / 2, (1 + level) / 2])
    if recentre:
        lo, hi = lo + value - arr.mean(), hi + value - arr.mean()
    return {
        "value": float(value),
        "low": float(lo),
        "high": float(hi),
        "level": float(level),
        "n_boot": len(boots),
        "method": "bootstrap, re-centred" if recentre else "bootstrap percentile",
    }


def bootstrap_interval(
    statistic: Callable[..., float],
    samples: Sequence[torch.Tensor | np.ndarray],
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    recentre: bool = False,
) -> Interval:
    """Bootstrap interval of statistic(*samples); each sample (N_i, ...) is resampled along axis 0.

    `statistic` receives numpy arrays (float64 when given tensors) and returns a float. With `recentre` the
    quantiles are shifted by (value - mean of the resampled statistics), for statistics biased by duplicates (see
    the module doc). Deterministic in `seed`.
    """
    _check_level(level, n_boot)
    arrays = [s.detach().double().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s) for s in samples]
    if not arrays or any(len(a) < 2 for a in arrays):
        raise PdaeError("bootstrap_interval needs at least one sample and >= 2 rows in every sample.")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        boots.append(float(statistic(*[a[rng.integers(0, len(a), len(a))] for a in arrays])))
    return _interval(float(statistic(*arrays)), boots, level, recentre)


def _fd_from_grams(kaa: np.ndarray, kbb: np.ndarray, kab: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted (ddof 1) to two sets, from raw Gram matrices A A^T, B B^T, A B^T.

    With centring P = I - 11^T/n: tr(C_a) = tr(P Kaa P)/(n-1), ||mu_a - mu_b||^2 from the Gram means, and
    tr((C_a C_b)^(1/2)) = nuclear norm of P_a Kab P_b / sqrt((n-1)(m-1)), since C_a C_b and M M^T (M = P_a A B^T P_b)
    share their non-zero spectrum.
    """
    n, m = kab.shape
    mean_sq = kaa.mean() + kbb.mean() - 2.0 * kab.mean()
    tr_a = (np.trace(kaa) - kaa.sum() / n) / (n - 1)
    tr_b = (np.trace(kbb) - kbb.sum() / m) / (m - 1)
    centred = kab - kab.mean(0, keepdims=True) - kab.mean(1, keepdims=True) + kab.mean()
    small = centred @ centred.T if n <= m else centred.T @ centred
    tr_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum())
    tr_root /= np.sqrt((n - 1) * (m - 1))
    return max(float(mean_sq + tr_a + tr_b - 2.0 * tr_root), 0.0)


def frechet_distance_with_interval(
    feats_a: torch.Tensor | np.ndarray,
    feats_b: torch.Tensor | np.ndarray,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Fréchet distance of features (N, D) vs (M, D) (float64, ddof 1) with a re-centred bootstrap interval.

    ``value`` equals `pdae.metrics.frechet_distance(feats_a, feats_b)` up to float64 rounding.
    """
    from pdae.metrics.fid import frechet_distance_from_stats

    _check_level(level, n_boot)
    a, b = _as_array(feats_a, "Fréchet distance"), _as_array(feats_b, "Fréchet distance")
    if a.shape[1] != b.shape[1]:
        raise PdaeError(f"Fréchet distance: feature dimensions differ ({a.shape[1]} vs {b.shape[1]}).")
    rng = np.random.default_rng(seed)
    boots = []
    if a.shape[1] > min(len(a), len(b)):  # Gram route: no D-sized eigen-decomposition per resample
        kaa, kbb, kab = a @ a.T, b @ b.T, a @ b.T
        value = _fd_from_grams(kaa, kbb, kab)
        for _ in range(n_boot):
            i, j = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
            boots.append(_fd_from_grams(kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)]))
    else:

        def stat(x: np.ndarray, y: np.ndarray) -> float:
            return frechet_distance_from_stats(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))

        value = stat(a, b)
        for _ in range(n_boot):
            boots.append(stat(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]))
    return _interval(value, boots, level, recentre=True)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel (x . y / D + 1)^3 (torch-fidelity's defaults)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel blocks; pairs that are the same original point (ix/iy = origin ids) are dropped."""
    off_x = ix[:, None] != ix[None, :]
    off_y = iy[:, None] != iy[None, :]
    return float(kxx[off_x].mean() + kyy[off_y].mean() - 2.0 * kxy.mean())


def kid_with_interval(
    feats_a: torch.Tensor | np.ndarray,
    feats_b: torch.Tensor | np.ndarray,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """KID of features (N, D) vs (M, D): the unbiased MMD^2 over the full sets with a bootstrap interval.

    The kernel is torch-fidelity's (cubic polynomial, gamma 1/D, coef 1), so ``value`` is what torch-fidelity's
    subset-averaged ``kid_mean`` estimates (equal to it when one subset covers both sets of equal size). In a
    resample, pairs made of one original point twice are left out, so duplicates do not inflate the within-set terms.
    """
    _check_level(level, n_boot)
    a, b = _as_array(feats_a, "KID"), _as_array(feats_b, "KID")
    if a.shape[1] != b.shape[1]:
        raise PdaeError(f"KID: feature dimensions differ ({a.shape[1]} vs {b.shape[1]}).")
    kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    ia, ib = np.arange(len(a)), np.arange(len(b))
    value = _mmd2_unbiased(kaa, kbb, kab, ia, ib)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i, j = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        boots.append(_mmd2_unbiased(kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)], i, j))
    return _interval(value, boots, level)


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """ "a lower" | "b lower" | "no difference at this size" for two intervals (dicts with "low" and "high").

    A ranking is returned only when the intervals do not overlap; touching or overlapping intervals, or a missing
    interval (None), give "no difference at this size".
    """
    if a is None or b is None or a.get("low") is None or b.get("low") is None:
        return NO_DIFFERENCE
    if a["high"] < b["low"]:
        return "a lower"
    if b["high"] < a["low"]:
        return "b lower"
    return NO_DIFFERENCE
