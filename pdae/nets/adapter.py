"""The DPM adapter settings: how a pre-trained network's output becomes epsilon, and its beta schedule.

A pre-trained DPM folder (`models/baseline/`) holds a diffusers `UNet2DModel` (config.json + weights), diffusers'
`scheduler_config.json` (beta schedule, `prediction_type`) and, only when needed, `pdae_dpm.json` with what diffusers'
configs cannot say (the class label a class-conditional model runs with; a timestep input scale). `DpmSpec` is the
parsed result; `eps_from_output` turns a raw network output into epsilon (docs/parameterisations.md), so that E, G,
the PDAE loss and every sampler only ever see epsilon.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdae.diffusion import Schedule
from pdae.errors import PdaeError

SCHEDULER_FILE = "scheduler_config.json"
DPM_FILE = "pdae_dpm.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SUPPORTED = (
    "discrete-time DDPM-family models (epsilon / v_prediction / sample prediction; linear, scaled_linear, "
    "squaredcos_cap_v2 or explicit betas)"
)
# diffusers scheduler classes of model families PDAE's discrete VP maths does not cover, with what they are.
_REFUSED_SCHEDULERS = {
    "ScoreSdeVeScheduler": "a score-SDE variance-exploding (VE) model",
    "KarrasVeScheduler": "a variance-exploding (VE) model",
    "ScoreSdeVpScheduler": "a continuous-time score-SDE VP model",
    "EDMEulerScheduler": "an EDM-preconditioned model",
    "EDMDPMSolverMultistepScheduler": "an EDM-preconditioned model",
    "CMStochasticIterativeScheduler": "a consistency model",
}


@dataclass(frozen=True)
class DpmSpec:
    """How to run a pre-trained DPM as eps(x_t, t).

    schedule: its training beta schedule; prediction_type: what the network outputs (epsilon, v_prediction or
    sample = x0); class_label: the label a class-conditional network runs with (None: unconditional network);
    timestep_scale: the network is fed t * timestep_scale (improved-diffusion's rescale_timesteps: 1000 / T);
    attention_heads: a head count for every attention module that the diffusers config cannot express (fixed heads
    over levels of different widths, ADM / improved-diffusion), None = as configured.
    """

    schedule: Schedule = field(default_factory=Schedule.linear)
    prediction_type: str = "epsilon"
    class_label: int | None = None
    timestep_scale: float = 1.0
    attention_heads: int | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise PdaeError(
                f"prediction_type '{self.prediction_type}' is not supported; use one of {', '.join(PREDICTION_TYPES)}."
            )
        if not self.timestep_scale > 0:
            raise PdaeError(f"timestep_scale must be positive (got {self.timestep_scale}).")


def schedule_from_config(cfg: Mapping[str, Any], where: str = "scheduler config") -> Schedule:
    """The beta schedule of a diffusers scheduler config (float64 tables; diffusers computes them in float32).

    Supported: `trained_betas` (explicit list, wins over beta_schedule as in diffusers), `beta_schedule` linear,
    scaled_linear or squaredcos_cap_v2, any `num_train_timesteps`. Refused with one line: VE / EDM / continuous-time
    scheduler classes, other beta schedules, `rescale_betas_zero_snr` (abar_T = 0 has no epsilon form at t = T-1).
    """
    name = str(cfg.get("_class_name", ""))
    if name in _REFUSED_SCHEDULERS:
        raise PdaeError(f"{where}: {name} is {_REFUSED_SCHEDULERS[name]}; PDAE supports {SUPPORTED}.")
    has_sigmas = cfg.get("sigma_min") is not None or cfg.get("sigma_max") is not None
    if has_sigmas and "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
        raise PdaeError(f"{where}: sigma_min/sigma_max describe a VE/EDM model; PDAE supports {SUPPORTED}.")
    if cfg.get("rescale_betas_zero_snr"):
        raise PdaeError(
            f"{where}: rescale_betas_zero_snr (zero terminal SNR) is not supported; PDAE supports {SUPPORTED}."
        )
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
        if betas.ndim != 1 or len(betas) != T:
            raise PdaeError(f"{where}: trained_betas has {betas.numel()} values but num_train_timesteps is {T}.")
        return Schedule(betas)
    kind = str(cfg.get("beta_schedule", "linear"))
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return Schedule.linear(T, start, end)
    if kind == "scaled_linear":
        return Schedule.scaled_linear(T, start, end)
    if kind == "squaredcos_cap_v2":
        return Schedule.cosine(T)
    raise PdaeError(
        f"{where}: beta_schedule '{kind}' is not supported; use {', '.join(BETA_SCHEDULES)} or trained_betas."
    )


def prediction_type_from_config(cfg: Mapping[str, Any], where: str = "scheduler config") -> str:
    kind = str(cfg.get("prediction_type", "epsilon"))
    if kind not in PREDICTION_TYPES:
        raise PdaeError(
            f"{where}: prediction_type '{kind}' is not supported; use one of {', '.join(PREDICTION_TYPES)}."
        )
    return kind


def scheduler_config(schedule_name: str = "linear", T: int = 1000, **overrides: Any) -> dict[str, Any]:
    """A diffusers DDIMScheduler-compatible config: the paper's linear schedule unless `overrides` say otherwise."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": T,
        "beta_schedule": schedule_name,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
        "clip_sample": True,
        "set_alpha_to_one": False,
        "timestep_spacing": "trailing",
        **overrides,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PdaeError(f"{path} is not valid JSON ({err}); re-create the model folder.") from None
    if not isinstance(data, dict):
        raise PdaeError(f"{path} must hold a JSON object; re-create the model folder.")
    return data


def read_dpm_spec(folder: str | Path) -> DpmSpec:
    """The DpmSpec of a model folder: scheduler_config.json (default: linear 1e-4..0.02, T=1000, epsilon) plus
    pdae_dpm.json (class_label, timestep_scale) when present."""
    folder = Path(folder)
    sched_path, extra_path = folder / SCHEDULER_FILE, folder / DPM_FILE
    cfg = _read_json(sched_path) if sched_path.is_file() else {}
    extra = _read_json(extra_path) if extra_path.is_file() else {}
    label = extra.get("class_label")
    return DpmSpec(
        schedule=schedule_from_config(cfg, str(sched_path)),
        prediction_type=prediction_type_from_config(cfg, str(sched_path)),
        class_label=None if label is None else int(label),
        timestep_scale=float(extra.get("timestep_scale", 1.0)),
        attention_heads=None if extra.get("attention_heads") is None else int(extra["attention_heads"]),
    )


def dpm_extra(
    class_label: int | None = None, timestep_scale: float = 1.0, attention_heads: int | None = None
) -> dict[str, Any] | None:
    """The pdae_dpm.json content for these settings, or None when all are defaults (no file is written)."""
    if class_label is None and timestep_scale == 1.0 and attention_heads is None:
        return None
    return {"class_label": class_label, "timestep_scale": float(timestep_scale), "attention_heads": attention_heads}


def set_attention_heads(unet: torch.nn.Module, heads: int) -> None:
    """Run every attention module of `unet` with `heads` heads (same weights; head width = channels / heads)."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            inner = module.to_q.out_features
            if inner % heads:
                raise PdaeError(f"attention_heads {heads} does not divide an attention width of {inner} channels.")
            module.heads = module.sliceable_head_dim = heads
            module.scale = (inner // heads) ** -0.5


def eps_from_output(
    out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, spec: DpmSpec, channels: int
) -> torch.Tensor:
    """epsilon (N, C, H, W) from a raw network output (N, C or 2C, H, W) at x_t (N, C, H, W), integer t (N,).

    A 2C-channel output is a learned-variance model (ADM / improved-diffusion): its first C channels are the mean
    parameterisation, the rest the variance interpolation, which PDAE does not use. v and x0 predictions are mapped
    to epsilon in closed form with the schedule's abar_t (docs/parameterisations.md).
    """
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]
    elif out.shape[1] != channels:
        raise PdaeError(f"the DPM outputs {out.shape[1]} channels for {channels}-channel images; expected C or 2C.")
    if spec.prediction_type == "epsilon":
        return out
    if spec.prediction_type == "v_prediction":
        return spec.schedule.eps_from_v(x_t, t, out)
    return spec.schedule.eps_from_x0(x_t, t, out)
