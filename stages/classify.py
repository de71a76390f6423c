"""DVC stage `classify`: linear attribute probes on z vs pixels vs the bare DPM's x_T, edit directions,
manipulation success and the manipulation / interpolation figures."""

from __future__ import annotations

from pathlib import Path

import _env  # noqa: F401  (runs the stage in the project's environment, or one error line)
import torch

from pdae import edit, probes
from pdae.autoencode import load_models
from pdae.data import binary_attribute_names, load_attributes, load_split, load_validation_ids, validation_mask
from pdae.io import save_figure, write_csv, write_text
from pdae.scoring import load_scorer
from pdae.stage import stage_main

PREPARED, LATENTS, OUT, REPORTS = Path("data/prepared"), Path("latents"), Path("models/classifier"), Path("reports")


def body(cfg, run) -> dict:
    c, seed = cfg["classify"], cfg["base"].seed
    model, schedule = load_models("models/baseline", "models/pdae", cfg["device"])
    frame, norm = load_attributes(PREPARED), probes.Normaliser.from_stats(LATENTS / "stats.safetensors")
    names, split, train_ids = binary_attribute_names(frame), {}, None
    for s in ("train", "test"):
        x, ids = load_split(PREPARED, s)
        train_ids = ids if s == "train" else train_ids
        z = norm.normalise(probes.load_codes(LATENTS / f"{s}.safetensors", ids))
        x_T = probes.dpm_inversion(model.backbone, x, schedule, c.xT_steps, c.batch_size, progress=True)
        split[s] = (x, frame.iloc[ids.numpy()].reset_index(drop=True), {"z": z, "pixels": x, "xT": x_T})
    feats = {k: (split["train"][2][k], split["test"][2][k]) for k in ("z", "pixels", "xT")}
    feats = {k: v if k == "z" else probes.standardise(*v) for k, v in feats.items()}
    train_rows, test_rows = split["train"][1], split["test"][1]
    table, metrics, _ = probes.probe_suite(feats, train_rows, test_rows, names, c.probe_c, c.max_iter)
    # Edit directions: normals of more strongly regularised probes on z (closer to the class-mean difference), the
    # strength chosen on the validation split (a subset of train; the test split is not looked at for it).
    scorer, class_attrs = load_scorer(PREPARED), probes.class_attributes(frame, names)
    val = validation_mask(train_ids, load_validation_ids(PREPARED))
    selection = choose_direction_c(c, model, schedule, scorer, class_attrs, split["train"][0], train_rows, feats, val,
                                   norm, seed)  # fmt: skip
    (ztr, zte), cd = feats["z"], selection["selected"]
    metrics.update(direction_c=cd, direction_c_selection=selection, n_validation=int(val.sum()))
    edit_probes = probes.attribute_probes(ztr, train_rows, zte, test_rows, names, cd, c.max_iter)
    directions = probes.AttributeDirections.from_probes(edit_probes, norm)
    metrics["direction_auroc_mean_z"] = dir_auroc = probes.mean_auroc({n: a for n, (_, a) in edit_probes.items()})
    directions.save(OUT, extra={"direction_c": cd, "direction_auroc_mean_z": dir_auroc})
    metrics.update(xT_probe_steps=c.xT_steps, n_train=len(train_rows), n_test=len(test_rows))
    # Manipulation and interpolation on a class-balanced test subset.
    test_x = split["test"][0]
    labels = torch.tensor(test_rows["label"].to_numpy()) if "label" in test_rows else None
    sub = edit.balanced_subset(labels, c.manipulation_images, seed, len(test_x))
    x, lab = test_x[sub], None if labels is None else labels[sub]
    class_attrs = {k: v for k, v in class_attrs.items() if v in directions.names}
    scale = max(c.scales)
    metrics.update(manipulation_scale=scale, manipulation_steps=c.steps, manipulation_images=len(sub))
    if scorer is not None and class_attrs and lab is not None:
        args = (model, schedule, scorer, x, lab, directions, class_attrs, scale, c.steps, c.batch_size)
        res = edit.manipulation_success(*args, progress=True)
        metrics.update(manipulation_success=res["manipulation_success"], manipulation_per_class=res["per_class"])
        metrics["manipulation_reconstruction_agreement"] = res["reconstruction_agreement"]
    n_fig = min(c.figure_images, len(x))
    targets = edit.figure_targets(lab, class_attrs, directions.names, n_fig)
    dirs = torch.stack([directions.direction(t) for t in targets])
    edited = edit.manipulate(model, schedule, x[:n_fig], norm, dirs, c.scales, c.steps)
    fig = edit.manipulation_figure(edited, [f"→ {t}" for t in targets], c.scales)
    run.log_artifact(save_figure(REPORTS / "figures/manipulation.png", fig), "figures")
    n_pairs = min(c.interpolate_pairs, len(x) // 2)
    alphas = torch.linspace(0, 1, c.interpolate_frames).tolist()
    frames = edit.interpolate(model, schedule, x[0 : 2 * n_pairs : 2], x[1 : 2 * n_pairs : 2], alphas, c.steps)
    fig = edit.interpolation_figure(frames, alphas)
    run.log_artifact(save_figure(REPORTS / "figures/interpolation.png", fig), "figures")
    write_csv(REPORTS / "classify.csv", table)
    write_text(REPORTS / "classify.md", probes.classify_report(table, metrics))
    for path in (REPORTS / "classify.md", REPORTS / "classify.csv"):
        run.log_artifact(path, "reports")
    return metrics


def choose_direction_c(c, model, schedule, scorer, class_attrs, train_x, train_rows, feats, val, norm, seed) -> dict:
    """classify.direction_c: one value is used as given; several are compared by manipulation success on up to
    c.selection_images class-balanced validation images, with probes fitted on the train rows outside validation."""
    cands = list(c.direction_c)
    labels = torch.tensor(train_rows["label"].to_numpy()) if "label" in train_rows else None
    why = None
    if len(cands) == 1:
        why = "one candidate"
    elif scorer is None or not class_attrs or labels is None:
        why = "no label classifier or class attributes to score manipulations"
    elif int(val.sum()) < 2 or len(torch.unique(labels[val])) < 2:
        why = "validation split too small"
    if why is not None:
        return {"candidates": cands, "selected": cands[0], "why": why}
    ztr, keep, wanted = feats["z"][0], (~val).numpy(), sorted(set(class_attrs.values()))
    fit_rows, val_rows = train_rows[keep].reset_index(drop=True), train_rows[val.numpy()].reset_index(drop=True)

    def fit(cd: float) -> probes.AttributeDirections:
        found = probes.attribute_probes(ztr[~val], fit_rows, ztr[val], val_rows, wanted, cd, c.max_iter)
        return probes.AttributeDirections.from_probes(found, norm)

    sub = edit.balanced_subset(labels[val], c.selection_images, seed)
    images, lab = train_x[val][sub], labels[val][sub]
    return edit.select_direction_c(model, schedule, scorer, images, lab, fit, cands, class_attrs, max(c.scales),
                                   c.steps, c.batch_size)  # fmt: skip


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    stage_main("classify", ["classify"], body, metrics_file="metrics/classify.json")
