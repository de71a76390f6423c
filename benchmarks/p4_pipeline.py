"""P4 — pipeline wall time: `dvc repro` from empty on the embedded default, per stage, and a no-op repro.

Runs in a temporary copy of the project (dvc.yaml, params.yaml, stages/, pdae/; `dvc init --no-scm`; MLflow store
inside the copy; PYTHONPATH pointing at the copied library). Per-stage wall time is read from the timestamps at which
dvc announces each stage ("Running stage '<name>'") while it streams its output, so it includes interpreter start,
imports, MLflow and dvc's own hashing/caching; each stage's `stage_seconds` (the body alone, from its
metrics/*.json) is reported beside it. Then `dvc repro` is repeated on the finished copy (nothing to do) and timed.
CPU seconds of all descendant processes (dvc + stages) are recorded too: wall time on a shared machine whose jobs
may be paused includes the pauses, CPU time does not.

    python -m benchmarks.p4_pipeline            # the real embedded default (long; the lead runs it)
    python -m benchmarks.p4_pipeline --tiny     # tiny params, about a minute: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from benchmarks.common import ROOT, machine, save_result, table

TARGET_WHOLE, TARGET_NOOP = 15 * 60.0, 2.0
COPY = ("dvc.yaml", "params.yaml", "stages", "pdae")


def _tiny(params: dict[str, Any]) -> dict[str, Any]:
    """The tiny budget of scripts/tiny_params.py (one home, shared with CI and tests/test_pipeline.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_params", ROOT / "scripts" / "tiny_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny(params)


def make_project(dst: Path, src: Path = ROOT, tiny: bool = False, overrides: list[str] | None = None) -> Path:
    """Copy the pipeline files of `src` into `dst`, apply tiny params / dotted overrides, `dvc init --no-scm`."""
    from pdae.config import apply_overrides

    dst.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        s = src / name
        if s.is_dir():
            shutil.copytree(s, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(s, dst / name)
    params = yaml.safe_load((dst / "params.yaml").read_text()) or {}
    if tiny:
        params = _tiny(params)
    params = apply_overrides(params, overrides)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=dst, env=env_for(dst), check=True)
    return dst


def _source_commit() -> str:
    from pdae.tracking import git_commit

    return os.environ.get("PDAE_GIT_COMMIT") or git_commit(ROOT)


def env_for(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(project),  # the stages import the copied library, as dvc hashes it
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PDAE_GIT_COMMIT=_source_commit(),  # the copy has no .git; its report names the commit it was copied from
    )
    return env


def stage_order(project: Path) -> list[str]:
    return list((yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages", {}))


def stage_metrics_files(project: Path) -> dict[str, list[str]]:
    """Stage name -> its metrics files as listed in dvc.yaml."""
    stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages", {})
    out: dict[str, list[str]] = {}
    for name, st in stages.items():
        files = []
        for item in st.get("metrics", []) or []:
            files.append(next(iter(item)) if isinstance(item, dict) else str(item))
        out[name] = files
    return out


def timed_repro(project: Path, log_path: Path | None = None, timeout: float = 4 * 3600) -> dict[str, Any]:
    """Run `dvc repro`, streaming its output; returns total seconds, return code and per-stage start offsets."""
    cmd = [sys.executable, "-m", "dvc", "repro"]
    starts: list[tuple[str, float]] = []
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            cmd, cwd=project, env=env_for(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            if log:
                log.write(line)
            if line.startswith("Running stage '"):
                starts.append((line.split("'")[1], now))
        rc = proc.wait(timeout=timeout)
    finally:
        if log:
            log.close()
    total = time.perf_counter() - t0
    return {"seconds": total, "cpu_seconds": _children_cpu() - cpu0, "returncode": rc, "starts": starts}


def _children_cpu() -> float:
    """CPU seconds of finished descendants (dvc waits for its stage processes, so their time is included)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def stage_times(starts: list[tuple[str, float]], total: float) -> dict[str, float]:
    """Wall time of each stage from the offsets at which dvc announced them (the last one runs to the end)."""
    out = {}
    for i, (name, t) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else total
        out[name] = end - t
    return out


def read_stage_seconds(project: Path) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, files in stage_metrics_files(project).items():
        secs = None
        for f in files:
            p = project / f
            if p.is_file():
                secs = json.loads(p.read_text()).get("stage_seconds", secs)
        out[name] = secs
    return out


def run(
    tiny: bool = False, work: Path | None = None, keep: bool = False, overrides: list[str] | None = None, noop: int = 3
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="pdae_p4_", dir=work))
    project = make_project(tmp / "project", tiny=tiny, overrides=overrides)
    log_path = tmp / "repro.log"
    try:
        first = timed_repro(project, log_path)
        if first["returncode"] != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"dvc repro failed (exit {first['returncode']}); log {log_path}:\n{tail}")
        noops = [timed_repro(project, log_path) for _ in range(noop)]
        if any(n["starts"] for n in noops):
            raise RuntimeError(f"the second dvc repro re-ran stages: {[n['starts'] for n in noops]}")
        walls = stage_times(first["starts"], first["seconds"])
        body = read_stage_seconds(project)
        stages = {s: {"wall_seconds": walls.get(s), "stage_seconds": body.get(s)} for s in stage_order(project)}
        noop_s = statistics.median(n["seconds"] for n in noops)
        return {
            "benchmark": "P4 pipeline",
            "params": "tiny (scripts/tiny_params.py)" if tiny else "embedded default (params.yaml)",
            "overrides": overrides or [],
            "stages": stages,
            "repro_from_empty_seconds": first["seconds"],
            "repro_from_empty_cpu_seconds": first["cpu_seconds"],
            "noop_repro_seconds": noop_s,
            "noop_repro_runs": [n["seconds"] for n in noops],
            "noop_repro_cpu_seconds": statistics.median(n["cpu_seconds"] for n in noops),
            "targets": {"whole_seconds": TARGET_WHOLE, "noop_seconds": TARGET_NOOP},
            "met": {"whole": first["seconds"] <= TARGET_WHOLE, "noop": noop_s < TARGET_NOOP},
            "machine": machine(),
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(res: dict[str, Any]) -> str:
    rows = [[s, v["wall_seconds"], v["stage_seconds"]] for s, v in res["stages"].items()]
    rows = [[*r, None] for r in rows]
    rows.append(["whole dvc repro", res["repro_from_empty_seconds"], None, res["repro_from_empty_cpu_seconds"]])
    rows.append(["no-op dvc repro (median)", res["noop_repro_seconds"], None, res["noop_repro_cpu_seconds"]])
    head = ["stage", "wall s", "stage_seconds (body)", "CPU s (all processes)"]
    return f"P4 pipeline ({res['params']})\n" + table(rows, head)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny params (checks the script; ~1 min)")
    ap.add_argument("--work", type=Path, default=None, help="parent folder of the temporary copy")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--noop-runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    res = run(args.tiny, args.work, args.keep, args.overrides, args.noop_runs)
    print(report(res))
    name = "p4_pipeline_tiny" if args.tiny else "p4_pipeline"
    print(f"wrote {save_result(name, res, args.out)}")
    return res


if __name__ == "__main__":
    main()
