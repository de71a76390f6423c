"""Fast solvers (pdae.solvers): diffusers' DPM-Solver++ / UniPC driven with PDAE's shifted eps."""

from __future__ import annotations

import math

import pytest
import torch

from pdae.diffusion import Schedule, at, ddim_grid
from pdae.errors import PdaeError
from pdae.sampling import ddim_sample
from pdae.solvers import SOLVERS, make_scheduler, solver_sample

FAST = [s for s in SOLVERS if s != "ddim"]
S2 = 0.25  # variance of the Gaussian toy data


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.linear(1000)


def gaussian_model(sched: Schedule, g_scale: float = 0.3):
    """Optimal eps for data N(0, S2 I) and a smooth, x-dependent shift g = g_scale * tanh(x)."""

    def fn(x, t):
        ab = at(sched.abar, t, x)
        return (1 - ab).sqrt() * x / (ab * S2 + 1 - ab), g_scale * torch.tanh(x)

    return fn


def tiny_net_model():
    """A small random conv net as eps_hat and a second one as G (t-dependent through a scalar embedding)."""
    torch.manual_seed(0)
    eps_net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 1))
    g_net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def fn(x, t):
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return eps_net(x) * (1 + s), g_net(x) * s

    return fn


def test_scheduler_is_configured_from_the_schedule(sched):
    for solver in FAST:
        sc = make_scheduler(sched, solver, 20)
        torch.testing.assert_close(sc.alphas_cumprod.double(), sched.abar, rtol=1e-5, atol=1e-7)
        ts = sc.timesteps.tolist()
        assert len(ts) == 20 and ts == sorted(ts, reverse=True)
        # the same uniform grid as 20-step DDIM (diffusers rounds, ddim_grid truncates)
        assert all(abs(a - b) <= 1 for a, b in zip(sorted(ts), ddim_grid(1000, 20)[1:], strict=True))
        assert not sc.config.thresholding and sc.config.prediction_type == "epsilon"


@pytest.mark.parametrize("solver", SOLVERS)
def test_trajectories_are_deterministic(solver, sched):
    fn = tiny_net_model()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = solver_sample(fn, x_T, sched, 10, solver, shift_fraction=0.7)
    b = solver_sample(fn, x_T.clone(), sched, 10, solver, shift_fraction=0.7)
    assert torch.equal(a, b) and a.shape == x_T.shape and torch.isfinite(a).all()


def test_ddim_solver_is_ddim_sample(sched):
    fn = tiny_net_model()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(solver_sample(fn, x_T, sched, 7, "ddim"), ddim_sample(fn, x_T, sched, 7))


@pytest.mark.parametrize("solver", FAST)
def test_fast_solvers_approach_ddim_with_many_steps(solver, sched):
    # Gaussian data with a shift: the shifted ODE is smooth, so every solver converges to the same end point.
    # Reference: DDIM at 1000 steps (its x0 prediction at t = 0, where the others end). Stated tolerance 1e-2 at 200
    # evaluations: DDIM-1000 itself is 5e-3 off the exact solution of the unshifted problem (outputs have std 0.5).
    fn = gaussian_model(sched)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = ddim_sample(fn, x_T, sched, 1000, clip=False, return_x0=True)
    torch.testing.assert_close(solver_sample(fn, x_T, sched, 200, solver, clip=False), ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize("solver", FAST)
def test_fast_solvers_beat_ddim_on_the_exact_ode(solver, sched):
    # Without a shift the probability-flow ODE of N(0, S2 I) data is solved exactly by x0 = x_T * sqrt(S2 / v_T),
    # v_T = abar_T S2 + 1 - abar_T: the higher-order solvers at 50 evaluations are > 2x closer than DDIM at 100.
    fn = gaussian_model(sched, g_scale=0.0)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ab = sched.abar[-1]
    exact = x_T * (S2 / (ab * S2 + 1 - ab)).sqrt()
    err_ddim = (ddim_sample(fn, x_T, sched, 100, clip=False, return_x0=True) - exact).abs().max().item()
    err = (solver_sample(fn, x_T, sched, 50, solver, clip=False) - exact).abs().max().item()
    assert err < 0.5 * err_ddim, (err, err_ddim)


@pytest.mark.parametrize("solver", SOLVERS)
def test_shift_is_on_for_the_first_fraction_of_evaluations(solver, sched):
    # G on for the first ceil(f * N) evaluations == a model whose g is zero after that many calls (shift always on).
    base = gaussian_model(sched)
    steps, frac = 10, 0.7
    k = math.ceil(frac * steps)
    seen: list[tuple[int, bool]] = []

    def counted(x, t):
        eps, g = base(x, t)
        on = len(seen) < k
        seen.append((int(t[0]), on))
        return eps, g if on else torch.zeros_like(g)

    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = solver_sample(base, x_T, sched, steps, solver, shift_fraction=frac)
    b = solver_sample(counted, x_T, sched, steps, solver, shift_fraction=1.0)
    assert torch.equal(a, b)
    assert len(seen) == steps
    # in units of the trajectory: the active evaluations are the steps that move x from t = T - 1 down to about
    # (1 - f)(T - 1) = 299.7; the first evaluation without G sits there (grid point 300 or 299 by rounding)
    assert min(t for t, on in seen if on) > (1 - frac) * 999
    assert abs(max(t for t, on in seen if not on) - (1 - frac) * 999) <= 1
    full = solver_sample(base, x_T, sched, steps, solver, shift_fraction=1.0)
    assert not torch.equal(a, full)  # the fraction matters


def test_clipping_clamps_the_x0_predictions(sched):
    # A model predicting eps = 0 has x0 = x / sqrt(abar): huge at t ~ T, so clipping must bound the output.
    fn = lambda x, t: (torch.zeros_like(x), None)  # noqa: E731
    x_T = 3 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    for solver in FAST:
        out = solver_sample(fn, x_T, sched, 8, solver, clip=True)
        assert out.abs().max().item() <= 1.0 + 1e-4, solver
        assert solver_sample(fn, x_T, sched, 8, solver, clip=False).abs().max().item() > 2


def test_latent_sampling_with_a_fast_solver():
    # The latent DPM's constant-beta schedule: the solver path ends at sigma = 0 itself (no extra DDIM move) and
    # converges to the exact ODE solution of the Gaussian toy as the number of evaluations grows.
    from pdae.latent import latent_ddim

    sched = Schedule.constant(1000, 0.008)
    fn = lambda x, t: gaussian_model(sched)(x, t)[0]  # noqa: E731
    z_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ab = sched.abar[-1]
    exact = z_T * (S2 / (ab * S2 + 1 - ab)).sqrt()
    err = [(latent_ddim(fn, z_T, sched, n, solver="dpmpp2m") - exact).abs().max().item() for n in (20, 100, 500)]
    assert err[0] > err[1] > err[2] and err[2] < 0.1, err


def test_bad_solver_name_is_one_line_error(sched):
    from pydantic import ValidationError

    from pdae.autoencode import decode
    from pdae.config import LatentConfig

    with pytest.raises(PdaeError, match=r"^unknown solver 'euler'; use one of ddim, dpmpp2m, dpmpp3m, unipc\.$"):
        solver_sample(gaussian_model(sched), torch.zeros(1, 2), sched, 5, "euler")
    with pytest.raises(PdaeError, match="unknown sampler 'euler'") as err:
        decode(torch.nn.Linear(1, 1), torch.zeros(1, 2), torch.zeros(1, 1, 2, 2), sched, 5, sampler="euler")
    assert "\n" not in str(err.value)
    with pytest.raises(ValidationError):
        LatentConfig(solver="euler")
