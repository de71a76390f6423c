"""Shared data types and helpers of the data layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

# Columns of attributes.csv that are not attributes.
RESERVED_COLUMNS = ("id", "split", "filename", "label")


# A whole dataset before the train/test split.
@dataclass
class RawData:
    """`images`: float32 (N, C, H, W) in [-1, 1]. `table`: N rows in image order with binary attribute columns
    (int 0/1), an optional `filename` column (folder data) and an optional integer `label` column.
    `info`: extra facts for the metrics (e.g. unused attribute rows)."""

    images: torch.Tensor
    table: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_label(self) -> bool:
        return "label" in self.table.columns


def uint8_to_unit(array: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) in [0, 255] -> float32 in [-1, 1]."""
    return array.float().div(127.5).sub(1.0)


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Convert (N, C, H, W) in [-1, 1] to `channels` (1: ITU-R 601 luma, 3: replicate grey); None keeps C."""
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)
