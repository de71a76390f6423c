"""DVC stage `encode`: semantic codes z of both splits, their train statistics, inferred x_T of a test subset."""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import torch

from pdae.autoencode import encode, invert, load_models
from pdae.data import load_split
from pdae.io import save_tensors
from pdae.stage import stage_main

PREPARED, OUT = Path("data/prepared"), Path("latents")


def body(cfg, run) -> dict:
    ecfg, device = cfg["encode"], cfg["device"]
    model, schedule = load_models("models/baseline", "models/pdae", device)
    metrics: dict = {"z_dim": model.z_dim}
    for split in ("train", "test"):
        images, ids = load_split(PREPARED, split)
        z = encode(model, images, ecfg.batch_size)
        save_tensors(OUT / f"{split}.safetensors", {"z": z, "ids": ids})
        metrics[f"n_{split}"] = len(z)
        if split == "train":
            mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
            save_tensors(OUT / "stats.safetensors", {"mean": mean, "std": std})
            metrics["z_std_mean"] = std.mean().item()
        else:
            n = min(ecfg.xT_images, len(images))
            x_T = invert(model, images[:n], z[:n], schedule, ecfg.xT_steps, ecfg.batch_size, progress=True)
            save_tensors(OUT / "xT_test.safetensors", {"x_T": x_T, "ids": ids[:n]}, {"steps": ecfg.xT_steps})
            metrics["n_xT"] = n
            metrics["xT_std"] = x_T.std().item() if n else None
    return metrics


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    stage_main("encode", ["encode"], body, metrics_file="metrics/encode.json")
