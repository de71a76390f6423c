"""A tiny but complete project tree (prepared digits at 8×8, baseline UNet, PDAE, latents) for stage/CLI tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pdae.config import BaseConfig, PrepareConfig

BASE = BaseConfig(image_size=8, threads=1)


def build_tiny_project(root: Path) -> Path:
    """Write data/prepared, models/baseline, models/pdae and latents/ under `root` (~seconds on CPU)."""
    from pdae.autoencode import encode, invert
    from pdae.baseline import load_schedule, save_baseline
    from pdae.data import load_split, prepare_dataset
    from pdae.io import save_tensors
    from pdae.nets.pdae import PDAE, load_backbone, save_pdae
    from pdae.nets.unet import build_unet

    torch.manual_seed(0)
    prepare_dataset(
        BASE, PrepareConfig(classifier_epochs=1, classifier_width=8), root / "data/prepared", progress=False
    )
    save_baseline(build_unet(8, 1, [8, 16], 1, 8), root / "models/baseline")
    backbone = load_backbone(root / "models/baseline")
    model = PDAE(backbone, z_dim=8)
    with torch.no_grad():  # break G's zero init so the shift is not identically zero
        for p in model.gradient.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pdae(model, root / "models/pdae")
    schedule = load_schedule(root / "models/baseline")
    for split in ("train", "test"):
        x, ids = load_split(root / "data/prepared", split)
        z = encode(model, x)
        save_tensors(root / f"latents/{split}.safetensors", {"z": z, "ids": ids})
        if split == "train":
            save_tensors(root / "latents/stats.safetensors", {"mean": z.mean(0), "std": z.std(0).clamp_min(1e-6)})
        else:
            x_T = invert(model, x[:16], z[:16], schedule, steps=5)
            save_tensors(root / "latents/xT_test.safetensors", {"x_T": x_T, "ids": ids[:16]})
    return root


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
