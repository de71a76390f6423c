"""The PDAE model: frozen backbone + trainable encoder E and gradient estimator G, with save/load."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pdae.errors import PdaeError
from pdae.io import load_tensors, read_json, save_tensors, write_json
from pdae.nets.backbone import Backbone, Features, load_backbone
from pdae.nets.encoder import Encoder, LabelEncoder
from pdae.nets.gradient import GradientEstimator

WEIGHTS_NAME = "pdae.safetensors"
CONFIG_NAME = "pdae_config.json"
FORMAT = "pdae-v1"

# A model_fn maps (x_t (N, C, H, W), t (N,) int) to (eps_hat, g), both (N, C, H, W); the samplers' signature.
ModelFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = ["PDAE", "ModelFn", "load_backbone", "load_pdae", "save_pdae"]


class PDAE(nn.Module):
    """Frozen pre-trained DPM + encoder E (or a label embedding) + gradient estimator G.

    The backbone is held but NOT registered as a submodule: ``parameters()``, ``state_dict()``, ``train()`` and
    EMA copies see only E and G (``copy.deepcopy`` shares the frozen backbone). ``.to()`` / ``.float()`` still move
    the backbone along.

    Args:
        backbone: the frozen DPM.
        z_dim: size of the semantic code.
        encoder_channels: Encoder conv widths (default by image size, see pdae.nets.encoder.ENCODER_PLANS).
        dropout: dropout inside G's z-ResBlocks.
        skip_norm: "separate" | "joint" (official code): G's normalisation of cat(hidden, frozen skip).
        num_classes: if set, class-conditional mode: E is replaced by a learned embedding of integer labels.
    """

    def __init__(
        self,
        backbone: Backbone,
        z_dim: int,
        encoder_channels: list[int] | None = None,
        dropout: float = 0.0,
        num_classes: int | None = None,
        skip_norm: str = "separate",
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)
        size, ch = backbone.image_size, backbone.in_channels
        if num_classes is not None:
            self.encoder: nn.Module = LabelEncoder(num_classes, z_dim)
        else:
            self.encoder = Encoder(size, ch, z_dim, encoder_channels)
        self.gradient = GradientEstimator(backbone.plan, z_dim, dropout, skip_norm)
        self.config: dict[str, Any] = {
            "format": FORMAT,
            "image_size": size,
            "in_channels": ch,
            "z_dim": z_dim,
            "encoder_channels": None if num_classes is not None else list(self.encoder.channels),
            "dropout": dropout,
            "num_classes": num_classes,
            "skip_norm": skip_norm,
            "backbone": backbone.fingerprint,
        }

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    @property
    def z_dim(self) -> int:
        return int(self.config["z_dim"])

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> PDAE:
        # Keep the unregistered backbone on the same device/dtype as E and G.
        self._backbone._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> PDAE:
        memo[id(self._backbone)] = self._backbone  # the frozen DPM is shared, never copied
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of E and G (the only ones PDAE optimises)."""
        yield from self.encoder.parameters()
        yield from self.gradient.parameters()

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0: images (N, C, H, W) in [-1, 1] (labels (N,) in class-conditional mode) -> z: (N, z_dim), raw."""
        return self.encoder(x0)

    def features(self, x_t: torch.Tensor, t: torch.Tensor | int) -> Features:
        """Frozen down-path features (no grad); see Backbone.features."""
        return self.backbone.features(x_t, t)

    def eps_and_shift(
        self, x_t: torch.Tensor, t: torch.Tensor | int, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen noise prediction and the learned shift from ONE pass of the frozen down path.

        Args:
            x_t: noisy images (N, C, H, W); t: timesteps (N,) or scalar, in [0, T); z: codes (N or 1, z_dim).
        Returns:
            eps_hat (N, C, H, W) without autograd history, and g = G(x_t, z, t) (N, C, H, W) differentiable w.r.t.
            E and G. Combine as eps_hat + c_t * g (training, DDPM) or eps_hat - sqrt(1 - abar_t) * g (DDIM).
        """
        feats = self.backbone.features(x_t, t)
        return self.backbone.eps_from_features(feats), self.gradient(feats, z)

    def shift(self, x_t: torch.Tensor, t: torch.Tensor | int, z: torch.Tensor) -> torch.Tensor:
        """g = G(x_t, z, t) only (N, C, H, W), skipping the frozen up path."""
        return self.gradient(self.backbone.features(x_t, t), z)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eps_and_shift(x_t, t, z)

    def model_fn(self, z: torch.Tensor, scale: float = 1.0) -> ModelFn:
        """The samplers' callable (x_t, t) -> (eps_hat, scale * g) for fixed codes z (N or 1, z_dim).

        `scale` multiplies G (class-conditional "truncation-like" sampling uses w in {0, 0.5, ..., 3}).
        """

        def fn(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps_hat, g = self.eps_and_shift(x_t, t, z)
            return eps_hat, g if scale == 1.0 else scale * g

        return fn


def save_pdae(model: PDAE, directory: str | os.PathLike) -> Path:
    """Atomically write `pdae.safetensors` (encoder.* and gradient.* weights) and `pdae_config.json` to `directory`."""
    directory = Path(directory)
    tensors = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "gradient."))}
    save_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
    write_json(directory / CONFIG_NAME, model.config)
    return directory


def _config_error(path: Path, problem: str) -> PdaeError:
    return PdaeError(f"{path}: {problem}; re-create it with the train stage (dvc repro train) or fix the path.")


def load_pdae(directory: str | os.PathLike, backbone: Backbone) -> PDAE:
    """Rebuild a PDAE saved by `save_pdae` on top of `backbone` (the DPM it was trained with); returns it in eval mode.

    Raises PdaeError naming the file for a missing/corrupt file, a config that does not match the backbone, or weights
    of another architecture (missing/unexpected keys, shape mismatch).
    """
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise PdaeError(f"PDAE config not found: {cfg_path} — run the train stage (dvc repro train) or fix the path.")
    cfg = read_json(cfg_path, what="PDAE config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("z_dim"), int):
        raise _config_error(cfg_path, "not a PDAE config (no integer z_dim)")
    if cfg.get("backbone") not in (None, backbone.fingerprint):
        raise PdaeError(
            f"{cfg_path}: trained on a backbone {cfg['backbone']} but the given backbone is {backbone.fingerprint}; "
            "load the baseline model it was trained with."
        )
    try:
        model = PDAE(
            backbone,
            z_dim=cfg["z_dim"],
            encoder_channels=cfg.get("encoder_channels"),
            dropout=float(cfg.get("dropout") or 0.0),
            num_classes=cfg.get("num_classes"),
            skip_norm=cfg.get("skip_norm") or "separate",
        )
    except (ValueError, TypeError) as err:
        raise _config_error(cfg_path, f"cannot build the model ({err})") from err
    tensors = load_tensors(w_path, what="PDAE weights")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PdaeError(
            f"{w_path} does not match the architecture in {cfg_path} ({len(missing)} missing, {len(unexpected)} "
            f"unexpected keys, e.g. {detail}); it was saved by a different model — re-train or use matching files."
        )
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise PdaeError(
                f"{w_path}: {key} has shape {tuple(tensors[key].shape)} but the architecture in {cfg_path} needs "
                f"{tuple(value.shape)}; it was saved by a different model — re-train or use matching files."
            )
    model.load_state_dict(tensors, strict=True)
    return model.eval()
