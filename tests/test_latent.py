"""Latent DPM: MLP wiring, loss, clamping, latent DDIM, few-shot selection, class-conditional G, the stage."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pdae.config import BaseConfig, LatentConfig
from pdae.data import load_split
from pdae.diffusion import Schedule
from pdae.errors import PdaeError
from pdae.fewshot import (
    accepted_f1,
    accepted_precision,
    class_probs,
    fewshot_study,
    labelled_examples,
    select_c,
    threshold_select,
    topk_select,
)
from pdae.latent import (
    LatentDPM,
    bare_samples,
    classcond_sample,
    classcond_study,
    labels_for,
    latent_ddim,
    load_latent,
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


def test_threshold_and_topk_selection():
    scores = torch.tensor([0.1, 0.9, 0.2, 0.7, 0.95, 0.3])
    assert threshold_select(scores, 2, 0.5).tolist() == [1, 3]  # first accepted draws, in draw order
    assert threshold_select(scores, 5, 0.5).tolist() == [1, 3, 4]  # never filled up with rejected draws
    assert topk_select(scores, 2).tolist() == [4, 1]
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accepted_precision(probs, torch.tensor([0, 1, 1, 1]), [0, 1], 0.65) == (0.5 + 1.0) / 2
    assert accepted_precision(probs, torch.tensor([0, 1, 1, 1]), [0, 1], 0.95) is None
    # class 0: accepted {0, 1}, positives {0} -> F1 2/3; class 1: accepted {2}, positives {1, 2, 3} -> F1 2/4
    assert accepted_f1(probs, torch.tensor([0, 1, 1, 1]), [0, 1], 0.65) == pytest.approx((2 / 3 + 0.5) / 2)
    assert accepted_f1(probs, torch.tensor([0, 1, 1, 1]), [0, 1], 0.95) == 0.0


def test_inception_features_without_weights_is_one_clear_error(monkeypatch):
    from pdae.fewshot import feature_fn

    monkeypatch.setattr(
        "pdae.metrics.inception.inception_extractor", lambda weights="auto": (None, "no weights cached")
    )
    with pytest.raises(PdaeError, match="no weights cached.*fewshot_features: classifier"):
        feature_fn("inception", None)(torch.zeros(2, 1, 8, 8))


def test_labelled_examples_and_c_selection_on_validation():
    gen = torch.Generator().manual_seed(0)
    centres = 4 * torch.eye(3, 6)
    labels = torch.arange(3).repeat(100)
    z = centres[labels] + torch.randn(300, 6, generator=gen)
    val = torch.zeros(300, dtype=torch.bool)
    val[:60] = True
    lab = labelled_examples(labels, 5, ~val, torch.Generator().manual_seed(1))
    assert len(lab) == 15 and not val[lab].any() and labels[lab].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # an absurdly strong penalty (C = 1e-6) gives flat probabilities that accept nothing at 0.5: never selected
    clf, rec = select_c(z[lab], labels[lab], z[val], labels[val], [1e-6, 1.0], 0.5, 0)
    assert rec["selected"] == 1.0 and rec["validation_precision"][0] is None and rec["validation_precision"][1] > 0.9
    assert rec["validation_f1"][0] == 0.0 and rec["validation_f1"][1] > 0.9
    assert (class_probs(clf, centres).argmax(1) == torch.arange(3)).all()
    _, rec = select_c(z[lab], labels[lab], z[:0], labels[:0], [0.1, 1.0], 0.5, 0)
    assert rec["selected"] == 0.1 and rec["why"] == "empty validation split"
    with pytest.raises(PdaeError, match="fewer than K = 101"):
        labelled_examples(labels, 101, ~val, gen)


def _tiny_models(root: Path):
    from pdae.autoencode import load_models
    from pdae.io import load_tensors

    model, schedule = load_models(root / "models/baseline", root / "models/pdae")
    lat = {n: load_tensors(root / f"latents/{n}.safetensors") for n in ("train", "test", "stats")}
    return model, schedule, lat


def test_fewshot_end_to_end_on_tiny_project(tiny_project):
    from pdae.data import load_attributes, load_split, load_validation_ids, validation_mask
    from pdae.scoring import load_scorer

    prepared = tiny_project / "data/prepared"
    model, schedule, lat = _tiny_models(tiny_project)
    cfg = LatentConfig(**TINY, images=64 * 3, fewshot_k=[1, 3], fewshot_samples=5, fewshot_draws=100, fewshot_boot=20,
                       fewshot_real=20)  # fmt: skip
    dpm, _ = train_latent(lat["train"]["z"], lat["stats"]["mean"], lat["stats"]["std"], cfg, 0, torch.device("cpu"),
                          progress=False)  # fmt: skip
    x, ids = load_split(prepared, "train")
    labels = labels_for(load_attributes(prepared), ids)
    val = validation_mask(ids, load_validation_ids(prepared))
    bare = x[:40]  # stands in for the bare DPM's samples: the baseline's wiring, not its quality, is tested here
    scorer = load_scorer(prepared)
    m, grids = fewshot_study(dpm, model, schedule, lat["train"]["z"], x, labels, val, cfg, torch.Generator(), scorer,
                             bare=bare)  # fmt: skip
    assert set(m["K"]) == {1, 3} and m["draws"] == 100 and m["threshold"] == 0.5 and m["protocol"].startswith("d2c")
    assert m["validation_rows"] == int(val.sum()) > 0 and m["K"][3]["labelled"] == 30
    assert m["features"] == "classifier" and set(m["n_real"].values()) == {20}  # capped real set per class
    for entry in m["K"].values():
        assert entry["c_selection"]["candidates"] == [0.01, 0.1, 1.0] and len(entry["per_class"]) == 10
        for row in entry["per_class"].values():
            assert 0 <= row["acceptance_rate"] <= 1 and row["n_accepted"] <= 5
            assert row["topk_precision"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # five top-k images per class
            assert (row["fd"] is None) == (row["n_accepted"] < 5)
            if row["fd"] is not None:
                assert row["fd"]["low"] <= row["fd"]["high"] and row["kid"]["n_boot"] == 20
        assert any(r["fd"] is not None for r in entry["per_class"].values())
        base = entry["baseline"]
        assert base["draws"] == 40 and 0 <= base["acceptance_rate"] <= 1
    images, nrow = grids["K3"]
    assert images.shape == (10 * 5, 1, 8, 8) and nrow == 5 and images.abs().max() <= 1


# --- class-conditional G ---------------------------------------------------------------------------------------------


def test_classcond_shapes_and_zero_scale_is_bare_dpm(tiny_project):
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
    text = (
        "base:\n  image_size: 8\n  threads: 1\n  device: cpu\n"
        "latent:\n  depth: 2\n  width: 16\n  images: 256\n  batch_size: 64\n  latent_steps: 3\n  steps: 2\n"
        "  n_samples: 24\n  study_samples: 12\n  fewshot_k: [1, 2]\n  fewshot_samples: 2\n  fewshot_draws: 40\n"
        "  classcond_images: 32\n  classcond_batch_size: 16\n  classcond_scales: [0.0, 1.0]\n  classcond_samples: 1\n"
    )
    replaced = {line.split(":")[0] for line in extra.splitlines() if line.strip()}  # duplicate keys are an error
    text = "".join(line for line in text.splitlines(keepends=True) if line.split(":")[0] not in replaced)
    (tiny_project / "params.yaml").write_text(text + extra)
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
    few = m["fewshot"]["label"]
    assert m["fewshot_conditions"] == ["label"] and set(few["K"]) == {"1", "2"} and "baseline" in few["K"]["1"]
    assert set(m["classcond_precision"]) == {"0.0", "1.0"} and m["classcond_condition"] == "label"
    assert m["clamp_study"]["reference"] == "validation" and m["n_validation"] > 0
    fds = {k: m["clamp_study"][k]["latent_fd"] for k in ("none", "noise", "x0", "both")}
    assert m["selection"]["clamp"]["lowest_latent_fd"] == min(fds, key=fds.get)
    assert set(m["clamp_study"]) >= {"none", "noise", "x0", "both"} and m["n_samples"] == 24
    for res, key in ((m, "uncond_fd"), (m, "baseline_uncond_fd"), (m["clamp_study"]["none"], "fd")):
        assert res[f"{key}_low"] <= res[key] <= res[f"{key}_high"], key
    verdicts = {"latent DPM lower", "bare DPM lower", "no difference at this size"}
    assert m["uncond_vs_baseline_fd"] in verdicts
    assert m["clamp_study"]["none_vs_both_fd"] in {"none lower", "both lower", "no difference at this size"}
    assert load_latent(tiny_project / "models/latent").mlp.config["width"] == 16
    assert {"samples.png", "clamp.png", "fewshot_label_K1.png", "fewshot_label_K2.png", "classcond.png"} <= set(
        run.artifacts
    )
    assert not list((tiny_project / "checkpoints/latent").glob("*.safetensors"))


def test_latent_stage_on_attribute_only_folder(tmp_path, monkeypatch):
    """A user folder of greyscale images whose table has only binary attributes: few-shot per attribute, class-cond G
    on the first one, sample FD by attribute scorers trained in the stage."""
    from tests.tiny import build_attribute_folder_project

    root = build_attribute_folder_project(tmp_path / "folder_project")
    prepared = root / "data/prepared"
    assert load_split(prepared, "train")[0].shape[1] == 1 and not (prepared / "label_classifier").exists()
    extra = "  fewshot_attributes: [odd, round]\n  scorer_epochs: 2\n  fewshot_boot: 10\n"
    m, run = _run_stage(root, monkeypatch, extra=extra)
    assert m["fewshot_conditions"] == ["odd", "round"] and m["classcond_condition"] == "odd"
    for col in ("odd", "round"):
        few = m["fewshot"][col]
        assert (
            few["classes"] == [0, 1] and set(few["K"]) == {"1", "2"} and m["scorers"][col]["source"] == "latent stage"
        )
        assert 0 <= few["K"]["2"]["acceptance_rate"] <= 1 and "baseline" in few["K"]["2"]
    assert set(m["classcond_precision"]) == {"0.0", "1.0"} and m["uncond_fd"] >= 0 and m["real_fd"] >= 0
    assert {"fewshot_odd_K1.png", "fewshot_round_K2.png", "classcond.png"} <= set(run.artifacts)
    assert (root / "models/latent/scorers/round/model.safetensors").is_file()


def test_latent_stage_without_conditions_skips_label_metrics(tiny_project, monkeypatch):
    import shutil

    import pandas as pd

    attrs = tiny_project / "data/prepared/attributes.csv"
    frame = pd.read_csv(attrs)
    frame[["id", "split"]].to_csv(attrs, index=False)
    shutil.rmtree(tiny_project / "data/prepared/label_classifier")
    m, run = _run_stage(tiny_project, monkeypatch, extra="  study_samples: 0\n")
    assert m["label_metrics"].startswith("skipped") and "fewshot" not in m and "uncond_fd" not in m
    assert m["uncond_latent_fd"] >= 0 and m["clamp_study"]["samples"] == 0
    assert "samples.png" in run.artifacts and "clamp.png" not in run.artifacts


def test_shift_fraction_benchmark_scores_validation_rows(tiny_project):
    from benchmarks.shift_fraction import measure
    from pdae.data import load_validation_ids

    res = measure(tiny_project, [0.0, 1.0], steps=2)
    assert res["split"] == "validation" and res["n_validation"] == len(
        load_validation_ids(tiny_project / "data/prepared")
    )
    agree = [r["class_agreement"] for r in res["rows"]]
    assert all(0 <= a <= 1 for a in agree) and res["selected"] == [0.0, 1.0][agree.index(max(agree))]
    assert all(r["fd"] >= 0 for r in res["rows"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [("  fewshot_attributes: [nope]\n", "'nope' is not a label or attribute column"),
     ("  fewshot_k: [500]\n", "fewer than K = 500")],
)  # fmt: skip
def test_bad_fewshot_condition_fails_before_training(tiny_project, monkeypatch, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        _run_stage(tiny_project, monkeypatch, extra=extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and message in err[0] and "latent.fewshot" in err[0]
    assert not (tiny_project / "models/latent").exists() and not (tiny_project / "metrics/latent.json").exists()
