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
    src: Path = typer.Argument(
        ..., help="Checkpoint: PDAE checkpoint.pt, Diff-AE last.ckpt, guided-diffusion / improved-diffusion .pt."
    ),
    dst: Path = typer.Argument(..., help="Output folder (diffusers UNet2DModel + scheduler_config.json)."),
    kind: str = typer.Option(
        "pdae-official", "--kind", help="Checkpoint kind: pdae-official | diffae | adm | improved-diffusion."
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help="PDAE config.yml, Diff-AE config file or preset name; adm / improved-diffusion: the model flags "
        "('--image_size 256 --num_channels 256 ...') or a file holding them (flags text, YAML or JSON).",
    ),
    sample_size: int | None = options.count(
        None, "--sample-size", help="Image size when the config lacks it.", low=8, high=1024
    ),
    class_label: int | None = options.count(
        None, "--class-label", help="Class-conditional models: the label PDAE runs the model with.", low=0, high=65535
    ),
) -> None:
    """Convert an official pre-trained DPM checkpoint into a model folder PDAE's baseline stage can use.

    Kinds: pdae-official, diffae, adm (guided-diffusion), improved-diffusion. Learned-variance models keep their
    epsilon half; x0-predicting models (predict_xstart) and cosine schedules are recorded in scheduler_config.json.
    """
    from pdae.convert import KINDS, convert_to_folder

    if kind not in KINDS:
        raise PdaeError(
            f"--kind '{kind}' is not supported; use one of {', '.join(KINDS)} (diffusers models need no conversion: "
            "set baseline.source=diffusers)."
        )
    out = convert_to_folder(src, kind, dst, config=config, sample_size=sample_size, class_label=class_label)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("params")(params_cmd)
    app.command("convert")(convert_cmd)
