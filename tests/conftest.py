"""Test setup: offline, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests import stage scripts as modules (runpy / importlib); `python stages/<name>.py` has stages/ on sys.path for
# their first import, stages/_env.py, so the tests give them the same.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def mlflow_tmp(tmp_path, monkeypatch):
    """An MLflow sqlite store in a temporary folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tiny_project_template(tmp_path_factory):
    """Build the tiny project once per session (read-only: copy it with `tiny_project`)."""
    from tests.tiny import build_tiny_project

    return build_tiny_project(tmp_path_factory.mktemp("tiny_template"))


@pytest.fixture()
def tiny_project(tiny_project_template, tmp_path):
    """A private copy of the tiny project tree (data/prepared, models/baseline, models/pdae, latents)."""
    from tests.tiny import copy_project

    return copy_project(tiny_project_template, tmp_path / "project")
