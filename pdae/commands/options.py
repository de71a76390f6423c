"""Shared command-line value types: every numeric option has a range, floats are finite, outputs are files.

Out-of-range values are click usage errors (exit 2): one message naming the option, the value and the range, e.g.
``Invalid value for '--steps': 0 is not in the range 1<=x<=1000.`` The ranges mirror pdae/config.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from pdae.config import MAX_COUNT, SEED_MAX

MAX_BATCH = 65_536  # images per network call
MAX_IMAGES = 100_000  # images one command generates or reads into memory
MAX_ZOOM = 64  # integer upscaling of a written PNG


def _finite(value: Any) -> Any:
    """Callback: click's FloatRange lets nan and inf through; refuse them (single or repeated values)."""
    for number in value if isinstance(value, (list, tuple)) else [value]:
        if number is not None and not math.isfinite(number):
            raise typer.BadParameter(f"{number} is not a finite number.")
    return value


def count(default: Any, *names: str, help: str, low: int = 1, high: int = MAX_COUNT) -> Any:
    """An int option in [low, high] (None stays allowed as 'not given')."""
    return typer.Option(default, *names, min=low, max=high, help=help)


def real(default: Any, *names: str, help: str, low: float, high: float) -> Any:
    """A finite float option in [low, high] (also for repeatable options)."""
    return typer.Option(default, *names, min=low, max=high, callback=_finite, help=help)


def seed(default: int = 0, help: str = "Random seed.") -> Any:
    return typer.Option(default, "--seed", min=0, max=SEED_MAX, help=help)


def _not_a_folder(value: Path | None) -> Path | None:
    if value is not None and value.is_dir():
        raise typer.BadParameter(f"{value} is a folder; pass a file path inside it, e.g. {value / 'out.png'}.")
    return value


def out_file(default: Any, *names: str, help: str) -> Any:
    """An output-file option; an existing folder is refused before any work starts."""
    return typer.Option(default, *names, callback=_not_a_folder, help=help)
