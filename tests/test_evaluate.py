"""Evaluation library and stage: reconstruction table, FID/KID sets, report, figures, MLflow logging."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pdae.config import EvaluateConfig
from pdae.data import load_split
from pdae.errors import PdaeError
from pdae.evaluate import (
    ROWS,
    evaluate_run,
    latent_dpm_samples,
    load_run,
    recon_plot_frame,
    reconstruction_table,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    steps=[2, 3],
    inversion_steps=None,
    n_images=4,
    fid_samples=4,
    fid_real=5,
    fid_steps=2,
    gap_images=4,
    n_boot=7,
    batch_size=64,
)


@pytest.fixture()
def flush_denormals():
    """As the stage and CLI do: DDIM inversion near t = 0 is ~10x slower with float32 denormals."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def tiny_latent(project: Path) -> Path:
    """An (untrained) latent DPM on the tiny project's z statistics, saved to models/latent."""
    from pdae.io import load_tensors
    from pdae.latent import LatentDPM, save_latent
    from pdae.nets.latent import LatentMLP

    stats = load_tensors(project / "latents/stats.safetensors")
    dpm = LatentDPM(LatentMLP(len(stats["mean"]), depth=2, width=16), stats["mean"], stats["std"])
    return save_latent(dpm, project / "models/latent")


def test_reconstruction_table_rows_match_the_library(tiny_project, flush_denormals):
    from pdae.autoencode import baseline_reconstruct, reconstruct
    from pdae.metrics import mse

    model, schedule = load_run(tiny_project / "models/baseline", tiny_project / "models/pdae")
    x, _ = load_split(tiny_project / "data/prepared", "test")
    x = x[:4]
    res = reconstruction_table(model, schedule, x, steps=[2, 3], metrics=("ssim", "lpips", "mse"))
    assert set(res.table) == {"T2", "T3"} and set(res.table["T3"]) == set(ROWS)
    dims = {k: v["latent_dim"] for k, v in res.table["T3"].items()}
    assert dims == {"pdae_random": 8, "ddim_inferred": 64, "pdae_inferred": 72}
    for row in res.table["T3"].values():
        assert 0 <= row["mse"] <= 1 and -1 <= row["ssim"] <= 1
        assert (row["lpips"] is None) == (res.lpips_reason is not None)  # real LPIPS or None + reason
    ddim = baseline_reconstruct(lambda a, t: model.backbone(a, t), x, schedule, 3)
    assert res.table["T3"]["ddim_inferred"]["mse"] == pytest.approx(mse(ddim, x).mean().item(), rel=1e-5)
    inferred = reconstruct(model, x, schedule, 3, x_T="inferred")
    assert res.table["T3"]["pdae_inferred"]["mse"] == pytest.approx(mse(inferred, x).mean().item(), rel=1e-5)
    shared = reconstruction_table(model, schedule, x, steps=[3], inversion_steps=3, metrics=("mse",))
    assert shared.table["T3"]["pdae_inferred"]["mse"] == pytest.approx(res.table["T3"]["pdae_inferred"]["mse"])
    frame = recon_plot_frame({"reconstruction": res.table})
    assert list(frame["T"]) == [2, 3] and "pdae_random_mse" in frame


def test_evaluate_run_fid_sets_figures_and_report(tiny_project, flush_denormals, tmp_path, monkeypatch):
    """The FID/KID wiring with intervals; Inception features are replaced by the flattened pixels (64-D at 8x8), so
    the FID, KID, intervals and rankings below are real computations on cheap features."""
    from pdae.io import write_json
    from pdae.metrics import frechet_distance
    from pdae.report import save_figures, write_report

    calls = []

    def fake_features(images, *args, **kw):
        calls.append((tuple(images.shape), images.min().item(), images.max().item()))
        return images.flatten(1).float(), "fake"

    monkeypatch.setattr("pdae.metrics.inception_features", fake_features)
    model, schedule = load_run(tiny_project / "models/baseline", tiny_project / "models/pdae")
    latent = tiny_latent(tiny_project)
    cfg = EvaluateConfig(**TINY)
    result = evaluate_run(model, schedule, tiny_project / "data/prepared", cfg, latent_dir=latent, seed=1)
    m = result.metrics
    n_test = len(load_split(tiny_project / "data/prepared", "test")[0])
    assert list(m["fid"]) == ["ddim_samples", "latent_dpm_samples", "random_xT_reconstructions", "real_test"]
    assert calls[0][0] == (5, 1, 8, 8) and len(calls) == 5  # the real reference, then one call per set
    assert [c[0][0] for c in calls[1:]] == [4, 4, n_test, n_test] and all(-1 <= c[1] <= c[2] <= 1 for c in calls)
    for key, res in m["fid"].items():
        assert res["n_real"] == 5 and res["n_boot"] == 7
        for stat in ("fid", "kid", "classifier_fd"):
            assert res[f"{stat}_low"] <= res[stat] <= res[f"{stat}_high"], (key, stat)
        assert res["kid_subset_size"] < min(res["n_generated"], 5)
    real = m["fid"]["real_test"]
    test_x = load_split(tiny_project / "data/prepared", "test")[0]
    train_x = load_split(tiny_project / "data/prepared", "train")[0]
    ref = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(12))[:5]]
    assert real["fid"] == pytest.approx(frechet_distance(test_x.flatten(1), ref.flatten(1)), rel=1e-3)
    pairs = {"latent_dpm_samples_vs_ddim_samples", "random_xT_reconstructions_vs_real_test"}
    assert set(m["fid_comparisons"]) == pairs
    assert m["fid_headline"]["statistic"] in ("fid", "classifier_fd")
    assert m["fid_settings"]["random_xT_set"] == "decoded separately"  # n_images < the test split
    assert m["n_images"] == 4 and m["steps"] == [2, 3] and m["gap_images"] == 4 and "gap_reduction" in m
    assert m["gap_reduction_low"] <= m["gap_reduction"] <= m["gap_reduction_high"]
    assert {"ssim_sd", "mse_sd"} <= set(m["reconstruction"]["T3"]["pdae_inferred"])
    write_json(tmp_path / "evaluate.json", m)  # JSON-serialisable as is
    figures = save_figures(result, tmp_path / "reports/figures/evaluate")
    assert {p.name for p in figures} == {
        "eval_reconstructions.png",
        "eval_recon_steps.png",
        "eval_fid_sets.png",
        "eval_gap.png",
    }
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text(json.dumps({"gap_reduction": 0.5, "final_loss": 0.01}))
    text = write_report(m, tmp_path / "reports/report.md", tmp_path / "metrics").read_text()
    assert "| T = 3 | PDAE (inferred x_T) | 72 |" in text and "## Stage `train`" in text
    assert "![eval_gap](figures/evaluate/eval_gap.png)" in text and "latent-DPM samples" in text
    assert ("LPIPS not computed" in text) == (m["lpips_reason"] is not None)


def test_missing_inputs_name_the_stage(tiny_project, tmp_path):
    with pytest.raises(PdaeError, match=r"dvc repro baseline"):
        load_run(tmp_path / "missing", tiny_project / "models/pdae")
    with pytest.raises(PdaeError, match=r"dvc repro train"):
        load_run(tiny_project / "models/baseline", tmp_path / "missing")
    model, schedule = load_run(tiny_project / "models/baseline", tiny_project / "models/pdae")
    images, z, reason = latent_dpm_samples(model, schedule, tmp_path / "missing", 2, 2)
    assert images is None and z is None and "dvc repro latent" in reason
    with pytest.raises(PdaeError, match=r"dvc repro prepare"):
        evaluate_run(model, schedule, tmp_path / "missing", EvaluateConfig(**TINY))


def test_stage_writes_outputs_and_logs_models(tiny_project, mlflow_tmp, monkeypatch):
    import mlflow

    from pdae.evaluate import download_run_models
    from pdae.stage import stage_main

    monkeypatch.chdir(tiny_project)
    (tiny_project / "params.yaml").write_text(
        "base:\n  image_size: 8\n  threads: 1\n  device: cpu\n"
        "evaluate:\n  steps: [2]\n  n_images: 4\n  metrics: [ssim, mse]\n  gap_images: 4\n"
    )
    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "stages/evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_flush_denormal, False)
        stage_main("evaluate", ["evaluate", "latent"], stage.body, metrics_file="metrics/evaluate.json")
    m = json.loads((tiny_project / "metrics/evaluate.json").read_text())
    assert set(m["reconstruction"]["T2"]) == set(ROWS) and "fid" not in m
    assert (tiny_project / "plots/eval_recon.csv").is_file() and (tiny_project / "plots/eval_gap.csv").is_file()
    report = (tiny_project / "reports/report.md").read_text()
    assert "runs:/" in report and "eval_reconstructions.png" in report
    mlflow.set_tracking_uri(mlflow_tmp)
    (run,) = mlflow.search_runs(experiment_names=["pdae"], output_format="list")
    assert run.data.metrics["reconstruction.T2.pdae_inferred.mse"] == pytest.approx(
        m["reconstruction"]["T2"]["pdae_inferred"]["mse"]
    )
    base, pdae_dir = download_run_models(run.info.run_id, tiny_project / "downloaded")
    assert (pdae_dir / "pdae.safetensors").is_file() and (base / "config.json").is_file()
    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/encoder"))
    assert (model_dir / "MLmodel").is_file() and not list(model_dir.rglob("*.pkl"))  # nothing pickled


def test_random_xt_fid_set_reuses_the_tables_decode_of_the_whole_split(tiny_project, flush_denormals, monkeypatch):
    from pdae.metrics import mse

    monkeypatch.setattr("pdae.metrics.inception_features", lambda images, *a, **k: (images.flatten(1).float(), "fake"))
    model, schedule = load_run(tiny_project / "models/baseline", tiny_project / "models/pdae")
    cfg = EvaluateConfig(**{**TINY, "steps": [2], "n_images": None, "metrics": ["mse", "fid"], "gap_images": 2})
    result = evaluate_run(model, schedule, tiny_project / "data/prepared", cfg, seed=1)
    m = result.metrics
    n_test = len(load_split(tiny_project / "data/prepared", "test")[0])
    assert m["n_images"] == n_test and m["fid_settings"]["random_xT_set"] == "shared with the reconstruction table"
    rec, real = result.fid_images["random_xT_reconstructions"], result.fid_images["real_test"]
    assert len(rec) == len(real) == n_test  # the same images in the same order as the table's rows
    table_mse = m["reconstruction"]["T2"]["pdae_random"]["mse"]
    assert mse(rec, real).mean().item() == pytest.approx(table_mse, rel=1e-6)
    assert m["reconstruction"]["T2"]["pdae_random"]["mse_sd"] == pytest.approx(mse(rec, real).double().std().item())
