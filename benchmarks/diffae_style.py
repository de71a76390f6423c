"""A Diff-AE-style autoencoder for the side-by-side benchmarks: the same encoder E as PDAE and a conditional UNet
trained from scratch with the plain epsilon loss (uniform weighting), z conditioning EVERY ResBlock.

Architecture (BeatGANs / Diff-AE, the same level plan as `pdae.nets.unet.build_unet`):
- sinusoidal time embedding (cos, sin; no frequency shift) -> Linear -> SiLU -> Linear (width 4 * channels[0]);
- z_emb = Linear(z_dim -> that width); every ResBlock: h = conv1(SiLU(GN(x))) (avg-pool before conv1 when
  downsampling, nearest x2 when upsampling), (s_t, b_t) = Linear_t(SiLU(t_emb)), (s_z, b_z) = Linear_z(SiLU(z_emb)),
  h = (1 + s_z) * (GN(h) * (1 + s_t) + b_t) + b_z ("scale and shift twice"), out = skip(x) + zero_conv(SiLU(h));
- down path: per level `layers_per_block` ResBlocks (+ attention at the lowest level), a downsampling ResBlock between
  levels; middle: ResBlock, attention, ResBlock; up path: `layers_per_block + 1` ResBlocks on cat(h, skip) per level
  (+ attention at the lowest level), an upsampling ResBlock between levels; GN -> SiLU -> zero-initialised conv out.

The widths are chosen (`matched_channels`) so that the conditional UNet has about as many parameters as the frozen
baseline UNet + PDAE's gradient estimator G together. The same efficiency tricks as G are used (GN affine and both
modulations folded into one pass, upsample conv as phase convolutions), so step-cost comparisons are fair.

For the samplers, `model_fn(z)` returns (eps, None): a plain conditional DPM, no mean shift.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from pdae.config import BaseConfig, TrainConfig
from pdae.diffusion import Schedule
from pdae.nets.encoder import Encoder
from pdae.nets.layers import SelfAttention, modulate_twice, upsample_conv3x3, zero_module
from pdae.nets.unet import norm_groups
from pdae.train import TrainResult, TrainSpec, train


# ResBlock conditioned on t and z by scale-and-shift twice; optional down (avg pool) / up (nearest x2) resampling.
class CondResBlock(nn.Module):
    """forward(x (N, in, H, W), t_act (N, E), z_act (N or 1, E)) -> (N, out, H', W'); H' = H/2 (down), 2H (up)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        groups: int,
        dropout: float = 0.0,
        resample: str | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up' (got {resample})")
        self.resample = resample
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.t_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.z_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, t_act: Tensor, z_act: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
            h = self.conv1(F.avg_pool2d(h, 2))
        elif self.resample == "up":
            h = upsample_conv3x3(h, self.conv1.weight, self.conv1.bias)
        else:
            h = self.conv1(h)
        out = self.shortcut(x)
        if self.resample == "up":
            out = F.interpolate(out, scale_factor=2.0, mode="nearest")  # a 1x1 conv commutes with nearest x2
        h = modulate_twice(h, self.norm2, self.t_proj(t_act), self.z_proj(z_act))
        return out + self.conv2(self.dropout(F.silu(h)))


class CondUNet(nn.Module):
    """Epsilon-prediction UNet conditioned on time and on a semantic code at every ResBlock.

    forward(x_t (N, C, H, W), t (N,) int in [0, T), z (N or 1, z_dim)) -> eps (N, C, H, W).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        channels: list[int],
        z_dim: int,
        layers_per_block: int = 1,
        attention_head_dim: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        levels = len(channels)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1}")
        if channels[-1] % attention_head_dim:
            raise ValueError(f"attention_head_dim {attention_head_dim} must divide {channels[-1]}")
        self.channels, self.z_dim = channels, z_dim
        g, e = norm_groups(channels), 4 * channels[0]
        heads = channels[-1] // attention_head_dim
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], e)
        self.z_emb = nn.Linear(z_dim, e)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        # Down path: a flat list of (block, produces_skip); attention follows each ResBlock of the lowest level.
        self.down = nn.ModuleList()
        skip_ch, ch = [channels[0]], channels[0]
        for i, c in enumerate(channels):
            for _ in range(layers_per_block):
                self.down.append(CondResBlock(ch, c, e, g, dropout))
                ch = c
                if i == levels - 1:
                    self.down.append(SelfAttention(ch, heads, g))
                skip_ch.append(ch)
            if i < levels - 1:
                self.down.append(CondResBlock(ch, ch, e, g, dropout, "down"))
                skip_ch.append(ch)
        self.mid = nn.ModuleList(
            [CondResBlock(ch, ch, e, g, dropout), SelfAttention(ch, heads, g), CondResBlock(ch, ch, e, g, dropout)]
        )
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            c = channels[i]
            for _ in range(layers_per_block + 1):
                self.up.append(CondResBlock(ch + skip_ch.pop(), c, e, g, dropout))
                ch = c
                if i == levels - 1:
                    self.up.append(SelfAttention(ch, heads, g))
            if i > 0:
                self.up.append(CondResBlock(ch, ch, e, g, dropout, "up"))
        assert not skip_ch
        self.out_norm = nn.GroupNorm(g, ch, eps=1e-5)
        self.out_conv = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        t = t.to(x_t.device).reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t.to(x_t.device)
        emb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        t_act = F.silu(emb)
        z_act = F.silu(self.z_emb(z.to(x_t.dtype)))
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down:
            if isinstance(block, SelfAttention):
                h = block(h)
                skips[-1] = h  # the attention output replaces its ResBlock's skip (as in AttnDownBlock2D)
            else:
                h = block(h, t_act, z_act)
                skips.append(h)
        res0, attn, res1 = self.mid
        h = res1(attn(res0(h, t_act, z_act)), t_act, z_act)
        for block in self.up:
            if isinstance(block, SelfAttention):
                h = block(h)
            elif block.resample == "up":
                h = block(h, t_act, z_act)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), t_act, z_act)
        return self.out_conv(F.silu(self.out_norm(h)))


class DiffAEStyle(nn.Module):
    """Encoder E (PDAE's) + conditional UNet, both trained from scratch; eval with EMA weights."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        z_dim: int,
        channels: list[int],
        layers_per_block: int = 1,
        attention_head_dim: int = 16,
        encoder_channels: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(image_size, in_channels, z_dim, encoder_channels)
        self.unet = CondUNet(image_size, in_channels, channels, z_dim, layers_per_block, attention_head_dim, dropout)
        self.config: dict[str, Any] = {
            "image_size": image_size,
            "in_channels": in_channels,
            "z_dim": z_dim,
            "channels": list(channels),
            "layers_per_block": layers_per_block,
            "attention_head_dim": attention_head_dim,
            "encoder_channels": list(self.encoder.channels),
            "dropout": dropout,
        }

    def encode(self, x0: Tensor) -> Tensor:
        """x0 (N, C, H, W) in [-1, 1] -> z (N, z_dim)."""
        return self.encoder(x0)

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        return self.unet(x_t, t, z)

    def model_fn(self, z: Tensor):
        """The samplers' callable (x_t, t) -> (eps, None): a conditional DPM, no mean shift."""
        return lambda x_t, t: (self.unet(x_t, t, z), None)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def level_plan(base_channels: list[int], width: int) -> list[int]:
    """The baseline's level plan rescaled so that its first level has `width` channels (e.g. [32,64,64], 40 -> ...)."""
    return [int(round(c * width / base_channels[0])) for c in base_channels]


def matched_channels(
    target_params: int,
    base_channels: list[int],
    image_size: int,
    in_channels: int,
    z_dim: int,
    layers_per_block: int = 1,
    attention_head_dim: int = 16,
    step: int = 8,
) -> list[int]:
    """Level widths (multiples of `step` at the first level) whose CondUNet parameter count is closest to target."""
    best: tuple[float, list[int]] | None = None
    for width in range(step, 8 * base_channels[0] + 1, step):
        chans = level_plan(base_channels, width)
        if chans[-1] % attention_head_dim or any(c <= 0 for c in chans):
            continue
        with torch.device("meta"):
            n = count_parameters(CondUNet(image_size, in_channels, chans, z_dim, layers_per_block, attention_head_dim))
        gap = abs(math.log(n / target_params))
        if best is None or gap < best[0]:
            best = (gap, chans)
    if best is None:
        raise ValueError(f"no width plan of {base_channels} fits attention_head_dim {attention_head_dim}")
    return best[1]


def diffae_loss(schedule: Schedule):
    """Loss callable for `pdae.train.train`: plain mean (eps - eps_theta(x_t, t, E(x0)))^2 (uniform weighting).

    Draws t then noise from the generator exactly as `pdae.fit.pdae_loss` does (without flips), so that with the same
    seed and batch size both models see the same (x0, t, eps) at every step.
    """

    def loss_fn(mods, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        x0 = batch[0]
        n = x0.shape[0]
        t = torch.randint(0, schedule.T, (n,), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = schedule.q_sample(x0, t, noise)
        z = mods["encoder"](x0)
        return F.mse_loss(mods["unet"](x_t, t, z).float(), noise)

    return loss_fn


def train_diffae(
    model: DiffAEStyle,
    schedule: Schedule,
    images: Tensor,
    base: BaseConfig,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint: Path | None,
    progress: bool = False,
    desc: str = "diffae",
) -> tuple[DiffAEStyle, TrainResult]:
    """Train E and the conditional UNet on `images` (N, C, H, W) in [-1, 1] with PDAE's TrainSpec (images, batch,
    lr, EMA, seed) and the shared loop; returns (a copy holding the EMA weights, eval mode; TrainResult).

    A compatible checkpoint is resumed, so calling this with increasing `cfg.images` yields successive checkpoints.
    """
    spec = TrainSpec.from_config(
        cfg,
        base.seed,
        {"model": model.config, "loss": "eps-uniform", "data": list(images.shape)},
    )
    mods = {"encoder": model.encoder, "unet": model.unet}
    result = train(mods, diffae_loss(schedule), (images,), spec, checkpoint, device, desc=desc, progress=progress)
    ema_model = copy.deepcopy(model)
    ema_model.encoder.load_state_dict(result.ema["encoder"].state_dict())
    ema_model.unet.load_state_dict(result.ema["unet"].state_dict())
    return ema_model.eval(), result
