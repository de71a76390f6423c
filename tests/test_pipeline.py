"""The DVC pipeline end to end on a temporary copy of the project with tiny params."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tiny settings per section: the whole chain runs in about a minute on 2 CPU cores.
TINY = {
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


def _tiny_params(project: Path) -> None:
    from pdae.config import SECTIONS

    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        if section in params:
            model = SECTIONS[section]
            params[section].update({k: v for k, v in values.items() if k in model.model_fields})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    dst = tmp_path / "proj"
    dst.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "stages", dst / "stages")
    shutil.copytree(ROOT / "pdae", dst / "pdae", ignore=shutil.ignore_patterns("__pycache__"))
    _tiny_params(dst)
    env = _env(dst)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=dst, env=env, check=True)
    return dst


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=_env(project), capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_dvc_repro_end_to_end(project: Path):
    res = _dvc(project, "repro")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for out in ("data/prepared/train.safetensors", "models/baseline/config.json", "models/pdae/pdae.safetensors",
                "latents/train.safetensors", "latents/stats.safetensors"):  # fmt: skip
        assert (project / out).is_file(), out
    baseline = json.loads((project / "metrics/baseline.json").read_text())
    assert 0.0 <= baseline["sample_confident_fraction"] <= 1.0 and baseline["sample_fd"] >= 0
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["images_seen"] == 256 and "gap_reduction" in train and "baseline_inverted_mse" in train
    assert not (project / "checkpoints/train/state.safetensors").exists()  # removed once the outputs are written
    # an immediate second repro does nothing
    again = _dvc(project, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    # every stage logged one MLflow run with its metrics
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pdae"])
    stages = set(runs["tags.stage"])
    assert {"prepare", "baseline", "train", "encode", "classify", "latent", "evaluate"} <= stages
    for stage in ("classify", "latent", "evaluate"):
        assert json.loads((project / f"metrics/{stage}.json").read_text()), stage
    row = runs[runs["tags.stage"] == "baseline"].iloc[0]
    assert row["params.baseline.images"] == "256" and row["metrics.sample_fd"] >= 0


@pytest.mark.slow
def test_bad_param_fails_before_compute(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["image_size"] = 12
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    res = _dvc(project, "repro", "prepare")
    assert res.returncode != 0
    assert "params.yaml: base.image_size: must be a power of two (got 12)." in res.stderr
    assert not (project / "data/prepared").exists()
