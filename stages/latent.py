"""DVC stage `latent`: latent DPM on z, unconditional and few-shot generation, class-conditional G (PDAE.md §5)."""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import torch

from pdae.autoencode import load_models
from pdae.data import load_attributes, load_split
from pdae.io import load_tensors, save_image_grid
from pdae.latent import (
    classcond_study,
    fewshot_study,
    labels_for,
    save_latent,
    train_classcond,
    train_latent,
    uncond_study,
)
from pdae.nets.pdae import save_pdae
from pdae.scoring import classifier_fd, load_scorer
from pdae.stage import stage_main

PREPARED, LATENTS, OUT = Path("data/prepared"), Path("latents"), Path("models/latent")
FIGS, CKPT = Path("reports/figures/latent"), Path("checkpoints/latent")


def body(cfg, run) -> dict:
    base, lcfg, device = cfg["base"], cfg["latent"], cfg["device"]
    train, test, stats = (load_tensors(LATENTS / f"{n}.safetensors", "latents") for n in ("train", "test", "stats"))
    ckpt = CKPT / "mlp.safetensors"
    dpm, res = train_latent(train["z"], stats["mean"], stats["std"], lcfg, base.seed, device, ckpt, run)
    save_latent(dpm, OUT)
    metrics: dict = {"latent_images_seen": res.images_seen, "latent_train_seconds": round(res.seconds, 1),
                     "latent_final_loss": res.history[-1][2] if res.history else None}  # fmt: skip
    model, schedule = load_models("models/baseline", "models/pdae", device)
    dpm.to(device)
    scorer, gen = load_scorer(PREPARED), torch.Generator().manual_seed(base.seed + 7)
    train_x, train_ids = load_split(PREPARED, "train")
    test_x = load_split(PREPARED, "test")[0]
    uncond, figures = uncond_study(dpm, model, schedule, test["z"], lcfg, gen, scorer, test_x)
    metrics.update(uncond, n_samples=lcfg.n_samples, latent_steps=lcfg.latent_steps, steps=lcfg.steps)
    attrs = load_attributes(PREPARED)
    labels, img_labels = labels_for(attrs, train["ids"]), labels_for(attrs, train_ids)
    if scorer is None or labels is None:
        metrics["label_metrics"] = "skipped: the dataset has no label column (no FD, few-shot or class-cond G)"
    else:
        real = train_x[torch.randperm(len(train_x), generator=gen)[: lcfg.n_samples]]
        metrics["real_fd"] = classifier_fd(scorer, real, test_x)
        few, few_figs = fewshot_study(dpm, model, schedule, train["z"], labels, lcfg, gen, scorer, base.seed)
        metrics.update(few)
        figures.update(few_figs)
        if lcfg.classcond_images > 0:
            n_cls = int(img_labels.max()) + 1
            cc_model, cc_res = train_classcond(model.backbone, schedule, train_x, img_labels, n_cls, model.z_dim,
                                               base, lcfg, device, CKPT / "classcond.safetensors", run)  # fmt: skip
            save_pdae(cc_model, OUT / "classcond")
            cc, cc_figs = classcond_study(cc_model, schedule, n_cls, lcfg, gen, scorer)
            metrics.update(cc, classcond_images_seen=cc_res.images_seen,
                           classcond_train_seconds=round(cc_res.seconds, 1))  # fmt: skip
            figures.update(cc_figs)
    for name, (images, nrow) in figures.items():
        run.log_artifact(save_image_grid(FIGS / f"{name}.png", images, nrow=nrow), "figures/latent")
    for ckpt in CKPT.glob("*.safetensors"):
        ckpt.unlink()
    return metrics


if __name__ == "__main__":
    stage_main("latent", ["latent"], body, metrics_file="metrics/latent.json")
