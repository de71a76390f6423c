"""The `pdae` command line: thin Typer commands over the library. User errors print one line and exit 1.

Commands live in pdae/commands/<group>.py, each with `register(app)`; COMMAND_MODULES fixes the help order.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from typer.core import TyperGroup

from pdae.errors import PdaeError


# User errors become one line on stderr and exit code 1, also under typer.testing.CliRunner.
class _Group(TyperGroup):
    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except PdaeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="pdae",
    help="PDAE: learn semantic codes z of images from a frozen pre-trained diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Help order: evaluation first, then the autoencoding commands, editing, utilities.
COMMAND_MODULES = [
    "pdae.commands.evaluate",
    "pdae.commands.autoencode",
    "pdae.commands.edit",
    "pdae.commands.tools",
    "pdae.commands.share",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


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
