"""Built-in datasets that need no download: scikit-learn's digits and procedural dSprites-like shapes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pdae.data.base import RawData

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
# Shape side length as a fraction of the image side; the upper half of the levels counts as `size_large`.
SIZE_LEVELS = (0.35, 0.45, 0.55, 0.65)


def load_digits_data(image_size: int) -> RawData:
    """scikit-learn's bundled 1797 handwritten digits (8x8, values 0..16), bilinearly resized to `image_size`.

    Returns images float32 (1797, 1, S, S) in [-1, 1] (ink bright, background -1), attributes `digit_0`..`digit_9`
    (one-hot, int 0/1) and the integer `label` 0..9.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    images = (x.clamp(0, 1) * 2 - 1).contiguous()
    labels = bunch.target.astype(np.int64)
    table = pd.DataFrame({f"digit_{k}": (labels == k).astype(np.int64) for k in range(10)})
    table["label"] = labels
    return RawData(images=images, table=table)


def _render(kind: np.ndarray, side: np.ndarray, cx: np.ndarray, cy: np.ndarray, image_size: int) -> torch.Tensor:
    """Anti-aliased coverage masks (N, 1, S, S) in [0, 1] of shapes given in pixel units (centre, side)."""
    factor = 4 if image_size <= 32 else 2
    grid = (torch.arange(image_size * factor, dtype=torch.float32) + 0.5) / factor  # sub-pixel centres
    gy, gx = grid.view(1, -1, 1), grid.view(1, 1, -1)
    k = torch.from_numpy(kind).view(-1, 1, 1)
    s = torch.from_numpy(side).float().view(-1, 1, 1)
    dx = gx - torch.from_numpy(cx).float().view(-1, 1, 1)
    dy = gy - torch.from_numpy(cy).float().view(-1, 1, 1)
    square = (dx.abs() <= s / 2) & (dy.abs() <= s / 2)
    circle = dx**2 + dy**2 <= (s / 2) ** 2
    # Upward triangle filling the bounding box: half-width grows linearly from the apex to the base.
    from_top = dy + s / 2
    triangle = (from_top >= 0) & (from_top <= s) & (dx.abs() <= from_top / 2)
    mask = torch.where(k == 0, square, torch.where(k == 1, circle, triangle)).float().unsqueeze(1)
    return F.avg_pool2d(mask, factor)


def make_shapes_data(count: int, image_size: int, seed: int) -> RawData:
    """Procedural dSprites-like RGB set: one shape per image on black, factors drawn i.i.d. from `seed`.

    Factors: shape (square/circle/triangle), size (4 levels), centre x/y (continuous, shape fully inside), colour
    (red/green/blue). Returns images float32 (count, 3, S, S) in [-1, 1]; binary attributes `shape_*`,
    `size_large`, `pos_left`, `pos_top`, `colour_*`; `label` = shape index (0 square, 1 circle, 2 triangle).
    """
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, len(SHAPES), count)
    level = rng.integers(0, len(SIZE_LEVELS), count)
    side = np.asarray(SIZE_LEVELS)[level] * image_size
    cx = side / 2 + rng.random(count) * (image_size - side)
    cy = side / 2 + rng.random(count) * (image_size - side)
    colour = rng.integers(0, len(COLOURS), count)
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[torch.from_numpy(colour)].view(-1, 3, 1, 1)
    chunks = []
    for start in range(0, count, 128):
        sl = slice(start, start + 128)
        cover = _render(kind[sl], side[sl], cx[sl], cy[sl], image_size)
        chunks.append(-1.0 + cover * (rgb[sl] + 1.0))
    images = torch.cat(chunks).contiguous()
    table = pd.DataFrame({f"shape_{name}": (kind == i).astype(np.int64) for i, name in enumerate(SHAPES)})
    table["size_large"] = (level >= len(SIZE_LEVELS) // 2).astype(np.int64)
    table["pos_left"] = (cx < image_size / 2).astype(np.int64)
    table["pos_top"] = (cy < image_size / 2).astype(np.int64)
    for i, name in enumerate(COLOURS):
        table[f"colour_{name}"] = (colour == i).astype(np.int64)
    table["label"] = kind.astype(np.int64)
    return RawData(images=images, table=table)
