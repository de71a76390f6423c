"""Fréchet distance (generic) and FID/KID on standard Inception pool3 features through torch-fidelity."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from pdae.errors import PdaeError
from pdae.io import load_tensors, save_tensors, to_uint8

_FEATURE_CACHE: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_FEATURE_CACHE_SIZE = 8


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix via eigen-decomposition."""
    w, v = np.linalg.eigh((mat + mat.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)) for Gaussians N(mu1, C1), N(mu2, C2).

    mu: (D,), cov: (D, D). tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix C1^(1/2) C2 C1^(1/2) (same spectrum as C1 C2), which is stable for singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise PdaeError(f"Fréchet distance: mismatched shapes {mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}.")
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # negative only through rounding


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), N, M >= 2.

    Means and unbiased covariances (ddof 1, as torch-fidelity/TTUR) are computed in float64.
    """
    a = feats_a.detach().double().cpu().numpy()
    b = feats_b.detach().double().cpu().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise PdaeError(f"Fréchet distance needs two (N>=2, D) feature sets with equal D, got {a.shape}, {b.shape}.")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _uint8_rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    """(N, 1|3, H, W) float in [-1, 1] -> uint8 (N, 3, H, W), the input torch-fidelity's extractors expect."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise PdaeError(f"{what} images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
    out = to_uint8(images)
    return out.repeat(1, 3, 1, 1) if out.shape[1] == 1 else out


def inception_features(
    images: torch.Tensor,
    weights: str = "auto",
    batch_size: int = 50,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor | None, str]:
    """Inception-2015-12-05 pool3 features of images (N, C, H, W) in [-1, 1] -> ((N, 2048) float32, source).

    Images are quantised to uint8 and grey images repeated to RGB; torch-fidelity's extractor resizes to 299.
    Returns (None, reason) when no Inception weights are available. With ``cache`` the features of the last few
    distinct image sets are kept in memory (keyed by a hash of the uint8 pixels), so a real set scored against
    several generated sets is embedded once; with ``cache_dir`` they are also stored there as safetensors
    (``inception-<hash>.safetensors``) and reused by later processes.
    """
    from pdae.metrics.inception import inception_extractor

    pixels = _uint8_rgb(images, "FID")
    extractor, source = inception_extractor(weights)
    if extractor is None:
        return None, source
    digest = hashlib.sha1(pixels.numpy().tobytes() + str(tuple(pixels.shape)).encode() + source.encode())
    key = (digest.hexdigest(), source)
    disk = Path(cache_dir) / f"inception-{key[0][:20]}.safetensors" if cache_dir is not None else None
    if key in _FEATURE_CACHE:
        _FEATURE_CACHE.move_to_end(key)
        feats = _FEATURE_CACHE[key]
    elif disk is not None and disk.is_file():
        feats = load_tensors(disk, "cached Inception features")["features"]
    else:
        chunks = []
        # channels-last convolutions: ~1.6x faster on CPU, features equal to float32 rounding (~1e-5 of their scale)
        extractor = extractor.to(memory_format=torch.channels_last)
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                chunks.append(extractor(pixels[start : start + batch_size])[0].float().cpu())
        feats = torch.cat(chunks)
    if disk is not None and not disk.is_file():
        save_tensors(disk, {"features": feats}, metadata={"weights": source, "n": len(feats)})
    if cache:
        _FEATURE_CACHE[key] = feats
        while len(_FEATURE_CACHE) > _FEATURE_CACHE_SIZE:
            _FEATURE_CACHE.popitem(last=False)
    return feats, source


def fid_kid_from_features(
    gen_feats: torch.Tensor, real_feats: torch.Tensor, kid_subset_size: int | None = None, kid_subsets: int = 100
) -> dict:
    """FID and KID (torch-fidelity's formulas and defaults: poly kernel d=3, seed 2020) from (N, D), (M, D) features.

    kid_subset_size defaults to min(1000, N, M).
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    n, m = len(gen_feats), len(real_feats)
    if min(n, m) < 2:
        raise PdaeError(f"FID/KID need at least 2 generated and 2 real images, got {n} and {m}.")
    subset = min(1000, n, m) if kid_subset_size is None else int(kid_subset_size)
    if not 2 <= subset <= min(n, m):
        raise PdaeError(f"kid_subset_size must be in [2, {min(n, m)}] for {n} generated / {m} real images.")
    stats_g = fid_features_to_statistics(gen_feats.float().cpu())  # as torch-fidelity: float32 in
    stats_r = fid_features_to_statistics(real_feats.float().cpu())
    fid = fid_statistics_to_metric(stats_g, stats_r, verbose=False)[KEY_METRIC_FID]
    kid = kid_features_to_metric(
        gen_feats.cpu(), real_feats.cpu(), kid_subsets=kid_subsets, kid_subset_size=subset, verbose=False
    )
    return {
        "fid": float(fid),
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]),
        "kid_std": float(kid[KEY_METRIC_KID_STD]),
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
    }


def fid_kid(
    generated: torch.Tensor,
    real: torch.Tensor,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    weights: str = "auto",
    batch_size: int = 50,
    real_cache_dir: str | os.PathLike | None = None,
) -> dict:
    """FID and KID of generated (N, C, H, W) vs real (M, C, H, W) images in [-1, 1] on Inception pool3 features.

    Returns {"fid", "kid_mean", "kid_std", "n_generated", "n_real", "features", "weights", "kid_subset_size",
    "kid_subsets", "reason"}; when no Inception weights are available the three metric values are None and
    "reason" says why (numbers are never invented). kid_subset_size defaults to min(1000, N, M). Real-set
    features are cached in memory across calls, and on disk under ``real_cache_dir`` if given.
    """
    from pdae.metrics.inception import FEATURES_LABEL

    out: dict = {
        "fid": None,
        "kid_mean": None,
        "kid_std": None,
        "n_generated": int(generated.shape[0]),
        "n_real": int(real.shape[0]),
        "features": FEATURES_LABEL,
        "weights": None,
        "kid_subset_size": None,
        "kid_subsets": kid_subsets,
        "reason": None,
    }
    _uint8_rgb(generated, "generated")  # validate both before the expensive part
    _uint8_rgb(real, "real")
    real_feats, source = inception_features(real, weights, batch_size, cache=True, cache_dir=real_cache_dir)
    if real_feats is None:
        out["reason"] = source
        return out
    gen_feats, _ = inception_features(generated, weights=weights, batch_size=batch_size, cache=False)
    out.update(fid_kid_from_features(gen_feats, real_feats, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets))
    out["weights"] = source
    return out
