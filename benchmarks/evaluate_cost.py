"""CPU cost of the evaluate stage's parts at the embedded default's sizes, from timed pieces and a linear scale-up.

A randomly initialised PDAE of the default size (UNet channels [32, 64, 64], 16x16, z 64) stands in for the trained
one (the cost of sampling does not depend on the weights). Each part is timed on a slice in process CPU time and
scaled to the sizes of params.yaml's `evaluate` section on the digits split (359 test, 1438 train images).

    python -m benchmarks.evaluate_cost [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

N_TEST, N_TRAIN, N_GEN = 359, 1438, 1000


def _clock(name: str, fn: Callable[[], object], scale: float, out: dict[str, float]) -> None:
    start = time.process_time()
    fn()
    out[name] = (time.process_time() - start) * scale
    print(f"{name:60s} {out[name]:7.0f} CPU-s", flush=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.set_flush_denormal(True)
    from pdae.autoencode import decode, encode
    from pdae.diagnostics import gap_per_image
    from pdae.diffusion import Schedule
    from pdae.evaluate import bare_dpm_samples, gap_grid, reconstruction_table
    from pdae.metrics.fid import inception_features
    from pdae.metrics.intervals import frechet_distance_with_interval, kid_with_interval
    from pdae.nets import PDAE, Backbone, build_unet

    model = PDAE(Backbone(build_unet(16, 1, [32, 64, 64], 1).float()), z_dim=64).eval()
    s, out = Schedule.linear(), {}
    x = torch.rand(32, 1, 16, 16) * 2 - 1
    table = (10, 20, 50, 100)
    _clock("reconstruction table (359 images, shared 100-step inversion)",
           lambda: reconstruction_table(model, s, x, table, 100, ("ssim", "mse")), N_TEST / 32, out)  # fmt: skip
    _clock("bare-DPM samples (1000, DDIM 50)", lambda: bare_dpm_samples(model, s, 64, 50), N_GEN / 64, out)
    z = encode(model, torch.rand(64, 1, 16, 16) * 2 - 1)
    _clock("latent-DPM samples, PDAE decoding (1000, DDIM 50)",
           lambda: decode(model, z, torch.randn(64, 1, 16, 16), s, 50), N_GEN / 64, out)  # fmt: skip
    _clock("gap curve (359 images)", lambda: gap_per_image(model, x, s, gap_grid(1000)), N_TEST / 32, out)
    gen, real, test = torch.randn(N_GEN, 2048), torch.randn(N_TRAIN, 2048), torch.randn(N_TEST, 2048)
    for name, feats, sets in (("1000", gen, 2), ("359", test, 2)):
        _clock(
            f"FD + KID intervals, {sets} sets of {name} (100 resamples)",
            lambda f=feats: (
                frechet_distance_with_interval(f, real, n_boot=10),
                kid_with_interval(f, real, n_boot=10),
            ),
            10 * sets,
            out,
        )
    imgs = torch.rand(50, 1, 16, 16) * 2 - 1
    inception_features(imgs[:2], cache=False)
    n_inc = N_TRAIN + 2 * N_GEN + 2 * N_TEST
    _clock(f"Inception features ({n_inc} images)", lambda: inception_features(imgs, cache=False), n_inc / 50, out)
    print(f"{'total':60s} {sum(out.values()):7.0f} CPU-s")
    return out


if __name__ == "__main__":
    main()
