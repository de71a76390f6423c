"""Evaluation metrics: SSIM, MSE, LPIPS (AlexNet v0.1), Fréchet distance, FID/KID on Inception-2015-12-05 features.

Importing this package is cheap: torch-fidelity and lpips are loaded on first use.
"""

from pdae.metrics.fid import (
    fid_kid,
    fid_kid_from_features,
    frechet_distance,
    frechet_distance_from_stats,
    inception_features,
)
from pdae.metrics.image import lpips_distance, mse, ssim

__all__ = [
    "fid_kid",
    "fid_kid_from_features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_features",
    "lpips_distance",
    "mse",
    "ssim",
]
