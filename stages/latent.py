"""DVC stage `latent`: latent DPM on z, unconditional and few-shot generation, class-conditional G.

The method: docs/method.md §5.
"""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import torch

from pdae.autoencode import load_models
from pdae.data import binary_attribute_names, load_attributes, load_split, load_validation_ids, validation_mask
from pdae.errors import PdaeError
from pdae.fewshot import check_condition, condition_labels, fewshot_study
from pdae.io import load_tensors, save_image_grid
from pdae.latent import classcond_study, save_latent, train_classcond, train_latent, uncond_study
from pdae.nets.pdae import save_pdae
from pdae.scoring import classifier_fd, load_scorer, train_scorer
from pdae.stage import stage_main

PREPARED, LATENTS, OUT = Path("data/prepared"), Path("latents"), Path("models/latent")
FIGS, CKPT = Path("reports/figures/latent"), Path("checkpoints/latent")


def conditions(attrs, lcfg) -> list[str]:
    """Condition columns: latent.fewshot_attributes, else `label`, else the first binary attribute (may be [])."""
    if lcfg.fewshot_attributes:
        return list(lcfg.fewshot_attributes)
    if "label" in attrs.columns:
        return ["label"]
    return binary_attribute_names(attrs)[:1]


def scorers(columns, attrs, train_x, train_ids, test_x, test_ids, lcfg, base, device) -> tuple[dict, dict]:
    """An image classifier per condition trained on the full train split (the prepared label classifier for
    `label`); returns ({column: scorer}, {column: facts incl. its test accuracy})."""
    out, facts, prepared = {}, {}, load_scorer(PREPARED)
    for col in columns:
        y, y_test = condition_labels(attrs, train_ids, col), condition_labels(attrs, test_ids, col)
        if col == "label" and prepared is not None:
            out[col], facts[col] = prepared, {"source": "prepare (label classifier)"}
        else:
            out[col] = train_scorer(train_x, y, lcfg.scorer_epochs, base.seed, device, OUT / "scorers" / col)
            facts[col] = {"source": "latent stage", "epochs": lcfg.scorer_epochs}
        acc = (out[col].predict_proba(test_x).argmax(1) == y_test).double().mean().item()
        facts[col]["test_accuracy"] = round(acc, 5)
    return out, facts


def body(cfg, run) -> dict:
    base, lcfg, device = cfg["base"], cfg["latent"], cfg["device"]
    train, test, stats = (load_tensors(LATENTS / f"{n}.safetensors", "latents") for n in ("train", "test", "stats"))
    train_x, train_ids = load_split(PREPARED, "train")
    if not torch.equal(train_ids, train["ids"].long()):
        raise PdaeError("latents/train.safetensors does not match the prepared train split; re-run the encode stage.")
    val, attrs = validation_mask(train_ids, load_validation_ids(PREPARED)), load_attributes(PREPARED)
    columns = conditions(attrs, lcfg)
    for col in columns:  # bad conditions fail here, before any training
        check_condition(col, condition_labels(attrs, train_ids, col), val, lcfg.fewshot_k)
    ckpt = CKPT / "mlp.safetensors"
    dpm, res = train_latent(train["z"], stats["mean"], stats["std"], lcfg, base.seed, device, ckpt, run)
    save_latent(dpm, OUT)
    metrics: dict = {"latent_images_seen": res.images_seen, "latent_train_seconds": round(res.seconds, 1),
                     "latent_final_loss": res.history[-1][2] if res.history else None}  # fmt: skip
    model, schedule = load_models("models/baseline", "models/pdae", device)
    dpm.to(device)
    gen = torch.Generator().manual_seed(base.seed + 7)
    test_x, test_ids = load_split(PREPARED, "test")
    scorer_of, facts = scorers(columns, attrs, train_x, train_ids, test_x, test_ids, lcfg, base, device)
    scorer, keep = scorer_of.get(columns[0]) if columns else None, {}
    uncond, figures = uncond_study(dpm, model, schedule, test["z"], lcfg, gen, scorer, test_x, train["z"][val],
                                   train_x[val], keep)  # fmt: skip
    metrics.update(uncond, n_samples=lcfg.n_samples, latent_steps=lcfg.latent_steps, steps=lcfg.steps)
    metrics["n_validation"] = int(val.sum())
    metrics["selection"] = {  # settings chosen by looking at results, all on the validation split
        "clamp": {"configured": uncond["clamp"], "study": "clamp_study (reference: validation)",
                  "lowest_latent_fd": uncond["clamp_study"]["best_latent_fd"]},
        "shift_fraction": {"configured": lcfg.shift_fraction, "measured_by": "python -m benchmarks.shift_fraction"},
        "fewshot_c": "per condition and K: fewshot.<condition>.K.<K>.c_selection",
    }  # fmt: skip
    if not columns:
        metrics["label_metrics"] = (
            "skipped: attributes.csv has no label or binary attribute column (no FD, few-shot or class-cond G)"
        )
        return _finish(metrics, figures, run)
    metrics.update(fewshot_conditions=columns, scorers=facts)
    real = train_x[torch.randperm(len(train_x), generator=gen)[: lcfg.n_samples]]
    metrics["real_fd"] = classifier_fd(scorer, real, test_x)
    metrics["fewshot"] = {}
    for col in columns:
        labels = condition_labels(attrs, train_ids, col)
        few, grids = fewshot_study(dpm, model, schedule, train["z"], train_x, labels, val, lcfg, gen, scorer_of[col],
                                   base.seed, keep.get("bare"))  # fmt: skip
        metrics["fewshot"][col] = few
        figures.update({f"fewshot_{col}_{k}": v for k, v in grids.items()})
    if lcfg.classcond_images > 0:
        col = columns[0]
        img_labels = condition_labels(attrs, train_ids, col)
        n_cls = int(img_labels.max()) + 1
        cc_model, cc_res = train_classcond(model.backbone, schedule, train_x, img_labels, n_cls, model.z_dim,
                                           base, lcfg, device, CKPT / "classcond.safetensors", run)  # fmt: skip
        save_pdae(cc_model, OUT / "classcond")
        cc, cc_figs = classcond_study(cc_model, schedule, n_cls, lcfg, gen, scorer)
        metrics.update(cc, classcond_condition=col, classcond_images_seen=cc_res.images_seen,
                       classcond_train_seconds=round(cc_res.seconds, 1))  # fmt: skip
        figures.update(cc_figs)
    return _finish(metrics, figures, run)


def _finish(metrics: dict, figures: dict, run) -> dict:
    for name, (images, nrow) in figures.items():
        run.log_artifact(save_image_grid(FIGS / f"{name}.png", images, nrow=nrow), "figures/latent")
    for ckpt in CKPT.glob("*.safetensors"):
        ckpt.unlink()
    return metrics


if __name__ == "__main__":
    stage_main("latent", ["latent"], body, metrics_file="metrics/latent.json")
