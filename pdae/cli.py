"""The `pdae` command line: thin Typer commands over the library. User errors print one line and exit 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from pdae.errors import PdaeError

app = typer.Typer(
    name="pdae",
    help="PDAE: learn semantic codes z of images from a frozen pre-trained diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OVERRIDE = typer.Option(None, "--set", "-S", help="Override a params key, e.g. -S train.lr=1e-4 (repeatable).")
PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read.")


def _device(name: str):
    from pdae.runtime import resolve_device

    return resolve_device(name)


@app.command("params")
def params_cmd(
    params: Path = PARAMS,
    overrides: list[str] = OVERRIDE,
) -> None:
    """Validate params.yaml (plus overrides) and print the effective values of every section."""
    import yaml

    from pdae.config import load_params

    cfg = load_params(params, overrides=overrides)
    typer.echo(yaml.safe_dump({k: v.model_dump() for k, v in cfg.items()}, sort_keys=False).rstrip())


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="Official checkpoint: PDAE checkpoint.pt or Diff-AE last.ckpt."),
    dst: Path = typer.Argument(..., help="Output folder (diffusers UNet2DModel format)."),
    kind: str = typer.Option("pdae-official", "--kind", help="pdae-official | diffae."),
    config: Path | None = typer.Option(None, "--config", help="Model config (PDAE config.yml / Diff-AE preset)."),
) -> None:
    """Convert an official PDAE or Diff-AE checkpoint into a diffusers UNet2DModel folder."""
    from pdae.convert import convert_to_folder

    if kind not in ("pdae-official", "diffae"):
        raise PdaeError(f"--kind '{kind}' is not supported; use pdae-official or diffae.")
    out = convert_to_folder(src, kind, dst, config=config)
    typer.echo(f"wrote {out}")


def main() -> None:
    """Console entry point: PdaeError -> `error: <one line>` on stderr, exit code 1."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        app()
    except PdaeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
