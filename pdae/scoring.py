"""Scoring generated images with the dataset's label classifier (the "digit classifier" of the embedded run)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

CONFIDENT = 0.9


def load_scorer(prepared_dir: str | Path):
    """The label classifier stored with the prepared data, or None when the dataset has no `label` column."""
    from pdae.data.classifier import load_label_classifier

    folder = Path(prepared_dir) / "label_classifier"
    return load_label_classifier(folder) if folder.is_dir() else None


def train_scorer(images: Tensor, labels: Tensor, epochs: int, seed: int, device, out_dir: str | Path):
    """Train and save (into `out_dir`) an image classifier on images (N, C, S, S) in [-1, 1] and classes (N,) — the
    independent scorer of a condition column other than `label` (same network and recipe as the label classifier)."""
    from pdae.config import PrepareConfig
    from pdae.data.classifier import save_label_classifier, train_label_classifier

    cfg = PrepareConfig(classifier_epochs=epochs)
    model = train_label_classifier(images, labels, cfg, seed, progress=False, device=device)
    save_label_classifier(model, out_dir)
    return model


@torch.no_grad()
def class_scores(scorer, images: Tensor) -> dict[str, float]:
    """Share of images classified with probability >= 0.9 and the normalised entropy of predicted classes."""
    probs = scorer.predict_proba(images.cpu())
    conf, pred = probs.max(dim=1)
    counts = torch.bincount(pred, minlength=probs.shape[1]).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(float(probs.shape[1])))
    return {"confident_fraction": (conf >= CONFIDENT).double().mean().item(), "class_entropy": entropy.item()}


@torch.no_grad()
def agreement(scorer, images: Tensor, labels: Tensor) -> float:
    """Share of images the classifier assigns to `labels` (N,)."""
    return (scorer.predict_proba(images.cpu()).argmax(1) == labels.cpu()).double().mean().item()


@torch.no_grad()
def classifier_fd(scorer, images: Tensor, reference: Tensor) -> float:
    """Fréchet distance between classifier features of `images` and of `reference` (both in [-1, 1])."""
    from pdae.metrics import frechet_distance

    return float(frechet_distance(scorer.features(images.cpu()).double(), scorer.features(reference.cpu()).double()))


@torch.no_grad()
def classifier_fd_interval(scorer, images: Tensor, reference: Tensor, n_boot: int = 200, seed: int = 0) -> dict:
    """`classifier_fd` with its 95% bootstrap interval: {"value", "low", "high", ...} (pdae.metrics.intervals)."""
    from pdae.metrics import frechet_distance_with_interval

    feats = scorer.features(images.cpu()).double(), scorer.features(reference.cpu()).double()
    return frechet_distance_with_interval(*feats, n_boot=n_boot, seed=seed)
