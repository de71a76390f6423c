"""A tiny but complete project tree (prepared digits at 8×8, baseline UNet, PDAE, latents) for stage/CLI tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pdae.config import BaseConfig, PrepareConfig

BASE = BaseConfig(image_size=8, threads=1)


def build_tiny_project(root: Path) -> Path:
    """Write data/prepared, models/baseline, models/pdae and latents/ under `root` (~seconds on CPU)."""
    from pdae.data import prepare_dataset

    torch.manual_seed(0)
    prepare_dataset(
        BASE, PrepareConfig(classifier_epochs=1, classifier_width=8), root / "data/prepared", progress=False
    )
    return build_models_and_latents(root)


def build_models_and_latents(root: Path) -> Path:
    """models/baseline, models/pdae and latents/ for the prepared data under `root` (image size 8)."""
    from pdae.autoencode import encode, invert
    from pdae.baseline import load_schedule, save_baseline
    from pdae.data import load_split
    from pdae.io import save_tensors
    from pdae.nets.pdae import PDAE, load_backbone, save_pdae
    from pdae.nets.unet import build_unet

    channels = load_split(root / "data/prepared", "test")[0].shape[1]
    save_baseline(build_unet(8, channels, [8, 16], 1, 8), root / "models/baseline")
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


def build_attribute_folder_project(root: Path, n: int = 300) -> Path:
    """A tiny user project: a folder of `n` greyscale 8x8 digit PNGs with a CSV holding only binary attributes
    (`odd`, `round`: digit in {0, 6, 8, 9}), prepared as dataset 'folder', plus models and latents."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from pdae.data import prepare_dataset
    from pdae.data.embedded import load_digits_data

    raw = load_digits_data(8)
    folder = root / "images"
    folder.mkdir(parents=True)
    pixels = ((raw.images[:n, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    digits = raw.table["label"].to_numpy()[:n]
    for i in range(n):
        Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
    table = pd.DataFrame({"filename": [f"{i:04d}.png" for i in range(n)], "odd": digits % 2,
                          "round": np.isin(digits, [0, 6, 8, 9]).astype(int)})  # fmt: skip
    table.to_csv(root / "attributes.csv", index=False)
    torch.manual_seed(0)
    base = BaseConfig(dataset="folder", image_size=8, threads=1)
    prep = PrepareConfig(folder=str(folder), attributes=str(root / "attributes.csv"), classifier_epochs=1)
    prepare_dataset(base, prep, root / "data/prepared", progress=False)
    return build_models_and_latents(root)
