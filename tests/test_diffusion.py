"""Closed-form checks of the diffusion maths and the samplers."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from pdae.diffusion import Schedule, at, ddim_grid
from pdae.errors import PdaeError
from pdae.sampling import ddim_invert, ddim_sample, ddpm_sample, plain


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.linear(1000)


def test_linear_schedule_values(sched):
    assert sched.T == 1000
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(sched.abar, torch.cumprod(1 - sched.betas, 0))
    assert sched.abar_prev[0].item() == 1.0
    assert sched.shift_coef[0].item() == 0.0  # c_0 = 0


def test_q_sample_matches_formula(sched):
    x0, eps = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.q_sample(x0, t, eps)
    for i in range(4):
        ab = sched.abar[t[i]]
        assert torch.allclose(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i])


def test_true_eps_gives_true_posterior_mean(sched):
    # With the true noise, the eps-parameterised mean equals the true posterior mean.
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1, 50, 300, 700, 999])
    xt = sched.q_sample(x0, t, eps)
    assert torch.allclose(sched.mean_from_eps(xt, t, eps), sched.posterior_mean(x0, xt, t), atol=1e-10)
    assert torch.allclose(sched.x0_from_eps(xt, t, eps), x0, atol=1e-8)
    assert torch.allclose(sched.eps_from_x0(xt, t, x0), eps, atol=1e-8)


def test_shift_coefficient_is_sigma_times_g(sched):
    # mu(eps_hat + c_t G) == mu(eps_hat) + Sigma_t G  with Sigma_t the posterior variance.
    xt, eps, g = (torch.randn(6, 2, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    lhs = sched.mean_from_eps(xt, t, sched.shift(eps, g, t))
    rhs = sched.mean_from_eps(xt, t, eps) + at(sched.posterior_var, t, xt) * g
    assert torch.allclose(lhs, rhs, atol=1e-10)


def test_pdae_weighting_identity(sched):
    t = torch.arange(0, 1000, 37)
    w = sched.loss_weight(t, "pdae", gamma=0.1)
    snr = sched.snr[t]
    assert torch.allclose(w, snr**0.1 / (1 + snr), rtol=1e-10)
    assert torch.equal(sched.loss_weight(t, "uniform"), torch.ones(len(t), dtype=torch.float64))
    with pytest.raises(PdaeError, match="weighting"):
        sched.loss_weight(t, "bogus")  # type: ignore[arg-type]


def test_other_schedules():
    cos = Schedule.cosine(1000)
    assert cos.abar[0] > 0.999 and cos.abar[-1] < 1e-3
    const = Schedule.constant(1000, 0.008)
    assert torch.allclose(const.abar[-1], torch.tensor(0.992, dtype=torch.float64) ** 1000)
    with pytest.raises(PdaeError):
        Schedule(torch.tensor([0.5, 1.5]))


def test_ddim_grid():
    assert ddim_grid(1000, 10) == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    g = ddim_grid(1000, 100)
    assert len(g) == 101 and g[0] == 0 and g[-1] == 999
    assert len(ddim_grid(1000, 1000)) == 1000
    with pytest.raises(PdaeError, match="steps"):
        ddim_grid(1000, 0)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    return unet.eval()


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(tiny_unet, sched, steps):
    # Our grid equals diffusers' "trailing" spacing, whose last step lands on abar_0 when set_alpha_to_one=False.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    assert sorted(scheduler.timesteps.tolist()) == ddim_grid(1000, steps)[1:]
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = tiny_unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    ours = ddim_sample(plain(lambda x, t: tiny_unet(x, t).sample), x_T, sched, steps)
    assert (ours - x).abs().max().item() < 1e-5


def test_inversion_round_trip(sched):
    # For Gaussian data N(0, s^2 I) the optimal eps is sqrt(1 - abar) x / (abar s^2 + 1 - abar): the DDIM ODE is
    # then exact, so inverting and sampling with many steps must return to x0.
    s2 = 0.25

    def gaussian_eps(x, t):
        ab = at(sched.abar, t, x)
        return (1 - ab).sqrt() * x / (ab * s2 + 1 - ab)

    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.5
    x_T = ddim_invert(plain(gaussian_eps), x0, sched, 1000, clip=False)
    assert x_T.std().item() > 0.7  # x_T is at noise level (x0 has std 0.5)
    rec = ddim_sample(plain(gaussian_eps), x_T, sched, 1000, clip=False)
    assert (rec - x0).abs().max().item() < 1.5e-2  # first-order convergence: 0.4 at 20 steps, 0.009 at 1000
    coarse = ddim_sample(
        plain(gaussian_eps), ddim_invert(plain(gaussian_eps), x0, sched, 20, clip=False), sched, 20, clip=False
    )
    assert (coarse - x0).abs().max() > (rec - x0).abs().max()  # more steps, closer


def test_shift_enters_ddim_and_ddpm(sched):
    # A constant model: eps_hat = 0, g = 1. DDIM with shift == DDIM with eps = -sqrt(1 - abar_t).
    x_T = torch.randn(3, 4, dtype=torch.float64)
    shifted = ddim_sample(lambda x, t: (torch.zeros_like(x), torch.ones_like(x)), x_T, sched, 5, clip=False)
    manual = ddim_sample(lambda x, t: (-at(sched.sqrt_one_minus_abar, t, x), None), x_T, sched, 5, clip=False)
    assert torch.allclose(shifted, manual)
    off = ddim_sample(lambda x, t: (torch.zeros_like(x), torch.ones_like(x)), x_T, sched, 5, shift_scale=0, clip=False)
    assert torch.allclose(off, ddim_sample(lambda x, t: (torch.zeros_like(x), None), x_T, sched, 5, clip=False))
    # DDPM: the shift is c_t G; with fraction 0 it is never applied.
    g1 = torch.Generator().manual_seed(3)
    a = ddpm_sample(
        lambda x, t: (torch.zeros_like(x), torch.ones_like(x)), x_T, sched, 10, shift_fraction=0.0, generator=g1
    )
    g2 = torch.Generator().manual_seed(3)
    b = ddpm_sample(lambda x, t: (torch.zeros_like(x), None), x_T, sched, 10, generator=g2)
    assert torch.allclose(a, b)


def test_ddpm_full_chain_shapes(sched):
    x_T = torch.randn(2, 3, dtype=torch.float64)
    out = ddpm_sample(lambda x, t: (torch.zeros_like(x), None), x_T, Schedule.linear(50), generator=torch.Generator())
    assert out.shape == x_T.shape and torch.isfinite(out).all()
