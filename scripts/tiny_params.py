"""Shrink a params file to a tiny budget: the whole pipeline then runs in a few minutes on 2 CPU cores.

A smoke run, not a result: 8x8 digits, small networks, a few hundred images per training stage. Used by CI (the
README's pipeline command on a fresh clone), tests/test_pipeline.py and `benchmarks/p4_pipeline.py --tiny`.

    python scripts/tiny_params.py params.yaml      # rewrites the file in place
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

# Keys a section does not know (in this version of pdae/config.py) are dropped when applied.
TINY: dict[str, dict[str, Any]] = {
    "base": {"image_size": 8, "threads": 1},
    "prepare": {"classifier_epochs": 1, "classifier_width": 8},
    "baseline": {
        "channels": [8, 16],
        "attention_head_dim": 8,
        "images": 256,
        "batch_size": 32,
        "n_samples": 16,
        "sample_steps": 5,
    },
    "train": {"z_dim": 8, "images": 256, "batch_size": 32, "eval_images": 16, "eval_steps": 5},
    "encode": {"xT_images": 8, "xT_steps": 5},
    "classify": {
        "xT_steps": 5,
        "steps": 5,
        "manipulation_images": 10,
        "figure_images": 2,
        "interpolate_pairs": 1,
        "interpolate_frames": 3,
    },
    "latent": {
        "depth": 2,
        "width": 32,
        "images": 512,
        "latent_steps": 5,
        "steps": 5,
        "n_samples": 32,
        "study_samples": 16,
        "fewshot_k": [1],
        "fewshot_samples": 2,
        "fewshot_draws": 64,
        "classcond_images": 64,
        "classcond_scales": [0.0, 1.0],
        "classcond_samples": 1,
    },
    "evaluate": {"steps": [5], "n_images": 8, "metrics": ["ssim", "mse"], "gap_images": 8, "log_models": False},
}


def tiny(params: dict[str, Any]) -> dict[str, Any]:
    """`params` (a parsed params.yaml) with the tiny values applied to the keys its sections know."""
    from pdae.config import SECTIONS

    out = {section: dict(values or {}) for section, values in params.items()}
    for section, values in TINY.items():
        if section in SECTIONS:
            fields = SECTIONS[section].model_fields
            out.setdefault(section, {}).update({k: v for k, v in values.items() if k in fields})
    return out


def apply(path: str | Path) -> None:
    """Rewrite the params file at `path` with the tiny values."""
    path = Path(path)
    params = yaml.safe_load(path.read_text()) or {}
    path.write_text(yaml.safe_dump(tiny(params), sort_keys=False))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_params.py PARAMS_FILE")
    apply(sys.argv[1])
