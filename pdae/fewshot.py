"""Few-shot conditional generation in D2C's setting (docs/method.md §5) and the naive bare-DPM rejection baseline.

A condition is a column of attributes.csv with integer classes: the `label` column or any binary attribute
(classes 0 and 1). For each K in `latent.fewshot_k`:

- protocol "d2c-threshold" (D2C's few-shot setting): K labelled examples per class are drawn from the train split
  (validation rows excluded); a logistic regression on normalised z is fitted on those K * C codes, its L2 strength
  chosen among `latent.fewshot_c` by the F1 of its acceptance on the validation codes; latent-DPM draws are scored and
  a draw is accepted for class c when p(c | z) >= `latent.fewshot_threshold` (rejection sampling); the first n
  accepted draws (in draw order) are decoded. `acceptance_rate` is the share of draws accepted.
- variant "top-k": the n best-scoring draws of the same pool, whatever their score (its acceptance is n / draws by
  construction, so none is reported).
- baseline "bare-dpm-rejection" (no PDAE): the same labelled examples, a logistic regression on standardised pixels,
  and the bare DPM's own samples accepted by the same threshold.

Each accepted set is scored by an independent image classifier trained on the full train split (precision = share
assigned to the conditioning class) and compared with the real train images of that class by Fréchet distance and
KID on that classifier's features, with bootstrap intervals (`pdae.metrics.intervals`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pdae.errors import PdaeError

MIN_SET = 5  # fewer accepted images get no FD / KID (a bootstrap resample of 2 points is mostly duplicates)
PROTOCOL = (
    "d2c-threshold: K labelled train examples per class, logistic regression on normalised z, latent-DPM draws "
    "accepted when p(class | z) >= threshold, first n accepted decoded; top-k: the n best-scoring draws; "
    "baseline bare-dpm-rejection: logistic regression on pixels, bare-DPM samples accepted by the same threshold"
)


def condition_labels(attrs: pd.DataFrame, ids: Tensor, column: str) -> Tensor:
    """Integer classes int64 (N,) of the prepared rows `ids` (N,) in column `column` of attributes.csv's frame."""
    if column not in attrs.columns or column in ("id", "split", "filename"):
        known = [c for c in attrs.columns if c not in ("id", "split", "filename")]
        raise PdaeError(
            f"few-shot condition '{column}' is not a label or attribute column of attributes.csv (known: "
            f"{', '.join(known[:12]) or 'none'}); fix latent.fewshot_attributes."
        )
    return torch.from_numpy(attrs.set_index("id").loc[ids.numpy(), column].to_numpy(dtype=np.int64).copy())


def check_condition(column: str, labels: Tensor, val_mask: Tensor, ks: list[int]) -> None:
    """Fail early (before any training) unless classes (N,) of the train rows allow every K outside validation."""
    classes, counts = torch.unique(labels[~val_mask], return_counts=True)
    if len(torch.unique(labels)) < 2:
        raise PdaeError(f"few-shot condition '{column}' has one class on the train split; pick a column with two.")
    if len(classes) < len(torch.unique(labels)) or int(counts.min()) < max(ks):
        raise PdaeError(
            f"few-shot condition '{column}': a class has {int(counts.min()) if len(classes) else 0} labelled train "
            f"examples outside the validation split, fewer than K = {max(ks)}; lower latent.fewshot_k."
        )


def labelled_examples(labels: Tensor, k: int, eligible: Tensor, generator: torch.Generator) -> Tensor:
    """Indices (K * C,) of k random rows per class of labels (N,) among the `eligible` (N,) bool rows, class order."""
    out = []
    for c in sorted(int(v) for v in torch.unique(labels)):
        rows = torch.nonzero((labels == c) & eligible).flatten()
        if len(rows) < k:
            raise PdaeError(
                f"few-shot: class {c} has {len(rows)} labelled train examples outside the validation split, fewer "
                f"than K = {k}; lower latent.fewshot_k."
            )
        out.append(rows[torch.randperm(len(rows), generator=generator)[:k]])
    return torch.cat(out)


def fit_classifier(x: Tensor, y: Tensor, c: float, seed: int = 0):
    """L2 logistic regression (multinomial for > 2 classes) on features x (n, d), classes y (n,)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x.double().numpy(), y.numpy())


def class_probs(clf, x: Tensor) -> Tensor:
    """p(class | x) float64 (M, C) for features x (M, d); columns in the classifier's sorted class order."""
    return torch.from_numpy(clf.predict_proba(x.double().numpy()))


def accepted_precision(probs: Tensor, labels: Tensor, classes: list[int], threshold: float) -> float | None:
    """Mean over classes of the share of rows accepted for class c (p >= threshold) whose label (M,) is c.

    Classes with no accepted row are left out; None when no class accepts any row.
    """
    per = [
        float((labels[probs[:, j] >= threshold] == c).double().mean())
        for j, c in enumerate(classes)
        if bool((probs[:, j] >= threshold).any())
    ]
    return float(np.mean(per)) if per else None


def accepted_f1(probs: Tensor, labels: Tensor, classes: list[int], threshold: float) -> float:
    """Mean over classes of the F1 score of "accepted for c" (p >= threshold) against "label is c" (M rows).

    Unlike precision alone it does not reward a classifier that accepts (almost) nothing.
    """
    scores = []
    for j, c in enumerate(classes):
        accepted, positive = probs[:, j] >= threshold, labels == c
        hits = float((accepted & positive).sum())
        denom = float(accepted.sum() + positive.sum())
        scores.append(2 * hits / denom if denom else 0.0)
    return float(np.mean(scores))


def select_c(
    x_lab: Tensor, y_lab: Tensor, x_val: Tensor, y_val: Tensor, candidates: list[float], threshold: float, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Fit one classifier per candidate C on the labelled (n, d) features, keep the one with the best mean F1 of its
    threshold acceptance on the validation rows (x_val (V, d), y_val (V,)); ties: the earlier candidate. Precision
    alone is not the criterion: it favours strong penalties whose flat probabilities accept almost no draw.
    Returns (classifier, record with the candidates, their validation F1 and precision, and the choice)."""
    classes = sorted(int(v) for v in torch.unique(y_lab))
    fits = [fit_classifier(x_lab, y_lab, c, seed) for c in candidates]
    if len(candidates) == 1 or len(x_val) == 0:
        why = "one candidate" if len(candidates) == 1 else "empty validation split"
        return fits[0], {"candidates": candidates, "selected": candidates[0], "validation_f1": None, "why": why}
    probs = [class_probs(f, x_val) for f in fits]
    f1 = [accepted_f1(p, y_val, classes, threshold) for p in probs]
    best = max(range(len(fits)), key=lambda i: f1[i])
    record = {"candidates": candidates, "selected": candidates[best], "validation_f1": f1,
              "validation_precision": [accepted_precision(p, y_val, classes, threshold) for p in probs]}  # fmt: skip
    return fits[best], record


def threshold_select(scores: Tensor, n: int, threshold: float) -> Tensor:
    """Indices (<= n,) of the first draws (in draw order) with score (M,) >= threshold; fewer when fewer pass."""
    return torch.nonzero(scores >= threshold).flatten()[:n]


def topk_select(scores: Tensor, n: int) -> Tensor:
    """Indices (min(n, M),) of the n best-scoring draws (scores (M,)), best first."""
    return scores.argsort(descending=True, stable=True)[:n]


def feature_fn(kind: str, scorer):
    """images (N, C, H, W) in [-1, 1] -> float64 features (N, F) for the few-shot FD / KID: "classifier" = the
    scorer's penultimate features, "inception" = Inception pool3 (FID / KID proper; its weights must be available)."""
    if kind == "classifier":
        return lambda x: scorer.features(x.cpu()).double()
    from pdae.metrics import inception_features

    def fn(x: Tensor) -> Tensor:
        feats, source = inception_features(x.cpu(), cache=False)
        if feats is None:
            raise PdaeError(
                f"latent.fewshot_features is 'inception' but no Inception weights are available ({source}); "
                "cache them once (see docs/reproduce.md) or set latent.fewshot_features: classifier."
            )
        return feats.double()

    return fn


def set_scores(scorer, images: Tensor, target: int, real_feats: Tensor, n_boot: int, seed: int,
               features=None) -> dict[str, Any]:  # fmt: skip
    """Precision of images (n, C, H, W) for class `target` by `scorer`, FD and KID vs real features (R, F) with
    bootstrap intervals (None below MIN_SET images); `features` as `feature_fn` (default: the scorer's)."""
    from pdae.metrics.intervals import frechet_distance_with_interval, kid_with_interval

    features = features or feature_fn("classifier", scorer)
    out: dict[str, Any] = {"n": len(images), "precision": None, "fd": None, "kid": None}
    if len(images) == 0:
        return out
    out["precision"] = float((scorer.predict_proba(images.cpu()).argmax(1) == target).double().mean())
    if len(images) >= MIN_SET and len(real_feats) >= MIN_SET:
        feats = features(images)
        out["fd"] = frechet_distance_with_interval(feats, real_feats, n_boot=n_boot, seed=seed)
        out["kid"] = kid_with_interval(feats, real_feats, n_boot=n_boot, seed=seed)
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _summary(per_class: dict[int, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Means over classes of per-class values (intervals contribute their `value`)."""
    out = {}
    for key in keys:
        vals = [v[key]["value"] if isinstance(v[key], dict) else v[key] for v in per_class.values()]
        out[key] = _mean(vals)
    return out


def _class_sets(scorer, imgs: Tensor, picks: list[tuple[Tensor, Tensor]], classes: list[int], probs: Tensor,
                threshold: float, real: dict[int, Tensor], n_boot: int, seed: int,
                features) -> dict[int, dict]:  # fmt: skip
    """Per-class metrics from decoded images (sum of pick sizes, C, H, W): threshold-accepted then top-k per class."""
    out, offset = {}, 0
    for j, (c, (acc, top)) in enumerate(zip(classes, picks, strict=True)):
        accepted, best = imgs[offset : offset + len(acc)], imgs[offset + len(acc) : offset + len(acc) + len(top)]
        offset += len(acc) + len(top)
        s = set_scores(scorer, accepted, c, real[c], n_boot, seed, features)
        out[c] = {
            "acceptance_rate": float((probs[:, j] >= threshold).double().mean()),
            "n_accepted": s["n"],
            "threshold_precision": s["precision"],
            "fd": s["fd"],
            "kid": s["kid"],
            "topk_precision": set_scores(scorer, best, c, real[c], 2, seed)["precision"] if len(best) else None,
        }
    return out


def _baseline(scorer, bare: Tensor, pixels, train_x: Tensor, labels: Tensor, lab: Tensor, val_mask: Tensor, cfg,
              real: dict[int, Tensor], classes: list[int], seed: int, features) -> dict[str, Any]:  # fmt: skip
    """Bare DPM + rejection: a pixel classifier on the labelled images; bare samples (M, C, H, W) accepted by it."""
    thr, n = cfg.fewshot_threshold, cfg.fewshot_samples
    xv = pixels(train_x[val_mask])
    clf, selection = select_c(pixels(train_x[lab]), labels[lab], xv, labels[val_mask], list(cfg.fewshot_c), thr, seed)
    probs = class_probs(clf, pixels(bare))
    per_class = {}
    for j, c in enumerate(classes):
        accepted = bare[threshold_select(probs[:, j], n, thr)]
        s = set_scores(scorer, accepted, c, real[c], cfg.fewshot_boot, seed, features)
        per_class[c] = {"acceptance_rate": float((probs[:, j] >= thr).double().mean()), "n_accepted": s["n"],
                        "threshold_precision": s["precision"], "fd": s["fd"], "kid": s["kid"]}  # fmt: skip
    keys = ("acceptance_rate", "threshold_precision", "fd", "kid")
    return {"c_selection": selection, "draws": len(bare), **_summary(per_class, keys), "per_class": per_class}


def _row(images: Tensor, n: int) -> Tensor:
    """Pad (m <= n, C, H, W) to n images with black (-1) so every class fills one grid row."""
    pad = torch.full((n - len(images), *images.shape[1:]), -1.0)
    return torch.cat([images, pad])


def fewshot_study(
    dpm, model, schedule, train_z: Tensor, train_x: Tensor, labels: Tensor, val_mask: Tensor, cfg,
    gen: torch.Generator, scorer, seed: int = 0, bare: Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[Tensor, int]]]:  # fmt: skip
    """The few-shot protocols for one condition: classes `labels` (N,) of the train rows, aligned with their raw codes
    train_z (N, z_dim) and images train_x (N, C, H, W) in [-1, 1]; val_mask (N,) marks the validation rows.

    `bare`: the bare DPM's samples (M, C, H, W) for the baseline (None skips it). Returns (metrics {"protocol",
    "threshold", "draws", "samples", "K": {K: {...}}, "cpu_seconds"}, figures {"K<K>": (accepted images, one row
    per class, black where fewer than n were accepted; n per row)}).
    """
    from pdae.latent import decode_codes, sample_latents

    start, classes = time.process_time(), sorted(int(v) for v in torch.unique(labels))
    if len(classes) < 2:
        raise PdaeError(f"few-shot: the condition has {len(classes)} class(es) on the train split; it needs 2.")
    pool = sample_latents(dpm, cfg.fewshot_draws, cfg.latent_steps, cfg.clip_noise, cfg.clip_x0, gen,
                          cfg.eval_batch_size, solver=cfg.latent_solver)  # fmt: skip
    pool_zn, zn = dpm.normalise(pool).cpu(), dpm.normalise(train_z).cpu()
    features, real = feature_fn(cfg.fewshot_features, scorer), {}
    for c in classes:
        rows = torch.nonzero(labels == c).flatten()
        if cfg.fewshot_real is not None and len(rows) > cfg.fewshot_real:
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[: cfg.fewshot_real]]
        real[c] = features(train_x[rows])
    sub = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:10_000]].flatten(1)
    mu, sd = sub.mean(0), sub.std(0).clamp_min(1e-6)  # pixel standardisation for the baseline (<= 10k rows)

    def pixels(x: Tensor) -> Tensor:
        return (x.flatten(1) - mu) / sd

    n, thr, size, ch = (
        cfg.fewshot_samples,
        cfg.fewshot_threshold,
        model.backbone.image_size,
        model.backbone.in_channels,
    )
    per_k, grids = {}, {}
    for k in cfg.fewshot_k:
        lab = labelled_examples(labels, k, ~val_mask, torch.Generator().manual_seed(seed * 1000 + k))
        clf, selection = select_c(zn[lab], labels[lab], zn[val_mask], labels[val_mask], list(cfg.fewshot_c), thr, seed)
        probs = class_probs(clf, pool_zn)
        picks = [(threshold_select(probs[:, j], n, thr), topk_select(probs[:, j], n)) for j in range(len(classes))]
        codes = torch.cat([pool[torch.cat([a, b])] for a, b in picks])
        imgs = decode_codes(model, codes, torch.randn(len(codes), ch, size, size, generator=gen), schedule, cfg)
        per_class = _class_sets(scorer, imgs, picks, classes, probs, thr, real, cfg.fewshot_boot, seed, features)
        keys = ("acceptance_rate", "threshold_precision", "topk_precision", "fd", "kid")
        per_k[k] = {
            "labelled": len(lab),
            "c_selection": selection,
            **_summary(per_class, keys),
            "per_class": per_class,
        }
        if bare is not None:
            per_k[k]["baseline"] = _baseline(scorer, bare, pixels, train_x, labels, lab, val_mask, cfg, real, classes,
                                             seed, features)  # fmt: skip
        offsets = np.cumsum([0] + [len(a) + len(b) for a, b in picks])
        rows = [_row(imgs[offsets[j] : offsets[j] + len(a)], n) for j, (a, _) in enumerate(picks)]
        grids[f"K{k}"] = (torch.cat(rows), n)
    metrics = {"protocol": PROTOCOL, "classes": classes, "threshold": thr, "draws": len(pool), "samples": n,
               "features": cfg.fewshot_features, "n_real": {c: len(f) for c, f in real.items()},
               "validation_rows": int(val_mask.sum()), "K": per_k,
               "cpu_seconds": round(time.process_time() - start, 1)}  # fmt: skip
    return metrics, grids
