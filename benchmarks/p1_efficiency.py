"""P1 — training efficiency: reconstruction quality of PDAE and a Diff-AE-style autoencoder vs images seen.

Both are trained with the shared loop on the same prepared train split, the same TrainSpec (params.yaml `train`:
batch, lr, EMA, seed; so the same image order and the same (t, eps) draws step for step), PDAE with its weighted
shifted loss on the frozen baseline DPM, Diff-AE-style from scratch with the plain epsilon loss. At each checkpoint
(images seen) the EMA weights are evaluated on a fixed subset of test images: z = E(x), DDIM-S inversion conditioned
on z (inferred x_T) or a fixed random x_T, DDIM-S decoding; MSE and SSIM (pdae.metrics) and class agreement of the
label classifier. PDAE at 0 images is the pre-trained DPM itself (G == 0). Diff-AE-style is trained further than
PDAE so that the images it needs to reach PDAE's final quality can be read off its curve (interpolated linearly in
log(images) between checkpoints; a bound when the curve never / already crosses). A metric whose ratio is
ill-defined — a curve that is not monotone, or a quality PDAE already has at 0 images — reports "not defined" with
the reason, computed from the curves (`not_defined`).

The baseline DPM's pre-training images are counted separately (as the paper does: "130M-z512-64M"); the ratio that
also charges them to PDAE is reported too. Data and baseline: `--prepared` / `--baseline`, else the project's
data/prepared and models/baseline when they exist, else built in `--work` with pdae.data.prepare_dataset and
pdae.baseline.pretrain_baseline from params.yaml (one-off, cached there, not part of the comparison's time).

Default run (about 14 min on 2 free cores, plus a one-off baseline pre-training of ~7 min if none exists):
PDAE checkpoints 0, 4k, 8k, 16k, 32k images; Diff-AE-style 4k ... 32k, 64k, 96k; 100 test images; DDIM 50 steps.
`--quick`: 1k/2k/4k (Diff-AE-style to 8k), 32 images, 20 steps, a 16k-image baseline if one must be built.

    python -m benchmarks.p1_efficiency [--quick] [--threads 2] [--work /tmp/pdae_bench]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor

from benchmarks.common import ROOT, build_pair, load_configs, machine, save_result, table
from benchmarks.diffae_style import DiffAEStyle, train_diffae

# name -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "random_ssim": ("SSIM, random x_T", True),
    "random_mse": ("MSE, random x_T", False),
    "random_agreement": ("class agreement, random x_T", True),
    "inferred_ssim": ("SSIM, inferred x_T", True),
    "inferred_mse": ("MSE, inferred x_T", False),
    "inferred_agreement": ("class agreement, inferred x_T", True),
}
HEADLINE = "random_ssim"  # what z alone carries; inferred x_T is near-exact for any DPM that inverts itself
TARGET_RATIO = 2.0

DEFAULT = {
    "pdae_checkpoints": [0, 4096, 8192, 16384, 32768],
    "diffae_checkpoints": [4096, 8192, 16384, 32768, 65536, 98304],
    "eval_images": 100,
    "steps": 50,
    "quick_baseline_images": None,
}
QUICK = {
    "pdae_checkpoints": [0, 1024, 2048, 4096],
    "diffae_checkpoints": [1024, 2048, 4096, 8192],
    "eval_images": 32,
    "steps": 20,
    "quick_baseline_images": 16384,
}


# ---- data and baseline --------------------------------------------------------------------------------------------
def ensure_inputs(
    work: Path,
    prepared: Path | None,
    baseline: Path | None,
    baseline_images: int | None = None,
    device: torch.device | None = None,
    log=print,
) -> dict[str, Any]:
    """Resolve (or build in `work`) the prepared data and the baseline DPM; returns paths and the DPM's images."""
    from pdae.io import read_json

    base, bcfg, _ = load_configs()
    device = device or torch.device("cpu")
    info: dict[str, Any] = {}
    if prepared is None:
        prepared = ROOT / "data/prepared" if (ROOT / "data/prepared/train.safetensors").is_file() else None
    if prepared is None:
        prepared = work / "data/prepared"
        if not (prepared / "train.safetensors").is_file():
            from pdae.config import load_params
            from pdae.data import prepare_dataset

            log(f"building prepared data in {prepared}")
            prepare_dataset(base, load_params(ROOT / "params.yaml", ["prepare"])["prepare"], prepared, progress=False)
    info["prepared"] = str(prepared)
    if baseline is None:
        baseline = ROOT / "models/baseline" if (ROOT / "models/baseline/config.json").is_file() else None
        metrics = ROOT / "metrics/baseline.json"
        if baseline is not None and metrics.is_file():
            info["baseline_images"] = read_json(metrics).get("train_images_seen")
    if baseline is None:
        if baseline_images is not None:
            bcfg = bcfg.model_copy(update={"images": baseline_images})
        baseline = work / f"models/baseline_{bcfg.images}"
        if not (baseline / "config.json").is_file():
            from pdae.baseline import pretrain_baseline, save_baseline
            from pdae.data import load_split

            log(f"pre-training the baseline DPM ({bcfg.images} images) in {baseline}")
            t0 = time.time()
            train_x, _ = load_split(prepared, "train")
            unet, res = pretrain_baseline(
                train_x, base, bcfg, device, work / "baseline_state.safetensors", progress=False
            )
            save_baseline(unet, baseline)
            (work / "baseline_state.safetensors").unlink(missing_ok=True)
            (baseline / "pretrain_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        info["baseline_images"] = bcfg.images
        secs = baseline / "pretrain_seconds.txt"
        info["baseline_pretrain_seconds"] = float(secs.read_text()) if secs.is_file() else None
    info["baseline"] = str(baseline)
    info.setdefault("baseline_images", None)
    return info


# ---- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, x: Tensor, labels: Tensor | None, x_T: Tensor, schedule, steps: int, scorer) -> dict[str, float]:
    """Reconstruction metrics of `model` (PDAE or DiffAEStyle, EMA weights) on images x (N, C, H, W) in [-1, 1]."""
    from pdae.autoencode import decode, encode, invert
    from pdae.metrics import mse, ssim

    z = encode(model, x)
    rec = {
        "inferred": decode(model, z, invert(model, x, z, schedule, steps), schedule, steps),
        "random": decode(model, z, x_T, schedule, steps),
    }
    out: dict[str, float] = {}
    for kind, r in rec.items():
        out[f"{kind}_mse"] = mse(r, x).mean().item()
        out[f"{kind}_ssim"] = ssim(r, x).mean().item()
        if scorer is not None and labels is not None:
            from pdae.scoring import agreement

            out[f"{kind}_agreement"] = agreement(scorer, r, labels)
    return out


# ---- reading the curves -------------------------------------------------------------------------------------------
def images_to_reach(curve: list[tuple[int, float]], target: float, higher_better: bool) -> dict[str, Any]:
    """Images at which `curve` [(images, value)] first reaches `target`.

    Returns {"images": x, "bound": "exact"} (interpolated linearly in log(images), or linearly from 0),
    {"images": first, "bound": "at_most"} when the first point already reaches it, or
    {"images": last, "bound": "more_than"} when no point does.
    """
    pts = sorted(curve)

    def ok(v: float) -> bool:
        return v >= target if higher_better else v <= target

    for i, (n, v) in enumerate(pts):
        if not ok(v):
            continue
        if i == 0:
            return {"images": float(n), "bound": "at_most"}
        (n0, v0) = pts[i - 1]
        f = 0.0 if v == v0 else (target - v0) / (v - v0)
        f = min(max(f, 0.0), 1.0)
        if n0 > 0:
            x = math.exp(math.log(n0) + f * (math.log(n) - math.log(n0)))
        else:
            x = n0 + f * (n - n0)
        return {"images": x, "bound": "exact"}
    return {"images": float(pts[-1][0]), "bound": "more_than"}


def _ratio(need: dict[str, Any], den: float) -> dict[str, Any]:
    """need["images"] / den, keeping need's bound ("at_most" -> the ratio is at most, "more_than" -> more than)."""
    return {"ratio": need["images"] / den, "bound": need["bound"]}


def _inverse(num: float, need: dict[str, Any]) -> dict[str, Any]:
    """num / need["images"]; the bound flips (needing at most n images means a ratio of at least num / n)."""
    if need["images"] <= 0:
        return {"ratio": None, "bound": "infinite"}
    flip = {"at_most": "at_least", "more_than": "less_than"}
    return {"ratio": num / need["images"], "bound": flip.get(need["bound"], "exact")}


LABELS = {"pdae": "PDAE", "diffae": "Diff-AE-style"}


def reversal(curve: list[tuple[int, float]], higher_better: bool) -> str | None:
    """Where a curve [(images, value)] first gets worse with more images, as a sentence; None when it never does."""
    pts = sorted(curve)
    for (n0, v0), (n1, v1) in zip(pts, pts[1:], strict=False):
        if (v1 < v0) if higher_better else (v1 > v0):
            return f"{v0:.4g} at {n0} images -> {v1:.4g} at {n1}"
    return None


def not_defined(rows: dict[str, list[dict[str, Any]]], key: str, higher_better: bool) -> str | None:
    """Why "images to reach a quality" is ill-defined for metric `key`, or None when it is defined.

    Ill-defined when (a) either curve is not monotone (the images needed then depend on which crossing is taken,
    i.e. on checkpoint noise), or (b) PDAE at 0 images (the pre-trained DPM, G == 0) already reaches PDAE's or
    Diff-AE-style's final value (no training is needed for that quality, so there is nothing to divide by).
    """
    reasons = []
    for kind in ("pdae", "diffae"):
        rev = reversal([(r["images"], r[key]) for r in rows[kind]], higher_better)
        if rev is not None:
            reasons.append(f"{LABELS[kind]} curve not monotone ({rev})")
    start = rows["pdae"][0]
    for kind in ("pdae", "diffae"):
        target = rows[kind][-1][key]
        if start["images"] == 0 and images_to_reach([(0, start[key])], target, higher_better)["bound"] == "at_most":
            reasons.append(f"PDAE at 0 images ({start[key]:.4g}) already reaches {LABELS[kind]}'s final {target:.4g}")
    return "; ".join(reasons) or None


def _undefined(reason: str) -> dict[str, Any]:
    return {"ratio": None, "bound": "not defined", "reason": reason}


def ratios(rows: dict[str, list[dict[str, Any]]], baseline_images: int | None) -> dict[str, Any]:
    """For every metric: images Diff-AE-style needs to reach PDAE's final value (and vice versa), as ratios.

    Metrics for which `not_defined` gives a reason keep the final values and the reason, and every ratio is
    {"ratio": None, "bound": "not defined", "reason": ...}.
    """
    out: dict[str, Any] = {}
    p_final, d_final = rows["pdae"][-1], rows["diffae"][-1]
    for key, (_, higher) in METRICS.items():
        if key not in p_final:
            continue
        reason = not_defined(rows, key, higher)
        if reason is not None:
            out[key] = {"pdae_final": p_final[key], "diffae_final": d_final[key], "not_defined": reason}
            for name in ("diffae_over_pdae", "diffae_final_over_pdae_needed", "diffae_over_pdae_plus_pretraining"):
                out[key][name] = _undefined(reason)
            out[key]["equal_quality"] = []
            continue
        d_need = images_to_reach([(r["images"], r[key]) for r in rows["diffae"]], p_final[key], higher)
        p_need = images_to_reach([(r["images"], r[key]) for r in rows["pdae"]], d_final[key], higher)
        entry = {
            "pdae_final": p_final[key],
            "diffae_final": d_final[key],
            "diffae_images_to_reach_pdae_final": d_need,
            "diffae_over_pdae": _ratio(d_need, p_final["images"]),
            "pdae_images_to_reach_diffae_final": p_need,
            "diffae_final_over_pdae_needed": _inverse(d_final["images"], p_need),
        }
        if baseline_images:
            entry["diffae_over_pdae_plus_pretraining"] = _ratio(d_need, p_final["images"] + baseline_images)
        entry["equal_quality"] = equal_quality(rows, key, higher)
        out[key] = entry
    return out


def equal_quality(rows: dict[str, list[dict[str, Any]]], key: str, higher: bool) -> list[dict[str, Any]]:
    """At every PDAE checkpoint (> 0 images): the images Diff-AE-style needs for the same value, and the ratio."""
    d_curve = [(r["images"], r[key]) for r in rows["diffae"]]
    out = []
    for r in rows["pdae"]:
        if r["images"] > 0:
            need = images_to_reach(d_curve, r[key], higher)
            out.append({"pdae_images": r["images"], "value": r[key], "diffae_images": need["images"],
                        **_ratio(need, r["images"])})  # fmt: skip
    return out


def is_met(res: dict[str, Any]) -> bool:
    head = res["ratios"][HEADLINE]["diffae_over_pdae"]
    return head["ratio"] is not None and head["ratio"] >= TARGET_RATIO and head["bound"] != "at_most"


def reanalyse(res: dict[str, Any]) -> dict[str, Any]:
    """Recompute the derived ratios of a saved result from its measured rows (no training, no evaluation)."""
    res = dict(res)
    res["ratios"] = ratios(res["rows"], res["inputs"].get("baseline_images"))
    res["met"] = is_met(res)
    res["analysis_recomputed"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return res


# ---- the run ------------------------------------------------------------------------------------------------------
def run(
    work: Path,
    settings: dict[str, Any],
    prepared: Path | None = None,
    baseline: Path | None = None,
    threads: int = 2,
    log=print,
    baseline_images: int | None = None,
) -> dict[str, Any]:
    from pdae.baseline import load_schedule, load_unet
    from pdae.data import load_attributes, load_split
    from pdae.fit import train_pdae
    from pdae.scoring import load_scorer

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    inputs = ensure_inputs(work, prepared, baseline, settings.get("quick_baseline_images"), device, log)
    if baseline_images is not None:
        inputs["baseline_images"] = baseline_images
    base, _, tcfg = load_configs()
    tcfg = tcfg.model_copy(update=settings.get("train_overrides") or {})  # tests shrink batch / z_dim
    prepared_dir = Path(inputs["prepared"])
    train_x, _ = load_split(prepared_dir, "train")
    test_x, test_ids = load_split(prepared_dir, "test")
    gen = torch.Generator().manual_seed(base.seed + 2)
    sub = torch.randperm(len(test_x), generator=gen)[: settings["eval_images"]]
    x = test_x[sub]
    x_T = torch.randn(x.shape, generator=gen)  # the same random x_T for both models and all checkpoints
    scorer = load_scorer(prepared_dir)
    labels = None
    if scorer is not None:
        attrs = load_attributes(prepared_dir).set_index("id")
        labels = torch.tensor(attrs.loc[test_ids[sub].numpy(), "label"].to_numpy().copy())
    unet = load_unet(inputs["baseline"])
    schedule = load_schedule(inputs["baseline"])
    pdae0, diffae0, counts = build_pair(unet, tcfg.z_dim, tcfg.encoder_channels, tcfg.dropout)
    steps = settings["steps"]
    setup_seconds = time.time() - t_start
    cpu_start = time.process_time()
    rows: dict[str, list[dict[str, Any]]] = {"pdae": [], "diffae": []}
    seconds = {"pdae_train": 0.0, "diffae_train": 0.0, "eval": 0.0}
    ckpts = {k: work / f"{k}_state.safetensors" for k in rows}
    for c in ckpts.values():
        c.unlink(missing_ok=True)  # a fresh run: never resume a previous run's (possibly longer) checkpoint

    def record(kind: str, model, images: int, train_seconds: float) -> None:
        t0 = time.time()
        m = evaluate(model.eval(), x, labels, x_T, schedule, steps, scorer)
        seconds["eval"] += time.time() - t0
        rows[kind].append({"images": images, **m, "train_seconds_cumulative": round(train_seconds, 1)})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items())
        log(f"[{time.time() - t_start:7.0f}s] {kind:6s} @ {images:6d} images: {shown}")

    for n in settings["pdae_checkpoints"]:
        if n == 0:
            record("pdae", pdae0, 0, 0.0)
            continue
        cfg = tcfg.model_copy(update={"images": n})
        model, res = train_pdae(pdae0.backbone, schedule, train_x, base, cfg, device, ckpts["pdae"], progress=False)
        seconds["pdae_train"] += res.seconds
        record("pdae", model, res.images_seen, seconds["pdae_train"])
    for n in settings["diffae_checkpoints"]:
        cfg = tcfg.model_copy(update={"images": n})
        torch.manual_seed(base.seed)
        fresh = DiffAEStyle(**{k: v for k, v in diffae0.config.items()})
        model, res = train_diffae(fresh, schedule, train_x, base, cfg, device, ckpts["diffae"])
        seconds["diffae_train"] += res.seconds
        record("diffae", model, res.images_seen, seconds["diffae_train"])
    for c in ckpts.values():
        c.unlink(missing_ok=True)
    result = {
        "benchmark": "P1 training efficiency",
        "settings": {
            **{k: v for k, v in settings.items() if k != "quick_baseline_images"},
            "batch_size": tcfg.batch_size,
            "lr": tcfg.lr,
            "ema_decay": tcfg.ema_decay,
            "z_dim": tcfg.z_dim,
            "bf16": tcfg.bf16,
            "pdae_weighting": f"{tcfg.weighting} (gamma {tcfg.gamma})",
            "diffae_loss": "plain eps MSE, uniform weighting",
            "seed": base.seed,
            "threads": threads,
        },
        "inputs": inputs,
        "parameters": counts,
        "diffae_channels": diffae0.config["channels"],
        "rows": rows,
        "headline_metric": HEADLINE,
        "ratios": ratios(rows, inputs.get("baseline_images")),
        "target_diffae_over_pdae": TARGET_RATIO,
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "setup": round(setup_seconds, 1)},
        "comparison_seconds": round(sum(seconds.values()), 1),
        "comparison_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "machine": machine(),
    }
    result["met"] = is_met(result)
    return result


def _fmt_ratio(r: dict[str, Any]) -> str:
    if r.get("bound") == "not defined":
        return "not defined"
    if r.get("ratio") is None:
        return "∞ (PDAE at 0 images)" if r.get("bound") == "infinite" else "—"
    sign = {"more_than": ">", "at_least": "≥", "at_most": "≤", "less_than": "<"}.get(r["bound"], "")
    return f"{sign}{r['ratio']:.2f}×"


def report(res: dict[str, Any]) -> str:
    keys = [k for k in METRICS if k in res["rows"]["pdae"][0]]
    rows = [[kind, r["images"], *[r[k] for k in keys]] for kind in ("pdae", "diffae") for r in res["rows"][kind]]
    lines = [table(rows, ["model", "images", *keys]), ""]
    rrows = []
    for k in keys:
        e = res["ratios"][k]
        rrows.append(
            [
                k,
                e["pdae_final"],
                e["diffae_final"],
                _fmt_ratio(e["diffae_over_pdae"]),
                _fmt_ratio(e.get("diffae_over_pdae_plus_pretraining", {})),
                _fmt_ratio(e["diffae_final_over_pdae_needed"]),
            ]
        )
    head = [
        "metric",
        "PDAE final",
        "Diff-AE final",
        "Diff-AE imgs / PDAE imgs to PDAE final",
        "… incl. DPM pre-training",
        "Diff-AE final imgs / PDAE imgs to that",
    ]
    lines.append(table(rrows, head))
    undefined = [f"- {k}: not defined — {res['ratios'][k]['not_defined']}" for k in keys
                 if res["ratios"][k].get("not_defined")]  # fmt: skip
    if undefined:
        lines += ["", "Ratios not defined (computed from the curves):", *undefined]
    eq = res["ratios"][HEADLINE].get("equal_quality", [])
    if eq:
        shown = ", ".join(f"{e['pdae_images']}: {_fmt_ratio(e)}" for e in eq)
        lines.append(f"\nDiff-AE-style images / PDAE images at equal {HEADLINE}, per PDAE checkpoint: {shown}")
    s = res["settings"]
    lines.append(
        f"\nheadline ({HEADLINE}): Diff-AE-style needs {_fmt_ratio(res['ratios'][HEADLINE]['diffae_over_pdae'])} "
        f"PDAE's images (target >= {TARGET_RATIO}×). PDAE {s['pdae_checkpoints'][-1]} images on a DPM pre-trained "
        f"on {res['inputs'].get('baseline_images')} images (counted separately); {s['eval_images']} test images, "
        f"DDIM {s['steps']} steps; comparison {res['comparison_seconds']:.0f} s wall "
        f"({res['comparison_cpu_seconds']:.0f} s CPU, {s['threads']} thread(s)), total {res['total_seconds']:.0f} s."
    )
    return "\n".join(lines)


def _counts(text: str) -> list[int]:
    """'0,4096,8192' -> [0, 4096, 8192] (increasing image counts)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of image counts") from None
    if not values or values != sorted(set(values)) or values[0] < 0:
        raise argparse.ArgumentTypeError(f"'{text}': give increasing, non-negative image counts")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small run (minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pdae_bench"), help="scratch folder (data, baseline)")
    ap.add_argument("--prepared", type=Path, default=None, help="prepared data folder (default: see docstring)")
    ap.add_argument("--baseline", type=Path, default=None, help="baseline DPM folder (default: see docstring)")
    ap.add_argument("--baseline-images", type=int, default=None, help="pre-training images of --baseline")
    ap.add_argument("--pdae-images", type=_counts, default=None, help="PDAE checkpoints, e.g. 0,4096,8192")
    ap.add_argument("--diffae-images", type=_counts, default=None, help="Diff-AE-style checkpoints, e.g. 4096,8192")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--clean", action="store_true", help="delete --work first (rebuild data and baseline)")
    ap.add_argument("--reanalyse", type=Path, default=None, help="recompute ratios of a saved result JSON in place")
    args = ap.parse_args(argv)
    if args.reanalyse is not None:
        from pdae.io import read_json, write_json

        res = reanalyse(read_json(args.reanalyse))
        print(report(res))
        write_json(args.reanalyse, res)
        print(f"rewrote {args.reanalyse} (rows unchanged, ratios recomputed)")
        return res
    if args.clean and args.work.exists():
        shutil.rmtree(args.work)
    settings = dict(QUICK if args.quick else DEFAULT)
    for key, value in (("pdae_checkpoints", args.pdae_images), ("diffae_checkpoints", args.diffae_images)):
        if value is not None:
            settings[key] = value
    log = lambda m: print(m, flush=True)  # noqa: E731
    res = run(args.work, settings, args.prepared, args.baseline, args.threads, log, args.baseline_images)
    print(report(res))
    name = "p1_efficiency_quick" if args.quick else "p1_efficiency"
    print(f"wrote {save_result(name, res, args.out)}")
    return res


if __name__ == "__main__":
    main()
