"""Bootstrap intervals of Fréchet distance / KID and the ranking rule (pdae.metrics.intervals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdae.errors import PdaeError
from pdae.metrics import frechet_distance
from pdae.metrics.intervals import (
    NO_DIFFERENCE,
    bootstrap_interval,
    compare,
    frechet_distance_with_interval,
    kid_with_interval,
)


def _gauss(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


@pytest.mark.parametrize(("n", "m", "d"), [(40, 60, 8), (30, 50, 96), (50, 20, 96)])
def test_fd_value_matches_frechet_distance_on_both_routes(n: int, m: int, d: int) -> None:
    # d = 8 uses covariances; d = 96 > n, m uses the Gram-matrix route (both orders of n, m)
    a, b = _gauss(n, d, 0), _gauss(m, d, 1, shift=0.2, scale=1.3)
    out = frechet_distance_with_interval(a, b, n_boot=20)
    # rtol 1e-6: square roots of rounding-level eigenvalues of rank-deficient covariances differ between routes
    np.testing.assert_allclose(out["value"], frechet_distance(a, b), rtol=1e-6)
    assert out["low"] <= out["value"] <= out["high"]
    assert out["method"] == "bootstrap, re-centred" and out["n_boot"] == 20 and out["level"] == 0.95


def test_gram_route_resample_equals_covariance_route_on_the_same_resample() -> None:
    from pdae.metrics.intervals import _fd_from_grams

    a, b = _gauss(12, 30, 2).numpy(), _gauss(15, 30, 3, shift=0.5).numpy()
    i, j = np.array([0, 0, 3, 5, 5, 5, 7, 11, 2, 9, 9, 1]), np.arange(15)[::-1] % 7
    ga = _fd_from_grams((a @ a.T)[np.ix_(i, i)], (b @ b.T)[np.ix_(j, j)], (a @ b.T)[np.ix_(i, j)])
    np.testing.assert_allclose(ga, frechet_distance(torch.from_numpy(a[i]), torch.from_numpy(b[j])), rtol=1e-6)


def test_fd_interval_narrows_with_set_size_and_is_deterministic() -> None:
    small = frechet_distance_with_interval(_gauss(60, 4, 0), _gauss(60, 4, 1, shift=0.5), n_boot=100)
    large = frechet_distance_with_interval(_gauss(960, 4, 0), _gauss(960, 4, 1, shift=0.5), n_boot=100)
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    assert large["low"] < 4 * 0.25 < large["high"]  # the population distance ||0.5 * 1||^2 = 1.0
    again = frechet_distance_with_interval(_gauss(60, 4, 0), _gauss(60, 4, 1, shift=0.5), n_boot=100)
    assert again == small


def test_kid_value_equals_torch_fidelity_when_one_subset_covers_both_sets() -> None:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    a, b = _gauss(80, 16, 4).float(), _gauss(80, 16, 5, shift=0.3).float()
    ref = kid_features_to_metric(a, b, kid_subsets=2, kid_subset_size=80, verbose=False)[KEY_METRIC_KID_MEAN]
    out = kid_with_interval(a, b, n_boot=50)
    np.testing.assert_allclose(out["value"], ref, rtol=1e-4)
    assert out["low"] <= out["value"] <= out["high"] and out["method"] == "bootstrap percentile"


def test_kid_interval_of_one_distribution_contains_zero_and_of_two_does_not() -> None:
    same = kid_with_interval(_gauss(200, 8, 6), _gauss(200, 8, 7), n_boot=100)
    apart = kid_with_interval(_gauss(200, 8, 6), _gauss(200, 8, 7, shift=0.5), n_boot=100)
    assert same["low"] < 0 < same["high"]
    assert apart["low"] > 0


def test_compare_ranks_only_separated_intervals() -> None:
    lo, hi, mid = {"low": 1.0, "high": 2.0}, {"low": 3.0, "high": 4.0}, {"low": 1.5, "high": 3.5}
    assert compare(lo, hi) == "a lower"
    assert compare(hi, lo) == "b lower"
    assert compare(lo, mid) == NO_DIFFERENCE == compare(mid, hi)
    assert compare({"low": 1.0, "high": 3.0}, {"low": 3.0, "high": 4.0}) == NO_DIFFERENCE  # touching
    assert compare(None, hi) == NO_DIFFERENCE
    ref = _gauss(300, 6, 8)
    near = frechet_distance_with_interval(_gauss(300, 6, 9), ref, n_boot=100)
    near2 = frechet_distance_with_interval(_gauss(300, 6, 10), ref, n_boot=100)
    far = frechet_distance_with_interval(_gauss(300, 6, 11, shift=0.6), ref, n_boot=100)
    assert compare(near, far) == "a lower"
    assert compare(near, near2) == NO_DIFFERENCE


def test_generic_bootstrap_interval_of_a_mean() -> None:
    x = _gauss(400, 1, 12)
    out = bootstrap_interval(lambda s: float(s.mean()), [x], n_boot=300, seed=1)
    half = 1.96 / np.sqrt(400)  # normal-theory half width of the mean of unit-variance data
    np.testing.assert_allclose(out["high"] - out["low"], 2 * half, rtol=0.2)
    assert out["low"] < float(x.mean()) < out["high"]


def test_bad_inputs_are_project_errors() -> None:
    with pytest.raises(PdaeError, match="features must be"):
        frechet_distance_with_interval(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(PdaeError, match="dimensions differ"):
        kid_with_interval(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(PdaeError, match="level"):
        frechet_distance_with_interval(torch.randn(4, 3), torch.randn(5, 3), level=1.5)
    with pytest.raises(PdaeError, match="n_boot"):
        kid_with_interval(torch.randn(4, 3), torch.randn(5, 3), n_boot=1)
