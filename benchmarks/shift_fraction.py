"""Choosing latent.shift_fraction (G on for the first fraction of the decoding steps) on the validation split.

Too costly to run inside every `dvc repro`, so this script measures it after a pipeline run: the codes z of the
validation images (a subset of the train split, data/prepared/validation.json; the test split is not read) are
decoded from random x_T (the same x_T for every candidate) with `latent.steps` DDIM steps, and each candidate is scored
by the label classifier: class agreement of the decoded image with the image's own label (does the decoded code keep
its semantics?) and the classifier-feature Fréchet distance to the validation images. The candidate with the highest
agreement is reported as the choice; params.yaml's latent.shift_fraction is set from it by hand.

    python -m benchmarks.shift_fraction [--fractions 0.5,0.7,1.0] [--project .]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pdae.errors import PdaeError


@torch.no_grad()
def measure(project: Path, fractions: list[float], steps: int, seed: int = 0, batch_size: int = 500) -> dict[str, Any]:
    """Scores of every candidate fraction on the validation rows of the project's prepared data and latents."""
    from pdae.autoencode import decode, load_models
    from pdae.data import load_attributes, load_split, load_validation_ids, validation_mask
    from pdae.io import load_tensors
    from pdae.latent import labels_for
    from pdae.scoring import classifier_fd, load_scorer

    prepared = project / "data/prepared"
    scorer = load_scorer(prepared)
    if scorer is None:
        raise PdaeError(f"{prepared} has no label classifier; the shift-fraction study scores class agreement.")
    x, ids = load_split(prepared, "train")
    val = validation_mask(ids, load_validation_ids(prepared))
    if int(val.sum()) < 2:
        raise PdaeError(
            f"{prepared}: the validation split has {int(val.sum())} rows; set prepare.validation_fraction."
        )
    z = load_tensors(project / "latents/train.safetensors", "latents")["z"][val]
    labels = labels_for(load_attributes(prepared), ids[val])
    model, schedule = load_models(project / "models/baseline", project / "models/pdae")
    size, ch = model.backbone.image_size, model.backbone.in_channels
    x_T = torch.randn(len(z), ch, size, size, generator=torch.Generator().manual_seed(seed))
    rows = []
    for f in fractions:
        imgs = decode(model, z, x_T, schedule, steps, shift_fraction=f, batch_size=batch_size)
        agree = (scorer.predict_proba(imgs).argmax(1) == labels).double().mean().item()
        rows.append({"shift_fraction": f, "class_agreement": agree, "fd": classifier_fd(scorer, imgs, x[val])})
    best = max(rows, key=lambda r: r["class_agreement"])
    return {"split": "validation", "n_validation": int(val.sum()), "steps": steps, "rows": rows,
            "selected": best["shift_fraction"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import ROOT, machine, save_result, table
    from pdae.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", default="0.5,0.7,1.0", help="comma-separated candidates in [0, 1]")
    ap.add_argument("--project", type=Path, default=ROOT, help="project folder with a completed pipeline run")
    args = ap.parse_args(argv)
    cfg = load_params(args.project / "params.yaml", sections=["latent"])
    fractions = [float(v) for v in args.fractions.split(",")]
    result = {**measure(args.project, fractions, cfg["latent"].steps, cfg["base"].seed), "machine": machine()}
    print(table([[r["shift_fraction"], r["class_agreement"], r["fd"]] for r in result["rows"]],
                ["shift_fraction", "class agreement", "classifier FD"]))  # fmt: skip
    print(f"selected on validation ({result['n_validation']} images): {result['selected']}")
    print(save_result("shift_fraction", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
