"""The PDAE objective as a formula (docs/method.md §4, paper eq. 9-11): the loss, the shift coefficient, training on a
toy problem with a known posterior mean, the DDPM/DDIM shift schedule and G's "scale and shift twice" modulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pdae.diffusion import Schedule, ddim_grid
from pdae.fit import pdae_loss
from pdae.nets.layers import modulate_twice
from pdae.sampling import ddim_sample, ddpm_sample

BETAS = np.linspace(0.02, 0.4, 20)  # a short schedule: c_t is not tiny for t >= 1 (c_0 = 0)


def _np_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Schedule quantities written out independently of pdae.diffusion (float64)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return {
        "alphas": alphas,
        "abar": abar,
        "abar_prev": abar_prev,
        "sigma": betas * (1 - abar_prev) / (1 - abar),  # posterior variance Sigma_t
        "c": -np.sqrt(alphas) * (1 - abar_prev) / np.sqrt(1 - abar),  # eps shift coefficient c_t
    }


class _StubBackbone:
    """features = x_t; eps_hat = 0.5 x_t."""

    @staticmethod
    def features(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t * 1.0

    @staticmethod
    def eps_from_features(feats: torch.Tensor) -> torch.Tensor:
        return 0.5 * feats


@pytest.mark.parametrize(("weighting", "gamma"), [("pdae", 0.1), ("pdae", 0.3), ("uniform", 0.1)])
def test_pdae_loss_equals_the_closed_form(weighting: str, gamma: float) -> None:
    schedule = Schedule(torch.tensor(BETAS))
    tab = _np_tables(BETAS)
    x0 = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    mods = {
        "encoder": lambda x: x.flatten(1)[:, :2],
        "gradient": lambda feats, z: 0.7 * feats + z.sum(1)[:, None, None, None],
    }
    loss = pdae_loss(_StubBackbone(), schedule, weighting, gamma)(mods, (x0,), torch.Generator().manual_seed(5))
    # the same draws as the loss: t first, then the noise
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, len(BETAS), (6,), generator=gen).numpy()
    noise = torch.randn(x0.shape, generator=gen).double().numpy()
    x = x0.double().numpy()
    b = (slice(None), None, None, None)
    x_t = np.sqrt(tab["abar"][t])[b] * x + np.sqrt(1 - tab["abar"][t])[b] * noise
    z = x.reshape(6, -1)[:, :2]
    g = 0.7 * x_t + z.sum(1)[b]
    eps_tilde = 0.5 * x_t + tab["c"][t][b] * g
    w = tab["abar"][t] ** gamma * (1 - tab["abar"][t]) ** (1 - gamma) if weighting == "pdae" else np.ones(6)
    expected = (w[b] * (noise - eps_tilde) ** 2).mean()
    assert len(set(t.tolist())) > 3  # several timesteps, including their weights and coefficients
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_shift_coefficient_moves_the_mean_by_sigma_t_times_g() -> None:
    """eps_tilde = eps_hat + c_t G  <=>  mu_tilde = mu_theta + Sigma_t G (paper eq. 10-11), c_t written out."""
    schedule = Schedule(torch.tensor(BETAS))
    tab = _np_tables(BETAS)
    torch.testing.assert_close(schedule.shift_coef, torch.tensor(tab["c"]), rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(1)
    x_t, eps, g = (torch.randn(19, 2, 2, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.arange(1, 20)
    moved = schedule.mean_from_eps(x_t, t, schedule.shift(eps, g, t)) - schedule.mean_from_eps(x_t, t, eps)
    torch.testing.assert_close(moved, torch.tensor(tab["sigma"][1:])[:, None, None, None] * g, rtol=1e-10, atol=1e-12)


class _ToyBackbone:
    """A frozen eps predictor that is optimal for N(0, I) data, eps_hat = sqrt(1 - abar_t) x_t; features (x_t, t)."""

    def __init__(self, schedule: Schedule) -> None:
        self.root = schedule.sqrt_one_minus_abar.float()

    def features(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t, t

    def eps_from_features(self, feats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x_t, t = feats
        return self.root[t][:, None, None, None] * x_t


class _ToyGradient(nn.Module):
    def __init__(self, z_dim: int, T: int) -> None:
        super().__init__()
        self.T = T
        self.net = nn.Sequential(nn.Linear(2 + z_dim + T, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        x_t, t = feats
        inp = torch.cat([x_t.flatten(1), z, nn.functional.one_hot(t, self.T).float()], dim=1)
        return self.net(inp)[:, :, None, None]


def _toy_data(n: int, gen: torch.Generator) -> torch.Tensor:
    """x0 = +-v (two points), (n, 2, 1, 1): for this data the N(0, I)-optimal eps_hat is biased."""
    sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return (sign[:, None] * torch.tensor([0.9, -0.6]))[:, :, None, None]


def _gap_ratio(schedule: Schedule, backbone: _ToyBackbone, mods: dict, gen: torch.Generator) -> tuple[float, float]:
    """(gap with shift / gap without, cosine of the mean shift Sigma_t G with mu_true - mu_theta), over t >= 1."""
    x0 = _toy_data(4000, gen)
    t = torch.randint(1, schedule.T, (4000,), generator=gen)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).float()
    with torch.no_grad():
        feats = backbone.features(x_t, t)
        eps_hat, g = backbone.eps_from_features(feats), mods["gradient"](feats, mods["encoder"](x0.flatten(1)))
    true = schedule.posterior_mean(x0, x_t, t)
    mu = schedule.mean_from_eps(x_t, t, eps_hat)
    mu_shift = schedule.mean_from_eps(x_t, t, schedule.shift(eps_hat, g, t))
    ratio = ((mu_shift - true) ** 2).sum() / ((mu - true) ** 2).sum()
    cos = nn.functional.cosine_similarity((mu_shift - mu).flatten(), (true - mu).flatten(), dim=0)
    return ratio.item(), cos.item()


def test_training_e_and_g_shrinks_the_posterior_mean_gap() -> None:
    """With the true x0 known, the posterior mean is known; E and G trained with pdae_loss must close most of the
    gap left by a biased frozen eps_hat, and the shift Sigma_t G must point along mu_true - mu_theta (paper eq. 10).
    A wrong sign or coefficient of the shift in the loss makes G learn another function and the ratio stays >~ 1."""
    torch.manual_seed(0)
    schedule = Schedule(torch.tensor(BETAS))
    backbone = _ToyBackbone(schedule)
    encoder, gradient = nn.Linear(2, 4), _ToyGradient(4, schedule.T)
    mods = {"encoder": lambda x0: encoder(x0.flatten(1)), "gradient": gradient}
    before, _ = _gap_ratio(schedule, backbone, mods, torch.Generator().manual_seed(9))
    loss_fn = pdae_loss(backbone, schedule, "pdae", 0.1)
    opt = torch.optim.Adam([*encoder.parameters(), *gradient.parameters()], lr=5e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(900):
        loss = loss_fn(mods, (_toy_data(256, gen),), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, cos = _gap_ratio(schedule, backbone, mods, torch.Generator().manual_seed(9))
    assert before > 0.5
    assert after < 0.1 and cos > 0.95, (before, after, cos)


def _respaced_ddpm_reference(eps_fn, g_fn, x_T, tau, shifted, gen, abar_full) -> torch.Tensor:
    """Ancestral DDPM over grid tau written out independently; the shift c'_k g is added on t in `shifted`."""
    abar = abar_full[tau]
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    tab = _np_tables(betas)
    post_var = tab["sigma"].copy()
    log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    x = x_T.double()
    for k in range(len(tau) - 1, -1, -1):
        t_net = torch.full((x.shape[0],), tau[k], dtype=torch.long)
        eps = eps_fn(x, t_net).double()
        if tau[k] in shifted:
            eps = eps + tab["c"][k] * g_fn(x, t_net).double()
        mean = (x - betas[k] / np.sqrt(1 - tab["abar"][k]) * eps) / np.sqrt(tab["alphas"][k])
        x = mean + math.exp(0.5 * log_var[k]) * torch.randn(x.shape, generator=gen, dtype=x.dtype) if k > 0 else mean
    return x


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_ddpm_applies_the_shift_exactly_on_the_first_steps(fraction: float) -> None:
    schedule = Schedule.linear(50)
    tau = ddim_grid(50, 10)  # 11 timesteps, all of them DDPM steps
    n_shift = math.ceil(fraction * len(tau))
    shifted = set(tau[len(tau) - n_shift :])  # the n_shift largest t: the first steps of sampling
    seen: list[tuple[int, bool]] = []

    def eps_fn(x, t):
        return 0.3 * x + 0.01 * t[:, None, None, None]

    def g_fn(x, t):
        return 0.5 - x

    def model_fn(x, t):
        on = int(t[0]) in shifted
        seen.append((int(t[0]), on))
        # NaN where no shift may be applied: any use of g on those steps poisons the output
        return eps_fn(x, t), g_fn(x, t) if on else torch.full_like(x, float("nan"))

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddpm_sample(model_fn, x_T, schedule, 10, shift_fraction=fraction, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    assert [t for t, _ in seen] == tau[::-1] and sum(on for _, on in seen) == n_shift
    ref = _respaced_ddpm_reference(
        eps_fn, g_fn, x_T, tau, shifted, torch.Generator().manual_seed(1), schedule.abar.numpy()
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)  # same float64 path up to operation order
    none = ddpm_sample(lambda x, t: (eps_fn(x, t), g_fn(x, t)), x_T, schedule, 10, shift_fraction=0.0,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert (none - out).abs().max() > 1e-3  # the shift does change the result


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_ddim_applies_the_shift_only_on_the_first_steps(fraction: float) -> None:
    schedule = Schedule.linear(50)
    tau = ddim_grid(50, 10)
    n_shift = math.ceil(fraction * (len(tau) - 1))  # DDIM makes len(tau) - 1 moves
    shifted = set(tau[len(tau) - n_shift :])

    def model_fn(x, t):
        g = 0.5 - x if int(t[0]) in shifted else torch.full_like(x, float("nan"))
        return 0.3 * x, g

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.isfinite(ddim_sample(model_fn, x_T, schedule, 10, shift_fraction=fraction)).all()


def test_modulate_twice_matches_its_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=gen))
        norm.bias.copy_(torch.randn(8, generator=gen))
    h = torch.randn(3, 8, 5, 5, generator=gen) * 2 + 1
    t_mod, z_mod = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    s_t, b_t = (v[:, :, None, None] for v in t_mod.chunk(2, dim=1))
    s_z, b_z = (v[:, :, None, None] for v in z_mod.chunk(2, dim=1))
    expected = (1 + s_z) * (norm(h) * (1 + s_t) + b_t) + b_z
    torch.testing.assert_close(modulate_twice(h, norm, t_mod, z_mod), expected, rtol=1e-5, atol=1e-5)
    swapped = (1 + s_t) * (norm(h) * (1 + s_z) + b_z) + b_t  # the other order is a different function
    assert (modulate_twice(h, norm, t_mod, z_mod) - swapped).abs().max() > 0.1
