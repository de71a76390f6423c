"""The gradient estimator G(x_t, z, t) (docs/method.md §2): a new, z-conditioned middle block and up path that
mirror the frozen UNet's channel plan and consume the frozen down path's features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pdae.nets.backbone import Features, UpBlockPlan, UpPathPlan
from pdae.nets.layers import SelfAttention, group_norm, groups_for, modulate_twice, upsample_conv3x3, zero_module


# ResBlock conditioned on time and z by "scale and shift twice": (1 + s_z) * (GN(h) * (1 + s_t) + b_t) + b_z.
class ZResBlock(nn.Module):
    """z-ResBlock.

    h = conv1(SiLU(GN(x))) (nearest x2 before conv1 when `up`, computed as phase convolutions);
    (s_t, b_t) = Linear_t(SiLU(t_emb)); (s_z, b_z) = Linear_z(SiLU(z_emb));
    h = (1 + s_z) * (GN(h) * (1 + s_t) + b_t) + b_z;
    return shortcut(x) + conv2(Dropout(SiLU(h))) with conv2 zero-initialised, shortcut = identity or 1x1 conv.

    Up-path blocks take x = cat(hidden, skip) with `skip` a frozen down-path feature map (skip_ch > 0). conv1 and the
    shortcut are split into a hidden and a skip convolution (backward computes no input gradient for the skip
    channels). skip_norm "separate" (default): the two parts are normalised separately (GroupNorm groups never
    straddle them) and the frozen part without a learnable affine, so its activation is a constant. skip_norm
    "joint": one GroupNorm(groups) with affine over the concatenation, as the official code's shift blocks do; the
    block is then exactly the one above applied to cat(hidden, skip).

    forward(x (N, in, H, W), t_act (N, E), z_act (N or 1, E), skip (N, skip_ch, H, W) or None) -> (N, out, H', W'),
    H' = 2H when `up`. t_act / z_act are SiLU(t_emb) / SiLU(z_emb), computed once per G forward.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,
        up: bool = False,
        groups: int = 32,
        eps: float = 1e-5,
        skip_ch: int = 0,
        skip_norm: str = "separate",
    ) -> None:
        super().__init__()
        if up and skip_ch:
            raise ValueError("an upsampling z-ResBlock takes no skip input")
        if skip_norm not in ("separate", "joint"):
            raise ValueError(f"skip_norm must be 'separate' or 'joint', got '{skip_norm}'")
        self.up, self.eps, self.in_ch = up, eps, in_ch
        self.joint = skip_norm == "joint" and skip_ch > 0
        self.norm1 = group_norm(in_ch + skip_ch if self.joint else in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.skip_groups = groups_for(skip_ch, groups) if skip_ch else 0
        self.conv1_skip = nn.Conv2d(skip_ch, out_ch, 3, padding=1, bias=False) if skip_ch else None
        self.t_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.z_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, groups, eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        identity = in_ch == out_ch and not skip_ch
        self.shortcut = nn.Identity() if identity else nn.Conv2d(in_ch, out_ch, 1)
        self.shortcut_skip = nn.Conv2d(skip_ch, out_ch, 1, bias=False) if skip_ch else None

    def forward(
        self, x: torch.Tensor, t_act: torch.Tensor, z_act: torch.Tensor, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.joint:  # one GroupNorm over cat(hidden, skip), then the split convolutions
            a = F.silu(self.norm1(torch.cat([x, skip.to(x.dtype)], dim=1)))
            h, a_skip = self.conv1(a[:, : self.in_ch]), a[:, self.in_ch :]
            out = self.shortcut(x) + self.shortcut_skip(skip)
            h = h + self.conv1_skip(a_skip)
            h = modulate_twice(h, self.norm2, self.t_proj(t_act), self.z_proj(z_act))
            return out + self.conv2(self.dropout(F.silu(h)))
        h = F.silu(self.norm1(x))
        if self.up:
            h = upsample_conv3x3(h, self.conv1.weight, self.conv1.bias)
            out = F.interpolate(self.shortcut(x), scale_factor=2.0, mode="nearest")  # 1x1 conv commutes with it
        else:
            h = self.conv1(h)
            out = self.shortcut(x)
        if self.conv1_skip is not None:
            a_skip = F.silu(F.group_norm(skip, self.skip_groups, eps=self.eps))
            h = h + self.conv1_skip(a_skip)
            out = out + self.shortcut_skip(skip)
        h = modulate_twice(h, self.norm2, self.t_proj(t_act), self.z_proj(z_act))
        return out + self.conv2(self.dropout(F.silu(h)))


# Nearest x2 then 3x3 conv: mirrors diffusers' Upsample2D for UNets that upsample with a conv.
class UpsampleConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t_act: torch.Tensor, z_act: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3(x, self.conv.weight, self.conv.bias)


class UpLevel(nn.Module):
    """One up-path level of G: z-ResBlocks (each after concatenating one skip), optional attention after each,
    optional upsampler."""

    def __init__(
        self, plan: UpBlockPlan, emb_dim: int, dropout: float, groups: int, eps: float, skip_norm: str = "separate"
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        hidden = plan.in_channels
        for skip in plan.skip_channels:
            block = ZResBlock(hidden, plan.out_channels, emb_dim, dropout, False, groups, eps, skip, skip_norm)
            self.resnets.append(block)
            hidden = plan.out_channels
        heads = plan.attention_heads
        self.attentions = nn.ModuleList(
            [SelfAttention(hidden, heads, groups, eps) for _ in plan.skip_channels] if heads else []
        )
        if plan.upsample == "resnet":
            self.upsampler: nn.Module | None = ZResBlock(hidden, hidden, emb_dim, dropout, True, groups, eps)
        elif plan.upsample == "conv":
            self.upsampler = UpsampleConv(hidden)
        else:
            self.upsampler = None


class GradientEstimator(nn.Module):
    """G: predicts the mean shift from frozen features and z. Randomly initialised; G == 0 at initialisation.

    Built from a Backbone's UpPathPlan: z_emb = Linear(z_dim -> E); middle block (z-ResBlock, attention,
    z-ResBlock); an up path with exactly the frozen up path's channel plan, consuming the same skips; output head
    GroupNorm -> SiLU -> zero-initialised 3x3 conv -> image channels. Every residual branch's last layer is zero, too.

    Args:
        plan: the frozen UNet's up-path plan (Backbone.plan).
        z_dim: size of the semantic code z.
        dropout: dropout inside the z-ResBlocks.
        skip_norm: "separate" | "joint": how up-path blocks normalise cat(hidden, frozen skip) (see ZResBlock).

    Setting `grad_checkpoint = True` makes forward passes that record gradients keep only each block's inputs and
    recompute the block in backward (less activation memory, one more forward of G per step; same gradients).
    """

    grad_checkpoint: bool = False

    def __init__(self, plan: UpPathPlan, z_dim: int, dropout: float = 0.0, skip_norm: str = "separate") -> None:
        super().__init__()
        self.plan, self.z_dim = plan, z_dim
        e, c, g, eps = plan.emb_dim, plan.mid_channels, plan.norm_groups, plan.norm_eps
        self.z_emb = nn.Linear(z_dim, e)
        self.mid = nn.ModuleList(
            [
                ZResBlock(c, c, e, dropout, False, g, eps),
                SelfAttention(c, plan.mid_attention_heads or 1, g, eps),
                ZResBlock(c, c, e, dropout, False, g, eps),
            ]
        )
        self.levels = nn.ModuleList([UpLevel(b, e, dropout, g, eps, skip_norm) for b in plan.blocks])
        last = plan.blocks[-1].out_channels if plan.blocks else c
        self.out_norm = group_norm(last, g, eps)
        self.out_conv = zero_module(nn.Conv2d(last, plan.image_channels, 3, padding=1))

    def _run(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, feats: Features, z: torch.Tensor) -> torch.Tensor:
        """feats: frozen features of x_t (Backbone.features); z: (N, z_dim) or (1, z_dim) -> g: (N, C, H, W)."""
        t_act = F.silu(feats.emb)
        z_act = F.silu(self.z_emb(z.to(feats.emb.dtype)))
        res0, attn, res1 = self.mid
        h = self._run(res1, self._run(attn, self._run(res0, feats.h, t_act, z_act)), t_act, z_act)
        skips = feats.skips
        for level in self.levels:
            for i, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, t_act, z_act, skips[-1])
                skips = skips[:-1]
                if len(level.attentions):
                    h = self._run(level.attentions[i], h)
            if level.upsampler is not None:
                h = self._run(level.upsampler, h, t_act, z_act)
        return self.out_conv(F.silu(self.out_norm(h)))
