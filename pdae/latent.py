"""Latent DPM (docs/method.md §5): unconditional and few-shot generation from z, and class-conditional G.

The latent DPM models z normalised per dimension with the train statistics (latents/stats.safetensors):
z_n = (z - mean) / std. It is an epsilon-predicting MLP (`pdae.nets.latent.LatentMLP`) on a constant-beta schedule
(beta = 0.008, T = 1000) trained with an L1 loss through the shared loop `pdae.train.train`. Sampling draws
z_T ~ N(0, I), runs latent DDIM, de-normalises and decodes images from random x_T with G applied during the first
`shift_fraction` of the image DDIM steps. Both clamps of the official code (z_T and the latent x0 prediction to
[-1, 1]) are options.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pdae.config import BaseConfig, LatentConfig, TrainConfig
from pdae.diffusion import Schedule
from pdae.errors import PdaeError, brief
from pdae.io import load_tensors, read_json, save_tensors, write_json
from pdae.nets.latent import LatentMLP
from pdae.sampling import ddim_sample, plain
from pdae.solvers import solver_sample
from pdae.train import TrainResult, TrainSpec, train

WEIGHTS_NAME, CONFIG_NAME = "latent.safetensors", "latent_config.json"
Figure = tuple[Tensor, int]  # images (N, C, H, W) in [-1, 1] and images per grid row


# The MLP plus the normalisation statistics and the diffusion schedule it was trained with.
class LatentDPM(nn.Module):
    def __init__(self, mlp: LatentMLP, mean: Tensor, std: Tensor, beta: float = 0.008, T: int = 1000) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.beta, self.T = float(beta), int(T)
        self.schedule = Schedule.constant(self.T, self.beta)

    def normalise(self, z: Tensor) -> Tensor:
        """Raw z (N, z_dim) -> z_n (N, z_dim) with zero mean / unit std per dimension (train statistics)."""
        return (z.to(self.mean) - self.mean) / self.std

    def denormalise(self, zn: Tensor) -> Tensor:
        return zn.to(self.mean) * self.std + self.mean

    def forward(self, z_t: Tensor, t: Tensor) -> Tensor:
        return self.mlp(z_t, t)

    @property
    def config(self) -> dict[str, Any]:
        return {**self.mlp.config, "beta": self.beta, "T": self.T}


def latent_loss(schedule: Schedule, kind: str = "l1"):
    """Loss callable for `train`: mean |eps - eps_theta(z_t, t)| (or squared) over normalised codes batch = (z_n,)."""
    if kind not in ("l1", "l2"):
        raise PdaeError(f"unknown latent loss '{kind}'; use l1 or l2.")

    def loss_fn(mods, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        zn = batch[0]
        t = torch.randint(0, schedule.T, (zn.shape[0],), generator=gen).to(zn.device)
        noise = torch.randn(zn.shape, generator=gen).to(zn.device)
        diff = mods["mlp"](schedule.q_sample(zn, t, noise), t).float() - noise
        return diff.abs().mean() if kind == "l1" else (diff**2).mean()

    return loss_fn


def train_latent(
    z: Tensor, mean: Tensor, std: Tensor, cfg: LatentConfig, seed: int, device: torch.device,
    checkpoint: Path | None = None, run: Any | None = None, progress: bool = True, stop_after_steps: int | None = None,
) -> tuple[LatentDPM, TrainResult]:  # fmt: skip
    """Train the latent DPM on raw train codes z (N, z_dim); returns (LatentDPM with EMA weights, CPU; result)."""
    torch.manual_seed(seed)
    mlp = LatentMLP(z.shape[1], cfg.depth - 1, cfg.width, dropout=cfg.dropout)  # depth counts the output layer
    dpm = LatentDPM(mlp, mean, std, cfg.beta, cfg.T)
    spec = TrainSpec(
        images=cfg.images,
        batch_size=min(cfg.batch_size, z.shape[0]),
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
        checkpoint_every=cfg.checkpoint_every,
        seed=seed,
        optimizer="adamw",
        weight_decay=cfg.weight_decay,
        fingerprint={"model": dpm.config, "loss": cfg.loss, "data": list(z.shape)},
    )
    data = (dpm.normalise(z).float(),)
    loss = latent_loss(dpm.schedule, cfg.loss)
    result = train({"mlp": mlp}, loss, data, spec, checkpoint, device, run, "latent", progress, stop_after_steps)
    dpm.mlp.load_state_dict(result.ema["mlp"].state_dict())
    return dpm.cpu().eval(), result


def save_latent(dpm: LatentDPM, directory: str | os.PathLike) -> Path:
    """Atomically write latent.safetensors (mlp.* EMA weights, mean, std) and latent_config.json to `directory`."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_NAME, dpm.state_dict(), metadata={"format": dpm.mlp.config["format"]})
    write_json(directory / CONFIG_NAME, dpm.config)
    return directory


def load_latent(directory: str | os.PathLike) -> LatentDPM:
    """Rebuild a LatentDPM written by `save_latent` (eval mode, CPU); a mismatched/broken folder raises PdaeError."""
    directory = Path(directory)
    cfg = read_json(directory / CONFIG_NAME, what="latent DPM config")
    tensors = load_tensors(directory / WEIGHTS_NAME, what="latent DPM weights")
    try:
        mlp = LatentMLP(cfg["z_dim"], cfg["depth"], cfg["width"], cfg["time_dim"], cfg["time_width"], cfg["dropout"])
        dpm = LatentDPM(mlp, tensors["mean"], tensors["std"], cfg["beta"], cfg["T"])
        dpm.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise PdaeError(
            f"{directory}: the latent DPM files do not match ({brief(err)}); re-run the latent "
            "stage (dvc repro latent)."
        ) from None
    return dpm.eval()


@torch.no_grad()
def latent_ddim(
    eps_fn,
    z_T: Tensor,
    schedule: Schedule,
    steps: int = 100,
    clip_x0: bool = False,
    clip_range: float = 1.0,
    solver: str = "ddim",
) -> Tensor:
    """Latent DDIM from z_T (N, z_dim) to the clean code z_0 (N, z_dim), normalised space.

    The shared sampler runs the grid down to t = 0; one last DDIM move to abar_{-1} = 1 (the x0 prediction at t = 0)
    removes the remaining sqrt(1 - abar_0) noise (0.09 for beta = 0.008). `clip_x0` clamps every x0 prediction.
    Another `solver` (pdae.solvers) ends at sigma = 0 itself, with `steps` evaluations and no extra move.
    """
    if solver != "ddim":
        return solver_sample(plain(eps_fn), z_T, schedule, steps, solver, clip=clip_x0, clip_range=clip_range)
    x = ddim_sample(plain(eps_fn), z_T, schedule, steps, clip=clip_x0, clip_range=clip_range)
    t0 = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    x0 = schedule.x0_from_eps(x, t0, eps_fn(x, t0))
    return x0.clamp(-clip_range, clip_range) if clip_x0 else x0


@torch.no_grad()
def sample_latents(
    dpm: LatentDPM,
    n: int,
    steps: int = 100,
    clip_noise: bool = False,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 1000,
    noise: Tensor | None = None,
    solver: str = "ddim",
) -> Tensor:
    """n raw codes (n, z_dim) (de-normalised) from the latent DPM; `noise` (n, z_dim) fixes z_T (paired studies)."""
    dev = dpm.mean.device
    z_T = noise if noise is not None else torch.randn(n, dpm.mlp.z_dim, generator=generator)
    if clip_noise:
        z_T = z_T.clamp(-1, 1)
    outs = [
        latent_ddim(dpm, z_T[i : i + batch_size].to(dev), dpm.schedule, steps, clip_x0, solver=solver).cpu()
        for i in range(0, n, batch_size)
    ]
    return dpm.denormalise(torch.cat(outs)).cpu()


def latent_fd(a: Tensor, b: Tensor, dpm: LatentDPM) -> float:
    """Fréchet distance between two sets of raw codes (N, z_dim), measured in normalised space."""
    from pdae.metrics import frechet_distance

    return frechet_distance(dpm.normalise(a).cpu(), dpm.normalise(b).cpu())


@torch.no_grad()
def bare_samples(
    backbone, x_T: Tensor, schedule: Schedule, steps: int, batch_size: int = 500, solver: str = "ddim"
) -> Tensor:
    """The bare DPM's own unconditional samples (N, C, H, W) in [-1, 1] from x_T (N, C, H, W) (DDIM or `solver`)."""
    dev = next(iter(backbone.parameters())).device
    outs = [
        solver_sample(plain(backbone), x_T[i : i + batch_size].to(dev), schedule, steps, solver).clamp(-1, 1).cpu()
        for i in range(0, len(x_T), batch_size)
    ]
    return torch.cat(outs)


def labels_for(attrs, ids: Tensor, column: str = "label") -> Tensor | None:
    """Integer classes (N,) of the prepared rows `ids` (N,) in `column` of attributes.csv's frame, None without it."""
    if column not in attrs.columns:
        return None
    return torch.from_numpy(attrs.set_index("id").loc[ids.numpy(), column].to_numpy(dtype=np.int64).copy())


# ---- class-conditional G ----------------------------------------------------------------------------------------


def train_classcond(
    backbone, schedule: Schedule, images: Tensor, labels: Tensor, num_classes: int, z_dim: int, base: BaseConfig,
    cfg: LatentConfig, device: torch.device, checkpoint: Path | None = None, run: Any | None = None,
    progress: bool = True,
):  # fmt: skip
    """Train G on a learned class embedding (E replaced by LabelEncoder) for cfg.classcond_images images.

    images (N, C, H, W) in [-1, 1], labels (N,) in [0, num_classes). Returns (PDAE with EMA weights, TrainResult).
    """
    from pdae.fit import train_pdae

    tcfg = TrainConfig(
        z_dim=z_dim,
        images=cfg.classcond_images,
        batch_size=cfg.classcond_batch_size,
        lr=cfg.classcond_lr,
        checkpoint_every=cfg.checkpoint_every,
    )
    kw = dict(labels=labels, num_classes=num_classes, progress=progress, desc="classcond")
    return train_pdae(backbone, schedule, images, base, tcfg, device, checkpoint, run, **kw)


@torch.no_grad()
def classcond_sample(
    model, labels: Tensor, x_T: Tensor, schedule: Schedule, scale: float, steps: int = 50, batch_size: int = 500
) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] for labels (N,) from x_T (N, C, H, W), G scaled by `scale` at every step.

    scale = 0 is exactly the bare DPM's DDIM sample from the same x_T.
    """
    from pdae.autoencode import decode

    z = model.encode(labels.to(next(model.parameters()).device)).cpu()
    return decode(model, z, x_T, schedule, steps, shift_scale=scale, batch_size=batch_size)


# ---- studies run by the `latent` stage --------------------------------------------------------------------------
# Each study reports `<name>_cpu_seconds`: process CPU time (all threads), stable on a shared machine.

# Clamp settings of the unconditional study: (clamp z_T, clamp latent x0).
CLAMPS: dict[str, tuple[bool, bool]] = {"none": (False, False), "noise": (True, False), "x0": (False, True),
                                        "both": (True, True)}  # fmt: skip


def clamp_name(clip_noise: bool, clip_x0: bool) -> str:
    return {v: k for k, v in CLAMPS.items()}[(clip_noise, clip_x0)]


def decode_codes(model, z: Tensor, x_T: Tensor, schedule: Schedule, cfg: LatentConfig) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] from raw codes z (N, z_dim) and x_T, G on for the first cfg.shift_fraction."""
    from pdae.autoencode import decode

    return decode(
        model,
        z,
        x_T,
        schedule,
        cfg.steps,
        sampler=cfg.solver,
        shift_fraction=cfg.shift_fraction,
        batch_size=cfg.eval_batch_size,
    )


def _verdict(result: str, a: str, b: str) -> str:
    """compare()'s "a lower" / "b lower" with the sets' names; "no difference at this size" unchanged."""
    return {"a lower": f"{a} lower", "b lower": f"{b} lower"}.get(result, result)


def uncond_study(
    dpm: LatentDPM, model, schedule: Schedule, test_z: Tensor, cfg: LatentConfig, gen: torch.Generator, scorer=None,
    test_x: Tensor | None = None, val_z: Tensor | None = None, val_x: Tensor | None = None, keep: dict | None = None,
) -> tuple[dict[str, Any], dict[str, Figure]]:  # fmt: skip
    """Unconditional generation: latent DPM + PDAE decoding vs the bare DPM, and the clamp study.

    Every setting uses the same z_T noise and x_T (paired). The clamp study is a choice of a setting, so it compares
    with the validation codes / images (val_z, val_x; the test ones when not given): latent FD (normalised z) for all
    four clamp settings on cfg.n_samples draws, image FD and class entropy for "none" vs "both" on
    cfg.study_samples. The reported figures of the configured setting and the bare DPM (cfg.n_samples each; FD vs
    `test_x`, class entropy) use the test split. `keep`, when given, receives the bare DPM's samples as keep["bare"].
    Returns (metrics, figures "samples" (48 latent-DPM samples over 48 bare-DPM samples from the same x_T) and
    "clamp" (a row of unclamped over a row of clamped samples, paired by column; only when study_samples > 0)).
    """
    from pdae.metrics import compare
    from pdae.scoring import class_scores, classifier_fd_interval

    start, size = time.process_time(), model.backbone.image_size
    n, ns = cfg.n_samples, min(cfg.study_samples, cfg.n_samples)
    noise = torch.randn(n, dpm.mlp.z_dim, generator=gen)
    x_T = torch.randn(n, model.backbone.in_channels, size, size, generator=gen)
    chosen = clamp_name(cfg.clip_noise, cfg.clip_x0)
    codes = {
        k: sample_latents(dpm, n, cfg.latent_steps, *v, noise=noise, solver=cfg.latent_solver)
        for k, v in CLAMPS.items()
    }
    ref_z, ref_x = (test_z, test_x) if val_z is None or len(val_z) < 2 else (val_z, val_x)
    study: dict[str, Any] = {k: {"latent_fd": latent_fd(z, ref_z, dpm)} for k, z in codes.items()}
    images = {"latent": decode_codes(model, codes[chosen], x_T, schedule, cfg)}
    images["bare"] = bare_samples(model.backbone, x_T, schedule, cfg.steps, cfg.eval_batch_size, cfg.solver)
    for k in ("none", "both") if ns > 0 else ():
        imgs = images["latent"][:ns] if k == chosen else decode_codes(model, codes[k][:ns], x_T[:ns], schedule, cfg)
        images[k] = imgs
    metrics: dict[str, Any] = {"uncond_latent_fd": latent_fd(codes[chosen], test_z, dpm), "clamp": chosen}
    if scorer is not None and test_x is not None:
        fds = {}
        for key, imgs in (("uncond", images["latent"]), ("baseline_uncond", images["bare"])):
            scores = class_scores(scorer, imgs)
            fds[key] = fd = classifier_fd_interval(scorer, imgs, test_x)
            metrics[f"{key}_fd"], metrics[f"{key}_fd_low"], metrics[f"{key}_fd_high"] = (
                fd["value"],
                fd["low"],
                fd["high"],
            )
            metrics[f"{key}_class_entropy"] = scores["class_entropy"]
            metrics[f"{key}_confident_fraction"] = scores["confident_fraction"]
        # a ranking only when the 95% intervals separate (pdae.metrics.compare)
        metrics["uncond_vs_baseline_fd"] = _verdict(
            compare(fds["uncond"], fds["baseline_uncond"]), "latent DPM", "bare DPM"
        )
        for k in ("none", "both"):
            if ns >= 2 and ref_x is not None:
                fd = fds[k] = classifier_fd_interval(scorer, images[k], ref_x)
                study[k].update(fd=fd["value"], fd_low=fd["low"], fd_high=fd["high"])
                study[k]["class_entropy"] = class_scores(scorer, images[k])["class_entropy"]
        if ns >= 2 and ref_x is not None:
            study["none_vs_both_fd"] = _verdict(compare(fds["none"], fds["both"]), "none", "both")
    reference = "test" if ref_z is test_z else "validation"
    best = min(CLAMPS, key=lambda k: study[k]["latent_fd"])
    metrics["clamp_study"] = {"samples": ns, "latent_samples": n, "reference": reference, "best_latent_fd": best}
    metrics["clamp_study"].update(study)
    if keep is not None:
        keep["bare"] = images["bare"]
    metrics["uncond_cpu_seconds"] = round(time.process_time() - start, 1)
    figures = {"samples": (torch.cat([images["latent"][:48], images["bare"][:48]]), 16)}
    if ns > 0:  # top row unclamped, bottom row clamped, same z_T and x_T per column
        figures["clamp"] = (torch.cat([images["none"][:16], images["both"][:16]]), min(ns, 16))
    return metrics, figures


def classcond_study(
    model, schedule: Schedule, num_classes: int, cfg: LatentConfig, gen: torch.Generator, scorer
) -> tuple[dict[str, Any], dict[str, Figure]]:
    """Class-conditional sampling for every scale w: the same x_T per (class, sample) for all w.

    Returns ({"classcond_precision": {w: share assigned to the conditioning class}}, figure "classcond": one row per w
    of up to 2 samples per class).
    """
    from pdae.scoring import agreement

    start, size, m = time.process_time(), model.backbone.image_size, cfg.classcond_samples
    labels = torch.arange(num_classes).repeat_interleave(m)
    x_T = torch.randn(len(labels), model.backbone.in_channels, size, size, generator=gen)
    shown = torch.cat([torch.arange(c * m, c * m + min(m, 2)) for c in range(num_classes)])
    precision, rows = {}, []
    for w in cfg.classcond_scales:
        imgs = classcond_sample(model, labels, x_T, schedule, w, cfg.steps, cfg.eval_batch_size)
        precision[w] = agreement(scorer, imgs, labels)
        rows.append(imgs[shown])
    metrics = {
        "classcond_precision": precision,
        "classcond_samples": m,
        "classcond_cpu_seconds": round(time.process_time() - start, 1),
    }
    return metrics, {"classcond": (torch.cat(rows), len(shown))}
