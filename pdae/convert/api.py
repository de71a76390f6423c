"""Convert official pre-trained DPM checkpoints (PDAE, Diff-AE, guided-diffusion/ADM, improved-diffusion) into
diffusers `UNet2DModel` folders with their scheduler config."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DModel

from pdae.convert.adm import adm_spec, read_flags
from pdae.convert.load import safe_torch_load
from pdae.convert.mapping import convert_state_dict
from pdae.convert.spec import DIFFAE_PRESETS, UNetSpec, diffae_preset, diffae_spec, pdae_spec, read_yaml
from pdae.errors import PdaeError
from pdae.nets.adapter import (
    DPM_FILE,
    SCHEDULER_FILE,
    DpmSpec,
    dpm_extra,
    schedule_from_config,
    scheduler_config,
    set_attention_heads,
)
from pdae.nets.backbone import Backbone

Kind = Literal["pdae-official", "diffae", "adm", "improved-diffusion"]
KINDS: tuple[str, ...] = ("pdae-official", "diffae", "adm", "improved-diffusion")
ADM_KINDS = ("adm", "improved-diffusion")
PDAE_FILES = ("checkpoint.pt", "config.yml")
DIFFAE_FILE = "last.ckpt"
# Lightning state_dict entries of a Diff-AE DDIM model that are not the EMA UNet (raw weights, sampling buffers).
_DIFFAE_IGNORED = ("model.", "x_T", "conds_mean", "conds_std")
# A model config: file path, parsed mapping, Diff-AE preset name, or None (found next to / inside the checkpoint).
ConfigArg = Path | Mapping[str, Any] | str | None


def _pdae_source(src: Path, config: ConfigArg) -> tuple[UNetSpec, dict[str, torch.Tensor]]:
    ckpt_path = src / PDAE_FILES[0] if src.is_dir() else src
    if not ckpt_path.is_file():
        raise PdaeError(f"checkpoint not found: {ckpt_path}; give pre-trained-dpms/<name>/ or its checkpoint.pt.")
    if config is None:
        config = ckpt_path.parent / PDAE_FILES[1]
    if isinstance(config, Mapping):
        spec = pdae_spec(config, where="PDAE config")
    else:
        spec = pdae_spec(read_yaml(Path(config), "PDAE config.yml"), where=str(config))
    ckpt = safe_torch_load(ckpt_path, key="ema_denoise_fn")
    if "ema_denoise_fn" in ckpt:
        state = ckpt["ema_denoise_fn"]
    elif "time_embed.0.weight" in ckpt:  # a bare UNet state dict
        state = ckpt
    else:
        keys = ", ".join(sorted(map(str, ckpt))[:5])
        raise PdaeError(f"{ckpt_path} has no 'ema_denoise_fn' entry (found: {keys}); is it a PDAE pre-trained DPM?")
    if not isinstance(state, Mapping):
        raise PdaeError(f"{ckpt_path}: 'ema_denoise_fn' is not a state dict.")
    return spec, dict(state)


def _diffae_spec_for(ckpt_path: Path, ckpt: Mapping[str, Any], config: ConfigArg) -> UNetSpec:
    if isinstance(config, Mapping):
        return diffae_spec(config)
    if isinstance(config, str) and diffae_preset(config) is not None:
        return diffae_spec(diffae_preset(config), where=f"Diff-AE preset '{config}'")
    if config is not None:
        path = Path(config)
        return diffae_spec(read_yaml(path, "Diff-AE config"), where=str(path))
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, Mapping) and ("model_conf" in hparams or "net_ch" in hparams):
        return diffae_spec(hparams, where=f"{ckpt_path} hyper_parameters")
    preset = diffae_preset(ckpt_path.parent.name)
    if preset is not None:
        return diffae_spec(preset, where=f"Diff-AE preset '{ckpt_path.parent.name}'")
    raise PdaeError(
        f"{ckpt_path}: no model config found (no hyper_parameters, folder name is not a known baseline); pass a "
        f"config file or one of the presets {', '.join(DIFFAE_PRESETS)}."
    )


def _diffae_source(src: Path, config: ConfigArg) -> tuple[UNetSpec, dict[str, torch.Tensor]]:
    ckpt_path = src / DIFFAE_FILE if src.is_dir() else src
    ckpt = safe_torch_load(ckpt_path, key="state_dict", allow_lightning=True)
    spec = _diffae_spec_for(ckpt_path, ckpt, config)
    full = ckpt.get("state_dict", ckpt)
    if not isinstance(full, Mapping) or not any(str(k).startswith("ema_model.") for k in full):
        raise PdaeError(f"{ckpt_path} has no 'ema_model.*' weights in its state_dict; is it a Diff-AE checkpoint?")
    state = {k[len("ema_model.") :]: v for k, v in full.items() if k.startswith("ema_model.")}
    other = sorted(k for k in full if not k.startswith("ema_model.") and not k.startswith(_DIFFAE_IGNORED))
    if other:
        raise PdaeError(
            f"{ckpt_path}: unexpected state_dict entries {', '.join(other[:4])}; only DDIM baselines (ema_model.*, "
            "model.*, x_T) convert."
        )
    return spec, state


def _adm_source(src: Path, kind: str, config: ConfigArg) -> tuple[UNetSpec, dict[str, Any], float, dict]:
    if src.is_dir():
        raise PdaeError(f"{src} is a folder; give the {kind} checkpoint file (e.g. 256x256_diffusion_uncond.pt).")
    spec, sched, scale = adm_spec(kind, read_flags(config, f"{kind} model flags"), f"{kind} model flags")
    ckpt = safe_torch_load(src, key="state_dict")
    for key in ("state_dict", "model", "ema"):  # a state dict re-saved under one entry
        if "time_embed.0.weight" not in ckpt and isinstance(ckpt.get(key), Mapping):
            ckpt = dict(ckpt[key])
    if "time_embed.0.weight" not in ckpt:
        keys = ", ".join(sorted(map(str, ckpt))[:5])
        raise PdaeError(f"{src} is not a {kind} UNet state dict (no time_embed.0.weight; found: {keys}).")
    return spec, sched, scale, ckpt


def load_official(
    src: str | os.PathLike, kind: Kind, config: ConfigArg = None
) -> tuple[UNetSpec, dict[str, torch.Tensor]]:
    """Architecture spec and official-key UNet state dict of an official checkpoint (see convert_checkpoint)."""
    src = Path(src)
    if kind == "pdae-official":
        return _pdae_source(src, config)
    if kind == "diffae":
        return _diffae_source(src, config)
    if kind in ADM_KINDS:
        spec, _, _, state = _adm_source(src, kind, config)
        return spec, state
    raise PdaeError(f"unknown checkpoint kind '{kind}'; use one of {', '.join(KINDS)}.")


def convert_checkpoint(
    src: str | os.PathLike,
    kind: Kind,
    config: ConfigArg = None,
    *,
    sample_size: int | None = None,
) -> UNet2DModel:
    """Build a diffusers `UNet2DModel` holding an official pre-trained DPM's (EMA) weights.

    Args:
        src: `pre-trained-dpms/<name>/` or its `checkpoint.pt` (kind "pdae-official": the `ema_denoise_fn` entry),
            or `checkpoints/<name>/` or its `last.ckpt` (kind "diffae": the `ema_model.*` weights).
        kind: "pdae-official" or "diffae".
        config: the model config. PDAE: path to `config.yml` (default: beside the checkpoint) or its dict.
            Diff-AE: a dict or YAML/JSON file of TrainConfig / BeatGANsUNetConfig keys, or a preset name
            (ffhq128, horse128, bedroom128, celeba64); default: the checkpoint's `hyper_parameters`, then the preset
            named like the checkpoint's folder.
        sample_size: image size recorded in the diffusers config; default: from the config, else the trailing
            number of the checkpoint's folder name (pre-trained-dpms/ffhq128 -> 128).

    Returns:
        The model in eval mode, float32 on CPU: (x_t (N, C, H, W) in [-1, 1] scale, t (N,) in 0..999) -> eps_hat.
        Every source key is consumed and every target key filled, else PdaeError.
    """
    spec, state = load_official(src, kind, config)
    if sample_size is None and spec.sample_size is None:
        folder = Path(src) if Path(src).is_dir() else Path(src).parent
        found = re.search(r"(\d+)$", folder.name)
        sample_size = int(found.group(1)) if found else None
    if sample_size is not None:
        spec = dataclasses.replace(spec, sample_size=int(sample_size))
    return _build(spec, state, str(src))


def _build(spec: UNetSpec, state: Mapping[str, torch.Tensor], what: str) -> UNet2DModel:
    model = UNet2DModel(**spec.diffusers_config())
    model.load_state_dict(convert_state_dict(spec, state, model.state_dict(), what=what), strict=True)
    return model.eval()


def convert_dpm(
    src: str | os.PathLike,
    kind: Kind,
    config: ConfigArg = None,
    *,
    sample_size: int | None = None,
) -> tuple[UNet2DModel, dict[str, Any], dict[str, Any]]:
    """(UNet2DModel, its diffusers scheduler config, adapter settings) of an official checkpoint.

    The PDAE and Diff-AE DPMs are epsilon models on the linear 1e-4..0.02 schedule with T = 1000 and integer t.
    ADM / improved-diffusion: `config` holds the model flags (a '--flag value' string, or a YAML/JSON/flags file);
    schedule, prediction type and timestep scale follow from them (pdae.convert.adm.adm_spec). Adapter settings:
    {"timestep_scale": float, "attention_heads": int | None} (pdae.nets.adapter.DpmSpec); attention heads are also
    set on the returned model, so that calling it directly is already correct.
    """
    if kind not in ADM_KINDS:
        unet = convert_checkpoint(src, kind, config, sample_size=sample_size)
        return unet, scheduler_config(), {"timestep_scale": 1.0, "attention_heads": None}
    spec, sched, scale, state = _adm_source(Path(src), kind, config)
    if sample_size is not None and sample_size != spec.sample_size:
        raise PdaeError(f"sample_size {sample_size} contradicts the model flags' image_size {spec.sample_size}.")
    unet = _build(spec, state, str(src))
    heads = spec.fixed_heads()
    if heads is not None:
        set_attention_heads(unet, heads)
    return unet, sched, {"timestep_scale": scale, "attention_heads": heads}


def convert_to_folder(
    src: str | os.PathLike,
    kind: Kind,
    dst: str | os.PathLike,
    config: ConfigArg = None,
    *,
    sample_size: int | None = None,
    class_label: int | None = None,
) -> Path:
    """Convert (as convert_dpm) and save a model folder atomically at `dst`: diffusers config.json + safetensors,
    scheduler_config.json and, when needed, pdae_dpm.json (class label, timestep scale; pdae.nets.adapter).

    The folder is written beside `dst` under a temporary name and renamed into place; an existing `dst` is replaced
    only if it is itself a diffusers model folder (has config.json). A class-conditional model needs `class_label`.
    Returns `dst`.
    """
    dst = Path(dst)
    if dst.exists() and not (dst.is_dir() and (dst / "config.json").is_file()):
        raise PdaeError(f"{dst} exists and is not a diffusers model folder; choose another destination or remove it.")
    model, scheduler, adapter = convert_dpm(src, kind, config, sample_size=sample_size)
    extra = dpm_extra(class_label, **adapter)
    # Refuse what the adapter cannot run (e.g. a class-conditional model without a label) before writing anything.
    Backbone(model, DpmSpec(schedule_from_config(scheduler), scheduler["prediction_type"], **(extra or {})))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    old = dst.with_name(f".{dst.name}.old")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler, indent=2) + "\n")
        if extra:
            (tmp / DPM_FILE).write_text(json.dumps(extra, indent=2) + "\n")
        provenance = {"source": str(Path(src).resolve()), "kind": kind, "converter": "pdae.convert"}
        (tmp / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dst
