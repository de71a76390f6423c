"""FID/KID sets of the evaluation (docs/method.md §6) with bootstrap intervals, and the rankings those intervals allow.

Each generated set (bare-DPM samples, latent-DPM samples, random-x_T reconstructions of the test split) and the real
test split (the small-sample floor) is scored against the real reference (the whole train split by default) in two
feature spaces: Inception-2015-12-05 pool3 (FID, KID; torch-fidelity) and the dataset's label classifier when there
is one (classifier-feature FD). Every figure carries a 95% bootstrap interval (`pdae.metrics.intervals`), and two
sets are ranked only when their intervals separate; otherwise the comparison reads "no difference at this size".
The headline statistic is the feature space whose intervals are tighter relative to its values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pdae.errors import PdaeError

# Kernel matrices of KID are (N, N) float64: above this many rows per set, KID and its interval use a random
# subsample of this size (recorded as kid_rows); at the embedded sizes every row is used.
KID_MAX_ROWS = 5000
GENERATED = ("ddim_samples", "latent_dpm_samples")
# (set a, set b) pairs ranked in the metrics when both sets exist.
COMPARISONS = (("latent_dpm_samples", "ddim_samples"), ("random_xT_reconstructions", "real_test"))
STATISTICS = ("classifier_fd", "fid", "kid")


def _rows(feats: Tensor, limit: int, seed: int) -> Tensor:
    if len(feats) <= limit:
        return feats
    return feats[torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:limit]]


def _shifted(value: float, interval: dict[str, Any]) -> tuple[float, float]:
    """The interval's [low, high] moved by (value - its own value): puts it around a value computed elsewhere."""
    delta = float(value) - interval["value"]
    return interval["low"] + delta, interval["high"] + delta


def inception_scores(
    gen_feats: Tensor, real_feats: Tensor, kid_subset_size: int, n_boot: int, seed: int = 0
) -> dict[str, Any]:
    """FID (torch-fidelity) and KID of Inception features (N, 2048) vs (M, 2048) with bootstrap intervals.

    Keys: fid, fid_low, fid_high; kid (unbiased MMD^2 over the full sets), kid_low, kid_high, kid_rows; kid_mean and
    kid_std (torch-fidelity: mean and sd over 100 subsets of kid_subset_size, which is kept below the set sizes).
    """
    from pdae.metrics import fid_kid_from_features, frechet_distance_with_interval, kid_with_interval

    subset = min(kid_subset_size, min(len(gen_feats), len(real_feats)) - 1)
    if subset < 2:
        sizes = f"{len(gen_feats)} and {len(real_feats)}"
        raise PdaeError(f"FID/KID need at least 3 generated and 3 real images, got {sizes}; use larger sets.")
    out = fid_kid_from_features(gen_feats, real_feats, kid_subset_size=subset)
    fd = frechet_distance_with_interval(gen_feats, real_feats, n_boot=n_boot, seed=seed)
    out["fid_low"], out["fid_high"] = _shifted(out["fid"], fd)
    a, b = _rows(gen_feats, KID_MAX_ROWS, seed), _rows(real_feats, KID_MAX_ROWS, seed + 1)
    kid = kid_with_interval(a, b, n_boot=n_boot, seed=seed)
    out.update(kid=kid["value"], kid_low=kid["low"], kid_high=kid["high"], kid_rows=[len(a), len(b)])
    return out


def classifier_scores(gen_feats: Tensor, real_feats: Tensor, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Classifier-feature FD of (N, F) vs (M, F) features with its bootstrap interval."""
    from pdae.metrics import frechet_distance_with_interval

    fd = frechet_distance_with_interval(gen_feats, real_feats, n_boot=n_boot, seed=seed)
    return {"classifier_fd": fd["value"], "classifier_fd_low": fd["low"], "classifier_fd_high": fd["high"]}


def score_sets(
    sets: dict[str, Tensor],
    real: Tensor,
    kid_subset_size: int,
    n_boot: int,
    scorer=None,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, Any]]:
    """Scores of every image set (N_i, C, H, W) in [-1, 1] against `real` (M, C, H, W): {set: flat metrics dict}.

    Inception figures are None with a "reason" when no Inception weights are available; classifier figures are
    present only with a `scorer` (the dataset's label classifier).
    """
    from pdae.metrics import inception_features
    from pdae.metrics.inception import FEATURES_LABEL

    progress(f"Inception features: real reference ({len(real)})")
    real_inc, source = inception_features(real, cache=True)
    real_cls = scorer.features(real.cpu()).double() if scorer is not None else None
    results: dict[str, dict[str, Any]] = {}
    for name, images in sets.items():
        res: dict[str, Any] = {"n_generated": len(images), "n_real": len(real), "features": FEATURES_LABEL}
        res.update(fid=None, kid=None, kid_mean=None, kid_std=None, weights=None, reason=None)
        if real_inc is None:
            res["reason"] = source
        else:
            progress(f"Inception features: {name} ({len(images)})")
            gen_inc, _ = inception_features(images, cache=False)
            res.update(inception_scores(gen_inc, real_inc, kid_subset_size, n_boot, seed), weights=source)
        if real_cls is not None:
            res.update(classifier_scores(scorer.features(images.cpu()).double(), real_cls, n_boot, seed))
        res["n_boot"] = n_boot
        results[name] = res
    return results


def _relative_width(results: dict[str, dict[str, Any]], stat: str) -> float | None:
    widths = [
        (r[f"{stat}_high"] - r[f"{stat}_low"]) / abs(r[stat])
        for k, r in results.items()
        if k in GENERATED and r.get(stat) not in (None, 0) and r.get(f"{stat}_low") is not None
    ]
    return sum(widths) / len(widths) if widths else None


def headline(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Fréchet statistic to lead with: the one whose intervals on the generated sets are tighter relative to
    their values (mean of (high - low) / value), with both widths recorded."""
    widths = {s: _relative_width(results, s) for s in ("classifier_fd", "fid")}
    known = {s: w for s, w in widths.items() if w is not None}
    lead = min(known, key=known.get) if known else None
    return {"statistic": lead, "relative_interval_width": widths}


def comparisons(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{"<a>_vs_<b>": {statistic: "<a> lower" | "<b> lower" | "no difference at this size"}} for COMPARISONS."""
    from pdae.metrics import compare

    out: dict[str, dict[str, str]] = {}
    for a, b in COMPARISONS:
        if a not in results or b not in results:
            continue
        row = {}
        for stat in STATISTICS:
            ra, rb = results[a], results[b]
            if ra.get(stat) is None or rb.get(stat) is None:
                continue
            verdict = compare(
                {"low": ra[f"{stat}_low"], "high": ra[f"{stat}_high"]},
                {"low": rb[f"{stat}_low"], "high": rb[f"{stat}_high"]},
            )
            row[stat] = {"a lower": f"{a} lower", "b lower": f"{b} lower"}.get(verdict, verdict)
        out[f"{a}_vs_{b}"] = row
    return out
