"""DVC stage `prepare`: dataset -> data/prepared (train/test tensors, attributes.csv, label classifier, samples)."""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)

from pdae.data import prepare_dataset
from pdae.stage import stage_main

OUT = Path("data/prepared")


def body(cfg, run) -> dict:
    metrics = prepare_dataset(cfg["base"], cfg["prepare"], OUT, progress=True, device=cfg["device"])
    run.log_artifact(OUT / "samples.png", "figures")
    return metrics


if __name__ == "__main__":
    stage_main("prepare", ["prepare"], body, metrics_file="metrics/prepare.json")
