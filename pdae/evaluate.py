"""Evaluation of a trained run (docs/method.md §6): reconstruction table, FID/KID sets, gap curve, their files.

`evaluate_run` is what the `evaluate` stage and `pdae evaluate` call. The reconstruction table decodes `n_images`
test images (default: the whole test split) with T in `steps` DDIM steps: PDAE with x_T inferred by DDIM inversion
conditioned on z (T-step inversion by default, or one shared `inversion_steps` inversion), PDAE with random x_T
(same noise for every T), and the bare DPM's own DDIM inversion + sampling; each cell is the mean over images with
its per-image standard deviation (<metric>_sd). FID/KID sets (`pdae.evaluate_fid`: Inception FID/KID and
label-classifier FD, each with a bootstrap interval) are scored against `fid_real` real training images (default:
the whole train split): bare-DPM and latent-DPM samples (`fid_samples` each; latent only when models/latent exists),
random-x_T reconstructions of the whole test split, and the real test split (the small-sample floor). Two sets are
ranked only when their intervals separate. LPIPS is a real number or None with the reason, never from random weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from pdae.autoencode import decode, encode, invert, random_xT
from pdae.config import EvaluateConfig
from pdae.diffusion import Schedule
from pdae.errors import PdaeError, brief
from pdae.sampling import ddim_invert, ddim_sample, plain

# Row keys of the reconstruction table and their labels in the paper's wording.
ROWS = {
    "ddim_inferred": "DDIM baseline (inferred x_T)",
    "pdae_random": "PDAE (random x_T)",
    "pdae_inferred": "PDAE (inferred x_T)",
}
IMAGE_METRICS = ("ssim", "lpips", "mse")
# Which stage writes each model folder (named in "not found" errors).
STAGE_OF = {"baseline": "baseline", "pdae": "train", "data": "prepare", "latent": "latent"}
Progress = Callable[[str], None]


def require_dir(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a folder, else a PdaeError naming the stage that writes it."""
    path = Path(path)
    if not path.is_dir():
        stage = STAGE_OF.get(what, what)
        raise PdaeError(
            f"{what} folder not found: {path} — run the {stage} stage (dvc repro {stage}) or pass its path."
        )
    return path


def load_run(baseline_dir: str | Path, pdae_dir: str | Path, device: torch.device | str = "cpu"):
    """(PDAE model with EMA weights in eval mode on `device`, its Schedule); missing folders name the stage to run."""
    from pdae.autoencode import load_models

    return load_models(require_dir(baseline_dir, "baseline"), require_dir(pdae_dir, "pdae"), device)


def _noop(_: str) -> None:
    return None


def _mean_sd(values: Tensor | None, key: str) -> dict[str, float | None]:
    """{key: mean, key_sd: per-image standard deviation (ddof 1; 0 for one image)} of per-image values (N,)."""
    if values is None:
        return {key: None, f"{key}_sd": None}
    v = values.double()
    return {key: v.mean().item(), f"{key}_sd": v.std().item() if len(v) > 1 else 0.0}


def _scores(rec: Tensor, ref: Tensor, metrics: Sequence[str]) -> tuple[dict[str, float | None], str | None]:
    """Mean and per-image sd of SSIM / LPIPS / MSE of reconstructions vs references (N, C, H, W) in [-1, 1].

    LPIPS is None with the reason when its weights are unavailable.
    """
    from pdae.metrics import lpips_distance, mse, ssim

    out: dict[str, float | None] = {}
    reason = None
    if "ssim" in metrics:
        out.update(_mean_sd(ssim(rec, ref), "ssim"))
    if "lpips" in metrics:
        values, reason = lpips_distance(rec, ref)
        out.update(_mean_sd(values, "lpips"))
    if "mse" in metrics:
        out.update(_mean_sd(mse(rec, ref), "mse"))
    return out, reason


def _bare_fn(model):
    return plain(lambda x, t: model.backbone(x, t))


@torch.no_grad()
def ddim_inversion(model, images: Tensor, schedule: Schedule, steps: int, batch_size: int = 256) -> Tensor:
    """The bare DPM's own DDIM inversion x_T (N, C, H, W) of images (N, C, H, W) in [-1, 1] (no z, no shift)."""
    dev = next(model.parameters()).device
    outs = [
        ddim_invert(_bare_fn(model), images[i : i + batch_size].to(dev), schedule, steps).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outs)


@torch.no_grad()
def ddim_decode(model, x_T: Tensor, schedule: Schedule, steps: int, batch_size: int = 256) -> Tensor:
    """The bare DPM's DDIM samples (N, C, H, W) in [-1, 1] from x_T (N, C, H, W)."""
    dev = next(model.parameters()).device
    outs = [
        ddim_sample(_bare_fn(model), x_T[i : i + batch_size].to(dev), schedule, steps).clamp(-1, 1).cpu()
        for i in range(0, len(x_T), batch_size)
    ]
    return torch.cat(outs)


@dataclass
class ReconResult:
    """The table {"T<steps>": {row: {metric: value}}}, the LPIPS reason and reconstructions at the largest T.

    random_by_T: the random-x_T reconstructions (N, C, H, W) at each T (reused as the FID set at fid_steps).
    """

    table: dict[str, dict[str, dict[str, float | None]]]
    lpips_reason: str | None
    images: dict[str, Tensor] = field(default_factory=dict)
    random_by_T: dict[int, Tensor] = field(default_factory=dict)


@torch.no_grad()
def reconstruction_table(
    model,
    schedule: Schedule,
    images: Tensor,
    steps: Sequence[int] = (10, 20, 50, 100),
    inversion_steps: int | None = None,
    metrics: Sequence[str] = IMAGE_METRICS,
    seed: int = 0,
    batch_size: int = 256,
    progress: Progress = _noop,
) -> ReconResult:
    """Reconstruction metrics of test images (N, C, H, W) in [-1, 1] for each T in `steps` (see module doc)."""
    metrics = [m for m in metrics if m in IMAGE_METRICS]
    z = encode(model, images, batch_size)
    x_rand = random_xT(len(images), tuple(images.shape[1:]), torch.Generator().manual_seed(seed))
    shared_inv = shared_ddim = None
    if inversion_steps is not None:
        progress(f"invert ({inversion_steps} steps)")
        shared_inv = invert(model, images, z, schedule, inversion_steps, batch_size)
        shared_ddim = ddim_inversion(model, images, schedule, inversion_steps, batch_size)
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    reason = None
    recs: dict[str, Tensor] = {}
    random_by_T: dict[int, Tensor] = {}
    pixels = int(images[0].numel())
    latent_dim = {"pdae_inferred": model.z_dim + pixels, "pdae_random": model.z_dim, "ddim_inferred": pixels}
    for T in steps:
        inv = inversion_steps or T
        progress(f"T={T}: PDAE, inferred x_T")
        x_T = shared_inv if shared_inv is not None else invert(model, images, z, schedule, inv, batch_size)
        recs["pdae_inferred"] = decode(model, z, x_T, schedule, T, batch_size=batch_size)
        progress(f"T={T}: PDAE, random x_T")
        recs["pdae_random"] = random_by_T[T] = decode(model, z, x_rand, schedule, T, batch_size=batch_size)
        progress(f"T={T}: DDIM baseline")
        x_T = shared_ddim if shared_ddim is not None else ddim_inversion(model, images, schedule, inv, batch_size)
        recs["ddim_inferred"] = ddim_decode(model, x_T, schedule, T, batch_size)
        row: dict[str, dict[str, float | None]] = {}
        for key in ROWS:
            row[key], why = _scores(recs[key], images, metrics)
            row[key]["latent_dim"] = latent_dim[key]
            reason = reason or why
        table[f"T{T}"] = row
    return ReconResult(table, reason, {"original": images, **recs}, random_by_T)


@dataclass
class LatentSampling:
    """How latent-DPM samples are drawn and decoded (mirrors the `latent` params section)."""

    latent_steps: int = 100
    clip_noise: bool = False
    clip_x0: bool = False
    shift_fraction: float = 0.7
    solver: str = "ddim"  # image decoding solver (pdae.solvers)
    latent_solver: str = "ddim"  # the latent DPM's own solver


@torch.no_grad()
def latent_dpm_samples(
    model,
    schedule: Schedule,
    latent_dir: str | Path | None,
    n: int,
    steps: int,
    sampling: LatentSampling | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[Tensor | None, Tensor | None, str | None]:
    """(images (n, C, H, W) in [-1, 1], raw codes z (n, z_dim), None) from the latent DPM, or (None, None, reason).

    z comes from latent DDIM (`pdae.latent.sample_latents`), x_T is random, G acts in the first shift_fraction.
    """
    if latent_dir is None or not Path(latent_dir).is_dir():
        return None, None, f"no latent DPM at {latent_dir} — run the latent stage (dvc repro latent)"
    try:
        from pdae.latent import load_latent, sample_latents
    except ImportError as err:
        return None, None, f"the latent DPM library is unavailable ({err})"
    sampling = sampling or LatentSampling()
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    dpm = load_latent(latent_dir).to(dev)
    z = sample_latents(
        dpm,
        n,
        steps=sampling.latent_steps,
        clip_noise=sampling.clip_noise,
        clip_x0=sampling.clip_x0,
        generator=gen,
        solver=sampling.latent_solver,
    )
    x_T = random_xT(n, (model.backbone.in_channels, model.backbone.image_size, model.backbone.image_size), gen)
    images = decode(
        model,
        z,
        x_T,
        schedule,
        steps,
        sampler=sampling.solver,
        shift_fraction=sampling.shift_fraction,
        batch_size=batch_size,
    )
    return images, z, None


def bare_dpm_samples(model, schedule: Schedule, n: int, steps: int, seed: int = 0, batch_size: int = 256) -> Tensor:
    """n unconditional DDIM samples (n, C, H, W) in [-1, 1] of the frozen DPM alone."""
    bb = model.backbone
    x_T = random_xT(n, (bb.in_channels, bb.image_size, bb.image_size), torch.Generator().manual_seed(seed))
    return ddim_decode(model, x_T, schedule, steps, batch_size)


def _skipped(reason: str, n_real: int) -> dict[str, Any]:
    return {"fid": None, "kid_mean": None, "kid_std": None, "n_generated": 0, "n_real": n_real, "reason": reason}


@torch.no_grad()
def fid_sets(
    model,
    schedule: Schedule,
    train_x: Tensor,
    test_x: Tensor,
    cfg: EvaluateConfig,
    latent_dir: str | Path | None = None,
    sampling: LatentSampling | None = None,
    seed: int = 0,
    progress: Progress = _noop,
    scorer=None,
    random_recon: Tensor | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Scores of each image set vs `cfg.fid_real` real training images (all when None) -> ({set: dict}, {set: images}).

    The random-x_T set reconstructs the whole test split; pass `random_recon` (the test split decoded from random x_T
    with cfg.fid_steps) to reuse the reconstruction table's decode. See `pdae.evaluate_fid` for the scores.
    """
    from pdae.evaluate_fid import score_sets

    gen = torch.Generator().manual_seed(seed + 11)
    n_real = len(train_x) if cfg.fid_real is None else min(cfg.fid_real, len(train_x))
    real = train_x[torch.randperm(len(train_x), generator=gen)[:n_real]]
    n, steps, bs = cfg.fid_samples, cfg.fid_steps, cfg.batch_size
    sets: dict[str, Tensor] = {}
    results: dict[str, dict[str, Any]] = {}
    progress(f"FID set: bare DPM samples ({n}, {steps} steps)")
    sets["ddim_samples"] = bare_dpm_samples(model, schedule, n, steps, seed + 12, bs)
    progress(f"FID set: latent-DPM samples ({n})")
    latent, _, reason = latent_dpm_samples(model, schedule, latent_dir, n, steps, sampling, seed + 13, bs)
    if latent is None:
        results["latent_dpm_samples"] = _skipped(str(reason), len(real))
    else:
        sets["latent_dpm_samples"] = latent
    if random_recon is None:
        progress(f"FID set: random-x_T reconstructions ({len(test_x)})")
        x_T = random_xT(len(test_x), tuple(test_x.shape[1:]), torch.Generator().manual_seed(seed + 14))
        random_recon = decode(model, encode(model, test_x, bs), x_T, schedule, steps, batch_size=bs)
    sets["random_xT_reconstructions"] = random_recon
    sets["real_test"] = test_x
    results.update(score_sets(sets, real, cfg.kid_subset_size, cfg.n_boot, scorer, seed, progress))
    order = ["ddim_samples", "latent_dpm_samples", "random_xT_reconstructions", "real_test"]
    return {k: results[k] for k in order if k in results}, sets


def gap_grid(T: int) -> list[int]:
    """t = 0, 50, ..., and T - 1: the grid of the gap curve."""
    return sorted(set(range(0, T, 50)) | {T - 1})


def gap_frame(model, schedule: Schedule, images: Tensor, seed: int = 0, batch_size: int = 256) -> pd.DataFrame:
    """The posterior-mean-gap curve (t, gap_without, gap_with, ratio, per-image sds) on t = 0, 50, ..., T-1."""
    from pdae.diagnostics import gap_curve

    return gap_curve(model, images, schedule, gap_grid(schedule.T), seed=seed, batch_size=batch_size)


def _clock() -> tuple[float, float]:
    return time.time(), time.process_time()


def _lap(out: dict[str, Any], part: str, start: tuple[float, float]) -> None:
    out["seconds"][part] = round(time.time() - start[0], 1)
    out["cpu_seconds"][part] = round(time.process_time() - start[1], 1)


@dataclass
class EvalResult:
    """Everything an evaluation produced: the metrics dict (the JSON), figure tensors and the gap frame."""

    metrics: dict[str, Any]
    recon_images: dict[str, Tensor] = field(default_factory=dict)
    fid_images: dict[str, Tensor] = field(default_factory=dict)
    gap: pd.DataFrame | None = None


def evaluate_run(
    model,
    schedule: Schedule,
    data_dir: str | Path,
    cfg: EvaluateConfig,
    latent_dir: str | Path | None = None,
    sampling: LatentSampling | None = None,
    seed: int = 0,
    progress: Progress = _noop,
) -> EvalResult:
    """Reconstruction table, FID/KID sets and gap curve of a loaded run on the prepared data in `data_dir`."""
    from pdae.data import load_split

    data_dir = require_dir(data_dir, "data")
    test_x, _ = load_split(data_dir, "test")
    if test_x.shape[1:] != (model.backbone.in_channels, model.backbone.image_size, model.backbone.image_size):
        raise PdaeError(
            f"{data_dir}: images {tuple(test_x.shape[1:])} do not match the model's input "
            f"({model.backbone.in_channels}, {model.backbone.image_size}, {model.backbone.image_size}); "
            "evaluate on the data the model was trained on."
        )
    gen = torch.Generator().manual_seed(seed + 10)
    pick = torch.randperm(len(test_x), generator=gen)
    wanted = set(cfg.metrics)
    out: dict[str, Any] = {"n_test": len(test_x), "z_dim": model.z_dim, "metrics": sorted(wanted)}
    out["seconds"], out["cpu_seconds"] = {}, {}  # wall and process CPU time per part (CPU time is load-independent)
    result = EvalResult(out)
    image_metrics = [m for m in IMAGE_METRICS if m in wanted]
    random_recon = None
    if image_metrics:
        start = _clock()
        x = test_x[pick[: cfg.n_images or len(test_x)]]
        rec = reconstruction_table(
            model, schedule, x, cfg.steps, cfg.inversion_steps, image_metrics, seed, cfg.batch_size, progress
        )
        out.update(
            n_images=len(x),
            steps=list(cfg.steps),
            inversion_steps=cfg.inversion_steps or "T (same as decoding)",
            reconstruction=rec.table,
        )
        if "lpips" in wanted:
            out["lpips_reason"] = rec.lpips_reason
        result.recon_images = rec.images
        if len(x) == len(test_x) and cfg.fid_steps in rec.random_by_T:  # the whole test split, in `pick` order
            random_recon = rec.random_by_T[cfg.fid_steps]
        _lap(out, "reconstruction", start)
    if "fid" in wanted:
        start = _clock()
        parts = (model, schedule, data_dir, test_x[pick], cfg, latent_dir, sampling, seed, progress, random_recon)
        _fid_part(*parts, out, result)
        _lap(out, "fid", start)
    start = _clock()
    progress("gap curve")
    _gap_part(model, schedule, test_x[pick[: cfg.gap_images or len(test_x)]], cfg, seed, out, result)
    _lap(out, "gap", start)
    return result


def _fid_part(model, schedule, data_dir, test_x, cfg, latent_dir, sampling, seed, progress, random_recon, out, result):
    """FID/KID/classifier-FD sets with intervals, their comparisons and the headline into `out` (see fid_sets)."""
    from pdae.data import load_split
    from pdae.evaluate_fid import comparisons, headline
    from pdae.scoring import load_scorer

    train_x, _ = load_split(data_dir, "train")
    scorer = load_scorer(data_dir)
    fid, result.fid_images = fid_sets(
        model, schedule, train_x, test_x, cfg, latent_dir, sampling, seed, progress, scorer, random_recon
    )
    out["fid"] = fid
    out["fid_comparisons"] = comparisons(fid)
    out["fid_headline"] = headline(fid)
    out["fid_settings"] = {
        "n_generated": cfg.fid_samples,
        "n_real": len(train_x) if cfg.fid_real is None else min(cfg.fid_real, len(train_x)),
        "n_test": len(test_x),
        "real_split": "train",
        "steps": cfg.fid_steps,
        "n_boot": cfg.n_boot,
        "interval": "95% bootstrap over both sets (Fréchet distances re-centred on the full-set value)",
        "random_xT_set": "shared with the reconstruction table" if random_recon is not None else "decoded separately",
        "classifier_features": "label classifier (penultimate layer)" if scorer is not None else None,
    }


def _gap_part(model, schedule, images, cfg, seed, out, result) -> None:
    """Gap curve (with per-image sds) of `images` and the gap reduction with its bootstrap interval into `out`."""
    from pdae.diagnostics import gap_frame_of, gap_per_image, gap_reduction, gap_reduction_interval

    grid = gap_grid(schedule.T)
    without, with_ = gap_per_image(model, images, schedule, grid, seed, cfg.batch_size)
    result.gap = gap_frame_of(without, with_, grid)
    out["gap_reduction"] = gap_reduction(result.gap, schedule.T)
    interval = gap_reduction_interval(without, with_, grid, schedule.T, cfg.n_boot, seed)
    out["gap_reduction_low"], out["gap_reduction_high"] = interval["low"], interval["high"]
    out["gap_images"] = len(images)


def table_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows {T, row, label, latent_dim, ssim, lpips, mse} of a metrics dict's reconstruction table."""
    rows = []
    for t_key, by_row in metrics.get("reconstruction", {}).items():
        for key, vals in by_row.items():
            rows.append({"T": int(t_key[1:]), "row": key, "label": ROWS.get(key, key), **vals})
    return rows


def recon_plot_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """One line per T with columns <row>_<metric> (the DVC plot of the reconstruction table)."""
    wide: dict[int, dict[str, Any]] = {}
    for r in table_rows(metrics):
        line = wide.setdefault(r["T"], {"T": r["T"]})
        for m in IMAGE_METRICS:
            if m in r:
                line[f"{r['row']}_{m}"] = r[m]
    return pd.DataFrame([wide[t] for t in sorted(wide)], columns=None if wide else ["T"])


def download_run_models(run_id: str, dst: str | Path) -> tuple[Path, Path]:
    """Download the artifacts models/baseline and models/pdae of MLflow run `run_id` into `dst`."""
    import mlflow

    from pdae.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise PdaeError(
            f"--run-id {run_id}: there is no MLflow store at {uri.removeprefix('sqlite:///')} (nothing was tracked "
            "here); set MLFLOW_TRACKING_URI to the store that holds the run, or pass --baseline/--pdae folders."
        )
    paths = []
    for name in ("baseline", "pdae"):
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"models/{name}", dst_path=str(dst), tracking_uri=tracking_uri()
            )
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; all mean "not there"
            raise PdaeError(
                f"MLflow run {run_id} has no artifact models/{name} in {tracking_uri()} "
                f"({brief(err)}); evaluate that run with --baseline/--pdae paths instead."
            ) from None
        paths.append(Path(local))
    return paths[0], paths[1]
