"""Evaluation metrics: SSIM, MSE, LPIPS (AlexNet v0.1), Fréchet distance, FID/KID on Inception-2015-12-05 features,
bootstrap intervals of Fréchet distance / KID and the rule that ranks two figures only when their intervals separate.

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
from pdae.metrics.intervals import (
    NO_DIFFERENCE,
    bootstrap_interval,
    compare,
    frechet_distance_with_interval,
    kid_with_interval,
)

__all__ = [
    "NO_DIFFERENCE",
    "bootstrap_interval",
    "compare",
    "fid_kid",
    "fid_kid_from_features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_distance_with_interval",
    "inception_features",
    "kid_with_interval",
    "lpips_distance",
    "mse",
    "ssim",
]
