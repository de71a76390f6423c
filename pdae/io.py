"""Artifact I/O: atomic writes (safetensors, JSON, CSV, PNG) and safe reads with one-line errors."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pdae.errors import PdaeError

_UMASK = os.umask(0)
os.umask(_UMASK)


# Yield a temporary path beside `path`; on success rename it over `path`, on any error remove it.
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    path = Path(path)
    if path.is_dir():
        raise PdaeError(f"output {path} is a folder; pass a file path (e.g. {path / ('out' + (suffix or '.json'))}).")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temporary files killed atomic writes of `path` left beside it; returns how many.

    Only for files a single process writes (e.g. a training checkpoint at the start of training).
    """
    path = Path(path)
    stale = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically write a flat dict of tensors to a safetensors file (metadata: str -> str)."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike, what: str = "file") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises PdaeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"{what} not found: {path} — run the stage that produces it (dvc repro) or fix the path.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PdaeError(
            f"{what} {path} is not a readable safetensors file ({err}); delete it and re-create it."
        ) from err


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pinned_weights(path: str | os.PathLike, sha256: str, what: str, fix: str) -> dict[str, torch.Tensor]:
    """Read third-party weights only if the file's sha256 is the pinned one, then with weights_only=True.

    A file with any other digest (a damaged download, another release, a planted pickle) is refused before a
    single byte of it is unpickled. `what` names the weights, `fix` tells the user how to get the right file.
    Returns the flat mapping of name -> tensor the file holds (safetensors or a torch state-dict file).
    """
    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"{what} not found at {path}; {fix}.")
    actual = sha256_of(path)
    if actual != sha256:
        raise PdaeError(
            f"{what} at {path} has sha256 {actual[:16]}…, not the pinned {sha256[:16]}…; refusing to read it — "
            f"delete it and {fix}."
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:
        raise PdaeError(f"{what} at {path} cannot be read ({type(err).__name__}); delete it and {fix}.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PdaeError(f"{what} at {path} is not a mapping of tensors; delete it and {fix}.")
    return state


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Metadata dict of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise PdaeError(f"{path} is not a readable safetensors file ({err}).") from err


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            return _json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write JSON (numpy/torch scalars converted, NaN/inf written as null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"{what} not found: {path}.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PdaeError(f"{what} {path} is not valid JSON ({err}); delete it and re-create it.") from err


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, frame: Any) -> None:
    """Atomically write a pandas DataFrame as CSV without the index."""
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, C, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# Largest PNG grid written (pixels): 8192 x 8192, about 200 MB as RGB in memory.
MAX_GRID_PIXELS = 8192 * 8192


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1) -> torch.Tensor:
    """Tile (N, C, H, W) in [-1, 1] into one uint8 (H', W', 3) image, `nrow` images per row.

    A grid above MAX_GRID_PIXELS is refused (PdaeError) before anything is allocated.
    """
    n, _, h, w = images.shape
    ncol = max(1, nrow)
    height = math.ceil(n / ncol) * (h * scale + pad) + pad
    width = ncol * (w * scale + pad) + pad
    if height * width > MAX_GRID_PIXELS:
        raise PdaeError(
            f"the image grid would be {width} x {height} pixels (at most {MAX_GRID_PIXELS} allowed); "
            "lower the upscaling (--scale/--zoom) or the number of images."
        )
    imgs = to_uint8(images)
    if imgs.shape[1] == 1:
        imgs = imgs.repeat(1, 3, 1, 1)
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = imgs.shape
    ncol = max(1, nrow)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = imgs[i]
    return grid.permute(1, 2, 0).contiguous()


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, nrow: int, scale: int = 2) -> Path:
    """Atomically write a PNG grid of images in [-1, 1]; returns the path."""
    from PIL import Image

    grid = image_grid(images, nrow=nrow, scale=scale).numpy()
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return Path(path)


def save_figure(path: str | os.PathLike, fig: Any) -> Path:
    """Atomically save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
