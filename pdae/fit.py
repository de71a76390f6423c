"""PDAE training: the weighted, shifted epsilon loss of docs/method.md §3 on top of the shared training loop."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pdae.config import BaseConfig, TrainConfig
from pdae.diffusion import Schedule, at
from pdae.train import TrainResult, TrainSpec, train


def pdae_loss(
    backbone,
    schedule: Schedule,
    weighting: str = "pdae",
    gamma: float = 0.1,
    hflip: bool = False,
    class_conditional: bool = False,
):
    """Loss callable for `train`: mean lambda_t (eps - (eps_hat + c_t G(x_t, E(x0), t)))^2.

    batch = (x0,) or, class-conditional, (x0, labels). The frozen down path runs once (no grad) and feeds both the
    frozen up path (eps_hat) and G.
    """

    def loss_fn(mods, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        x0 = batch[0]
        n = x0.shape[0]
        if hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x0.device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, schedule.T, (n,), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = schedule.q_sample(x0, t, noise)
        feats = backbone.features(x_t, t)
        eps_hat = backbone.eps_from_features(feats)
        z = mods["encoder"](batch[1] if class_conditional else x0)
        g = mods["gradient"](feats, z).float()
        eps_tilde = eps_hat.float() + at(schedule.shift_coef, t, g) * g
        w = schedule.loss_weight(t, weighting, gamma).to(x0.device, torch.float32)
        return (w[:, None, None, None] * (noise - eps_tilde) ** 2).mean()

    return loss_fn


def train_pdae(
    backbone,
    schedule: Schedule,
    images: Tensor,
    base: BaseConfig,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint: Path | None,
    run: Any | None = None,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    desc: str = "pdae",
) -> tuple[Any, TrainResult]:
    """Train E and G on `images` (N, C, H, W) in [-1, 1]; returns (PDAE with EMA weights, eval mode; TrainResult).

    With `num_classes` (and `labels` (N,)), G is conditioned on a learned class embedding instead of E(x0).
    """
    from pdae.nets.pdae import PDAE

    torch.manual_seed(base.seed)
    model = PDAE(
        backbone, cfg.z_dim, cfg.encoder_channels, cfg.dropout, num_classes=num_classes, skip_norm=cfg.g_skip_norm
    ).to(device)
    model.gradient.grad_checkpoint = cfg.grad_checkpoint  # memory lever only: gradients are the same
    spec = TrainSpec.from_config(
        cfg,
        base.seed,
        {
            "model": model.config,
            "weighting": cfg.weighting,
            "gamma": cfg.gamma,
            "hflip": cfg.hflip,
            "data": list(images.shape),
            "class_conditional": num_classes,
        },
    )
    loss = pdae_loss(
        backbone, schedule, cfg.weighting, cfg.gamma, cfg.hflip, class_conditional=num_classes is not None
    )
    data = (images,) if num_classes is None else (images, labels)
    mods = {"encoder": model.encoder, "gradient": model.gradient}
    result = train(mods, loss, data, spec, checkpoint, device, run, desc=desc, progress=progress)
    ema_model = copy.deepcopy(model)
    ema_model.encoder.load_state_dict(result.ema["encoder"].state_dict())
    ema_model.gradient.load_state_dict(result.ema["gradient"].state_dict())
    return ema_model.eval(), result
