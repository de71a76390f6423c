"""Sharing command: export a pipeline run as a DiffusionAutoencoder folder (and upload it to the Hub)."""

from __future__ import annotations

from pathlib import Path

import typer


def export_cmd(
    out: Path = typer.Argument(..., help="Folder to write (new, empty, or an earlier export to replace)."),
    push: str | None = typer.Option(None, "--push", help="Also upload to this Hub model repo (owner/name)."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo as private (with --push)."),
    baseline: Path = typer.Option(Path("models/baseline"), "--baseline", help="Baseline DPM folder."),
    pdae_dir: Path = typer.Option(Path("models/pdae"), "--pdae", help="PDAE folder (train stage)."),
    latent: Path = typer.Option(Path("models/latent"), "--latent", help="Latent DPM folder (latent stage)."),
    stats: Path = typer.Option(Path("latents/stats.safetensors"), "--stats", help="z statistics (encode stage)."),
    classifier: Path = typer.Option(Path("models/classifier"), "--classifier", help="Directions (classify stage)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The run's params.yaml (for the card)."),
    metrics: Path = typer.Option(Path("metrics"), "--metrics", help="The run's metrics folder (for the card)."),
) -> None:
    """Write a trained model as one folder (config.json + safetensors per component + model card README.md).

    Load it anywhere with `DiffusionAutoencoder.from_pretrained(OUT)`; nothing else from the project is needed.
    """
    from pdae.export import check_push, export_run, push_folder

    token = check_push(push) if push else None
    folder, notes = export_run(out, baseline, pdae_dir, latent, stats, classifier, params, metrics)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    typer.echo(f"wrote {folder}: {len(files)} files, {size / 1e6:.1f} MB")
    if push and token:
        typer.echo(f"uploaded to {push_folder(folder, push, token, private)}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
