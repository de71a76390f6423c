"""`pdae evaluate`: the reconstruction table, FID/KID and gap of a trained run, as a rich table and a JSON file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer

from pdae.commands import options
from pdae.commands.autoencode import BASELINE, DATA, DEVICE, PDAE_DIR, SEED, THREADS, console, load, prepare
from pdae.errors import PdaeError


def _options(**values: Any) -> dict[str, Any]:
    """Command-line values (None = not given) -> an `evaluate` params dict; comma lists are split."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in ("steps", "metrics"):
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            try:
                value = [int(v) for v in items] if key == "steps" else items
            except ValueError:
                raise PdaeError(
                    f"--steps must be comma-separated integers, e.g. 10,20,50,100 (got '{value}')."
                ) from None
        out[key] = value
    return out


def _expected_messages(cfg) -> int:
    recon = (
        3 * len(cfg.steps) + (1 if cfg.inversion_steps else 0) if {"ssim", "mse", "lpips"} & set(cfg.metrics) else 0
    )
    return recon + (7 if "fid" in cfg.metrics else 0) + 1


def print_tables(metrics: dict[str, Any]) -> None:
    """Rich tables of the reconstruction results, FID/KID sets and the gap reduction."""
    from rich.table import Table

    from pdae.evaluate import table_rows
    from pdae.report import FID_LABELS, fmt, interval_cell

    con = console()
    if "reconstruction" in metrics:
        inv = metrics.get("inversion_steps")
        table = Table(title=f"Reconstruction of {metrics['n_images']} test images (x_T inversion steps: {inv})")
        for col in ("T", "model", "latent dim", "SSIM ↑", "LPIPS ↓", "MSE ↓"):
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
        for r in table_rows(metrics):
            cells = [fmt(r.get(k)) if r.get(f"{k}_sd") is None else f"{fmt(r[k])} ± {fmt(r[f'{k}_sd'])}"
                     for k in ("ssim", "lpips", "mse")]  # fmt: skip
            table.add_row(str(r["T"]), r["label"], fmt(r.get("latent_dim")), *cells)
        con.print(table)
        if metrics.get("lpips_reason"):
            con.print(f"LPIPS not computed: {metrics['lpips_reason']}")
    if "fid" in metrics:
        s = metrics["fid_settings"]
        table = Table(title=f"FID / KID vs {s['n_real']} real {s['real_split']} images ({s['steps']} DDIM steps)")
        for col in ("set", "n", "classifier FD ↓", "FID ↓", "KID ↓", "note"):
            table.add_column(col)
        for key, res in metrics["fid"].items():
            cells = [interval_cell(res, k) for k in ("classifier_fd", "fid", "kid")]
            table.add_row(FID_LABELS.get(key, key), str(res["n_generated"]), *cells, res["reason"] or "")
        con.print(table)
        for pair, verdicts in metrics.get("fid_comparisons", {}).items():
            con.print(f"{pair}: " + "; ".join(f"{k}: {v}" for k, v in verdicts.items()))
    con.print(f"gap reduction (t >= T/10, {metrics['gap_images']} images): {fmt(metrics['gap_reduction'])}")


def evaluate_cmd(
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    data: Path = DATA,
    latent: Path = typer.Option(Path("models/latent"), "--latent", help="Latent DPM folder (FID set; optional)."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Evaluate the models/baseline + models/pdae artifacts of this MLflow run instead."
    ),
    steps: str | None = typer.Option(None, "--steps", help="Decoding steps T, comma-separated [10,20,50,100]."),
    inversion_steps: int | None = options.count(
        None, "--inversion-steps", help="One shared inversion [100].", high=1000
    ),
    n_images: int | None = options.count(
        None, "--n-images", help="Test images in the reconstruction table [all].", low=2, high=options.MAX_IMAGES
    ),
    metrics: str | None = typer.Option(None, "--metrics", help="Comma-separated subset of ssim,mse,lpips,fid."),
    fid_samples: int | None = options.count(
        None, "--fid-samples", help="Images per generated FID set [1000].", low=3, high=options.MAX_IMAGES
    ),
    fid_real: int | None = options.count(
        None, "--fid-real", help="Real reference images for FID [all train].", low=3, high=options.MAX_IMAGES
    ),
    n_boot: int | None = options.count(
        None, "--n-boot", help="Bootstrap resamples of every interval [100].", low=2, high=100_000
    ),
    fid_steps: int | None = options.count(None, "--fid-steps", help="DDIM steps of the FID sets [50].", high=1000),
    out: Path | None = options.out_file(None, "--out", "-o", help="Write the metrics JSON to this file."),
    report: Path | None = options.out_file(
        None, "--report", help="Also write a Markdown report (figures/ beside it)."
    ),
    params: Path | None = typer.Option(
        None, "--params", help="params.yaml whose `latent` section is used [params.yaml, defaults if absent]."
    ),
    device: str = DEVICE,
    seed: int = SEED,
    threads: int = THREADS,
) -> None:
    """Evaluate a trained run: reconstruction table (SSIM, LPIPS, MSE vs the bare DPM), FID/KID sets, gap curve.

    Defaults (in brackets): the whole test split, 1000 generated images per FID set, the whole train split as the
    FID reference; on the embedded 16x16 digits run that is about 12 minutes on 2 CPU cores (docs/evaluation.md).
    """
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pdae.config import load_params, parse_section
    from pdae.evaluate import LatentSampling, download_run_models, evaluate_run
    from pdae.io import write_json

    values = dict(steps=steps, inversion_steps=inversion_steps, n_images=n_images, metrics=metrics)
    values.update(fid_samples=fid_samples, fid_real=fid_real, fid_steps=fid_steps, n_boot=n_boot)
    cfg = parse_section("evaluate", _options(**values), source="command line")
    sampling = None
    if params is not None or Path("params.yaml").is_file():  # a --params file that is missing is an error
        lat = load_params(params or Path("params.yaml"), sections=["latent"])["latent"]
        sampling = LatentSampling(
            lat.latent_steps, lat.clip_noise, lat.clip_x0, lat.shift_fraction, lat.solver, lat.latent_solver
        )
    dev = prepare(seed, threads, device)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="pdae-run-") as tmp:
        if run_id:
            baseline, pdae_dir = download_run_models(run_id, tmp)
        model, schedule = load(baseline, pdae_dir, dev)
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console(stderr=True), transient=True) as bar:
            task = bar.add_task("evaluate", total=_expected_messages(cfg))

            def progress(msg: str) -> None:
                bar.update(task, description=msg, advance=1)

            result = evaluate_run(model, schedule, data, cfg, latent, sampling, seed, progress)
    result.metrics["seconds"]["total"] = round(time.time() - start, 1)
    print_tables(result.metrics)
    if out is not None:
        write_json(out, result.metrics)
        typer.echo(f"wrote {out}")
    if report is not None:
        from pdae.report import save_figures, write_report

        save_figures(result, report.parent / "figures" / "evaluate")
        write_report(result.metrics, report, metrics_dir=Path("metrics"), info={"run id": run_id, "device": str(dev)})
        typer.echo(f"wrote {report}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
