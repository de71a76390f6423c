"""DVC stage `baseline`: acquire the frozen DPM (pre-train, load, download or convert) and score its samples."""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import pandas as pd
import torch

from pdae.baseline import acquire_baseline, load_schedule
from pdae.data import load_split
from pdae.io import save_image_grid, write_csv
from pdae.nets.backbone import load_backbone
from pdae.sampling import ddim_sample, plain
from pdae.scoring import class_scores, classifier_fd, load_scorer
from pdae.stage import stage_main

PREPARED, OUT, FIGS = Path("data/prepared"), Path("models/baseline"), Path("reports/figures")


def body(cfg, run) -> dict:
    base, bcfg, device = cfg["base"], cfg["baseline"], cfg["device"]
    train_x, _ = load_split(PREPARED, "train")
    metrics, history = acquire_baseline(bcfg, base, train_x, OUT, device, run)
    if history:
        hist = pd.DataFrame(history, columns=["step", "images", "loss"])
        write_csv("plots/baseline_loss.csv", hist)
    backbone, schedule = load_backbone(OUT).to(device), load_schedule(OUT)  # eps(x_t, t) whatever the model predicts
    gen = torch.Generator().manual_seed(base.seed + 1)
    x_T = torch.randn(bcfg.n_samples, *train_x.shape[1:], generator=gen).to(device)
    # Sampled in float32 even when training used bf16 autocast (baseline.bf16 is a training option).
    samples = ddim_sample(plain(backbone), x_T, schedule, bcfg.sample_steps, progress=True)
    samples = samples.clamp(-1, 1).cpu()
    run.log_artifact(save_image_grid(FIGS / "baseline_samples.png", samples[:64], nrow=8), "figures")
    scorer = load_scorer(PREPARED)
    if scorer is None:
        metrics["sample_metrics"] = "skipped: the dataset has no label column"
        return metrics
    test_x, _ = load_split(PREPARED, "test")
    perm = torch.randperm(train_x.shape[0], generator=gen)[: bcfg.n_samples]
    scores = class_scores(scorer, samples)
    metrics["sample_confident_fraction"] = scores["confident_fraction"]
    metrics["sample_class_entropy"] = scores["class_entropy"]
    metrics["sample_fd"] = classifier_fd(scorer, samples, test_x)
    metrics["real_fd"] = classifier_fd(scorer, train_x[perm], test_x)
    metrics["n_samples"] = bcfg.n_samples
    metrics["sample_steps"] = bcfg.sample_steps
    return metrics


if __name__ == "__main__":
    stage_main("baseline", ["baseline"], body, metrics_file="metrics/baseline.json")
