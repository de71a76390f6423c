"""Fast deterministic solvers (DPM-Solver++ 2M/3M, UniPC) driven with PDAE's shifted epsilon; DDIM stays the default.

The solvers are diffusers' multistep schedulers, configured from the project's `Schedule`; only the model function
is ours. At every network evaluation it returns

    eps_tilde = eps_hat - sqrt(1 - abar_t) * scale * g        (the same classifier-guidance form as our DDIM)

so the schedulers see an epsilon-prediction model whose mean is shifted by G (docs/method.md §4).

Choices (docs: this module is the reference):
- Betas are handed over as `trained_betas` with `num_train_timesteps = T`, `prediction_type = "epsilon"` and the
  "linspace" timestep spacing, so an N-step solver evaluates the network on (almost) the same uniform grid in t as
  N-step DDIM (diffusers rounds linspace(0, T-1, N+1), `ddim_grid` truncates), with N evaluations for both.
- diffusers' dynamic thresholding is off. Clipping is done like our DDIM does it: the x0 prediction is clamped to
  [-clip_range, clip_range] and eps recomputed from it, inside the model function; the data-prediction solvers then
  see exactly the clamped x0. The last step goes to sigma = 0 (`final_sigmas_type = "zero"`): the output is the
  clean estimate, where DDIM stops at t = 0.
- `shift_fraction` counts network evaluations like DDIM does: G is on for the first ceil(f * N) of the N evaluations,
  which on the shared uniform grid means t above about (1 - f)(T - 1) for every solver.
- Inversion is DDIM only (`pdae.sampling.ddim_invert`): it is exact in the limit, and the codes it gives can be
  decoded by any solver.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pdae.diffusion import Schedule, at
from pdae.errors import PdaeError
from pdae.sampling import ModelFn, _apply_shift, _progress, ddim_sample

SOLVERS: tuple[str, ...] = ("ddim", "dpmpp2m", "dpmpp3m", "unipc")


def check_solver(name: str) -> str:
    """Return `name` if it is a known solver, else raise one clear error line."""
    if name not in SOLVERS:
        raise PdaeError(f"unknown solver '{name}'; use one of {', '.join(SOLVERS)}.")
    return name


def make_scheduler(schedule: Schedule, solver: str, steps: int, device: torch.device | str = "cpu"):
    """A diffusers multistep scheduler for `solver` (not ddim) on `schedule`, set to `steps` evaluations."""
    check_solver(solver)
    if solver == "ddim":
        raise PdaeError("make_scheduler is for the diffusers solvers; DDIM is pdae.sampling.ddim_sample.")
    if not 1 <= steps <= schedule.T:
        raise PdaeError(f"number of sampling steps must be in 1..{schedule.T} (got {steps}).")
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(
        num_train_timesteps=schedule.T,
        trained_betas=schedule.betas.numpy(),
        prediction_type="epsilon",
        thresholding=False,
        timestep_spacing="linspace",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    if solver == "unipc":
        sched = UniPCMultistepScheduler(solver_order=2, predict_x0=True, solver_type="bh2", **common)
    else:
        order = 2 if solver == "dpmpp2m" else 3
        sched = DPMSolverMultistepScheduler(
            solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint", **common
        )
    sched.set_timesteps(steps, device=device)
    if len(set(sched.timesteps.tolist())) != steps:
        raise PdaeError(f"{solver} gives repeated timesteps at {steps} steps on T = {schedule.T}; use fewer steps.")
    return sched


def clipped_eps(x: Tensor, eps: Tensor, abar_t: Tensor, clip_range: float) -> Tensor:
    """eps consistent with the x0 prediction clamped to [-clip_range, clip_range] (as in DDIM's `_ddim_move`)."""
    x0 = ((x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-clip_range, clip_range)
    return (x - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()


@torch.no_grad()
def solver_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int = 100,
    solver: str = "ddim",
    *,
    shift_scale: float = 1.0,
    shift_fraction: float = 1.0,
    clip: bool = True,
    clip_range: float = 1.0,
    progress: bool = False,
) -> Tensor:
    """Deterministic sample from x_T (N, ...) with `steps` network evaluations; images come out in about [-1, 1].

    `solver="ddim"` is exactly `ddim_sample` (returns x at t = 0); the others return the clean estimate at sigma = 0.
    """
    check_solver(solver)
    kw = dict(shift_scale=shift_scale, shift_fraction=shift_fraction, clip=clip, clip_range=clip_range)
    if solver == "ddim":
        return ddim_sample(model_fn, x_T, schedule, steps, progress=progress, **kw)
    sched = make_scheduler(schedule, solver, steps, x_T.device)
    timesteps = [int(t) for t in sched.timesteps]
    n_shift = math.ceil(shift_fraction * len(timesteps))
    x = x_T
    for i, tv in enumerate(_progress(timesteps, progress, solver)):
        t = torch.full((x.shape[0],), tv, device=x.device, dtype=torch.long)
        eps, g = model_fn(x, t)
        abar_t = at(schedule.abar, t, x)
        eps = _apply_shift(eps.to(x.dtype), g, -(1 - abar_t).sqrt(), shift_scale, i < n_shift)
        if clip:
            eps = clipped_eps(x, eps, abar_t, clip_range)
        x = sched.step(eps, tv, x).prev_sample
    return x
