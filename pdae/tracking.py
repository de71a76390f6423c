"""MLflow tracking in one place: store location, experiment, one run per stage invocation.

DVC's metrics files are the record; MLflow mirrors them for browsing (`mlflow ui --host 127.0.0.1`). The default
store is the sqlite file `<repo>/mlflow.db` (absolute, so `dvc exp run --temp/--queue` lands in the same store);
`MLFLOW_TRACKING_URI` overrides it. `PDAE_TRACKING=off` disables tracking (the run object then only no-ops).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pdae.errors import PdaeError

EXPERIMENT = "pdae"
log = logging.getLogger("pdae.tracking")


def repo_root(start: Path | None = None) -> Path:
    """The git top-level folder containing `start` (default: cwd), else `start` itself."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".git").exists() or (folder / "dvc.yaml").exists():
            return folder
    return start


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<repo>/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # DVC runs experiments in temp copies; DVC_ROOT points at the real repo.
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else repo_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def git_commit(root: Path | None = None) -> str:
    """The commit of the code that runs: PDAE_GIT_COMMIT if set (copies without .git), else `git rev-parse HEAD`.

    `safe.directory=*` lets git answer in a clone owned by another user (CI, containers), where it would otherwise
    refuse as "dubious ownership". "unknown" outside a git checkout.
    """
    if os.environ.get("PDAE_GIT_COMMIT"):
        return os.environ["PDAE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-c", "safe.directory=*", "rev-parse", "HEAD"],
            cwd=root or repo_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; pydantic models are dumped first."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _check_reachable(uri: str) -> None:
    """Fail fast (before any compute) when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    fix = "start it, fix MLFLOW_TRACKING_URI, or set PDAE_TRACKING=off to run without tracking"
    try:
        resp = requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as err:
        raise PdaeError(f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); {fix}.") from None
    if resp.status_code >= 500:  # MLflow's client would retry such answers for minutes
        raise PdaeError(f"MLflow tracking server {uri} answers HTTP {resp.status_code} (server error); {fix}.")


# Thin wrapper over an active MLflow run: every call is a no-op when tracking is off, and a logging failure
# after compute only warns (artifacts are on disk already; the metrics JSON is the record).
class StageRun:
    def __init__(self, mlflow_module: Any | None) -> None:
        self._mlflow = mlflow_module
        self.run_id: str | None = None
        if mlflow_module is not None:
            active = mlflow_module.active_run()
            self.run_id = active.info.run_id if active else None

    @property
    def enabled(self) -> bool:
        return self._mlflow is not None

    def _safe(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        if self._mlflow is None:
            return None
        try:
            return getattr(self._mlflow, fn)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never lose computed results
            warnings.warn(f"MLflow {fn} failed ({err}); results on disk are unaffected.", stacklevel=3)
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        self._safe("log_params", flat)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        flat = {
            k.replace("@", "_at_"): float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        }
        if flat:
            self._safe("log_metrics", flat, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            fn = "log_artifacts" if Path(path).is_dir() else "log_artifact"
            self._safe(fn, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._safe("set_tags", dict(tags))

    def log_model(self, *args: Any, **kwargs: Any) -> Any:
        """mlflow.pyfunc.log_model passthrough (None when tracking is off or it fails)."""
        if self._mlflow is None:
            return None
        try:
            import mlflow.pyfunc

            return mlflow.pyfunc.log_model(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"MLflow log_model failed ({err}).", stacklevel=2)
            return None


def tracking_enabled() -> bool:
    return os.environ.get("PDAE_TRACKING", "on").lower() not in ("0", "off", "false", "no")


@contextlib.contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any] | None = None, extra_tags: Mapping[str, str] | None = None
) -> Iterator[StageRun]:
    """Open one MLflow run named `stage` in experiment `pdae`, tagged with commit, stage and DVC_EXP_NAME."""
    if not tracking_enabled():
        yield StageRun(None)
        return
    uri = tracking_uri()
    _check_reachable(uri)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(EXPERIMENT)
    except Exception as err:  # noqa: BLE001
        raise PdaeError(
            f"MLflow store {uri} cannot be opened ({_first_line(err)}); fix MLFLOW_TRACKING_URI "
            "or set PDAE_TRACKING=off."
        ) from None
    tags = {
        "stage": stage,
        "git_commit": git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        **(extra_tags or {}),
    }
    try:
        mlflow.start_run(run_name=stage, tags=tags)
    except Exception as err:  # noqa: BLE001
        raise PdaeError(
            f"MLflow run cannot be started in {uri} ({_first_line(err)}); fix MLFLOW_TRACKING_URI "
            "or set PDAE_TRACKING=off."
        ) from None
    status = "FAILED"
    try:
        run = StageRun(mlflow)
        if params:
            run.log_params(params)
        yield run
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception as err:  # noqa: BLE001 - the stage's results are on disk already
            warnings.warn(f"MLflow end_run failed ({err}); results on disk are unaffected.", stacklevel=3)
