"""The frozen pre-trained DPM: an adapter over diffusers' UNet2DModel that exposes its down path (features) and its
middle block + up path (eps from features) separately, plus the up-path "plan" the gradient estimator mirrors.

This is the only module (besides checkpoint converters) that knows diffusers' block internals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from pdae.errors import PdaeError
from pdae.nets.adapter import DpmSpec, eps_from_output, read_dpm_spec, set_attention_heads

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells ids
SUPPORTED_DOWN = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
SUPPORTED_UP = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")


# What one pass of the frozen down path produces; consumed by both the frozen up path and the gradient estimator.
@dataclass(frozen=True)
class Features:
    """Frozen encoder-half activations for a batch (no autograd history).

    Attributes:
        emb: time embedding (N, E), E = the UNet's time-embedding width (4 * channels[0] for our UNets).
        skips: down-path residuals in production order: conv_in output first (full resolution), lowest resolution
            last; the up path pops them from the end.
        h: bottleneck (N, channels[-1], H / 2**(L-1), W / 2**(L-1)) BEFORE the frozen middle block; the frozen and the
            new middle block each start from it (as the reference implementation does).
        x_t, t: the input (N, C, H, W) and integer timesteps (N,) the features were computed at; the frozen output
            needs them to convert v / x0 predictions to epsilon.
    """

    emb: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    h: torch.Tensor
    x_t: torch.Tensor | None = None
    t: torch.Tensor | None = None


# One up-path level: the gradient estimator builds the same shape from its own (z-conditioned) layers.
@dataclass(frozen=True)
class UpBlockPlan:
    """Channel plan of one frozen up block.

    in_channels: hidden channels entering the block; out_channels: channels of every ResBlock output;
    skip_channels: channels of the skip each ResBlock concatenates, in consumption order (popped from the end of
    Features.skips); attention_heads: heads of the attention after every ResBlock (0 = no attention);
    upsample: "resnet" (ResBlock with nearest x2 inside), "conv" (nearest x2 then 3x3 conv) or None.
    """

    in_channels: int
    out_channels: int
    skip_channels: tuple[int, ...]
    attention_heads: int
    upsample: str | None


@dataclass(frozen=True)
class UpPathPlan:
    """Everything the gradient estimator needs to mirror the frozen middle block + up path."""

    image_channels: int
    emb_dim: int
    mid_channels: int
    mid_attention_heads: int
    blocks: tuple[UpBlockPlan, ...]
    norm_groups: int
    norm_eps: float


def _timesteps(t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    # Same broadcasting as UNet2DModel.forward so that results are bitwise identical to calling the UNet.
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.long, device=device)
    elif t.ndim == 0:
        t = t[None].to(device)
    return t * torch.ones(batch, dtype=t.dtype, device=t.device)


class Backbone(nn.Module):
    """A frozen diffusers UNet2DModel seen as an epsilon predictor, split into features / eps_from_features.

    `dpm` says how the network is run and read (pdae.nets.adapter.DpmSpec): its output (epsilon, v or x0; C or 2C
    channels for learned variance) is converted to epsilon, a class-conditional network runs with `dpm.class_label`,
    and the timestep input is scaled by `dpm.timestep_scale`. Default: an unconditional epsilon model.

    The wrapped UNet is put in eval mode with requires_grad False and stays in eval mode (``train()`` is a no-op).
    No computation builds an autograd graph: ``features`` runs under ``torch.no_grad()`` and returns ordinary tensors
    (trainable layers may consume them and be back-propagated through; inference-mode tensors could not be saved for
    backward), ``eps_from_features`` runs in ``torch.inference_mode()`` and returns an ordinary tensor.

    Supported UNets: positional or learned time embedding, no class embedding, down blocks
    DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D, up blocks UpBlock2D / AttnUpBlock2D /
    ResnetUpsampleBlock2D, UNetMidBlock2D or no middle block (e.g. google/ddpm-* and our BeatGANs-style UNets).
    """

    def __init__(self, unet: UNet2DModel, dpm: DpmSpec | None = None) -> None:
        super().__init__()
        dpm = dpm if dpm is not None else DpmSpec()
        _check_supported(unet, dpm)
        if dpm.attention_heads is not None:
            set_attention_heads(unet, dpm.attention_heads)
        unet.eval()
        unet.requires_grad_(False)
        self.unet = unet
        self.dpm = dpm
        self.plan = _make_plan(unet)

    def train(self, mode: bool = True) -> Backbone:
        """The frozen DPM always stays in eval mode (dropout off)."""
        return super().train(False)

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def fingerprint(self) -> dict:
        """A small description of the architecture, stored with trained PDAE weights to catch mismatched backbones."""
        cfg = self.unet.config
        return {
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "block_out_channels": [int(c) for c in cfg.block_out_channels],
            "layers_per_block": int(cfg.layers_per_block),
            "emb_dim": self.plan.emb_dim,
        }

    @torch.no_grad()
    def features(self, x_t: torch.Tensor, t: torch.Tensor | int) -> Features:
        """Run the time embedding and the down path once.

        Args:
            x_t: noisy images (N, C, H, W), roughly [-1, 1] scale.
            t: integer timesteps in [0, T) as (N,) or a scalar.
        """
        unet = self.unet
        x_in = x_t
        if unet.config.center_input_sample:
            x_t = 2 * x_t - 1.0
        ts = _timesteps(t, x_t.shape[0], x_t.device)
        model_t = ts if self.dpm.timestep_scale == 1.0 else ts * self.dpm.timestep_scale
        emb = unet.time_embedding(unet.time_proj(model_t).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            labels = torch.full((x_t.shape[0],), int(self.dpm.class_label), dtype=torch.long, device=x_t.device)
            emb = emb + unet.class_embedding(labels).to(dtype=emb.dtype)
        h = unet.conv_in(x_t)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in unet.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        return Features(emb=emb, skips=skips, h=h, x_t=x_in, t=ts)

    def eps_from_features(self, feats: Features) -> torch.Tensor:
        """Frozen middle block + up path + output head: the pre-trained noise prediction eps_hat (N, C, H, W).

        The raw output is converted to epsilon (pdae.nets.adapter.eps_from_output). Runs in inference mode (cheaper
        than no_grad); the result is returned as an ordinary tensor.
        """
        unet = self.unet
        with torch.inference_mode():
            emb = feats.emb
            h = unet.mid_block(feats.h, emb) if unet.mid_block is not None else feats.h
            skips = feats.skips
            for block in unet.up_blocks:
                n = len(block.resnets)
                h = block(h, skips[-n:], emb)
                skips = skips[:-n]
            out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
            if self.dpm.prediction_type != "epsilon" and (feats.x_t is None or feats.t is None):
                raise PdaeError("Features without x_t / t cannot be converted to epsilon; use Backbone.features.")
            eps = eps_from_output(out, feats.x_t, feats.t, self.dpm, self.in_channels)
        return eps.clone() if not torch.is_inference_mode_enabled() else eps

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eps_hat = unet(x, t).sample, computed through features / eps_from_features (no grad)."""
        return self.eps_from_features(self.features(x, t))


def _check_supported(unet: UNet2DModel, dpm: DpmSpec) -> None:
    if not isinstance(unet, UNet2DModel):
        found = type(unet).__name__
        raise PdaeError(f"the backbone must be a diffusers UNet2DModel (an unconditional image DPM), got {found}.")
    cfg = unet.config
    what = f"UNet2DModel (down blocks {list(cfg.down_block_types)})"
    if unet.class_embedding is not None:
        n = getattr(unet.class_embedding, "num_embeddings", None)
        if n is None or cfg.class_embed_type is not None:
            raise PdaeError(
                f"{what} has a '{cfg.class_embed_type}' class embedding; only label embeddings are supported."
            )
        if dpm.class_label is None:
            raise PdaeError(
                f"{what} is class-conditional ({n} labels); choose the label it runs with: baseline.class_label "
                "(or --class-label), e.g. its null label if it was trained with one."
            )
        if not 0 <= dpm.class_label < n:
            raise PdaeError(f"class label {dpm.class_label} is outside the model's {n} labels (0..{n - 1}).")
    elif dpm.class_label is not None:
        raise PdaeError(f"class label {dpm.class_label} given but {what} is unconditional; remove the label.")
    if cfg.time_embedding_type not in ("positional", "learned"):
        raise PdaeError(
            f"{what} uses a '{cfg.time_embedding_type}' time embedding (a score-SDE / continuous-time model); "
            "PDAE supports discrete-time DDPM-family UNets with positional or learned time embeddings."
        )
    if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise PdaeError(
            f"{what} outputs {cfg.out_channels} channels for {cfg.in_channels}-channel inputs; expected C (epsilon, "
            "v or x0) or 2C (learned variance)."
        )
    for block in unet.down_blocks:
        if type(block).__name__ not in SUPPORTED_DOWN:
            raise PdaeError(f"{what}: down block {type(block).__name__} is not supported (use {SUPPORTED_DOWN}).")
    for block in unet.up_blocks:
        if type(block).__name__ not in SUPPORTED_UP:
            raise PdaeError(f"{what}: up block {type(block).__name__} is not supported (use {SUPPORTED_UP}).")


def _heads(block: nn.Module) -> int:
    attns = getattr(block, "attentions", None)
    if not attns or attns[0] is None:
        return 0
    return int(attns[0].heads)


def _make_plan(unet: UNet2DModel) -> UpPathPlan:
    # Channels of every down-path residual, in production order (mirrors what `features` returns).
    skip_ch = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        skip_ch += [r.out_channels for r in block.resnets]
        if block.downsamplers is not None:
            skip_ch.append(int(block.downsamplers[0].out_channels))
    hidden = int(unet.config.block_out_channels[-1])
    mid_heads = _heads(unet.mid_block) if unet.mid_block is not None else 0
    mid_channels = hidden
    blocks = []
    for block in unet.up_blocks:
        block_in, used = hidden, []
        for resnet in block.resnets:
            skip = skip_ch.pop()
            if resnet.in_channels != hidden + skip:
                raise PdaeError(f"unexpected UNet2DModel up-path layout ({resnet.in_channels} != {hidden} + {skip}).")
            used.append(skip)
            hidden = int(resnet.out_channels)
        if block.upsamplers is None:
            upsample = None
        elif isinstance(block.upsamplers[0], ResnetBlock2D):
            upsample = "resnet"
        else:
            upsample = "conv"
        blocks.append(UpBlockPlan(block_in, hidden, tuple(used), _heads(block), upsample))
    if skip_ch:
        raise PdaeError(f"unexpected UNet2DModel layout: {len(skip_ch)} down-path residuals are never consumed.")
    emb_dim = int(unet.time_embedding.linear_2.out_features)
    return UpPathPlan(
        image_channels=int(unet.config.in_channels),
        emb_dim=emb_dim,
        mid_channels=mid_channels,
        mid_attention_heads=mid_heads,
        blocks=tuple(blocks),
        norm_groups=int(unet.config.norm_num_groups or 32),
        norm_eps=float(unet.config.norm_eps),
    )


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' logger (e.g. "Defaulting to unsafe serialization") around a load: failures raise instead."""
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def load_backbone(path: str | os.PathLike, subfolder: str | None = None) -> Backbone:
    """Load a frozen Backbone from a diffusers UNet2DModel folder (config.json + weights), local files only.

    The folder's scheduler_config.json / pdae_dpm.json give its DpmSpec (pdae.nets.adapter.read_dpm_spec).

    `path` may also be a hub id already in the local cache (e.g. google/ddpm-cifar10-32); nothing is downloaded.
    A missing folder, a folder without a readable UNet2DModel or an unsupported architecture raise PdaeError.
    """
    where = Path(path) / subfolder if subfolder else Path(path)
    missing = PdaeError(
        f"baseline model not found: {path} is neither a folder nor a cached hub id; "
        "run the baseline stage (dvc repro) or fix the path."
    )
    if not Path(path).exists() and not _HUB_ID.fullmatch(str(path)):
        raise missing  # not a folder and not shaped like owner/name: no hub lookup (and none of its warnings)
    if Path(path).exists() and not (where / "config.json").is_file():
        raise PdaeError(f"no diffusers UNet2DModel in {where} (config.json missing); run the baseline stage first.")
    try:
        with warnings.catch_warnings(), quiet_diffusers():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers -> huggingface_hub
            unet = UNet2DModel.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        if not Path(path).exists():
            raise missing from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PdaeError(f"cannot load a UNet2DModel from {where} ({first}); re-create it or fix the path.") from err
    return Backbone(unet.float(), read_dpm_spec(where) if Path(where).is_dir() else None)
