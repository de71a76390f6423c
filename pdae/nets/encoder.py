"""The semantic encoder E: x0 -> z (docs/method.md §2), and the label embedding standing in for E (class-cond. G)."""

from __future__ import annotations

import torch
from torch import nn

from pdae.nets.layers import SelfAttention, group_norm

# Output channels of each stride-2 conv, per image size. 128 and 64 px are the paper's plans (docs/method.md §2);
# 32 and 16 px are our small defaults: the paper's 64-128 widths, attention at 16x16 (32 px) or 8x8 (16 px).
ENCODER_PLANS: dict[int, list[int]] = {
    128: [64, 128, 256, 256, 256],
    64: [64, 128, 128, 128],
    32: [64, 128, 128],
    16: [64, 128],
    8: [64],
}


def num_levels(image_size: int) -> int:
    """Number of stride-2 convs that take an image of side `image_size` down to 4x4."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"Encoder: image_size must be a power of two >= 8 (got {image_size})")
    return image_size.bit_length() - 3


def default_encoder_channels(image_size: int) -> list[int]:
    """Paper plan for 64/128 px, small plans for 8-32 px; larger sizes: 64, 128, then 256 per extra level."""
    n = num_levels(image_size)
    if image_size in ENCODER_PLANS:
        return list(ENCODER_PLANS[image_size])
    return [min(64 * 2**i, 256) for i in range(n)]


def attention_level(image_size: int) -> int:
    """Index of the conv whose output resolution is nearest 16x16 (ties: the higher resolution)."""
    n = num_levels(image_size)
    return min(range(n), key=lambda i: (abs(image_size // 2 ** (i + 1) - 16), i))


class Encoder(nn.Module):
    """Plain strided-conv encoder without time input.

    conv(C -> ch[0], stride 2), then per further level [GroupNorm + SiLU, conv stride 2] down to 4x4, a residual
    self-attention block (4 heads, zero-initialised output projection) after the level nearest 16x16, then
    GroupNorm + SiLU, flatten and Linear(ch[-1] * 16 -> z_dim).

    Args:
        image_size: side H = W of the input, a power of two >= 8.
        in_channels: image channels C.
        z_dim: size of the semantic code.
        channels: output channels of each stride-2 conv (len = log2(image_size / 4)); default by image size, see
            ENCODER_PLANS. GroupNorm uses up to 32 groups dividing the channel count.
        heads: attention heads (must divide the attention level's channels).
    """

    def __init__(
        self, image_size: int, in_channels: int, z_dim: int, channels: list[int] | None = None, heads: int = 4
    ) -> None:
        super().__init__()
        n = num_levels(image_size)
        channels = [int(c) for c in (channels if channels is not None else default_encoder_channels(image_size))]
        if len(channels) != n:
            raise ValueError(
                f"Encoder: {image_size} px needs {n} stride-2 convs down to 4x4, so encoder channels must have {n} "
                f"entries (got {channels})"
            )
        self.image_size, self.in_channels, self.z_dim, self.channels = image_size, in_channels, z_dim, channels
        attn_at = attention_level(image_size)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, stride=2, padding=1)]
        for i in range(n):
            if i == attn_at:
                layers.append(SelfAttention(channels[i], heads))
            if i + 1 < n:
                layers += [group_norm(channels[i]), nn.SiLU(), nn.Conv2d(channels[i], channels[i + 1], 3, 2, 1)]
        layers += [group_norm(channels[-1]), nn.SiLU(), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(channels[-1] * 16, z_dim)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """x0: images (N, C, H, W) in [-1, 1] -> z: (N, z_dim), raw (no normalisation, unbounded)."""
        if x0.shape[-1] != self.image_size or x0.shape[-2] != self.image_size:
            raise ValueError(f"Encoder expects {self.image_size}x{self.image_size} images, got {tuple(x0.shape)}")
        return self.out(self.body(x0))


class LabelEncoder(nn.Module):
    """Class-conditional stand-in for E: a learned embedding per class, used as z (docs/method.md §5).

    forward(labels): integer labels (N,) in [0, num_classes) -> z (N, z_dim).
    """

    def __init__(self, num_classes: int, z_dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
        self.num_classes, self.z_dim = num_classes, z_dim
        self.embedding = nn.Embedding(num_classes, z_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels.long())
