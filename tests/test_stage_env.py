"""stages/_env.py: a stage started by a python that cannot import pdae re-runs itself under .venv, or says why not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import _env  # noqa: F401\nimport pdae\nimport sys\nprint('ran in', sys.executable, pdae.__name__)\n"


def _project(tmp_path: Path) -> Path:
    (tmp_path / "stages").mkdir()
    shutil.copy(ROOT / "stages" / "_env.py", tmp_path / "stages" / "_env.py")
    (tmp_path / "stages" / "probe.py").write_text(PROBE)
    return tmp_path


def _run_without_site(project: Path) -> subprocess.CompletedProcess:
    # `python -S` skips site-packages: pdae (and torch) cannot be imported, like a system python without the project
    return subprocess.run([sys.executable, "-S", "stages/probe.py"], cwd=project, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_foreign_python_without_venv_gives_one_line(tmp_path: Path) -> None:
    res = _run_without_site(_project(tmp_path))
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the python running this stage")
    assert ".venv does not exist yet" in lines[0] and "bash scripts/setup.sh" in lines[0]


def test_foreign_python_reexecs_under_the_project_venv(tmp_path: Path) -> None:
    project = _project(tmp_path)
    venv_python = project / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    # stands for the setup's .venv/bin/python: the interpreter running the tests, which can import pdae
    venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    res = _run_without_site(project)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ran in ") and res.stdout.strip().endswith("pdae")


def test_broken_venv_does_not_loop(tmp_path: Path) -> None:
    project = _project(tmp_path)
    venv_python = project / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # a .venv whose python lacks pdae
    venv_python.chmod(0o755)
    res = _run_without_site(project)
    assert res.returncode == 2 and "cannot import it" in res.stderr and len(res.stderr.strip().splitlines()) == 1
