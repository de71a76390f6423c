"""Utility commands: validate params, convert official checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from pdae.commands import options
from pdae.errors import PdaeError

OVERRIDE = typer.Option(None, "--set", "-S", help="Override a params key, e.g. -S train.lr=1e-4 (repeatable).")
PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read.")


def params_cmd(params: Path = PARAMS, overrides: list[str] = OVERRIDE) -> None:
    """Validate params.yaml (plus overrides) and print the effective values of every section."""
    import yaml

    from pdae.config import load_params

    cfg = load_params(params, overrides=overrides)
    typer.echo(yaml.safe_dump({k: v.model_dump() for k, v in cfg.items()}, sort_keys=False).rstrip())


def convert_cmd(
    src: Path = typer.Argument(..., help="Official checkpoint: PDAE checkpoint.pt or Diff-AE last.ckpt."),
    dst: Path = typer.Argument(..., help="Output folder (diffusers UNet2DModel format)."),
    kind: str = typer.Option("pdae-official", "--kind", help="pdae-official | diffae."),
    config: str | None = typer.Option(None, "--config", help="PDAE config.yml, Diff-AE config file or preset name."),
    sample_size: int | None = options.count(
        None, "--sample-size", help="Image size when the config lacks it.", low=8, high=1024
    ),
) -> None:
    """Convert an official PDAE or Diff-AE checkpoint into a diffusers UNet2DModel folder."""
    from pdae.baseline import SCHEDULER_FILE, scheduler_config
    from pdae.convert import convert_to_folder
    from pdae.io import write_json

    if kind not in ("pdae-official", "diffae"):
        raise PdaeError(f"--kind '{kind}' is not supported; use pdae-official or diffae.")
    out = convert_to_folder(src, kind, dst, config=config, sample_size=sample_size)
    write_json(Path(out) / SCHEDULER_FILE, scheduler_config())
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("params")(params_cmd)
    app.command("convert")(convert_cmd)
