"""Latent DPM: MLP wiring, loss, clamping, latent DDIM, few-shot selection, class-conditional G, the stage."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pdae.config import BaseConfig, LatentConfig
from pdae.diffusion import Schedule
from pdae.errors import PdaeError
from pdae.latent import (
    LatentDPM,
    bare_samples,
    classcond_sample,
    classcond_study,
    fewshot_codes,
    fewshot_study,
    labels_for,
    latent_ddim,
    load_latent,
    rejection_select,
    sample_latents,
    save_latent,
    train_classcond,
    train_latent,
)
from pdae.nets.latent import LatentMLP, timestep_embedding

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, width=16, batch_size=64, latent_steps=4, steps=2, eval_batch_size=64)


def _dpm(z_dim: int = 4, mean: float = 0.0, std: float = 1.0) -> LatentDPM:
    return LatentDPM(LatentMLP(z_dim, depth=2, width=16), torch.full((z_dim,), mean), torch.full((z_dim,), std))


# --- network ---------------------------------------------------------------------------------------------------------


def test_mlp_shapes_and_input_skips():
    mlp = LatentMLP(6, depth=3, width=16, time_dim=8, time_width=12)
    z, t = torch.randn(5, 6), torch.tensor([0, 10, 10, 999, 3])
    assert mlp(z, t).shape == (5, 6)
    assert [layer.linear.in_features for layer in mlp.layers] == [6, 22, 22] and mlp.out.in_features == 22
    seen: list[torch.Tensor] = []
    for mod in [*(layer.linear for layer in mlp.layers), mlp.out]:
        mod.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    mlp(z, t)
    assert torch.equal(seen[0], z)  # the first layer sees z_t alone; every later layer ends with z_t
    assert all(torch.equal(x[:, -6:], z) for x in seen[1:])
    # time features computed once per distinct t give the same result as one row at a time
    rows = torch.cat([mlp(z[i : i + 1], t[i : i + 1]) for i in range(5)])
    assert torch.allclose(mlp(z, t), rows, atol=1e-5)
    assert timestep_embedding(t, 7).shape == (5, 7)


def test_latent_loss_finite_and_decreasing():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0, 0, 1], [-3.0, 1, 0, 0]])
    z = centres[torch.randint(0, 2, (256,), generator=gen)] + 0.1 * torch.randn(256, 4, generator=gen)
    cfg = LatentConfig(**{**TINY, "width": 32, "images": 64 * 120, "lr": 3e-3, "ema_decay": 0.9})
    dpm, result = train_latent(z, z.mean(0), z.std(0), cfg, seed=0, device=torch.device("cpu"), progress=False)
    losses = [h[2] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]
    assert not dpm.training and torch.allclose(dpm.denormalise(dpm.normalise(z)), z, atol=1e-5)
    # latent.depth counts every layer as the paper does: TINY's depth 2 is one hidden layer + the output layer
    assert cfg.depth == 2 and len(dpm.mlp.layers) == 1 and dpm.mlp.out.out_features == 4


def test_save_load_round_trip(tmp_path):
    dpm = _dpm(mean=2.0, std=3.0)
    save_latent(dpm, tmp_path)
    back = load_latent(tmp_path)
    z, t = torch.randn(3, 4), torch.tensor([1, 2, 3])
    assert torch.equal(back(z, t), dpm(z, t)) and torch.equal(back.std, dpm.std) and back.beta == 0.008
    (tmp_path / "latent_config.json").write_text(json.dumps({**dpm.config, "width": 8}))
    with pytest.raises(PdaeError, match="dvc repro latent"):
        load_latent(tmp_path)


# --- sampling and clamping -------------------------------------------------------------------------------------------


def test_latent_ddim_exact_gaussian():
    """For data N(0, I) the optimal eps is sqrt(1 - abar_t) z_t: DDIM then maps N(0, I) to N(0, I)."""
    sched = Schedule.constant(1000, 0.008)
    eps_fn = lambda x, t: sched.sqrt_one_minus_abar[t].float()[:, None] * x  # noqa: E731
    z = latent_ddim(eps_fn, torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)), sched, steps=200)
    assert z.shape == (4000, 8) and 0.95 < z.std().item() < 1.03 and abs(z.mean().item()) < 0.05


def test_clamping_in_normalised_space():
    sched = Schedule.constant(1000, 0.008)
    zero_eps = lambda x, t: torch.zeros_like(x)  # noqa: E731  -- x0 prediction x / sqrt(abar_t) explodes
    z_T = torch.randn(64, 4)
    assert latent_ddim(zero_eps, z_T, sched, 10).abs().max() > 5
    assert latent_ddim(zero_eps, z_T, sched, 10, clip_x0=True).abs().max() <= 1.0
    dpm = _dpm(mean=5.0, std=2.0)
    big = 10 * torch.randn(32, 4)
    clamped = sample_latents(dpm, 32, 5, clip_noise=True, noise=big)
    assert torch.allclose(clamped, sample_latents(dpm, 32, 5, noise=big.clamp(-1, 1)))
    both = sample_latents(dpm, 32, 5, clip_noise=True, clip_x0=True, noise=big)
    assert both.min() >= 3.0 - 1e-5 and both.max() <= 7.0 + 1e-5  # [-1, 1] normalised = mean -/+ std
    assert sample_latents(dpm, 7, 3, generator=torch.Generator().manual_seed(0), batch_size=3).shape == (7, 4)


# --- few-shot -------------------------------------------------------------------------------------------------------


def test_rejection_select_order_and_fill():
    scores = torch.tensor([0.1, 0.9, 0.2, 0.7, 0.95, 0.3])
    idx, rate = rejection_select(scores, 2, threshold=0.5)
    assert idx.tolist() == [1, 3] and rate == 0.5  # first accepted draws, in draw order
    idx, _ = rejection_select(scores, 5, threshold=0.5)
    assert idx.tolist() == [1, 3, 4, 5, 2]  # then the best rejected ones
    idx, rate = rejection_select(scores, 2)  # no threshold: the best-scoring draws
    assert idx.tolist() == [4, 1] and rate == 2 / 6


def test_fewshot_codes_pick_the_target_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = 4 * torch.eye(3, 6)
    labels = torch.arange(3).repeat(100)
    train_z = centres[labels] + torch.randn(300, 6, generator=gen)
    pool_labels = torch.randint(0, 3, (600,), generator=gen)
    pool = centres[pool_labels] + torch.randn(600, 6, generator=gen)
    dpm = _dpm(6)
    dpm.mean, dpm.std = train_z.mean(0), train_z.std(0)
    for k, threshold in ((1, 0.5), (5, 0.5), (1, None), (5, None)):
        codes, rate = fewshot_codes(dpm, train_z, labels, pool, target=2, k=k, n=30, threshold=threshold)
        nearest = torch.cdist(codes, centres).argmin(1)
        assert (nearest == 2).double().mean() >= 0.9 and 0 < rate < 1
        assert threshold is not None or rate == 30 / 600
    with pytest.raises(PdaeError, match="fewer than K"):
        fewshot_codes(dpm, train_z, labels, pool, target=2, k=101, n=3)


def _tiny_models(root: Path):
    from pdae.autoencode import load_models
    from pdae.io import load_tensors

    model, schedule = load_models(root / "models/baseline", root / "models/pdae")
    lat = {n: load_tensors(root / f"latents/{n}.safetensors") for n in ("train", "test", "stats")}
    return model, schedule, lat


def test_fewshot_end_to_end_on_tiny_project(tiny_project):
    from pdae.data import load_attributes
    from pdae.scoring import load_scorer

    model, schedule, lat = _tiny_models(tiny_project)
    cfg = LatentConfig(**TINY, images=64 * 3, fewshot_k=[1, 3], fewshot_samples=2, fewshot_draws=100)
    dpm, _ = train_latent(lat["train"]["z"], lat["stats"]["mean"], lat["stats"]["std"], cfg, 0, torch.device("cpu"),
                          progress=False)  # fmt: skip
    labels = labels_for(load_attributes(tiny_project / "data/prepared"), lat["train"]["ids"])
    scorer = load_scorer(tiny_project / "data/prepared")
    metrics, grids = fewshot_study(dpm, model, schedule, lat["train"]["z"], labels, cfg, torch.Generator(), scorer)
    assert set(metrics["fewshot_precision"]) == {1, 3} and metrics["fewshot_draws"] == 100
    assert all(0 <= v <= 1 for v in [*metrics["fewshot_precision"].values(), *metrics["fewshot_acceptance"].values()])
    images, nrow = grids["fewshot_K3"]
    assert images.shape == (10 * 2, 1, 8, 8) and nrow == 2 and images.abs().max() <= 1


# --- class-conditional G ---------------------------------------------------------------------------------------------


def test_classcond_shapes_and_zero_scale_is_bare_dpm(tiny_project):
    from pdae.data import load_split
    from pdae.scoring import load_scorer

    model, schedule, _ = _tiny_models(tiny_project)
    x, _ = load_split(tiny_project / "data/prepared", "train")
    labels = torch.arange(len(x)) % 3
    cfg = LatentConfig(**TINY, classcond_images=32, classcond_batch_size=16, classcond_scales=[0.0, 2.0],
                       classcond_samples=2)  # fmt: skip
    base = BaseConfig(image_size=8, threads=1)
    cc, result = train_classcond(model.backbone, schedule, x, labels, 3, 5, base, cfg, torch.device("cpu"),
                                 progress=False)  # fmt: skip
    assert result.images_seen == 32 and cc.encode(torch.tensor([0, 2])).shape == (2, 5)
    with torch.no_grad():  # make the shift clearly non-zero
        for p in cc.gradient.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_T = torch.randn(4, 1, 8, 8)
    lab = torch.tensor([0, 1, 2, 0])
    w0 = classcond_sample(cc, lab, x_T, schedule, 0.0, steps=3)
    assert w0.shape == (4, 1, 8, 8)
    # G scaled by 0 vs the bare DPM's sampler: different code paths, equal up to float rounding over 3 steps
    torch.testing.assert_close(w0, bare_samples(model.backbone, x_T, schedule, 3), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(classcond_sample(cc, lab, x_T, schedule, 2.0, steps=3), w0)
    scorer = load_scorer(tiny_project / "data/prepared")
    metrics, grids = classcond_study(cc, schedule, 3, cfg, torch.Generator(), scorer)
    assert set(metrics["classcond_precision"]) == {0.0, 2.0}
    assert grids["classcond"][0].shape == (2 * 6, 1, 8, 8) and grids["classcond"][1] == 6  # one row per scale


# --- the stage ------------------------------------------------------------------------------------------------------


class _RecordingRun:
    def __init__(self) -> None:
        self.artifacts: list[str] = []

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(Path(path).name)

    def log_metrics(self, metrics, step=None) -> None:
        pass


def _run_stage(tiny_project: Path, monkeypatch, extra: str = "") -> tuple[dict, _RecordingRun]:
    monkeypatch.chdir(tiny_project)
    (tiny_project / "params.yaml").write_text(
        "base:\n  image_size: 8\n  threads: 1\n  device: cpu\n"
        "latent:\n  depth: 2\n  width: 16\n  images: 256\n  batch_size: 64\n  latent_steps: 3\n  steps: 2\n"
        "  n_samples: 24\n  study_samples: 12\n  fewshot_k: [1, 2]\n  fewshot_samples: 2\n  fewshot_draws: 40\n"
        "  classcond_images: 32\n  classcond_batch_size: 16\n  classcond_scales: [0.0, 1.0]\n  classcond_samples: 1\n"
        + extra
    )
    run = _RecordingRun()
    monkeypatch.setattr("pdae.stage.stage_run", lambda name, params=None: contextlib.nullcontext(run))
    spec = importlib.util.spec_from_file_location("latent_stage", ROOT / "stages/latent.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    from pdae.stage import stage_main

    stage_main("latent", ["latent"], stage.body, metrics_file="metrics/latent.json")
    return json.loads((tiny_project / "metrics/latent.json").read_text()), run


def test_latent_stage_on_tiny_project(tiny_project, monkeypatch):
    m, run = _run_stage(tiny_project, monkeypatch)
    for key in ("uncond_fd", "baseline_uncond_fd", "real_fd", "uncond_class_entropy", "uncond_latent_fd"):
        assert m[key] is not None and m[key] >= 0, key
    assert set(m["fewshot_precision"]) == {"1", "2"} and set(m["classcond_precision"]) == {"0.0", "1.0"}
    assert set(m["clamp_study"]) >= {"none", "noise", "x0", "both"} and m["n_samples"] == 24
    for res, key in ((m, "uncond_fd"), (m, "baseline_uncond_fd"), (m["clamp_study"]["none"], "fd")):
        assert res[f"{key}_low"] <= res[key] <= res[f"{key}_high"], key
    verdicts = {"latent DPM lower", "bare DPM lower", "no difference at this size"}
    assert m["uncond_vs_baseline_fd"] in verdicts
    assert m["clamp_study"]["none_vs_both_fd"] in {"none lower", "both lower", "no difference at this size"}
    assert load_latent(tiny_project / "models/latent").mlp.config["width"] == 16
    assert {"samples.png", "clamp.png", "fewshot_K1.png", "fewshot_K2.png", "classcond.png"} <= set(run.artifacts)
    assert not list((tiny_project / "checkpoints/latent").glob("*.safetensors"))


def test_latent_stage_without_labels_skips_label_metrics(tiny_project, monkeypatch):
    import shutil

    import pandas as pd

    attrs = tiny_project / "data/prepared/attributes.csv"
    pd.read_csv(attrs).drop(columns=["label"]).to_csv(attrs, index=False)
    shutil.rmtree(tiny_project / "data/prepared/label_classifier")
    m, run = _run_stage(tiny_project, monkeypatch, extra="  study_samples: 0\n")
    assert m["label_metrics"].startswith("skipped") and "fewshot_precision" not in m and "uncond_fd" not in m
    assert m["uncond_latent_fd"] >= 0 and m["clamp_study"]["samples"] == 0
    assert "samples.png" in run.artifacts and "clamp.png" not in run.artifacts
