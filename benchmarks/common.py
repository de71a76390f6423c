"""Shared pieces of the benchmark scripts: configs from params.yaml, the two models, interleaved timing, results."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.diffae_style import DiffAEStyle, count_parameters, matched_channels
from pdae.config import BaseConfig, BaselineConfig, TrainConfig, load_params
from pdae.io import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_configs(params: str | Path = ROOT / "params.yaml") -> tuple[BaseConfig, BaselineConfig, TrainConfig]:
    """The base, baseline and train sections of the project's params.yaml (the embedded default)."""
    cfg = load_params(params, sections=["base", "baseline", "train"])
    return cfg["base"], cfg["baseline"], cfg["train"]  # type: ignore[return-value]


def build_pair(
    unet, z_dim: int, encoder_channels: list[int] | None = None, dropout: float = 0.0
) -> tuple[Any, DiffAEStyle, dict[str, int]]:
    """(PDAE on the frozen `unet`, a Diff-AE-style model of matched size, parameter counts).

    The Diff-AE-style UNet keeps the baseline's level plan and layers per block, widened so that its parameter count
    is closest to baseline UNet + G (see `diffae_style.matched_channels`).
    """
    from pdae.nets.backbone import Backbone
    from pdae.nets.pdae import PDAE

    backbone = Backbone(unet)
    pdae = PDAE(backbone, z_dim, encoder_channels, dropout)
    cfg = unet.config
    size, ch = backbone.image_size, backbone.in_channels
    base_channels = [int(c) for c in cfg.block_out_channels]
    head_dim = int(cfg.attention_head_dim or 16)
    target = count_parameters(unet) + count_parameters(pdae.gradient)
    channels = matched_channels(target, base_channels, size, ch, z_dim, int(cfg.layers_per_block), head_dim)
    torch.manual_seed(0)
    diffae = DiffAEStyle(size, ch, z_dim, channels, int(cfg.layers_per_block), head_dim, encoder_channels, dropout)
    counts = {
        "baseline_unet": count_parameters(unet),
        "pdae_gradient_estimator": count_parameters(pdae.gradient),
        "pdae_encoder": count_parameters(pdae.encoder),
        "pdae_trainable": count_parameters(pdae.encoder) + count_parameters(pdae.gradient),
        "diffae_unet": count_parameters(diffae.unet),
        "diffae_encoder": count_parameters(diffae.encoder),
        "diffae_trainable": count_parameters(diffae),
    }
    return pdae, diffae, counts


def machine() -> dict[str, Any]:
    """Where a result was measured (load average shows how shared the cores were)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(v, 2) for v in load],
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1, warmup: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Time each callable `repeats` times per round, alternating the order every round (ABBA...), after `warmup`.

    Returns {name: {"wall": [s per call per round], "cpu": [process CPU s per call per round]}}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                fns[name]()
            out[name]["wall"].append((time.perf_counter() - w0) / repeats)
            out[name]["cpu"].append((time.process_time() - c0) / repeats)
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (each pair measured back to back, so shared load mostly cancels)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def summary(times: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "min": min(times), "n": len(times)}


def save_result(name: str, result: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write `result` as benchmarks/results/<name>.json (atomically) and return the path."""
    path = Path(out_dir or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text (markdown) table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)
