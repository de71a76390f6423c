"""The served encoder: PDAE's EMA encoder E as an MLflow pyfunc model (image array -> z).

`log_encoder(run, pdae_dir)` writes the encoder's weights (safetensors) and config into a temporary folder, logs it as
the model's artifacts and logs `EncoderModel` "from code" — a tiny stateless class that rebuilds the network from
those files in `load_context`; nothing in the logged model is pickled. Serve it with

    mlflow models serve -m runs:/<run_id>/encoder --env-manager local -h 127.0.0.1 -p 5001

and POST `{"inputs": <images>}` to /invocations; the answer is `{"predictions": z}` with z (N, z_dim). Accepted images
(also via `mlflow.pyfunc.load_model(...).predict`): float arrays in [-1, 1] or integer (uint8) arrays in [0, 255],
as a batch (N, C, H, W) or (N, H, W, C), or a single image (C, H, W), (H, W, C) or (H, W) for one channel. H = W
must be the training resolution.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from pdae.errors import PdaeError

ENCODER_WEIGHTS, ENCODER_CONFIG, ARTIFACT_KEY = "encoder.safetensors", "encoder_config.json", "encoder_dir"


def export_encoder(pdae_dir: str | Path, out_dir: str | Path) -> Path:
    """Write encoder.safetensors (E's weights, keys without the `encoder.` prefix) + encoder_config.json to out_dir.

    `pdae_dir`: the run's models/pdae or a DiffusionAutoencoder folder (`pdae export`, save_pretrained).
    """
    from pdae.io import load_tensors, read_json, save_tensors, write_json
    from pdae.model import is_model_folder
    from pdae.nets.pdae import CONFIG_NAME, WEIGHTS_NAME

    pdae_dir, out_dir = Path(pdae_dir), Path(out_dir)
    if is_model_folder(pdae_dir):
        pdae_dir = pdae_dir / "pdae"
    cfg = read_json(pdae_dir / CONFIG_NAME, what="PDAE config")
    if cfg.get("num_classes") is not None:
        raise PdaeError(f"{pdae_dir} holds a class-conditional model (no image encoder) — nothing to serve.")
    tensors = load_tensors(pdae_dir / WEIGHTS_NAME, what="PDAE weights")
    enc = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    if not enc:
        raise PdaeError(f"{pdae_dir / WEIGHTS_NAME} has no encoder.* weights; re-run the train stage.")
    keys = ("image_size", "in_channels", "z_dim", "encoder_channels")
    save_tensors(out_dir / ENCODER_WEIGHTS, enc, metadata={"format": "pdae-encoder-v1"})
    write_json(out_dir / ENCODER_CONFIG, {k: cfg.get(k) for k in keys})
    return out_dir


def load_encoder(encoder_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(Encoder in eval mode on the CPU, its config) rebuilt from an `export_encoder` folder."""
    from safetensors.torch import load_file

    from pdae.io import read_json
    from pdae.nets.encoder import Encoder

    encoder_dir = Path(encoder_dir)
    cfg = read_json(encoder_dir / ENCODER_CONFIG, what="encoder config")
    net = Encoder(cfg["image_size"], cfg["in_channels"], cfg["z_dim"], cfg.get("encoder_channels"))
    net.load_state_dict(load_file(str(encoder_dir / ENCODER_WEIGHTS)), strict=True)
    return net.eval().requires_grad_(False), cfg


def to_model_input(images: Any, image_size: int, channels: int) -> torch.Tensor:
    """Any accepted image array (see module doc) -> float32 (N, C, H, W) in [-1, 1]."""
    if hasattr(images, "to_numpy"):  # pandas DataFrame / Series
        images = images.to_numpy()
    arr = np.asarray(images.tolist() if hasattr(images, "dtype") and images.dtype == object else images)
    if arr.dtype.kind not in "fiub":
        raise PdaeError(f"images must be a numeric array, got dtype {arr.dtype}.")
    x = torch.from_numpy(np.ascontiguousarray(arr))
    x = x.float() / 127.5 - 1 if arr.dtype.kind in "iub" else x.float()
    if x.ndim == 2 and channels == 1:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise PdaeError(f"images must be (N, C, H, W), (N, H, W, C) or one image; got shape {tuple(arr.shape)}.")
    if x.shape[1] != channels and x.shape[-1] == channels:
        x = x.permute(0, 3, 1, 2)
    if tuple(x.shape[1:]) != (channels, image_size, image_size):
        raise PdaeError(
            f"images of shape {tuple(arr.shape)} do not match the encoder input ({channels}, {image_size}, "
            f"{image_size}) (channels first or last)."
        )
    return x.contiguous()


# Stateless on purpose (also safe to cloudpickle); the network is built from the artifacts in load_context.
class EncoderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: predict(images) -> z as float32 numpy (N, z_dim)."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's PythonModelContext
        self._net, cfg = load_encoder(context.artifacts[ARTIFACT_KEY])
        self._shape = (int(cfg["image_size"]), int(cfg["in_channels"]))

    # np.ndarray is a hint MLflow derives no signature from (list/pydantic hints would be enforced as a schema).
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:  # noqa: ANN001
        x = to_model_input(model_input, *self._shape)
        with torch.no_grad():
            return self._net(x).float().numpy()


def pip_requirements() -> list[str]:
    """Requirements recorded with the model (nothing is installed with --env-manager local)."""
    import safetensors

    return [f"torch=={torch.__version__.split('+')[0]}", f"safetensors=={safetensors.__version__}", "numpy", "mlflow"]


# The model-from-code script MLflow stores and runs at load time (no pickled Python objects in the model at all).
MODEL_CODE = """import mlflow
from pdae.serve import EncoderModel

mlflow.models.set_model(EncoderModel())
"""


def log_encoder(run: Any, pdae_dir: str | Path, name: str = "encoder") -> Any:
    """Log the EMA encoder of `pdae_dir` as pyfunc model `name` in the active MLflow run (`run`: a StageRun).

    Returns MLflow's ModelInfo (model_uri, ...) or None when tracking is off or logging failed (a warning says why).
    The model is logged "from code" (a three-line script, no cloudpickle); the pdae package is shipped in the model
    (code_paths), so serving needs only torch, safetensors and mlflow.
    """
    if not getattr(run, "enabled", False):
        return None
    import pdae

    with tempfile.TemporaryDirectory(prefix="pdae-encoder-") as tmp:
        weights = export_encoder(pdae_dir, Path(tmp) / "encoder")
        code = Path(tmp) / "encoder_model.py"
        code.write_text(MODEL_CODE)
        return run.log_model(
            name=name,
            python_model=str(code),
            artifacts={ARTIFACT_KEY: str(weights)},
            code_paths=[str(Path(pdae.__file__).parent)],
            pip_requirements=pip_requirements(),
        )
