"""P6 — fast solvers: network evaluations (NFE) against quality for DDIM, DPM-Solver++ (2M) and UniPC.

Reads a finished pipeline's outputs under --root (models/baseline, models/pdae, models/latent, models/classifier,
data/prepared, params.yaml) and writes nothing there. Per solver and NFE, on the same test images / noise:
- random-x_T reconstruction: z = E(x0), fixed random x_T, decoded -> SSIM and MSE against x0;
- inferred-x_T reconstruction: x_T from one DDIM inversion (--inversion-steps, shared by every row), decoded -> MSE;
- manipulation success (label classifier, the classify stage's largest scale), x_T from the same DDIM inversion;
- latent-DPM samples: z from the latent DPM (its own DDIM, params latent.latent_steps, shared), fixed random x_T,
  decoded with G on the first latent.shift_fraction -> classifier-feature FD to test images, with the 95%
  re-centred bootstrap interval the evaluate step uses (pdae.metrics.frechet_distance_with_interval);
- seconds per image of the random-x_T decoding (wall clock on a shared machine: noisy).

    python -m benchmarks.p6_solvers --root /work/main [--nfe 5 10 20 50 100] [--n-images 64] [--n-samples 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import machine, save_result

SOLVERS = ("ddim", "dpmpp2m", "unipc")
NFE = (5, 10, 20, 50, 100)


def _fd_interval(feats: torch.Tensor, ref: torch.Tensor, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Classifier-feature FD with the evaluate step's 95% re-centred bootstrap interval (pdae.metrics.intervals)."""
    from pdae.metrics import frechet_distance_with_interval

    fd = frechet_distance_with_interval(feats, ref, n_boot=n_boot, seed=seed)
    return fd["value"], fd["low"], fd["high"]


def load_inputs(root: Path, n_images: int, n_samples: int, seed: int) -> dict[str, Any]:
    """Models, test images, labels, directions and the fixed noise of every row."""
    from pdae.autoencode import encode, load_models, random_xT
    from pdae.config import LatentConfig, load_params
    from pdae.data import load_attributes, load_split
    from pdae.edit import balanced_subset
    from pdae.latent import load_latent, sample_latents
    from pdae.probes import AttributeDirections, class_attributes
    from pdae.scoring import load_scorer

    model, schedule = load_models(root / "models/baseline", root / "models/pdae")
    params = root / "params.yaml"
    lat = load_params(params, sections=["latent"])["latent"] if params.is_file() else LatentConfig()
    cls = load_params(params, sections=["classify"])["classify"] if params.is_file() else None
    test_x, ids = load_split(root / "data/prepared", "test")
    frame = load_attributes(root / "data/prepared").iloc[ids.numpy()].reset_index(drop=True)
    labels = torch.tensor(frame["label"].to_numpy()) if "label" in frame else None
    sub = balanced_subset(labels, n_images, seed, len(test_x))
    x = test_x[sub]
    gen = torch.Generator().manual_seed(seed)
    bb = model.backbone
    shape = (bb.in_channels, bb.image_size, bb.image_size)
    dpm = load_latent(root / "models/latent")
    z_lat = sample_latents(dpm, n_samples, lat.latent_steps, lat.clip_noise, lat.clip_x0, gen)
    directions = (
        AttributeDirections.load(root / "models/classifier") if (root / "models/classifier").is_dir() else None
    )
    class_attrs = class_attributes(frame, directions.names) if directions is not None else {}
    return {
        "model": model, "schedule": schedule, "lat": lat, "x": x, "z": encode(model, x),
        "labels": None if labels is None else labels[sub], "xT_random": random_xT(len(x), shape, gen),
        "z_latent": z_lat, "xT_latent": random_xT(n_samples, shape, gen),
        "scorer": load_scorer(root / "data/prepared"),
        "directions": directions, "class_attrs": class_attrs, "scale": max(cls.scales) if cls else 1.0,
        "test_all": test_x,
    }  # fmt: skip


def measure(
    inp: dict[str, Any], solver: str, nfe: int, x_T_inv: torch.Tensor, inv_steps: int, n_boot: int, seed: int
) -> dict:
    """Every metric of one (solver, NFE) row."""
    from pdae.autoencode import decode
    from pdae.edit import manipulation_success
    from pdae.metrics import mse, ssim

    model, schedule, x, z = inp["model"], inp["schedule"], inp["x"], inp["z"]
    start = time.perf_counter()
    rec = decode(model, z, inp["xT_random"], schedule, nfe, sampler=solver)
    seconds = (time.perf_counter() - start) / len(x)
    inf = decode(model, z, x_T_inv, schedule, nfe, sampler=solver)
    row = {
        "solver": solver,
        "nfe": nfe,
        "random_xT_ssim": ssim(rec, x).mean().item(),
        "random_xT_mse": mse(rec, x).mean().item(),
        "inferred_xT_mse": mse(inf, x).mean().item(),
        "seconds_per_image": seconds,
    }
    lat = inp["lat"]
    samples = decode(model, inp["z_latent"], inp["xT_latent"], schedule, nfe, sampler=solver,
                     shift_fraction=lat.shift_fraction)  # fmt: skip
    scorer = inp["scorer"]
    if scorer is not None:
        feats = scorer.features(samples).double()
        ref = scorer.features(inp["test_all"]).double()
        row["latent_fd"], row["latent_fd_lo"], row["latent_fd_hi"] = _fd_interval(feats, ref, n_boot, seed)
        if inp["class_attrs"] and inp["labels"] is not None:
            res = manipulation_success(
                model, schedule, scorer, x, inp["labels"], inp["directions"], inp["class_attrs"], inp["scale"],
                nfe, solver=solver, inversion_steps=inv_steps,
            )  # fmt: skip
            row["manipulation_success"] = res["manipulation_success"]
    return row


def run(root: Path, nfes=NFE, solvers=SOLVERS, n_images=64, n_samples=500, inv_steps=100, n_boot=200, seed=0):
    from pdae.autoencode import invert

    inp = load_inputs(root, n_images, n_samples, seed)
    x_T_inv = invert(inp["model"], inp["x"], inp["z"], inp["schedule"], inv_steps)
    rows = []
    for solver in solvers:
        for nfe in nfes:
            rows.append(measure(inp, solver, nfe, x_T_inv, inv_steps, n_boot, seed))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    ref = next((r for r in rows if r["solver"] == "ddim" and r["nfe"] == max(nfes)), None)
    targets = {}
    if ref is not None:
        for r in rows:
            if r["solver"] == "ddim":
                continue
            key = f"{r['solver']}_{r['nfe']}"
            if "latent_fd" in r and r["nfe"] in (10, 20):
                bound = 1.1 if r["nfe"] == 20 else 1.3
                targets[f"{key}_latent_fd_ratio"] = {
                    "ratio": r["latent_fd"] / ref["latent_fd"], "target": bound,
                    "met": r["latent_fd"] <= bound * ref["latent_fd"] or r["latent_fd"] <= ref["latent_fd_hi"],
                }  # fmt: skip
            if r["nfe"] == 10:
                ratio = r["random_xT_ssim"] / ref["random_xT_ssim"]
                targets[f"{key}_ssim_ratio"] = {"ratio": ratio, "target": 0.98, "met": ratio >= 0.98}
    return {
        "benchmark": "P6 fast solvers: NFE vs quality",
        "root": str(root),
        "reference": f"ddim at {max(nfes)} NFE",
        "n_images": len(inp["x"]),
        "n_latent_samples": n_samples,
        "inversion": f"DDIM, {inv_steps} steps, shared by every row",
        "latent_sampling": {"latent_steps": inp["lat"].latent_steps, "shift_fraction": inp["lat"].shift_fraction},
        "fd": "label-classifier features of latent-DPM samples vs all test images; 95% re-centred bootstrap interval",
        "rows": rows,
        "targets": targets,
        "note": "seconds_per_image is wall clock on a shared 2-core machine (noisy); the NFE count is exact",
        "machine": machine(),
    }


def report(res: dict[str, Any]) -> str:
    from benchmarks.common import table

    cols = ["random_xT_ssim", "random_xT_mse", "inferred_xT_mse", "latent_fd", "manipulation_success"]
    cols = [c for c in cols if any(c in r for r in res["rows"])]
    rows = [[r["solver"], r["nfe"], *[round(r[c], 4) if r.get(c) is not None else "-" for c in cols],
             round(1000 * r["seconds_per_image"], 1)] for r in res["rows"]]  # fmt: skip
    lines = [table(rows, ["solver", "NFE", *cols, "ms/image"])]
    for k, v in res["targets"].items():
        lines.append(f"{k}: {v['ratio']:.3f} (target {v['target']}) {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("random_xT_ssim", "random-x_T SSIM"), ("inferred_xT_mse", "inferred-x_T MSE"),
            ("latent_fd", "latent-DPM sample FD"), ("manipulation_success", "manipulation success")]  # fmt: skip
    keys = [k for k in keys if any(k[0] in r for r in res["rows"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for solver in dict.fromkeys(r["solver"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["solver"] == solver and key in r]
            ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], marker="o", label=solver)
            if key == "latent_fd":
                lo, hi = [r["latent_fd_lo"] for r in rows], [r["latent_fd_hi"] for r in rows]
                ax.fill_between([r["nfe"] for r in rows], lo, hi, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="project root holding the pipeline's outputs")
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFE))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=500, help="latent-DPM samples per row")
    ap.add_argument("--inversion-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    from pdae.errors import PdaeError
    from pdae.solvers import check_solver

    for s in args.solvers:
        check_solver(s)
    missing = [d for d in ("models/baseline", "models/pdae", "models/latent", "data/prepared")
               if not (args.root / d).is_dir()]  # fmt: skip
    if missing:
        raise PdaeError(f"{args.root} lacks {', '.join(missing)}; run the pipeline (dvc repro) there first.")
    torch.set_num_threads(args.threads)
    res = run(args.root, args.nfe, args.solvers, args.n_images, args.n_samples, args.inversion_steps)
    path = save_result("p6_solvers" + args.tag, res, args.out)
    plot(res, path.with_suffix(".png"))
    print(report(res))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return res


if __name__ == "__main__":
    main()
