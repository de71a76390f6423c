"""Architecture description of the official guided-diffusion/BeatGANs UNets and its diffusers equivalent.

The PDAE reference code (`model/unet.py`, config key `denoise_fn_config`) and Diff-AE's DDIM baselines
(`BeatGANsUNetModel`, Lightning `hyper_parameters`) build the same network:

- sinusoidal time embedding of width `base` ordered [cos, sin], Linear(base, E) - SiLU - Linear(E, E);
- `conv_in`, then per level `num_res_blocks` ResBlocks (scale-shift GroupNorm), optional legacy-QKV attention after
  each, and a down-sampling ResBlock (average pool) between levels;
- middle Res - Attn - Res; up path with `num_res_blocks + 1` ResBlocks per level consuming the skips, an
  up-sampling ResBlock (nearest) between levels; output GroupNorm - SiLU - conv.

`UNetSpec` captures that family; `UNetSpec.diffusers_config()` is the matching `UNet2DModel` config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdae.errors import PdaeError

# Both official codes normalise with GroupNorm(32) (Diff-AE: min(32, C)) and torch's default eps.
NORM_GROUPS = 32
NORM_EPS = 1e-5


# One official UNet: channel plan, attention placement (as level indices, 0 = full resolution) and heads.
@dataclass(frozen=True)
class UNetSpec:
    in_channels: int
    out_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    num_heads: int = 1
    head_channels: int = -1  # > 0: fixed channels per head (then num_heads is ignored)
    new_attention_order: bool = False  # QKVAttention (split q/k/v first) instead of QKVAttentionLegacy
    dropout: float = 0.0
    embed_channels: int | None = None  # time-embedding width E; None -> 4 * base_channels
    sample_size: int | None = None
    num_classes: int | None = None
    resblock_updown: bool = True  # False: conv resampling (strided conv down, nearest + conv up)
    scale_shift: bool = True  # False: the time embedding is added after the first conv (no scale-shift norm)
    adapter_heads: bool = False  # True: a fixed head count diffusers cannot express is set by the DPM adapter
    source: str = "config"  # where the spec came from, for error messages

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels per level, highest resolution first."""
        return tuple(int(m * self.base_channels) for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return int(self.embed_channels or 4 * self.base_channels)

    def heads_at(self, channels: int) -> int:
        """Number of attention heads of an attention block on `channels` channels."""
        return channels // self.head_channels if self.head_channels > 0 else self.num_heads

    def attention_head_dim(self) -> int | None:
        """diffusers' single `attention_head_dim` reproducing the heads at every attention block (None = 1 head).

        diffusers derives heads = C // attention_head_dim per block, so a fixed head count with different widths
        (other than one head everywhere) has no exact equivalent: rejected, unless `adapter_heads` (then the config
        says one head and `fixed_heads()` gives the count the adapter sets on every attention module).
        """
        widths = sorted({self.channels[lv] for lv in self.attention_levels} | {self.channels[-1]})
        if self.head_channels > 0:
            return self.head_channels
        if self.num_heads == 1:
            return None
        if len(widths) == 1:
            return widths[0] // self.num_heads
        if self.adapter_heads:
            return None
        raise PdaeError(
            f"{self.source}: num_heads={self.num_heads} on attention widths {widths} gives different head widths, "
            "which diffusers' UNet2DModel (one attention_head_dim) cannot express; such a checkpoint is not supported."
        )

    def fixed_heads(self) -> int | None:
        """Head count the adapter must set on every attention module (pdae_dpm.json `attention_heads`), or None."""
        if self.adapter_heads and self.head_channels <= 0 and self.num_heads > 1 and self.attention_head_dim() is None:
            return self.num_heads
        return None

    def validate(self) -> UNetSpec:
        """Check what the diffusers equivalent needs; returns self."""
        where = self.source
        if not self.channel_mult or any(int(m) <= 0 for m in self.channel_mult):
            raise PdaeError(f"{where}: channel multipliers must be positive (got {list(self.channel_mult)}).")
        if int(self.channel_mult[0]) != 1:
            raise PdaeError(
                f"{where}: the first channel multiplier must be 1 (got {self.channel_mult[0]}): diffusers' time "
                "projection has the width of the first level, the official one the base width."
            )
        if self.num_res_blocks < 1:
            raise PdaeError(f"{where}: num_res_blocks must be >= 1 (got {self.num_res_blocks}).")
        bad = [c for c in self.channels if c % NORM_GROUPS]
        if bad:
            raise PdaeError(f"{where}: channel widths {bad} are not divisible by {NORM_GROUPS} GroupNorm groups.")
        for lv in self.attention_levels:
            c = self.channels[lv]
            if c % self.heads_at(c) or (self.head_channels > 0 and c % self.head_channels):
                raise PdaeError(f"{where}: {c} attention channels do not split into the configured heads.")
        self.attention_head_dim()
        return self

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent diffusers `UNet2DModel`."""
        n = len(self.channel_mult)
        attn = set(self.attention_levels)
        plain_down, plain_up = ("DownBlock2D", "UpBlock2D")
        if self.resblock_updown:
            plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
        down = [("AttnDownBlock2D" if lv in attn else plain_down) for lv in range(n)]  # full resolution first
        up = [("AttnUpBlock2D" if lv in attn else plain_up) for lv in reversed(range(n))]
        resample = "resnet" if self.resblock_updown else "conv"
        cfg: dict[str, Any] = {
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "time_embedding_type": "positional",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "down_block_types": tuple(down),
            "up_block_types": tuple(up),
            "block_out_channels": self.channels,
            "layers_per_block": self.num_res_blocks,
            "downsample_type": resample,
            "upsample_type": resample,
            "dropout": float(self.dropout),
            "act_fn": "silu",
            "attention_head_dim": self.attention_head_dim(),
            "norm_num_groups": NORM_GROUPS,
            # without this diffusers drops the middle attention's GroupNorm under scale_shift; the official has it
            "attn_norm_num_groups": NORM_GROUPS,
            "norm_eps": NORM_EPS,
            "resnet_time_scale_shift": "scale_shift" if self.scale_shift else "default",
            "num_class_embeds": self.num_classes,
        }
        if self.embed_channels is not None and self.embed_channels != 4 * self.base_channels:
            cfg["time_embedding_dim"] = int(self.embed_channels)
        return cfg


def _need(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise PdaeError(f"{where}: missing key '{key}'; give the checkpoint's full model config.")
    return cfg[key]


def _ints(value: Any, key: str, where: str) -> tuple[int, ...]:
    if isinstance(value, str):  # "(1, 2, 4)" written as a string in some YAML files
        value = [v for v in value.strip("()[] ").split(",") if v.strip()]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise PdaeError(f"{where}: '{key}' must be a list of integers (got {value!r}).") from None


def read_yaml(path: Path, what: str = "config") -> dict[str, Any]:
    """Load a YAML mapping safely; missing or malformed files raise PdaeError."""
    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"{what} not found: {path}; pass the model config explicitly (--config).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PdaeError(f"{path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise PdaeError(f"{path} must contain a mapping of config keys.")
    return data


def pdae_spec(config: Mapping[str, Any], where: str = "PDAE config") -> UNetSpec:
    """Spec from the PDAE reference `config.yml` (its `denoise_fn_config` block, or that block's keys directly).

    PDAE's `attention_resolutions` are downsampling factors: 2 means attention at the level of half resolution.
    """
    block = config.get("denoise_fn_config", config)
    if not isinstance(block, Mapping):
        raise PdaeError(f"{where}: 'denoise_fn_config' must be a mapping.")
    if int(block.get("dims", 2)) != 2:
        raise PdaeError(f"{where}: only 2-D models are supported (dims={block.get('dims')}).")
    mult = _ints(_need(block, "channel_multiplier", where), "channel_multiplier", where)
    factors = set(_ints(_need(block, "attention_resolutions", where), "attention_resolutions", where))
    in_ch = int(_need(block, "input_channel", where))
    size = (config.get("train_dataset_config") or {}).get("image_size") if "denoise_fn_config" in config else None
    return UNetSpec(
        in_channels=in_ch,
        out_channels=in_ch * (2 if block.get("learn_sigma", False) else 1),
        base_channels=int(_need(block, "base_channel", where)),
        channel_mult=mult,
        num_res_blocks=int(_need(block, "num_residual_blocks_of_a_block", where)),
        attention_levels=tuple(lv for lv in range(len(mult)) if 2**lv in factors),
        num_heads=int(block.get("num_heads", 1)),
        head_channels=int(block.get("head_channel", -1)),
        new_attention_order=bool(block.get("use_new_attention_order", False)),
        dropout=float(block.get("dropout", 0.0)),
        sample_size=int(size or block.get("image_size") or 0) or None,
        num_classes=int(block["num_class"]) if block.get("num_class") is not None else None,
        source=where,
    ).validate()


# Diff-AE's DDIM-baseline templates (templates.py: ddpm() -> ffhq128_ddpm() and its derivatives), as TrainConfig keys.
_FFHQ128_DDPM = {
    "model_name": "beatgans_ddpm",
    "img_size": 128,
    "net_ch": 128,
    "net_ch_mult": (1, 1, 2, 3, 4),
    "net_attn": (16,),
    "net_beatgans_attn_head": 1,
    "net_beatgans_embed_channels": 512,
    "net_num_res_blocks": 2,
    "net_resblock_updown": True,
    "dropout": 0.1,
}
# celeba64d2c_ddpm() is ffhq128_ddpm() with another dataset: its img_size (which places attention) stays 128.
DIFFAE_PRESETS: dict[str, dict[str, Any]] = {
    "ffhq128": _FFHQ128_DDPM,
    "horse128": _FFHQ128_DDPM,
    "bedroom128": _FFHQ128_DDPM,
    "celeba64": _FFHQ128_DDPM,
}
DIFFAE_PRESET_ALIASES = {
    "ffhq128_ddpm": "ffhq128",
    "ffhq128_ddpm_72m": "ffhq128",
    "ffhq128_ddpm_130m": "ffhq128",
    "horse128_ddpm": "horse128",
    "bedroom128_ddpm": "bedroom128",
    "celeba64d2c_ddpm": "celeba64",
}


def diffae_preset(name: str) -> dict[str, Any] | None:
    """Preset config for a Diff-AE DDIM baseline name (e.g. 'ffhq128' or 'ffhq128_ddpm_130M'), else None."""
    key = name.lower()
    key = DIFFAE_PRESET_ALIASES.get(key, key)
    return dict(DIFFAE_PRESETS[key]) if key in DIFFAE_PRESETS else None


def diffae_spec(config: Mapping[str, Any], where: str = "Diff-AE config") -> UNetSpec:
    """Spec from a Diff-AE config: TrainConfig keys (`net_ch`, ...), its `model_conf`, or BeatGANsUNetConfig keys.

    Diff-AE's `attention_resolutions` are pixel sizes relative to the config's `image_size`.
    """
    nested = config.get("model_conf")
    if isinstance(nested, Mapping) and "model_channels" in nested:
        if str(config.get("model_name", "beatgans_ddpm")) != "beatgans_ddpm":
            raise PdaeError(f"{where}: model_name {config.get('model_name')!r} is not a DDIM baseline.")
        config = config["model_conf"]
    if "model_channels" not in config:
        name = str(config.get("model_name", "beatgans_ddpm"))
        if name != "beatgans_ddpm" or config.get("net_beatgans_resnet_two_cond"):
            raise PdaeError(f"{where}: model_name {name!r} is not a DDIM baseline; only beatgans_ddpm converts.")
        config = {
            "model_channels": _need(config, "net_ch", where),
            "channel_mult": _need(config, "net_ch_mult", where),
            "attention_resolutions": _need(config, "net_attn", where),
            "image_size": _need(config, "img_size", where),
            "num_heads": config.get("net_beatgans_attn_head", 1),
            "embed_channels": config.get("net_beatgans_embed_channels", 512),
            "num_res_blocks": config.get("net_num_res_blocks", 2),
            "num_input_res_blocks": config.get("net_num_input_res_blocks"),
            "resblock_updown": config.get("net_resblock_updown", True),
            "dropout": config.get("dropout", 0.1),
        }
    if config.get("resnet_two_cond") or config.get("enc_out_channels") is not None:
        raise PdaeError(f"{where}: this is a Diff-AE autoencoder, not a DDIM baseline; only beatgans_ddpm converts.")
    if not config.get("resblock_updown", True):
        raise PdaeError(f"{where}: resblock_updown=False (conv resampling) is not supported; BeatGANs uses True.")
    nres = int(config.get("num_res_blocks", 2))
    if config.get("num_input_res_blocks") not in (None, nres):
        raise PdaeError(f"{where}: num_input_res_blocks differs from num_res_blocks; diffusers needs them equal.")
    if int(config.get("dims", 2)) != 2:
        raise PdaeError(f"{where}: only 2-D models are supported.")
    base = int(_need(config, "model_channels", where))
    if config.get("time_embed_channels") not in (None, base):
        raise PdaeError(f"{where}: time_embed_channels must equal model_channels for diffusers' time projection.")
    mult = _ints(_need(config, "channel_mult", where), "channel_mult", where)
    size = int(_need(config, "image_size", where))
    pixels = set(_ints(_need(config, "attention_resolutions", where), "attention_resolutions", where))
    return UNetSpec(
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=nres,
        attention_levels=tuple(lv for lv in range(len(mult)) if size // 2**lv in pixels),
        num_heads=int(config.get("num_heads", 1)),
        head_channels=int(config.get("num_head_channels", -1)),
        new_attention_order=bool(config.get("use_new_attention_order", False)),
        dropout=float(config.get("dropout", 0.1)),
        embed_channels=int(config.get("embed_channels", 512)),
        sample_size=size,
        num_classes=int(config["num_classes"]) if config.get("num_classes") is not None else None,
        source=where,
    ).validate()
