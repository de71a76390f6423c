"""PDAE: unsupervised representation learning from a frozen pre-trained diffusion model."""

from pdae.errors import PdaeError

__all__ = ["PdaeError"]
__version__ = "0.1.0"
