"""CLI command groups. Each module defines `register(app)`; pdae/cli.py lists them in help order."""
