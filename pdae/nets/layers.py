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


def _collapse(kernel: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    # Taps of a 3-tap kernel that land on the same low-resolution pixel after nearest x2 upsampling are summed:
    # even output rows/cols read low-res offsets (-1, 0) with taps (k0, k1 + k2), odd ones (0, +1) with (k0 + k1, k2).
    k0, k1, k2 = kernel.unbind(dim)
    pair = (k0, k1 + k2) if phase == 0 else (k0 + k1, k2)
    return torch.stack(pair, dim)


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_upsample_x2(x), padding 1), computed at low resolution as four 2x2 phase convolutions.

    The same function (up to float rounding) with 2.25x fewer multiply-adds and no upsampled input tensor; used from
    8x8 inputs up (on smaller maps the four calls cost more than they save on CPU).
    x: (N, I, H, W); weight: (O, I, 3, 3); bias: (O,) or None -> (N, O, 2H, 2W).
    """
    n, _, h, w = x.shape
    if h * w < 64:
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    padded = F.pad(x, (1, 1, 1, 1))
    rows = []
    for a in (0, 1):
        k_row = _collapse(weight, 2, a)
        cols = [F.conv2d(padded[:, :, a : a + h + 1, b : b + w + 1], _collapse(k_row, 3, b), bias) for b in (0, 1)]
        rows.append(torch.stack(cols, dim=-1))  # (N, O, H, W, 2): column phase last
    out = torch.stack(rows, dim=3)  # (N, O, H, 2, W, 2)
    return out.reshape(n, -1, 2 * h, 2 * w)


def modulate_twice(h: torch.Tensor, norm: nn.GroupNorm, t_mod: torch.Tensor, z_mod: torch.Tensor) -> torch.Tensor:
    """(1 + s_z) * (norm(h) * (1 + s_t) + b_t) + b_z ("scale and shift twice") in one pass over h (N, C, H, W).

    t_mod and z_mod (N, 2C) hold (s_t, b_t) and (s_z, b_z); the GroupNorm's affine and both modulations are folded
    into one per-(N, C) scale and shift.
    """
    s_t, b_t = t_mod.chunk(2, dim=1)
    s_z, b_z = z_mod.chunk(2, dim=1)
    g_t, g_z = 1 + s_t, 1 + s_z
    scale = norm.weight * g_t * g_z
    shift = (norm.bias * g_t + b_t) * g_z + b_z
    h = F.group_norm(h, norm.num_groups, eps=norm.eps)
    return torch.addcmul(shift[:, :, None, None], h, scale[:, :, None, None])
