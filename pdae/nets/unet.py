"""The baseline DPM architecture: a BeatGANs-style (guided-diffusion / Diff-AE) UNet as a diffusers UNet2DModel."""

from __future__ import annotations

import math

from diffusers import UNet2DModel


def norm_groups(channels: list[int] | tuple[int, ...], max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm group count that divides every channel count of a UNet (and every sum of them).

    Chosen as in guided-diffusion at its base width of 128 (32 groups of 4 channels): as many groups as possible up to
    `max_groups` while keeping at least `min_group_size` channels per group, e.g. [32, 64, 64] -> 8, [128, 256] -> 32.
    """
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    best = 1
    for cand in range(1, max_groups + 1):
        if g % cand == 0 and g // cand >= min_group_size:
            best = cand
    return best


def build_unet(
    image_size: int,
    in_channels: int,
    channels: list[int] | tuple[int, ...],
    layers_per_block: int = 1,
    attention_head_dim: int = 16,
    dropout: float = 0.0,
) -> UNet2DModel:
    """A randomly initialised epsilon-prediction UNet in the style of the paper's baselines (BeatGANs/ADM).

    - ResBlocks with scale-shift time conditioning (GN(h) * (1 + s) + b), resnet down- and up-sampling blocks;
    - attention (with its own GroupNorm) only at the lowest resolution and in the middle block;
    - sinusoidal time embedding [cos, sin] without frequency shift, time-embedding width 4 * channels[0].

    Args:
        image_size: side length H = W; must be divisible by 2 ** (len(channels) - 1).
        in_channels: image channels C (the output has C channels too: predicted noise).
        channels: output channels per resolution level, highest resolution first (e.g. [32, 64, 64]).
        layers_per_block: ResBlocks per level on the down path (the up path has one more).
        attention_head_dim: channels per attention head (must divide channels[-1]).
        dropout: dropout inside ResBlocks.

    Returns:
        A diffusers UNet2DModel mapping (x_t in (N, C, H, W), t in (N,) ints) -> eps_hat (N, C, H, W).
    """
    channels = [int(c) for c in channels]
    levels = len(channels)
    if levels < 1:
        raise ValueError("channels must list at least one resolution level")
    if image_size % (2 ** (levels - 1)):
        raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1} (levels of {channels})")
    if channels[-1] % attention_head_dim:
        raise ValueError(f"attention_head_dim {attention_head_dim} must divide the lowest-level width {channels[-1]}")
    groups = norm_groups(channels)
    down = ["ResnetDownsampleBlock2D"] * (levels - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["ResnetUpsampleBlock2D"] * (levels - 1)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        downsample_type="resnet",
        upsample_type="resnet",
        dropout=dropout,
        act_fn="silu",
        attention_head_dim=attention_head_dim,
        norm_num_groups=groups,
        # diffusers drops the middle attention's GroupNorm under scale_shift unless this is set; BeatGANs has it.
        attn_norm_num_groups=groups,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift",
    )
