"""Images in the forms people hold them, to and from the model's tensors (N, C, S, S) in [-1, 1].

Accepted inputs (`to_batch`): a PIL image or a list of them; a file path or a folder of images (str or Path) or a
list of paths; a uint8 array in [0, 255] or a float array in [-1, 1], channels last (H, W, C), (N, H, W, C) or
channels first (C, H, W), (N, C, H, W), or (H, W) for one channel; a torch tensor in [-1, 1], (C, H, W) or
(N, C, H, W). PIL images, files and arrays of another size are centre-cropped and resized (bicubic) like the
training data (`pdae.data.folder.decode_image`); tensors must already have the model's shape.

Outputs (`from_batch`) follow the input's form unless `output_type` says otherwise: "pt" (float tensor in [-1, 1],
channels first), "np" (array in the input's layout and dtype; uint8 (N, H, W, C) when nothing was given),
"pil" (PIL images). A single input image gives a single output image (or one list/array for several frames).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pdae.errors import PdaeError

OUTPUT_TYPES = ("pt", "np", "pil")


@dataclass(frozen=True)
class ImageForm:
    """How images were given: kind "pt" | "np" | "pil"; single (one image, no batch axis); for arrays whether they
    were channels last, 2-D greyscale (H, W), and their dtype."""

    kind: str
    single: bool = False
    channels_last: bool = True
    flat: bool = False
    dtype: Any = np.uint8


def _pil_to_tensor(img: Any, size: int, channels: int, name: str) -> Tensor:
    """One PIL image -> (C, S, S) in [-1, 1] through the training data's decoder (PNG round trip is lossless)."""
    from pdae.data.folder import decode_image

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return decode_image(buf.getvalue(), size, channels, name)


def _path_files(path: Path) -> list[Path]:
    from pdae.data.folder import IMAGE_EXTENSIONS, list_image_files

    if path.is_dir():
        return list_image_files(path)
    if path.is_file():
        return [path]
    raise PdaeError(f"image not found: {path}; pass image files ({', '.join(IMAGE_EXTENSIONS)}) or a folder of them.")


def _from_paths(paths: list[Path], size: int, channels: int) -> Tensor:
    from pdae.data.folder import decode_image

    files = [f for p in paths for f in _path_files(p)]
    if not files:
        raise PdaeError("no images given; pass image files or a folder of them.")
    return torch.stack([decode_image(f, size, channels, str(f)) for f in files])


def _from_array(arr: np.ndarray, size: int, channels: int) -> tuple[Tensor, ImageForm]:
    if arr.dtype.kind not in "fiub":
        raise PdaeError(f"images must be a numeric array, got dtype {arr.dtype}.")
    single, flat = arr.ndim in (2, 3), arr.ndim == 2
    a = arr[None] if single else arr
    if flat:
        a = a[..., None]
    if a.ndim != 4:
        raise PdaeError(f"image arrays must be (H, W, C), (N, H, W, C), channels first, or (H, W); got {arr.shape}.")
    if a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        last = False
    elif a.shape[-1] in (1, 3, 4):
        last = True
    else:
        raise PdaeError(f"image array of shape {arr.shape} has no channel axis of 1 or 3 (first or last).")
    x = torch.from_numpy(np.ascontiguousarray(a))
    x = x.permute(0, 3, 1, 2) if last else x
    form = ImageForm("np", single, last, flat, arr.dtype)
    integer = arr.dtype.kind in "iub"
    if x.shape[1] == channels and tuple(x.shape[2:]) == (size, size):
        from pdae.data.base import uint8_to_unit

        return (uint8_to_unit(x) if integer else x.float()).contiguous(), form
    from PIL import Image

    u8 = x if integer else ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    u8 = u8.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    imgs = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in u8]
    return torch.stack([_pil_to_tensor(im, size, channels, f"array[{i}]") for i, im in enumerate(imgs)]), form


def to_batch(images: Any, size: int, channels: int) -> tuple[Tensor, ImageForm]:
    """Any accepted input (module doc) -> (float32 (N, C, S, S) in [-1, 1] on the CPU, how it was given)."""
    from PIL import Image

    if isinstance(images, Tensor):
        x = images.detach()
        single = x.ndim == 3
        x = x[None] if single else x
        if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
            raise PdaeError(
                f"image tensor of shape {tuple(images.shape)} does not match the model input ({channels}, {size}, "
                f"{size}); pass (N, C, H, W) in [-1, 1] or a PIL image / file to be resized."
            )
        if not x.is_floating_point():  # uint8 tensors hold [0, 255]
            from pdae.data.base import uint8_to_unit

            x = uint8_to_unit(x)
        return x.float().cpu().contiguous(), ImageForm("pt", single)
    if isinstance(images, np.ndarray):
        return _from_array(images, size, channels)
    if isinstance(images, Image.Image):
        return _pil_to_tensor(images, size, channels, "PIL image")[None], ImageForm("pil", True)
    if isinstance(images, (str, Path)):
        path = Path(images)
        return _from_paths([path], size, channels), ImageForm("pil", path.is_file())
    if isinstance(images, (list, tuple)) and images:
        if all(isinstance(im, Image.Image) for im in images):
            x = torch.stack([_pil_to_tensor(im, size, channels, f"image {i}") for i, im in enumerate(images)])
            return x, ImageForm("pil")
        if all(isinstance(im, (str, Path)) for im in images):
            return _from_paths([Path(p) for p in images], size, channels), ImageForm("pil")
    raise PdaeError(
        f"cannot read images from {type(images).__name__}; pass PIL images, file paths or a folder, a uint8 array "
        "in [0, 255], a float array or tensor in [-1, 1]."
    )


def _to_pil(x: Tensor) -> Any:
    from PIL import Image

    from pdae.io import to_uint8

    u8 = to_uint8(x[None])[0]
    return Image.fromarray(u8[0].numpy() if u8.shape[0] == 1 else u8.permute(1, 2, 0).numpy())


def _nested_pil(x: Tensor) -> Any:
    return _to_pil(x) if x.ndim == 3 else [_nested_pil(im) for im in x]


def from_batch(x: Tensor, form: ImageForm, output_type: str | None = None) -> Any:
    """Images (N, *F, C, H, W) in [-1, 1] (F: extra frame axes, e.g. edit scales) -> the requested/given form.

    A single input image drops the leading N axis. "pil" gives (nested) lists of PIL images.
    """
    kind = output_type or form.kind
    if kind not in OUTPUT_TYPES:
        raise PdaeError(f"unknown output_type '{output_type}'; use one of: {', '.join(OUTPUT_TYPES)}.")
    x = x.detach().float().cpu().clamp(-1, 1)
    if form.single:
        x = x[0]
    if kind == "pt":
        return x
    if kind == "pil":
        return _nested_pil(x)
    integer = form.kind != "np" or np.dtype(form.dtype).kind in "iub"
    arr = ((x + 1) * 127.5).round().to(torch.uint8) if integer else x
    if form.kind != "np" or form.channels_last:
        arr = arr.movedim(-3, -1)
        if form.flat:
            arr = arr[..., 0]
    out = arr.numpy()
    return out.astype(form.dtype) if form.kind == "np" else out
