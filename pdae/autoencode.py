"""The autoencoding API: encode, invert, decode, reconstruct, interpolate — what the CLI and the stages call.

A representation of an image is (z, x_T): z = E(x0) is the compact semantic code, x_T the stochastic code found by
DDIM inversion conditioned on z. All functions batch internally, use the model as given (load it with EMA
weights: `load_models`), and take images (N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pdae.diffusion import Schedule
from pdae.sampling import ddim_invert, ddim_sample, ddpm_sample, plain
from pdae.solvers import SOLVERS, solver_sample


def load_models(baseline_dir: str | Path, pdae_dir: str | Path, device: torch.device | str = "cpu"):
    """(PDAE model in eval mode on `device`, the DPM's Schedule) from the stage output folders."""
    from pdae.baseline import load_schedule
    from pdae.nets.pdae import load_backbone, load_pdae

    backbone = load_backbone(baseline_dir)
    model = load_pdae(pdae_dir, backbone).to(device).eval()
    return model, load_schedule(baseline_dir)


def _batched(fn: Callable[..., Tensor], *tensors: Tensor, batch_size: int) -> Tensor:
    n = tensors[0].shape[0]
    outs = [fn(*(t[i : i + batch_size] for t in tensors)) for i in range(0, n, batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def _dev(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode(model, images: Tensor, batch_size: int = 256) -> Tensor:
    """z (N, z_dim) on the CPU for images (N, C, H, W) in [-1, 1]."""
    dev = _dev(model)
    return _batched(lambda x: model.encode(x.to(dev)).float().cpu(), images, batch_size=batch_size)


@torch.no_grad()
def invert(
    model,
    images: Tensor,
    z: Tensor,
    schedule: Schedule,
    steps: int = 100,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Stochastic code x_T (N, C, H, W): DDIM inversion of the images conditioned on z."""
    dev = _dev(model)

    def run(x: Tensor, zz: Tensor) -> Tensor:
        return ddim_invert(model.model_fn(zz.to(dev)), x.to(dev), schedule, steps, progress=progress).cpu()

    return _batched(run, images, z, batch_size=batch_size)


@torch.no_grad()
def decode(
    model,
    z: Tensor,
    x_T: Tensor,
    schedule: Schedule,
    steps: int = 100,
    sampler: str = "ddim",
    shift_fraction: float = 1.0,
    shift_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] decoded from (z, x_T).

    `sampler`: ddim (default), dpmpp2m, dpmpp3m, unipc (deterministic, `steps` network evaluations; pdae.solvers)
    or ddpm (stochastic, uses `generator`).
    """
    if sampler != "ddpm" and sampler not in SOLVERS:
        from pdae.errors import PdaeError

        raise PdaeError(f"unknown sampler '{sampler}'; use {', '.join(SOLVERS)} or ddpm.")
    dev = _dev(model)

    def run(zz: Tensor, xt: Tensor) -> Tensor:
        fn = model.model_fn(zz.to(dev))
        kw = dict(shift_scale=shift_scale, shift_fraction=shift_fraction, progress=progress)
        if sampler == "ddpm":
            out = ddpm_sample(fn, xt.to(dev), schedule, steps, generator=generator, **kw)
        else:
            out = solver_sample(fn, xt.to(dev), schedule, steps, sampler, **kw)
        return out.clamp(-1, 1).cpu()

    return _batched(run, z, x_T, batch_size=batch_size)


def random_xT(n: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    return torch.randn((n, *shape), generator=generator)


@torch.no_grad()
def reconstruct(
    model,
    images: Tensor,
    schedule: Schedule,
    steps: int = 100,
    x_T: str = "inferred",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    progress: bool = False,
    solver: str = "ddim",
    inversion_steps: int | None = None,
) -> Tensor:
    """Autoencode images: z = E(x0), x_T inferred by inversion (near-exact) or random (same semantics).

    Inversion is always DDIM with `inversion_steps` (None: `steps`); decoding uses `solver` with `steps` evaluations.
    """
    z = encode(model, images, batch_size)
    if x_T == "inferred":
        xt = invert(model, images, z, schedule, inversion_steps or steps, batch_size, progress)
    else:
        xt = random_xT(images.shape[0], tuple(images.shape[1:]), generator)
    return decode(model, z, xt, schedule, steps, sampler=solver, batch_size=batch_size, progress=progress)


@torch.no_grad()
def baseline_reconstruct(
    unet_fn: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    schedule: Schedule,
    steps: int = 100,
    batch_size: int = 256,
) -> Tensor:
    """The bare DPM's own DDIM inversion + sampling (its latent is the full x_T)."""
    dev = images.device

    def run(x: Tensor) -> Tensor:
        x_T = ddim_invert(plain(unet_fn), x, schedule, steps)
        return ddim_sample(plain(unet_fn), x_T, schedule, steps).clamp(-1, 1)

    return _batched(lambda x: run(x.to(dev)).cpu(), images, batch_size=batch_size)


def slerp(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation between a and b (N, ...) along the batch's flattened vectors; alpha in [0, 1]."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    small = sin.abs() < 1e-6
    wa = torch.where(small, 1 - alpha, torch.sin((1 - alpha) * theta) / torch.where(small, 1.0, sin))
    wb = torch.where(small, torch.full_like(theta, alpha), torch.sin(alpha * theta) / torch.where(small, 1.0, sin))
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.reshape(a.shape).to(a.dtype)


def lerp(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    return a + alpha * (b - a)
