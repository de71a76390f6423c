"""Diffusion maths shared by the image DPM, PDAE and the latent DPM.

Conventions (docs/method.md): T steps, t in {0..T-1}, abar_{-1} = 1, images in [-1, 1], the network predicts epsilon.
All per-step quantities are float64 tables; `at(table, t, x)` gathers them for a batch and broadcasts to x.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from pdae.errors import PdaeError

ScheduleKind = Literal["linear", "cosine", "constant"]


def at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] as `like`'s dtype/device, shaped (N, 1, ..., 1) to broadcast over `like` (N, ...)."""
    vals = table.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return vals.reshape(-1, *([1] * (like.ndim - 1)))


# A beta schedule with every derived table PDAE needs (posterior, shift coefficient, loss weighting).
class Schedule:
    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise PdaeError("diffusion betas must be a 1-D sequence in (0, 1) with at least 2 steps.")
        self.betas = betas
        self.T = len(betas)
        self.alphas = 1.0 - betas
        self.abar = torch.cumprod(self.alphas, dim=0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), self.abar[:-1]])
        self.sqrt_abar = self.abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - self.abar).sqrt()
        self.snr = self.abar / (1.0 - self.abar)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, var)
        self.posterior_var = betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.posterior_log_var_clipped = torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]))
        self.posterior_coef1 = betas * self.abar_prev.sqrt() / (1.0 - self.abar)
        self.posterior_coef2 = (1.0 - self.abar_prev) * self.alphas.sqrt() / (1.0 - self.abar)
        # eps_tilde = eps_hat + c_t G  <=>  mu_tilde = mu_theta + Sigma_t G   (c_0 = 0)
        self.shift_coef = -self.alphas.sqrt() * (1.0 - self.abar_prev) / (1.0 - self.abar).sqrt()

    # ---- constructors ----
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64, device="cpu"))

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Schedule:
        """Latent-diffusion schedule: betas linear in sqrt(beta), i.e. linspace(sqrt(b0), sqrt(b1), T) ** 2."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64, device="cpu") ** 2)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """Nichol & Dhariwal's cosine schedule: abar(t) = cos^2(((t/T + s) / (1 + s)) pi / 2), normalised."""
        f = [math.cos(((i / T) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = [min(1 - f[i + 1] / f[i], max_beta) for i in range(T)]
        return cls(torch.tensor(betas, dtype=torch.float64, device="cpu"))

    @classmethod
    def constant(cls, T: int = 1000, beta: float = 0.008) -> Schedule:
        return cls(torch.full((T,), beta, dtype=torch.float64, device="cpu"))

    @classmethod
    def create(cls, kind: ScheduleKind, T: int = 1000, **kwargs: float) -> Schedule:
        if kind == "linear":
            return cls.linear(T, **kwargs)
        if kind == "cosine":
            return cls.cosine(T, **kwargs)
        if kind == "constant":
            return cls.constant(T, **kwargs)
        raise PdaeError(f"unknown beta schedule '{kind}'; use linear, cosine or constant.")

    # ---- forward process and posterior ----
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; x0, noise (N, ...), t (N,) long."""
        return at(self.sqrt_abar, t, x0) * x0 + at(self.sqrt_one_minus_abar, t, x0) * noise

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """True posterior mean mu_t(x_t, x0) of q(x_{t-1} | x_t, x0)."""
        return at(self.posterior_coef1, t, x_t) * x0 + at(self.posterior_coef2, t, x_t) * x_t

    def mean_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Model posterior mean (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
        coef = at(self.betas / self.sqrt_one_minus_abar, t, x_t)
        return (x_t - coef * eps) / at(self.alphas.sqrt(), t, x_t)

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (x_t - at(self.sqrt_one_minus_abar, t, x_t) * eps) / at(self.sqrt_abar, t, x_t)

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (x_t - at(self.sqrt_abar, t, x_t) * x0) / at(self.sqrt_one_minus_abar, t, x_t)

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, for v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.

        Derivation in docs/parameterisations.md.
        """
        return at(self.sqrt_abar, t, x_t) * v + at(self.sqrt_one_minus_abar, t, x_t) * x_t

    def v_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = (eps - sqrt(1 - abar_t) x_t) / sqrt(abar_t), the inverse of eps_from_v."""
        return (eps - at(self.sqrt_one_minus_abar, t, x_t) * x_t) / at(self.sqrt_abar, t, x_t)

    def shift(self, eps_hat: Tensor, g: Tensor, t: Tensor) -> Tensor:
        """Training / DDPM form of the PDAE shift: eps_tilde = eps_hat + c_t G."""
        return eps_hat + at(self.shift_coef, t, eps_hat) * g

    def loss_weight(self, t: Tensor, kind: Literal["pdae", "uniform"] = "pdae", gamma: float = 0.1) -> Tensor:
        """lambda_t per sample (N,): PDAE's abar^gamma (1 - abar)^(1 - gamma) = SNR^gamma / (1 + SNR), or 1."""
        if kind == "uniform":
            return torch.ones(t.shape, dtype=torch.float64)
        if kind != "pdae":
            raise PdaeError(f"unknown loss weighting '{kind}'; use pdae or uniform.")
        abar = self.abar[t.cpu().long()]
        return abar**gamma * (1.0 - abar) ** (1.0 - gamma)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """t ~ Uniform{0..T-1}, shape (n,)."""
        return torch.randint(0, self.T, (n,), generator=generator).to(device)


def ddim_grid(T: int, steps: int) -> list[int]:
    """tau = sorted unique int(linspace(0, T-1, steps+1)): tau[0] = 0, tau[-1] = T-1 (steps = T gives all T)."""
    if not 1 <= steps <= T:
        raise PdaeError(f"number of sampling steps must be in 1..{T} (got {steps}).")
    return sorted({int(v) for v in torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).tolist()})
