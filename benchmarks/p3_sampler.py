"""P3 — sampler overhead and inversion throughput.

Reconstruction = `pdae.autoencode.reconstruct` with inferred x_T: encode, DDIM-S inversion, DDIM-S decoding (2S
network evaluations). Its time is compared with the bare sum of the same work done by the networks alone: one
encoder pass plus 2S calls of the model's `model_fn(x, t)` at the same grid timesteps on the same batch.
overhead = reconstruction / bare - 1. Both are timed alternately (order flipped each round), median of per-round
ratios. Because shared-load noise is larger than the effect, the sampler's own cost is also measured directly:
the same reconstruction with a zero-cost network (precomputed outputs) over the bare network time
("decomposed" overhead).

Inversion throughput: images per second of a DDIM-S inversion (`pdae.autoencode.invert`) at the given batch.

    python -m benchmarks.p3_sampler [--batch 50] [--steps 100] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor

from benchmarks.common import build_pair, interleaved, load_configs, machine, paired_ratio, save_result, summary, table
from pdae.autoencode import invert, reconstruct
from pdae.diffusion import Schedule, ddim_grid

TARGET_OVERHEAD = 0.03


def _bare(model, x: Tensor, grid: list[int]):
    """The networks alone: E(x) once, then model_fn at every inversion and decoding timestep (no sampler maths)."""
    n = x.shape[0]
    ts = [torch.full((n,), t, dtype=torch.long) for t in grid[:-1]] + [
        torch.full((n,), t, dtype=torch.long) for t in grid[:0:-1]
    ]

    @torch.no_grad()
    def run() -> None:
        fn = model.model_fn(model.encode(x))
        for t in ts:
            fn(x, t)

    return run


class _Cached(torch.nn.Module):
    """A stand-in model whose encoder and model_fn cost nothing: returns precomputed tensors."""

    def __init__(self, z: Tensor, eps: Tensor, g: Tensor | None) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.z, self.eps, self.g = z, eps, g

    def encode(self, x0: Tensor) -> Tensor:
        return self.z

    def model_fn(self, z: Tensor):
        return lambda x_t, t: (self.eps, self.g)


@torch.no_grad()
def measure(model, name: str, x: Tensor, schedule: Schedule, steps: int, rounds: int) -> dict[str, Any]:
    grid = ddim_grid(schedule.T, steps)
    bs = x.shape[0]
    z = model.encode(x)
    eps, g = model.model_fn(z)(x, torch.full((bs,), grid[len(grid) // 2], dtype=torch.long))
    cached = _Cached(z, eps, g)
    fns = {
        "reconstruct": lambda: reconstruct(model, x, schedule, steps, "inferred", batch_size=bs),
        "bare_networks": _bare(model, x, grid),
        "sampler_only": lambda: reconstruct(cached, x, schedule, steps, "inferred", batch_size=bs),
        "invert": lambda: invert(model, x, z, schedule, steps, batch_size=bs),
    }
    fns["sampler_only"]()  # warm-up: allocator and kernels; one network call below warms the model
    model.model_fn(z)(x, torch.full((bs,), grid[0], dtype=torch.long))
    t = interleaved(fns, rounds=rounds, repeats=1, warmup=0)
    direct = paired_ratio(t["reconstruct"]["wall"], t["bare_networks"]["wall"]) - 1
    direct_cpu = paired_ratio(t["reconstruct"]["cpu"], t["bare_networks"]["cpu"]) - 1
    decomposed = paired_ratio(t["sampler_only"]["cpu"], t["bare_networks"]["cpu"])
    inv = summary(t["invert"]["wall"])
    return {
        "model": name,
        "network_evaluations": 2 * (len(grid) - 1),
        "seconds_wall": {k: summary(v["wall"]) for k, v in t.items()},
        "seconds_cpu": {k: summary(v["cpu"]) for k, v in t.items()},
        "overhead_direct_wall": direct,
        "overhead_direct_cpu": direct_cpu,
        "overhead_decomposed_cpu": decomposed,
        "inversion_images_per_second": bs / inv["median"],
        "inversion_images_per_second_cpu": bs / summary(t["invert"]["cpu"])["median"],
    }


def run(batch: int = 50, steps: int = 100, rounds: int = 3, seed: int = 0, baseline: str | None = None) -> dict:
    from pdae.nets.unet import build_unet

    base, bcfg, tcfg = load_configs()
    torch.manual_seed(seed)
    if baseline:
        from pdae.baseline import load_unet

        unet = load_unet(baseline)
    else:
        unet = build_unet(base.image_size, 1, bcfg.channels, bcfg.layers_per_block, bcfg.attention_head_dim)
    pdae, diffae, counts = build_pair(unet, tcfg.z_dim, tcfg.encoder_channels, tcfg.dropout)
    with torch.no_grad():  # untrained G is exactly 0; perturb it so the shift path does real arithmetic
        for p in pdae.gradient.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pdae.eval(), diffae.eval()
    schedule = Schedule.linear(1000)
    x = torch.rand(batch, unet.config.in_channels, base.image_size, base.image_size) * 2 - 1
    models = {name: measure(m, name, x, schedule, steps, rounds) for name, m in (("pdae", pdae), ("diffae", diffae))}
    return {
        "benchmark": "P3 sampler overhead",
        "batch_size": batch,
        "steps": steps,
        "rounds": rounds,
        "weights": "trained baseline" if baseline else "random (timing does not depend on weights)",
        "parameters": counts,
        "models": models,
        "target_overhead": TARGET_OVERHEAD,
        # The decomposed (CPU) overhead is the primary number: the direct wall ratio of two ~equal times is swamped by
        # shared-load noise of several percent, the sampler's own arithmetic is not.
        "primary": "overhead_decomposed_cpu",
        "met": all(m["overhead_decomposed_cpu"] <= TARGET_OVERHEAD for m in models.values()),
        "machine": machine(),
    }


def report(res: dict[str, Any]) -> str:
    rows = []
    for name, m in res["models"].items():
        w = m["seconds_wall"]
        rows.append(
            [
                name,
                round(w["reconstruct"]["median"], 3),
                round(w["bare_networks"]["median"], 3),
                f"{100 * m['overhead_direct_wall']:+.2f}%",
                f"{100 * m['overhead_direct_cpu']:+.2f}%",
                f"{100 * m['overhead_decomposed_cpu']:.2f}%",
                round(m["inversion_images_per_second"], 1),
            ]
        )
    head = [
        "model",
        "reconstruct s",
        "bare NFE s",
        "overhead (wall)",
        "overhead (CPU)",
        "sampler-only / NFE (CPU)",
        "inversion img/s",
    ]
    s = res["steps"]
    return (
        f"DDIM-{s} reconstruction (invert {s} + decode {s} steps), batch {res['batch_size']}, median of "
        f"{res['rounds']} interleaved rounds; target overhead <= {100 * res['target_overhead']:.0f}%\n"
        + table(rows, head)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust under shared load)")
    ap.add_argument("--baseline", default=None, help="a trained baseline folder (default: random weights)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.batch, args.steps, args.rounds, baseline=args.baseline)
    print(report(res))
    print(f"wrote {save_result('p3_sampler', res, args.out)}")
    return res


if __name__ == "__main__":
    main()
