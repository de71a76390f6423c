"""Make sure a stage runs in the project's environment, whatever `python` DVC found first on PATH.

dvc.yaml runs `python stages/<name>.py`. When that python cannot import pdae (a system python, another venv), the
stage re-executes itself with the project's `.venv/bin/python` if the setup created one, and otherwise stops with
one line that names the fix. Imported first by every stage script; it needs only the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_project_python() -> None:
    """Return if pdae is importable here; else re-exec under .venv's python, or exit 2 with one error line."""
    if importlib.util.find_spec("pdae") is not None:
        return
    if VENV_PYTHON.exists() and os.environ.get("PDAE_STAGE_REEXEC") != "1":
        os.environ["PDAE_STAGE_REEXEC"] = "1"  # guards against a loop if .venv is broken
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
    where = f"{VENV_PYTHON} cannot import it" if VENV_PYTHON.exists() else ".venv does not exist yet"
    print(
        f"error: the python running this stage ({sys.executable}) cannot import pdae and {where}; "
        "run `bash scripts/setup.sh`, then `source .venv/bin/activate` before `dvc repro` "
        "(or run `bash scripts/pipeline.sh`, which does both).",
        file=sys.stderr,
    )
    sys.exit(2)


ensure_project_python()
