"""Converters from the official PDAE and Diff-AE pre-trained DPM checkpoints to diffusers `UNet2DModel`."""

from pdae.convert.api import KINDS, Kind, convert_checkpoint, convert_dpm, convert_to_folder, load_official
from pdae.convert.spec import DIFFAE_PRESETS, UNetSpec, diffae_preset, diffae_spec, pdae_spec

__all__ = [
    "DIFFAE_PRESETS",
    "KINDS",
    "Kind",
    "UNetSpec",
    "convert_checkpoint",
    "convert_dpm",
    "convert_to_folder",
    "diffae_preset",
    "diffae_spec",
    "load_official",
    "pdae_spec",
]
