"""The DVC pipeline end to end on a temporary copy of the project with tiny params."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tiny_params(project: Path) -> None:
    """Shrink the copy's params.yaml with scripts/tiny_params.py (the budget CI's pipeline run uses too)."""
    spec = importlib.util.spec_from_file_location("tiny_params", ROOT / "scripts" / "tiny_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.apply(project / "params.yaml")


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
