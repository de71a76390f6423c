"""Small building blocks shared by the encoder and the gradient estimator (no diffusers internals here)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def groups_for(channels: int, preferred: int = 32) -> int:
    """Largest GroupNorm group count <= `preferred` that divides `channels` (gcd of the two)."""
    return math.gcd(int(channels), int(preferred))


def group_norm(channels: int, preferred: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm over `channels` with a group count that divides it."""
    return nn.GroupNorm(groups_for(channels, preferred), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place (residual branches start as the identity) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Multi-head self-attention over the spatial positions of a feature map: x + proj(attn(GN(x))), proj zero-initialised.
class SelfAttention(nn.Module):
    """Residual spatial self-attention block (guided-diffusion style).

    Input and output: (N, C, H, W). At initialisation the block is the identity (zero output projection).
    """

    def __init__(self, channels: int, heads: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"attention heads {heads} must divide channels {channels}")
        self.heads = heads
        self.norm = group_norm(channels, groups, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        d = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, d, hh * ww).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (N, heads, HW, d)
        out = out.transpose(-1, -2).reshape(n, c, hh, ww)
        return x + self.proj(out)
