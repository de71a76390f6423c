"""The baseline (frozen) DPM: acquire it from one of several sources, save it in diffusers format, score it.

Sources (`baseline.source`): `train` pre-trains a BeatGANs-style UNet2DModel on the prepared train split (the
embedded default, offline); `diffusers` loads a hub id or a local folder; `url` downloads a diffusers folder
archive or a single safetensors file with sha256 verification; `pdae-official` / `diffae` / `adm` /
`improved-diffusion` convert the official checkpoints (`pdae.convert`). Every source ends as `models/baseline/` =
`UNet2DModel.save_pretrained` + the model's own `scheduler_config.json` (schedule, prediction type) + `pdae_dpm.json`
when needed (class label, timestep scale, attention heads; `pdae.nets.adapter`), written atomically (temp folder,
then rename).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor

from pdae.config import BaseConfig, BaselineConfig
from pdae.diffusion import Schedule
from pdae.errors import PdaeError, brief
from pdae.nets.adapter import (
    DPM_FILE,
    SCHEDULER_FILE,
    DpmSpec,
    dpm_extra,
    prediction_type_from_config,
    read_dpm_spec,
    schedule_from_config,
    scheduler_config,
)
from pdae.nets.backbone import Backbone, quiet_diffusers
from pdae.train import TrainResult, TrainSpec, train


def load_schedule(model_dir: str | Path) -> Schedule:
    """The DPM's beta schedule from its scheduler_config.json (linear 1e-4..0.02, T=1000 when absent)."""
    return read_dpm_spec(model_dir).schedule


def save_baseline(
    unet: UNet2DModel,
    out_dir: str | Path,
    schedule_name: str = "linear",
    scheduler: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `unet` (diffusers format, safetensors) and its scheduler config to `out_dir` atomically.

    `scheduler`: the model's own diffusers scheduler config (default: scheduler_config(schedule_name));
    `extra`: pdae_dpm.json content (class label, timestep scale; see pdae.nets.adapter), written when given.
    The folder must load as a Backbone (so a class-conditional model without a label is refused before writing).
    """
    out_dir = Path(out_dir)
    cfg = dict(scheduler) if scheduler is not None else scheduler_config(schedule_name)
    Backbone(unet, DpmSpec(schedule_from_config(cfg), prediction_type_from_config(cfg), **(extra or {})))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if extra:
            (tmp / DPM_FILE).write_text(json.dumps(extra, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _unet_subfolder(source: str | Path, local_only: bool) -> str | None:
    """'unet' for a diffusers pipeline layout (model in unet/), else None; refuses non-UNet2DModel classes."""
    for sub in (None, "unet"):
        try:
            cfg = UNet2DModel.load_config(str(source), subfolder=sub, local_files_only=local_only)
        except (OSError, ValueError):
            continue
        found = cfg.get("_class_name", "UNet2DModel")
        if found != "UNet2DModel":
            raise PdaeError(
                f"'{source}' holds a {found}, not a UNet2DModel; PDAE supports unconditional (or class-conditional "
                "with a chosen label) diffusers UNet2DModel DPMs, ADM/guided-diffusion and improved-diffusion."
            )
        return sub
    return None


def load_unet(source: str | Path, local_only: bool = True) -> UNet2DModel:
    """Load a diffusers UNet2DModel from a folder (or its unet/ subfolder) or (online) hub id; one-line PdaeError."""
    path = Path(source)
    if local_only and not path.exists() and "/" not in str(source):
        raise PdaeError(f"baseline model folder not found: {source} — run `dvc repro baseline` or fix baseline.path.")
    sub = _unet_subfolder(source, local_only)
    try:
        with quiet_diffusers():
            unet = UNet2DModel.from_pretrained(
                str(source), subfolder=sub, local_files_only=local_only or path.is_dir()
            )
    except (OSError, ValueError) as err:
        raise PdaeError(
            f"cannot load a diffusers UNet2DModel from '{source}' ({brief(err)}); "
            "pass a folder with config.json + diffusion_pytorch_model.safetensors or a reachable hub id."
        ) from None
    return unet.eval()


def load_scheduler_config(source: str | Path, local_only: bool = True) -> dict[str, Any]:
    """The diffusers scheduler config next to a model (scheduler_config.json or scheduler/), validated.

    Without one the paper's linear epsilon schedule is assumed (scheduler_config()).
    """
    from diffusers import DDPMScheduler

    places = [(str(source), None), (str(source), "scheduler")]
    if Path(source).name == "unet":  # the UNet folder of a pipeline: its scheduler is a sibling
        places.append((str(Path(source).parent), "scheduler"))
    for folder, sub in places:
        try:
            cfg = dict(DDPMScheduler.load_config(folder, subfolder=sub, local_files_only=local_only))
        except (OSError, ValueError):
            continue
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
        where = f"{source} scheduler config"
        schedule_from_config(cfg, where)
        prediction_type_from_config(cfg, where)
        return cfg
    return scheduler_config()


def eps_loss(schedule: Schedule):
    """Plain epsilon-prediction loss for pre-training a DPM: mean (eps - eps_theta(x_t, t))^2."""

    def loss_fn(modules, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        x0 = batch[0]
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = schedule.q_sample(x0, t, noise)
        return F.mse_loss(modules["unet"](x_t, t).sample.float(), noise)

    return loss_fn


def pretrain_baseline(
    images: Tensor,
    base: BaseConfig,
    cfg: BaselineConfig,
    device: torch.device,
    checkpoint: Path | None,
    run: Any | None = None,
    progress: bool = True,
) -> tuple[UNet2DModel, TrainResult]:
    """Pre-train the embedded baseline DPM on `images` (N, C, H, W) in [-1, 1]; returns the EMA UNet."""
    from pdae.nets.unet import build_unet

    try:
        unet = build_unet(
            base.image_size, images.shape[1], cfg.channels, cfg.layers_per_block, cfg.attention_head_dim, cfg.dropout
        )
    except ValueError as err:
        raise PdaeError(f"params.yaml: baseline.channels/attention_head_dim: {err}.") from None
    spec = TrainSpec.from_config(
        cfg,
        base.seed,
        {"unet": unet.config, "data": list(images.shape)},
    )
    result = train(
        {"unet": unet},
        eps_loss(Schedule.linear(1000)),
        (images,),
        spec,
        checkpoint,
        device,
        run,
        desc="baseline",
        progress=progress,
    )
    return result.ema["unet"].cpu(), result


def _fetch(cfg: BaselineConfig, downloads: Path) -> Path:
    """Local path of the configured source: baseline.path, or baseline.url downloaded with sha256 verification."""
    if cfg.path:
        path = Path(cfg.path)
        if cfg.source != "diffusers" and not path.exists():
            raise PdaeError(f"baseline.path not found: {path} — download the checkpoint there or fix the path.")
        return path
    from pdae.download import download

    name = cfg.url.rstrip("/").split("/")[-1].split("?")[0] or "checkpoint"
    return download(cfg.url, downloads / name, cfg.sha256)


def _unpack_diffusers(archive: Path, work: Path) -> Path:
    """A downloaded diffusers folder: a .zip/.tar(.gz) archive holding config.json (+ weights).

    Unpacked by pdae.download.extract_archive (no path escape, no links, bounded size) into a temp folder that is
    renamed into place only when complete. An archive that cannot be unpacked is deleted with the temp folder.
    """
    from pdae.download import extract_archive

    if archive.is_dir():
        return archive
    target = work / (archive.name + ".d")
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=work))
        try:
            extract_archive(archive, tmp)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            archive.unlink(missing_ok=True)  # verified but unusable: keeping it would only fail again
            raise
    hits = sorted(target.rglob("config.json"))
    if not hits:
        raise PdaeError(f"{archive} holds no config.json; expected a diffusers UNet2DModel folder.")
    return hits[0].parent


def _foreign_unet(cfg: BaselineConfig, downloads: Path) -> tuple[UNet2DModel, dict[str, Any] | None, dict]:
    """(UNet, scheduler config, adapter dict) of a `url` or converted source; a failure leaves no empty downloads
    folder."""
    from pdae.download import remove_empty_dirs

    created = [d for d in (downloads, *downloads.parents) if not d.exists()]
    try:
        if cfg.source == "url":
            folder = _unpack_diffusers(_fetch(cfg, downloads), downloads)
            return load_unet(folder), load_scheduler_config(folder), {}
        from pdae.convert import convert_dpm

        return convert_dpm(_fetch(cfg, downloads), cfg.source, cfg.config, sample_size=cfg.sample_size)
    except BaseException:
        remove_empty_dirs(created)
        raise


def acquire_baseline(
    cfg: BaselineConfig,
    base: BaseConfig,
    train_images: Tensor,
    out_dir: str | Path,
    device: torch.device,
    run: Any | None = None,
    work_dir: str | Path = "checkpoints",
) -> tuple[dict[str, Any], list]:
    """Produce `out_dir` from `cfg.source`; returns (metrics, loss history). Training checkpoints live in work_dir."""
    work = Path(work_dir)
    history: list = []
    metrics: dict[str, Any] = {"source": cfg.source}
    if cfg.source == "train":
        ckpt = work / "baseline" / "state.safetensors"
        unet, result = pretrain_baseline(train_images, base, cfg, device, ckpt, run)
        history = result.history
        metrics.update(
            train_images_seen=result.images_seen,
            train_seconds=round(result.seconds, 1),
            train_images_per_second=result.images_per_second,
            final_loss=history[-1][2] if history else None,
        )
    scheduler, adapter = None, {}
    if cfg.source == "diffusers":
        local = Path(cfg.path).exists()
        unet, scheduler = load_unet(cfg.path, local_only=local), load_scheduler_config(cfg.path, local_only=local)
    elif cfg.source != "train":
        unet, scheduler, adapter = _foreign_unet(cfg, work / "downloads")
    if unet.config.sample_size != base.image_size or unet.config.in_channels != train_images.shape[1]:
        raise PdaeError(
            f"baseline model expects {unet.config.in_channels}×{unet.config.sample_size}² images but the prepared "
            f"data is {train_images.shape[1]}×{base.image_size}²; set base.image_size (and the dataset) to match."
        )
    metrics["parameters"] = sum(p.numel() for p in unet.parameters())
    save_baseline(unet.cpu(), out_dir, scheduler=scheduler, extra=dpm_extra(cfg.class_label, **adapter))
    if cfg.source == "train":
        (work / "baseline" / "state.safetensors").unlink(missing_ok=True)
    return metrics, history
