"""Safe reading of foreign torch checkpoints: `torch.load(weights_only=True)` only, never arbitrary unpickling.

Lightning checkpoints (Diff-AE's `last.ckpt`) may reference Lightning classes in their bookkeeping entries (e.g. old
versions key `callbacks` by the `ModelCheckpoint` class, `hyper_parameters` is an `AttributeDict`). For those, and
only for names under Lightning's packages (and numpy scalars next to them), the weights-only unpickler is given
inert stand-ins: nothing from the file is imported or executed. Any other global makes the file refused.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from pdae.errors import PdaeError

# Packages whose objects may appear in a Lightning checkpoint's bookkeeping; replaced by inert stand-ins.
LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
NUMPY_METADATA = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.dtypes.")


# Stand-in for a bookkeeping object: accepts any constructor arguments and state, keeps nothing, runs nothing.
class _Inert:
    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {type(self).__name__}>"


def _stand_in(name: str) -> Any:
    # Lightning's AttributeDict is a plain dict subclass: read it as a dict so hyper_parameters stay usable.
    if name.endswith(".AttributeDict"):
        return dict
    return type(name.rsplit(".", 1)[-1], (_Inert,), {"__module__": "pdae.convert.load.inert"})


def _resave_hint(path: Path, key: str) -> str:
    return (
        f"get a weights-only copy of it (its '{key}' tensors as safetensors or a plain state dict) from its publisher"
    )


def _refuse(path: Path, key: str, names: list[str]) -> PdaeError:
    shown = ", ".join(sorted(names)[:3]) or "unknown objects"
    return PdaeError(
        f"{path} cannot be loaded safely: it needs arbitrary unpickling ({shown}); refusing to run code from it — "
        + _resave_hint(path, key)
        + "."
    )


def safe_torch_load(path: str | Path, key: str, allow_lightning: bool = False) -> dict[str, Any]:
    """Load a foreign checkpoint with `torch.load(map_location="cpu", weights_only=True)`.

    Args:
        path: the checkpoint file.
        key: the entry the caller needs (named in the re-save hint of the error message).
        allow_lightning: let Lightning bookkeeping classes load as inert stand-ins (see the module docstring).

    Returns:
        The top-level mapping of the checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"checkpoint not found: {path}; check the path (or download it first).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on weights_only belong to no refusal of ours
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path)
        if not names:  # nothing unsafe could be listed: damaged, or a legacy file refused for its content
            raise PdaeError(
                f"{path} is not a readable torch checkpoint, or needs arbitrary unpickling "
                "(refused by the weights-only reader); " + _resave_hint(path, key) + "."
            ) from err
        if not allow_lightning:
            raise _refuse(path, key, names) from err
        obj = _load_lightning(path, key, names)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        detail = (str(err).strip().split(". ")[0].splitlines() or [type(err).__name__])[0]
        detail = detail if len(detail) <= 160 else type(err).__name__
        raise PdaeError(
            f"{path} is not a readable torch checkpoint ({detail}); it is truncated or damaged — download it again."
        ) from err
    if not isinstance(obj, dict):
        raise PdaeError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict; expected an entry '{key}'.")
    return obj


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a zip checkpoint references beyond torch's weights-only allowlist (scanned, never resolved)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format or a damaged archive: nothing to list
        return []


def _load_lightning(path: Path, key: str, names: list[str]) -> dict[str, Any]:
    lightning = [n for n in names if n.startswith(LIGHTNING_PREFIXES) or n.startswith(NUMPY_METADATA)]
    if len(lightning) != len(names):
        raise _refuse(path, key, [n for n in names if n not in lightning])
    stand_ins = [(_stand_in(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refuse(path, key, names) from err
