"""The baseline (frozen) DPM: acquire it from one of several sources, save it in diffusers format, score it.

Sources (`baseline.source`): `train` pre-trains a BeatGANs-style UNet2DModel on the prepared train split (the
embedded default, offline); `diffusers` loads a hub id or a local folder; `url` downloads a diffusers folder
archive or a single safetensors file with sha256 verification; `pdae-official` / `diffae` convert the official
checkpoints (`pdae.convert`). Every source ends as `models/baseline/` = `UNet2DModel.save_pretrained` +
`scheduler_config.json`, written atomically (temp folder, then rename).
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
from pdae.nets.backbone import quiet_diffusers
from pdae.train import TrainResult, TrainSpec, train

SCHEDULER_FILE = "scheduler_config.json"


def scheduler_config(schedule_name: str = "linear", T: int = 1000) -> dict[str, Any]:
    """A diffusers DDIMScheduler-compatible config describing the linear beta schedule of the paper's DPMs."""
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
    }


def load_schedule(model_dir: str | Path) -> Schedule:
    """The DPM's beta schedule from its scheduler_config.json (linear 1e-4..0.02, T=1000 when absent)."""
    path = Path(model_dir) / SCHEDULER_FILE
    if not path.is_file():
        return Schedule.linear(1000)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PdaeError(f"{path} is not valid JSON ({err}); re-create the baseline folder.") from None
    T = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    if kind == "linear":
        return Schedule.linear(T, float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)))
    if kind == "squaredcos_cap_v2":
        return Schedule.cosine(T)
    raise PdaeError(f"{path}: beta_schedule '{kind}' is not supported; use linear or squaredcos_cap_v2.")


def save_baseline(unet: UNet2DModel, out_dir: str | Path, schedule_name: str = "linear") -> Path:
    """Write `unet` (diffusers format, safetensors) and its scheduler config to `out_dir` atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler_config(schedule_name), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _from_pretrained(path: Path, source: str | Path, local_only: bool) -> UNet2DModel:
    if path.is_dir():
        return UNet2DModel.from_pretrained(str(path), local_files_only=True)
    return UNet2DModel.from_pretrained(str(source), local_files_only=local_only)


def load_unet(source: str | Path, local_only: bool = True) -> UNet2DModel:
    """Load a diffusers UNet2DModel from a folder or (online) hub id; one-line PdaeError on failure."""
    path = Path(source)
    if local_only and not path.exists() and "/" not in str(source):
        raise PdaeError(f"baseline model folder not found: {source} — run `dvc repro baseline` or fix baseline.path.")
    try:
        with quiet_diffusers():
            unet = _from_pretrained(path, source, local_only)
    except (OSError, ValueError) as err:
        raise PdaeError(
            f"cannot load a diffusers UNet2DModel from '{source}' ({brief(err)}); "
            "pass a folder with config.json + diffusion_pytorch_model.safetensors or a reachable hub id."
        ) from None
    return unet.eval()


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


def _foreign_unet(cfg: BaselineConfig, downloads: Path) -> UNet2DModel:
    """The UNet of a `url`, `pdae-official` or `diffae` source; a failure leaves no empty downloads folder."""
    from pdae.download import remove_empty_dirs

    created = [d for d in (downloads, *downloads.parents) if not d.exists()]
    try:
        if cfg.source == "url":
            return load_unet(_unpack_diffusers(_fetch(cfg, downloads), downloads))
        from pdae.convert import convert_checkpoint

        return convert_checkpoint(_fetch(cfg, downloads), cfg.source, cfg.config, sample_size=cfg.sample_size)
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
    elif cfg.source == "diffusers":
        unet = load_unet(cfg.path, local_only=Path(cfg.path).exists())
    else:
        unet = _foreign_unet(cfg, work / "downloads")
    if unet.config.sample_size != base.image_size or unet.config.in_channels != train_images.shape[1]:
        raise PdaeError(
            f"baseline model expects {unet.config.in_channels}×{unet.config.sample_size}² images but the prepared "
            f"data is {train_images.shape[1]}×{base.image_size}²; set base.image_size (and the dataset) to match."
        )
    metrics["parameters"] = sum(p.numel() for p in unet.parameters())
    save_baseline(unet.cpu(), out_dir)
    if cfg.source == "train":
        (work / "baseline" / "state.safetensors").unlink(missing_ok=True)
    return metrics, history
