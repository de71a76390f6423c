"""PDAE: unsupervised representation learning from a frozen pre-trained diffusion model."""

from __future__ import annotations

from typing import Any

from pdae.errors import PdaeError

__all__ = ["DiffusionAutoencoder", "PdaeError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: `import pdae` (and the CLI's start-up) stays free of torch/diffusers.
    if name == "DiffusionAutoencoder":
        from pdae.model import DiffusionAutoencoder

        return DiffusionAutoencoder
    raise AttributeError(f"module 'pdae' has no attribute {name!r}")
