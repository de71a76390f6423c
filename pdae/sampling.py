"""DDIM / DDPM sampling and DDIM inversion with an optional PDAE mean shift.

Every sampler takes a `model_fn(x, t) -> (eps_hat, g)`: `g` is the gradient estimator's output (or None for a
plain DPM). The bare DPM, PDAE and the latent DPM all plug in this way (`plain(eps_fn)` adapts an eps-only
network). The network is always called with the original timestep of the DDIM grid (`diffusion.ddim_grid`).

How the shift enters (docs/method.md §4):
- DDIM sampling and inversion: eps_tilde = eps_hat - sqrt(1 - abar_t) * scale * g   (classifier-guidance form);
- DDPM sampling: eps_tilde = eps_hat + c_t * scale * g   (the training form).
`shift_fraction` applies g only during the first fraction of the sampling steps (the latent-DPM decoder uses 0.7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pdae.diffusion import Schedule, at, ddim_grid

ModelFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


def plain(eps_fn: Callable[[Tensor, Tensor], Tensor]) -> ModelFn:
    """Adapt an eps-only network `eps_fn(x, t)` to the sampler signature (no shift)."""
    return lambda x, t: (eps_fn(x, t), None)


def _progress(iterable: Sequence[int], show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _grid(schedule: Schedule, steps: int | None, timesteps: Sequence[int] | None) -> list[int]:
    if timesteps is not None:
        return sorted(int(t) for t in timesteps)
    return ddim_grid(schedule.T, 100 if steps is None else steps)  # 0 is an error, not the default


def _apply_shift(eps: Tensor, g: Tensor | None, coef: Tensor, scale: float, active: bool) -> Tensor:
    if g is None or not active or scale == 0:
        return eps
    return eps + coef * scale * g


def _ddim_move(
    x: Tensor, eps: Tensor, abar_t: Tensor, abar_next: Tensor, clip: bool, clip_range: float
) -> tuple[Tensor, Tensor]:
    """One deterministic DDIM move from abar_t to abar_next: predict x0 (clipped), recompute eps, re-noise."""
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    if clip:
        x0 = x0.clamp(-clip_range, clip_range)
        eps = (x - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps, x0


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int | None = 100,
    *,
    timesteps: Sequence[int] | None = None,
    shift_scale: float = 1.0,
    shift_fraction: float = 1.0,
    clip: bool = True,
    clip_range: float = 1.0,
    progress: bool = False,
    return_x0: bool = False,
) -> Tensor:
    """Deterministic DDIM from x_T (N, ...) at t = tau[-1] down to tau[0] = 0 over the grid tau.

    Returns x at tau[0] (images in about [-1, 1]); `return_x0=True` returns the last clipped x0 prediction.
    """
    tau = _grid(schedule, steps, timesteps)
    x = x_T
    n_shift = math.ceil(shift_fraction * (len(tau) - 1))
    x0 = x
    for i, k in enumerate(_progress(range(len(tau) - 1, 0, -1), progress, "DDIM")):
        t = torch.full((x.shape[0],), tau[k], device=x.device, dtype=torch.long)
        eps, g = model_fn(x, t)
        abar_t = at(schedule.abar, t, x)
        eps = _apply_shift(eps, g, -(1 - abar_t).sqrt(), shift_scale, i < n_shift)
        abar_prev = at(schedule.abar, torch.full_like(t, tau[k - 1]), x)
        x, x0 = _ddim_move(x, eps, abar_t, abar_prev, clip, clip_range)
    return x0 if return_x0 else x


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    x0: Tensor,
    schedule: Schedule,
    steps: int | None = 100,
    *,
    timesteps: Sequence[int] | None = None,
    shift_scale: float = 1.0,
    clip: bool = True,
    clip_range: float = 1.0,
    progress: bool = False,
) -> Tensor:
    """DDIM inversion: the DDIM update run forward from tau[0] = 0 (x = x0) to tau[-1]; returns x_T (N, ...)."""
    tau = _grid(schedule, steps, timesteps)
    x = x0
    for k in _progress(range(len(tau) - 1), progress, "invert"):
        t = torch.full((x.shape[0],), tau[k], device=x.device, dtype=torch.long)
        eps, g = model_fn(x, t)
        abar_t = at(schedule.abar, t, x)
        eps = _apply_shift(eps, g, -(1 - abar_t).sqrt(), shift_scale, True)
        abar_next = at(schedule.abar, torch.full_like(t, tau[k + 1]), x)
        x, _ = _ddim_move(x, eps, abar_t, abar_next, clip, clip_range)
    return x


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    shift_scale: float = 1.0,
    shift_fraction: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM sampling over a (possibly respaced) grid; no noise is added at the last step.

    With steps=None all T steps are used. On a sub-grid the betas are respaced: beta'_k = 1 - abar[tau_k] /
    abar[tau_{k-1}], and the network is still called with the original t.
    """
    tau = list(range(schedule.T)) if steps is None and timesteps is None else _grid(schedule, steps, timesteps)
    abar = schedule.abar[tau]
    sub = Schedule(1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]))
    x = x_T
    n_shift = math.ceil(shift_fraction * len(tau))
    for i, k in enumerate(_progress(range(len(tau) - 1, -1, -1), progress, "DDPM")):
        t_net = torch.full((x.shape[0],), tau[k], device=x.device, dtype=torch.long)
        t_sub = torch.full_like(t_net, k)
        eps, g = model_fn(x, t_net)
        eps = _apply_shift(eps, g, at(sub.shift_coef, t_sub, x), shift_scale, i < n_shift)
        mean = sub.mean_from_eps(x, t_sub, eps)
        if k > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = mean + (0.5 * at(sub.posterior_log_var_clipped, t_sub, x)).exp() * noise
        else:
            x = mean
    return x
