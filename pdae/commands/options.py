"""Shared command-line value types: every numeric option has a range, floats are finite, outputs are files.

Out-of-range values are click usage errors (exit 2): one message naming the option, the value and the range, e.g.
``Invalid value for '--steps': Value error, 0 is out of range; use 1..1000``. The ranges mirror pdae/config.py.
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


# Parser of a numeric option: the type, then the range; finite floats only. Its error names the value and the range.
class Ranged:
    def __init__(self, kind: type, low: float, high: float) -> None:
        self.kind, self.low, self.high = kind, low, high

    def __call__(self, value: Any) -> Any:
        try:
            number = self.kind(value) if self.kind is float or not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}") from None
        if self.kind is float and not math.isfinite(number):
            raise ValueError(f"{value} is not a finite number; use one in {self.span}")
        if not self.low <= number <= self.high:
            raise ValueError(f"{value} is out of range; use {self.span}")
        return number

    @property
    def span(self) -> str:
        return f"{self.low:g}..{self.high:g}" if self.kind is float else f"{self.low}..{self.high}"


def count(default: Any, *names: str, help: str, low: int = 1, high: int = MAX_COUNT) -> Any:
    """An int option in [low, high] (a None default stays 'not given')."""
    return typer.Option(
        default, *names, parser=Ranged(int, low, high), metavar="INTEGER", help=f"{help} [{low}..{high}]"
    )


def real(default: Any, *names: str, help: str, low: float, high: float) -> Any:
    """A finite float option in [low, high] (also for repeatable options)."""
    return typer.Option(
        default, *names, parser=Ranged(float, low, high), metavar="FLOAT", help=f"{help} [{low:g}..{high:g}]"
    )


def seed(default: int = 0, help: str = "Random seed.") -> Any:
    return count(default, "--seed", help=help, low=0, high=SEED_MAX)


def _not_a_folder(value: Path | None) -> Path | None:
    if value is not None and value.is_dir():
        raise typer.BadParameter(f"{value} is a folder; pass a file path inside it, e.g. {value / 'out.png'}.")
    return value


def out_file(default: Any, *names: str, help: str) -> Any:
    """An output-file option; an existing folder is refused before any work starts."""
    return typer.Option(default, *names, callback=_not_a_folder, help=help)
