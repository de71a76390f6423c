"""DVC stage `evaluate`: reconstruction table, FID/KID, gap curve, figures, reports/report.md, served encoder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import torch

from pdae.evaluate import LatentSampling, evaluate_run, load_run, recon_plot_frame
from pdae.io import write_csv
from pdae.report import save_figures, write_report
from pdae.serve import log_encoder
from pdae.stage import stage_main
from pdae.tracking import git_commit

PREPARED, BASELINE, PDAE_DIR, LATENT = (
    Path("data/prepared"),
    Path("models/baseline"),
    Path("models/pdae"),
    "models/latent",
)
FIGS, REPORT = Path("reports/figures/evaluate"), Path("reports/report.md")


def body(cfg, run) -> dict:
    base, ecfg, device = cfg["base"], cfg["evaluate"], cfg["device"]
    start = time.time()

    def progress(msg: str) -> None:
        print(f"evaluate [{time.time() - start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    model, schedule = load_run(BASELINE, PDAE_DIR, device)
    lat = cfg.get("latent")
    sampling = (
        LatentSampling(
            lat.latent_steps, lat.clip_noise, lat.clip_x0, lat.shift_fraction, lat.solver, lat.latent_solver
        )
        if lat
        else None
    )
    result = evaluate_run(model, schedule, PREPARED, ecfg, LATENT, sampling, base.seed, progress)
    write_csv("plots/eval_recon.csv", recon_plot_frame(result.metrics))
    write_csv("plots/eval_gap.csv", result.gap)
    for fig in save_figures(result, FIGS):
        run.log_artifact(fig, "figures")
    info = {"git commit": git_commit(), "MLflow run": run.run_id, "device": str(device)}
    if ecfg.log_models and run.enabled:
        progress("logging models and the served encoder to MLflow")
        run.log_artifact(BASELINE, "models/baseline")
        run.log_artifact(PDAE_DIR, "models/pdae")
        model_info = log_encoder(run, PDAE_DIR)
        if model_info is not None:
            info["served encoder"] = f"`mlflow models serve -m runs:/{run.run_id}/encoder --env-manager local`"
    run.log_artifact(write_report(result.metrics, REPORT, "metrics", info), "report")
    return result.metrics


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    stage_main("evaluate", ["evaluate", "latent"], body, metrics_file="metrics/evaluate.json")
