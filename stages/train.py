"""DVC stage `train`: train PDAE's encoder E and gradient estimator G on the frozen baseline DPM, then diagnose."""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import pandas as pd
import torch

from pdae.autoencode import baseline_reconstruct, decode, encode, invert, random_xT
from pdae.baseline import load_schedule
from pdae.data import load_attributes, load_split
from pdae.diagnostics import gap_curve, gap_reduction, one_step_denoise, plot_gap
from pdae.fit import train_pdae
from pdae.io import save_figure, save_image_grid, write_csv
from pdae.metrics import mse
from pdae.nets.pdae import load_backbone, save_pdae
from pdae.scoring import agreement, load_scorer
from pdae.stage import stage_main

PREPARED, BASELINE, OUT, FIGS = (
    Path("data/prepared"),
    Path("models/baseline"),
    Path("models/pdae"),
    Path("reports/figures"),
)


def body(cfg, run) -> dict:
    base, tcfg, device = cfg["base"], cfg["train"], cfg["device"]
    train_x, _ = load_split(PREPARED, "train")
    backbone, schedule = load_backbone(BASELINE).to(device), load_schedule(BASELINE)
    ckpt = Path("checkpoints/train/state.safetensors")
    model, result = train_pdae(backbone, schedule, train_x, base, tcfg, device, ckpt, run)
    save_pdae(model.cpu(), OUT)
    model.to(device)
    write_csv("plots/train_loss.csv", pd.DataFrame(result.history, columns=["step", "images", "loss"]))
    metrics = {
        "images_seen": result.images_seen,
        "train_seconds": round(result.seconds, 1),
        "images_per_second": result.images_per_second,
        "weighting": tcfg.weighting,
        "final_loss": result.history[-1][2] if result.history else None,
    }
    test_x, test_ids = load_split(PREPARED, "test")
    gen = torch.Generator().manual_seed(base.seed + 2)
    sub = torch.randperm(len(test_x), generator=gen)[: tcfg.eval_images]
    x, ids = test_x[sub], test_ids[sub]
    gap = gap_curve(model, x, schedule, list(range(0, schedule.T, 50)) + [schedule.T - 1], seed=base.seed)
    write_csv("plots/gap.csv", gap)
    metrics["gap_reduction"] = gap_reduction(gap, schedule.T)
    run.log_artifact(save_figure(FIGS / "gap.png", plot_gap(gap)), "figures")
    denoise = one_step_denoise(model, x[:6], schedule, [400, 500, 600, 700, 800], seed=base.seed)
    run.log_artifact(save_image_grid(FIGS / "one_step_denoise.png", denoise, nrow=16), "figures")
    steps = tcfg.eval_steps
    z = encode(model, x)
    rec_inf = decode(model, z, invert(model, x, z, schedule, steps, progress=True), schedule, steps, progress=True)
    rec_rand = decode(model, z, random_xT(len(x), tuple(x.shape[1:]), gen), schedule, steps, progress=True)
    base_rec = baseline_reconstruct(lambda a, t: backbone(a, t), x.to(device), schedule, steps)
    metrics.update(
        recon_inferred_mse=mse(rec_inf, x).mean().item(),
        recon_random_mse=mse(rec_rand, x).mean().item(),
        baseline_inverted_mse=mse(base_rec, x).mean().item(),
        eval_images=len(x),
        eval_steps=steps,
    )
    grid = torch.stack([x[:16], rec_inf[:16], rec_rand[:16], base_rec[:16]], dim=0).flatten(0, 1)
    run.log_artifact(save_image_grid(FIGS / "reconstructions.png", grid, nrow=16), "figures")
    scorer = load_scorer(PREPARED)
    if scorer is not None:
        labels = torch.as_tensor(load_attributes(PREPARED).set_index("id").loc[ids.numpy(), "label"].to_numpy())
        metrics["recon_random_class_agreement"] = agreement(scorer, rec_rand, labels)
        metrics["recon_inferred_class_agreement"] = agreement(scorer, rec_inf, labels)
    ckpt.unlink(missing_ok=True)
    return metrics


if __name__ == "__main__":
    stage_main("train", ["train"], body, metrics_file="metrics/train.json")
