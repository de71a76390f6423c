"""Any pre-trained DPM as eps(x_t, t) + a Schedule: prediction types, learned variance, schedules, class labels.

A tiny epsilon UNet is exported analytically as a v- or x0-predicting model (its output head converts its own
epsilon with the closed forms of docs/parameterisations.md); the adapter must give the same PDAE trajectories.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from pdae.baseline import load_schedule, save_baseline
from pdae.diffusion import Schedule
from pdae.errors import PdaeError
from pdae.fit import pdae_loss
from pdae.nets import PDAE, Backbone, build_unet, load_backbone
from pdae.nets.adapter import DpmSpec, read_dpm_spec, schedule_from_config, scheduler_config
from pdae.sampling import ddim_invert, ddim_sample, ddpm_sample


def tiny_eps_unet(out_channels: int | None = None, classes: int | None = None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = build_unet(8, 2, [16, 16], 1, 8)
    if out_channels is None and classes is None:
        return unet
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cfg.update(out_channels=out_channels or 2, num_class_embeds=classes)
    torch.manual_seed(seed)
    return UNet2DModel(**cfg)


class _Exported(nn.Module):
    """Output head of an epsilon UNet re-expressed as v or x0 for the (x_t, t) of the current call."""

    def __init__(self, conv: nn.Module, schedule: Schedule, kind: str, ctx: dict) -> None:
        super().__init__()
        self.conv, self.schedule, self.kind, self.ctx = conv, schedule, kind, ctx

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        eps, x, t = self.conv(h), self.ctx["x"], self.ctx["t"].long()
        if self.kind == "v_prediction":
            return self.schedule.v_from_eps(x, t, eps)
        return self.schedule.x0_from_eps(x, t, eps)


def export(unet: UNet2DModel, schedule: Schedule, kind: str) -> UNet2DModel:
    """A copy of the epsilon model `unet` that predicts `kind` (v_prediction or sample) instead."""
    out, ctx = copy.deepcopy(unet), {}
    out.conv_in.register_forward_pre_hook(lambda m, args: ctx.update(x=args[0]))
    out.time_proj.register_forward_pre_hook(lambda m, args: ctx.update(t=args[0]))
    out.conv_out = _Exported(out.conv_out, schedule, kind, ctx)
    return out


def test_v_and_x0_closed_forms() -> None:
    s = Schedule.cosine(50)
    x0, eps, t = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64), None
    t = torch.tensor([0, 7, 30, 49])
    x_t = s.q_sample(x0, t, eps)
    v = s.sqrt_abar[t].view(-1, 1, 1, 1) * eps - s.sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(s.eps_from_v(x_t, t, v), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.v_from_eps(x_t, t, eps), v, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_exported_model_agrees_with_diffusers_scheduler(kind) -> None:
    """The export really is a `kind` model in diffusers' sense: a DDIM step with its scheduler equals the eps one."""
    unet = tiny_eps_unet().double()
    sched_eps = DDIMScheduler(num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)
    sched_k = DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, clip_sample=False)
    exported = export(unet, Schedule.linear(1000), kind)
    x, t = torch.randn(2, 2, 8, 8, dtype=torch.float64), 601
    for sched in (sched_eps, sched_k):
        sched.set_timesteps(10)
    with torch.no_grad():
        a = sched_eps.step(unet(x, t).sample, t, x).prev_sample
        b = sched_k.step(exported(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # diffusers' abar tables are float32


def _pair(kind: str, schedule: Schedule, dtype: torch.dtype) -> tuple[PDAE, PDAE]:
    unet = tiny_eps_unet().to(dtype)
    eps_model = PDAE(Backbone(unet, DpmSpec(schedule)), z_dim=4, encoder_channels=[8])
    with torch.no_grad():
        for p in eps_model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # G != 0 so that the shift matters
    other_unet = export(unet, schedule, kind) if kind != "learned_sigma" else _with_variance(unet)
    spec = DpmSpec(schedule, "epsilon" if kind == "learned_sigma" else kind)
    other = PDAE(Backbone(other_unet, spec), z_dim=4, encoder_channels=[8])
    other.load_state_dict(eps_model.state_dict())
    return eps_model.to(dtype).eval(), other.to(dtype).eval()


def _with_variance(unet: UNet2DModel) -> UNet2DModel:
    """The same epsilon model with 2C outputs (ADM-style learned variance): extra random channels appended."""
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cfg["out_channels"] = 2 * cfg["in_channels"]
    big = UNet2DModel(**cfg).to(unet.dtype)
    state = unet.state_dict()
    c = cfg["in_channels"]
    for name in ("conv_out.weight", "conv_out.bias"):
        extra = torch.randn_like(state[name])
        state[name] = torch.cat([state[name], extra])
    assert state["conv_out.weight"].shape[0] == 2 * c
    big.load_state_dict(state)
    return big


@pytest.mark.parametrize("kind", ["v_prediction", "sample", "learned_sigma"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_pdae_trajectories_match_eps_form(kind, dtype, tol) -> None:
    """DDIM inversion + sampling with the PDAE shift, DDPM steps and the PDAE loss: same as the eps model.

    float64: the forms are exact (1e-9); float32: the x0 form divides by sqrt(1 - abar_0) = 0.01, so 2e-4.
    """
    schedule = Schedule.cosine(100)
    a, b = _pair(kind, schedule, dtype)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(2, 2, 8, 8, generator=gen) * 2 - 1).to(dtype)
    with torch.no_grad():
        z = a.encode(x0)
        xs = [ddim_invert(m.model_fn(z), x0, schedule, steps=10) for m in (a, b)]
        torch.testing.assert_close(xs[1], xs[0], rtol=tol, atol=tol)
        outs = [ddim_sample(m.model_fn(z), xs[0], schedule, steps=10) for m in (a, b)]
        torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
        ddpm = [
            ddpm_sample(m.model_fn(z), xs[0], schedule, steps=5, generator=torch.Generator().manual_seed(1))
            for m in (a, b)
        ]
        torch.testing.assert_close(ddpm[1], ddpm[0], rtol=tol, atol=tol)
    losses = [
        pdae_loss(m.backbone, schedule)({"encoder": m.encoder, "gradient": m.gradient}, (x0,), torch.Generator())
        for m in (a, b)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=tol)
    # Controls: the shift matters, and reading the exported output as epsilon would be wrong.
    with torch.no_grad():
        unshifted = ddim_sample(a.model_fn(z, scale=0.0), xs[0], schedule, steps=10)
        assert (unshifted - outs[0]).abs().max() > 1e-3
        if kind != "learned_sigma":
            wrong = PDAE(Backbone(b.backbone.unet, DpmSpec(schedule)), z_dim=4, encoder_channels=[8]).to(dtype)
            wrong.load_state_dict(a.state_dict())
            assert (ddim_sample(wrong.model_fn(z), xs[0], schedule, steps=10) - outs[0]).abs().max() > 1e-2


def _diffusers_abar(**cfg) -> torch.Tensor:
    return DDPMScheduler(**cfg).alphas_cumprod.double()


@pytest.mark.parametrize(
    "cfg",
    [
        {"num_train_timesteps": 1000},
        {"num_train_timesteps": 250, "beta_start": 4e-4, "beta_end": 0.08},
        {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
        {"num_train_timesteps": 4000, "beta_schedule": "squaredcos_cap_v2"},
        {"num_train_timesteps": 7, "trained_betas": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]},
    ],
)
def test_schedules_match_diffusers(cfg) -> None:
    """Our float64 tables equal diffusers' float32 alphas_cumprod to float32 accuracy."""
    ours = schedule_from_config(cfg).abar
    torch.testing.assert_close(ours, _diffusers_abar(**cfg), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "cfg,words",
    [
        ({"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 50}, "variance-exploding"),
        ({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002}, "EDM"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}, "trained_betas has 2"),
    ],
)
def test_unsupported_schedules_are_refused(cfg, words) -> None:
    with pytest.raises(PdaeError, match=words) as err:
        schedule_from_config(cfg, "sched.json")
    assert "\n" not in str(err.value)


def test_folder_round_trip_and_refusals(tmp_path) -> None:
    """save_baseline writes the scheduler config and pdae_dpm.json; load_backbone reads them back."""
    unet = tiny_eps_unet(classes=5)
    sched = scheduler_config("squaredcos_cap_v2", 400, prediction_type="v_prediction")
    with pytest.raises(PdaeError, match="class-conditional .*class_label"):
        save_baseline(unet, tmp_path / "m", scheduler=sched)
    assert not (tmp_path / "m").exists()
    save_baseline(unet, tmp_path / "m", scheduler=sched, extra={"class_label": 3, "timestep_scale": 2.5})
    spec = read_dpm_spec(tmp_path / "m")
    got = (spec.prediction_type, spec.class_label, spec.timestep_scale, spec.schedule.T)
    assert got == ("v_prediction", 3, 2.5, 400)
    torch.testing.assert_close(load_schedule(tmp_path / "m").abar, Schedule.cosine(400).abar, rtol=0, atol=0)
    backbone = load_backbone(tmp_path / "m")
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 399])
    with torch.no_grad():
        v = unet(x, t * 2.5, class_labels=torch.tensor([3, 3])).sample
    torch.testing.assert_close(backbone(x, t), Schedule.cosine(400).eps_from_v(x, t, v), rtol=1e-5, atol=1e-5)
    (tmp_path / "m" / "pdae_dpm.json").write_text(json.dumps({"class_label": 9}))
    with pytest.raises(PdaeError, match="outside the model's 5 labels"):
        load_backbone(tmp_path / "m")
    with pytest.raises(PdaeError, match="unconditional; remove the label"):
        Backbone(tiny_eps_unet(), DpmSpec(class_label=1))
    with pytest.raises(PdaeError, match="prediction_type 'mu'"):
        DpmSpec(prediction_type="mu")


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_diffusers_source_carries_its_scheduler(tmp_path, layout) -> None:
    """baseline.source=diffusers: a v-prediction, scaled_linear model (pipeline unet/ + scheduler/ or one folder)."""
    from pdae.baseline import acquire_baseline
    from pdae.config import BaseConfig, BaselineConfig

    unet = tiny_eps_unet()
    src = tmp_path / "src"
    unet.save_pretrained(src / "unet" if layout == "pipeline" else src)
    sched = DDPMScheduler(num_train_timesteps=300, beta_schedule="scaled_linear", prediction_type="v_prediction")
    sched.save_config(src / "scheduler" if layout == "pipeline" else src)
    cfg = BaselineConfig(source="diffusers", path=str(src))
    acquire_baseline(cfg, BaseConfig(image_size=8, seed=0), torch.zeros(1, 2, 8, 8), tmp_path / "bl", "cpu")
    spec = read_dpm_spec(tmp_path / "bl")
    assert (spec.prediction_type, spec.schedule.T) == ("v_prediction", 300)
    torch.testing.assert_close(spec.schedule.abar, sched.alphas_cumprod.double(), rtol=2e-6, atol=1e-7)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0, 299])
    with torch.no_grad():
        v = unet(x, t).sample
    eps = spec.schedule.eps_from_v(x, t, v)
    torch.testing.assert_close(load_backbone(tmp_path / "bl")(x, t), eps, rtol=0, atol=1e-5)
