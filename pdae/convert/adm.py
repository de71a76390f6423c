"""guided-diffusion (ADM) and improved-diffusion checkpoints: model flags -> UNetSpec + diffusers scheduler config.

Both codes save a bare UNet state dict (`model.state_dict()`) and describe the model by the command-line flags of
their scripts (e.g. `--image_size 256 --num_channels 256 --learn_sigma True ...`). Their UNet is the network family
of `pdae.convert.spec` (the PDAE / Diff-AE UNets are derived from it) with two more switches: plain (non scale-shift)
time conditioning and convolutional resampling (`resblock_updown False`, improved-diffusion always), both of which
diffusers' UNet2DModel has. A fixed head count over attention levels of different widths (e.g. improved-diffusion's
ImageNet-64 models) has no UNet2DModel config: the folder then records `attention_heads` in pdae_dpm.json and the
DPM adapter sets it on every attention module. What cannot be expressed at all (a first channel multiplier other
than 1, other up-path heads) is refused.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pdae.convert.spec import UNetSpec
from pdae.errors import PdaeError
from pdae.nets.adapter import scheduler_config

NUM_CLASSES = 1000  # both codes' class-conditional models are ImageNet models
# model_and_diffusion_defaults() of each code: what the sampling scripts use for flags not given.
_COMMON = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_learned_sigmas": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "adm": {
        **_COMMON,
        "num_head_channels": -1,
        "channel_mult": "",
        "rescale_timesteps": False,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
    },
    "improved-diffusion": {**_COMMON, "sigma_small": False, "rescale_timesteps": True, "rescale_learned_sigmas": True},
}
# Channel multipliers the scripts pick from the image size (guided-diffusion also accepts an explicit list).
_MULT = {
    "adm": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
    "improved-diffusion": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_flags(text: str, where: str) -> dict[str, Any]:
    """`--key value` pairs (as in the codes' READMEs: MODEL_FLAGS="--image_size 64 ...") -> {key: value string}."""
    tokens = shlex.split(text.replace("\\\n", " "))
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--") or i + 1 >= len(tokens):
            raise PdaeError(f"{where}: expected '--flag value' pairs, got {key!r}; give the model's MODEL_FLAGS.")
        out[key[2:].replace("-", "_")] = tokens[i + 1]
        i += 2
    return out


def read_flags(config: Mapping[str, Any] | str | Path | None, where: str) -> dict[str, Any]:
    """Model flags from a mapping, a flags string ('--image_size 64 ...'), or a YAML/JSON/flags file."""
    if config is None:
        raise PdaeError(f"{where}: give the model flags (--config '--image_size 64 --num_channels 128 ...' or a file)")
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    if not text.lstrip().startswith("--"):
        path = Path(text)
        if not path.is_file():
            raise PdaeError(f"model flags file not found: {path}; pass the flags string or a YAML/JSON file.")
        text = path.read_text()
        where = str(path)
        if not text.lstrip().startswith("--"):
            try:
                data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as err:
                raise PdaeError(f"{path} is neither '--flag value' text nor a YAML/JSON mapping ({err}).") from None
            if not isinstance(data, dict):
                raise PdaeError(f"{path} must hold a mapping of model flags or '--flag value' text.")
            return data
    return parse_flags(text, where)


def _bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in _BOOLS:
        return _BOOLS[str(value).lower()]
    raise PdaeError(f"{where}: flag {key} must be True or False (got {value!r}).")


def _flags(kind: str, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    defaults = DEFAULTS[kind]
    if "large_size" in given or "small_size" in given:
        raise PdaeError(
            f"{where}: large_size/small_size describe a {kind} super-resolution model (conditioned on a low-res "
            "image); PDAE supports unconditional or class-conditional image DPMs."
        )
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise PdaeError(f"{where}: unknown {kind} flags {', '.join(unknown)}; known: {', '.join(sorted(defaults))}.")
    flags = {**defaults, **given}
    for key, default in defaults.items():
        if isinstance(default, bool):
            flags[key] = _bool(flags[key], key, where)
    return flags


def adm_spec(kind: str, given: Mapping[str, Any], where: str) -> tuple[UNetSpec, dict[str, Any], float]:
    """(UNetSpec, diffusers scheduler config, timestep input scale) of an ADM / improved-diffusion model.

    Diffusion flags: `diffusion_steps` T, `noise_schedule` linear (betas 0.1/T..20/T) or cosine
    (= squaredcos_cap_v2), `predict_xstart` (-> prediction_type sample), `rescale_timesteps` (the network is fed
    t * 1000 / T). `learn_sigma` doubles the output channels (the adapter uses the first half). Sampling-only flags
    (timestep_respacing, use_kl, sigma_small, rescale_learned_sigmas, use_fp16, use_checkpoint) do not matter here.
    """
    f = _flags(kind, given, where)
    size, base = int(f["image_size"]), int(f["num_channels"])
    if f.get("channel_mult"):
        mult = tuple(int(m) for m in str(f["channel_mult"]).split(","))
    elif size in _MULT[kind]:
        mult = _MULT[kind][size]
    else:
        sizes = ", ".join(map(str, _MULT[kind]))
        raise PdaeError(f"{where}: {kind} has no default channel_mult for image_size {size} (it knows {sizes}).")
    if any(m != int(m) for m in mult):
        raise PdaeError(
            f"{where}: channel_mult {list(mult)} has fractional multipliers (the 512 px ADM); diffusers' UNet2DModel "
            "needs the first level at the base width, so this model is not supported."
        )
    heads, heads_up = int(f["num_heads"]), int(f["num_heads_upsample"])
    head_channels = int(f.get("num_head_channels", -1))
    if heads_up not in (-1, heads) and head_channels <= 0:
        raise PdaeError(f"{where}: num_heads_upsample {heads_up} != num_heads {heads} is not supported by diffusers")
    pixels = {int(r) for r in str(f["attention_resolutions"]).split(",") if r.strip()}
    T = int(f["diffusion_steps"])
    schedule = str(f["noise_schedule"])
    if schedule == "linear":
        sched = scheduler_config("linear", T, beta_start=0.1 / T, beta_end=20.0 / T)
    elif schedule == "cosine":
        sched = scheduler_config("squaredcos_cap_v2", T)
    else:
        raise PdaeError(f"{where}: noise_schedule '{schedule}' is not supported; use linear or cosine.")
    sched["prediction_type"] = "sample" if f["predict_xstart"] else "epsilon"
    if f["learn_sigma"]:
        sched["variance_type"] = "learned_range"
    spec = UNetSpec(
        in_channels=3,
        out_channels=6 if f["learn_sigma"] else 3,
        base_channels=base,
        channel_mult=tuple(int(m) for m in mult),
        num_res_blocks=int(f["num_res_blocks"]),
        attention_levels=tuple(lv for lv in range(len(mult)) if 2**lv in {size // r for r in pixels}),
        num_heads=heads,
        head_channels=head_channels,
        new_attention_order=bool(f.get("use_new_attention_order", False)),
        dropout=float(f["dropout"]),
        sample_size=size,
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        resblock_updown=bool(f.get("resblock_updown", False)),
        scale_shift=bool(f["use_scale_shift_norm"]),
        adapter_heads=True,
        source=where,
    ).validate()
    return spec, sched, (1000.0 / T if f["rescale_timesteps"] else 1.0)
