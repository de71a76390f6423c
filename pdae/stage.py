"""The frame every stage script shares: params, runtime setup, MLflow run, metrics file, clean errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdae.config import PARAMS_FILE, Section, load_params
from pdae.errors import PdaeError
from pdae.io import write_json
from pdae.runtime import setup
from pdae.tracking import StageRun, stage_run


def stage_main(
    name: str,
    sections: list[str],
    body: Callable[[dict[str, Section], StageRun], dict[str, Any]],
    metrics_file: str | None = None,
    params_file: str = PARAMS_FILE,
) -> None:
    """Run one DVC stage: validate params, seed + pin threads, open the MLflow run, call `body(cfg, run)`.

    `cfg` maps section names (always incl. "base") to typed configs plus "device" -> torch.device. `body` returns
    the stage metrics; they are written atomically to `metrics_file` and mirrored to MLflow. A PdaeError ends
    the process with one line on stderr and exit code 1.
    """
    try:
        cfg: dict[str, Any] = load_params(params_file, sections=sections)
        base = cfg["base"]
        cfg["device"] = setup(base.seed, base.threads, base.device)
        start = time.time()
        with stage_run(name, params={k: v for k, v in cfg.items() if k != "device"}) as run:
            metrics = body(cfg, run)
            metrics = {**metrics, "stage_seconds": round(time.time() - start, 1)}
            if metrics_file:
                write_json(metrics_file, metrics)
                run.log_artifact(metrics_file)
            run.log_metrics(metrics)
    except PdaeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: stage '{name}' interrupted; re-run `dvc repro` to resume.", file=sys.stderr)
        sys.exit(130)


def out_dir(path: str | Path) -> Path:
    """Create (if needed) and return a stage output folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
