"""The latent DPM's noise predictor: an MLP with input skips on normalised z (docs/method.md §5, Diff-AE's MLPSkipNet).

    t -> sinusoid(time_dim) -> Linear(time_dim, time_width) -> SiLU -> Linear(time_width, time_width) = t_emb
    h = z_t
    for each of `depth` hidden layers i:
        h = cat([h, z_t]) if i > 0                       (input skip into every layer after the first)
        h = SiLU(LayerNorm(Linear(h) * (1 + Linear(SiLU(t_emb)))))
    eps = Linear(cat([h, z_t]))                          (the output layer is "after the first" too)

The paper's size for z_dim 512 is depth 10 x width 2048; the embedded run uses a smaller MLP (see params.yaml).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

FORMAT = "pdae-latent-mlp-v1"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps t (N,) (any real values): [cos(t f_k), sin(t f_k)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1) if dim % 2 else emb


# One hidden layer: Linear -> * (1 + Linear(SiLU(t_emb))) -> LayerNorm -> SiLU (-> Dropout).
class _TimeScaledLayer(nn.Module):
    def __init__(self, in_features: int, width: int, time_width: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, width)
        nn.init.kaiming_normal_(self.linear.weight, a=0, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)
        self.time = nn.Linear(time_width, width)
        self.norm = nn.LayerNorm(width)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, t_act: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """h (N, in_features), t_act = SiLU(t_emb) (U, time_width) of U distinct timesteps, index (N,) into U."""
        return self.dropout(self.act(self.norm(self.linear(h) * (1 + self.time(t_act)[index]))))


class LatentMLP(nn.Module):
    """eps_theta(z_t, t) for the latent DPM.

    Args:
        z_dim: size of the (normalised) semantic code.
        depth: number of hidden layers (>= 1).
        width: hidden width.
        time_dim: sinusoid size (64 in the paper); time_width: time-MLP width (512 in the paper).
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        z_dim: int,
        depth: int = 10,
        width: int = 2048,
        time_dim: int = 64,
        time_width: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(z_dim, depth, width, time_dim, time_width) < 1:
            raise ValueError("LatentMLP: z_dim, depth, width, time_dim and time_width must be >= 1")
        self.time_dim = time_dim
        self.time_embed = nn.Sequential(nn.Linear(time_dim, time_width), nn.SiLU(), nn.Linear(time_width, time_width))
        self.layers = nn.ModuleList(
            _TimeScaledLayer(z_dim if i == 0 else width + z_dim, width, time_width, dropout) for i in range(depth)
        )
        self.out = nn.Linear(width + z_dim, z_dim)
        self.config: dict[str, Any] = {
            "format": FORMAT,
            "z_dim": z_dim,
            "depth": depth,
            "width": width,
            "time_dim": time_dim,
            "time_width": time_width,
            "dropout": dropout,
        }

    @property
    def z_dim(self) -> int:
        return int(self.config["z_dim"])

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t (N, z_dim) noisy normalised codes, t (N,) timesteps in [0, T) -> predicted noise (N, z_dim)."""
        # Time features are computed once per distinct t (sampling calls share one t) and gathered per row.
        t_unique, inverse = torch.unique(t.reshape(-1), return_inverse=True)
        t_act = nn.functional.silu(self.time_embed(timestep_embedding(t_unique, self.time_dim)))
        h = z_t
        for i, layer in enumerate(self.layers):
            h = layer(h if i == 0 else torch.cat([h, z_t], dim=1), t_act, inverse)
        return self.out(torch.cat([h, z_t], dim=1))
