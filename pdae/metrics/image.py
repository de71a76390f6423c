"""Per-image reconstruction metrics with the paper's conventions: SSIM, MSE, LPIPS (AlexNet v0.1)."""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from pdae.errors import PdaeError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
# AlexNet's two stride-2 max-pools need at least 32 px; smaller images are upsampled (bilinear) before LPIPS.
LPIPS_MIN_SIZE = 32


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise PdaeError(
            f"{what}: need two (N, C, H, W) tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}."
        )


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size), float64, sum 1."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of x, y (N, C, H, W) in [-1, 1] -> (N,) float32, in [-1, 1] (1 for identical images).

    Convention of the PDAE/Diff-AE evaluation: computed on (x + 1) / 2, Gaussian window 11 with sigma 1.5,
    C1 = 0.01^2, C2 = 0.03^2 (data range 1), zero padding of 5 (output map of input size), per channel, then
    the mean over channels and pixels. Computed in float64.
    """
    _check_pair(x, y, "SSIM")
    a = (x.detach().double() + 1) / 2
    b = (y.detach().double() + 1) / 2
    channels = a.shape[1]
    window = gaussian_window().to(a.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, padding=SSIM_WINDOW // 2, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov_ab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov_ab + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return (num / den).mean(dim=(1, 2, 3)).float()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of x, y (N, C, H, W) in [-1, 1], measured on [0, 1] -> (N,) float32."""
    _check_pair(x, y, "MSE")
    return ((x.detach().double() - y.detach().double()) / 2).pow(2).mean(dim=(1, 2, 3)).float()


def alexnet_checkpoint_path() -> Path:
    """Where torchvision keeps its AlexNet ImageNet weights in the torch hub cache (not downloaded by us)."""
    from torchvision.models import AlexNet_Weights

    name = os.path.basename(urlparse(AlexNet_Weights.IMAGENET1K_V1.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


# sha256 of torchvision's alexnet-owt-7be5be79.pth (244,408,911 bytes; its name carries the prefix) and of the
# LPIPS v0.1 linear-layer file shipped in the lpips package (lpips/weights/v0.1/alex.pth).
ALEXNET_SHA256 = "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02"
LPIPS_LINEAR_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
_ALEXNET_FIX = f"download {ALEXNET_URL} to that path again (its sha256 is checked before it is read)"


@functools.lru_cache(maxsize=2)
def _lpips_model(checkpoint: str) -> torch.nn.Module:
    """LPIPS(alex, v0.1) built empty, then filled from `checkpoint` (AlexNet trunk) and the lpips package's file.

    Both files are read by pdae.io.load_pinned_weights (pinned sha256, then weights_only=True); lpips and
    torchvision load nothing themselves (no download path, no unpickling).
    """
    import lpips

    from pdae.io import load_pinned_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        # pnet_rand=True / pretrained=False: the trunk and the linear layers are built without reading any file.
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    state = load_pinned_weights(checkpoint, ALEXNET_SHA256, "LPIPS AlexNet weights", _ALEXNET_FIX)
    wanted = {k for k in state if k.startswith("features.")}
    loaded: set[str] = set()
    with torch.no_grad():
        for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
            for idx, module in slice_.named_children():  # lpips keeps torchvision's layer indices as names
                for pname, param in module.named_parameters(recurse=False):
                    key = f"features.{idx}.{pname}"
                    if key not in state or state[key].shape != param.shape:
                        raise PdaeError(f"{checkpoint} lacks {key}; it is not torchvision's AlexNet ImageNet file.")
                    param.copy_(state[key])
                    loaded.add(key)
    if loaded != wanted or len(loaded) != 10:
        raise PdaeError(f"{checkpoint}: loaded {len(loaded)} of {len(wanted)} AlexNet feature tensors, expected 10.")
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    lin_state = load_pinned_weights(lin_file, LPIPS_LINEAR_SHA256, "LPIPS linear weights", "reinstall lpips")
    result = model.load_state_dict(lin_state, strict=False)
    if result.unexpected_keys or sorted(lin_state) != [f"lin{i}.model.1.weight" for i in range(5)]:
        raise PdaeError(f"LPIPS linear weights in {lin_file} do not match LPIPS(alex); reinstall lpips.")
    return model.eval().requires_grad_(False)


def lpips_distance(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor | None, str | None]:
    """LPIPS (AlexNet, v0.1) of x, y (N, C, H, W) in [-1, 1] -> ((N,) float32, None) or (None, reason).

    Computed only when torchvision's AlexNet ImageNet weights are already in the torch hub cache; this function
    never downloads and never runs with a random trunk. Grey images are repeated to RGB; images smaller than
    LPIPS_MIN_SIZE px are upsampled bilinearly by the smallest integer factor that reaches it.
    """
    _check_pair(x, y, "LPIPS")
    if x.shape[1] not in (1, 3):
        raise PdaeError(f"LPIPS: images must have 1 or 3 channels, got {x.shape[1]}.")
    checkpoint = alexnet_checkpoint_path()
    if not checkpoint.is_file():
        return None, (
            f"AlexNet ImageNet weights not in the torch hub cache ({checkpoint}); download {ALEXNET_URL} there "
            "(pdae checks its sha256 and never unpickles it)"
        )
    model = _lpips_model(str(checkpoint)).to(x.device)
    factor = math.ceil(LPIPS_MIN_SIZE / min(x.shape[-2:]))
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            a, b = (t[start : start + batch_size].detach().float().clamp(-1, 1) for t in (x, y))
            if a.shape[1] == 1:
                a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
            if factor > 1:
                a, b = (F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False) for t in (a, b))
            out.append(model(a, b).reshape(-1).cpu())
    return torch.cat(out).float(), None
