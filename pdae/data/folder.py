"""User data: an image folder (or a Diff-AE LMDB) plus an optional attribute table, validated with one-line errors.

Images are centre-cropped to a square, resized to `image_size` (bicubic, antialiased by PIL) and mapped to [-1, 1].
The streaming datasets below read one file per item; `load_folder_data` stacks them for the prepared tensor files.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pdae.data.base import RawData, uint8_to_unit
from pdae.data.tables import read_attribute_table
from pdae.errors import PdaeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive, hidden entries skipped), sorted by relative path."""
    root = Path(folder)
    if not root.exists():
        raise PdaeError(f"prepare.folder {root} does not exist; set prepare.folder to a folder of images.")
    if not root.is_dir():
        raise PdaeError(f"prepare.folder {root} is not a folder; set prepare.folder to a folder of images.")
    files = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not files:
        raise PdaeError(
            f"prepare.folder {root} contains no image files ({', '.join(IMAGE_EXTENSIONS)}); "
            "point prepare.folder at a folder of images."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def decode_image(data: bytes | Path, image_size: int, channels: int, name: str) -> torch.Tensor:
    """Decode one image (file path or encoded bytes) -> float32 (C, S, S) in [-1, 1]; bad input raises PdaeError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(data, Path) and data.stat().st_size == 0:
        raise PdaeError(f"image {name} is an empty (0-byte) file; delete it or replace it with a valid image.")
    if isinstance(data, bytes) and not data:
        raise PdaeError(f"image {name} is empty (0 bytes); delete it or replace it with a valid image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below twice the limit
            img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        with img:
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                raise PdaeError(
                    f"image {name} has the high-bit-depth mode '{img.mode}', which has no unambiguous 8-bit "
                    "mapping; save it as an 8-bit RGB or greyscale image."
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # palette transparency -> alpha, which the next convert drops
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            m = min(w, h)
            box = ((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m)
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
            array = np.asarray(img, dtype=np.uint8).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise PdaeError(
            f"image {name} is too large ({str(err).split(',')[0]}); it may be a decompression bomb — downscale it "
            "or remove it."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        detail = "unrecognised image format" if isinstance(err, UnidentifiedImageError) else str(err).splitlines()[0]
        raise PdaeError(
            f"image {name} cannot be read ({detail}); it is truncated or not an image — replace or delete it."
        ) from None
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return uint8_to_unit(tensor).contiguous()


# Streaming dataset over image files: nothing is loaded until an item is requested.
class ImageFileDataset(Dataset):
    """Item i -> (image float32 (C, S, S) in [-1, 1], i). `names` are used in error messages."""

    def __init__(self, files: list[Path], image_size: int, channels: int = 3, names: list[str] | None = None):
        self.files = list(files)
        self.names = names or [str(p) for p in self.files]
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.files[index], self.image_size, self.channels, self.names[index]), index


def is_lmdb_dir(folder: str | Path) -> bool:
    return (Path(folder) / "data.mdb").is_file()


def _import_lmdb(folder: Path):  # noqa: ANN202
    try:
        import lmdb
    except ImportError:
        raise PdaeError(
            f"prepare.folder {folder} is an LMDB database but the 'lmdb' package is missing; "
            "install it with `pip install pdae[lmdb]` (or `pip install lmdb`)."
        ) from None
    return lmdb


# Streaming dataset over a Diff-AE LMDB: keys `{res}-{idx:05d}` -> encoded image bytes, key `length` -> count.
class LmdbImageDataset(Dataset):
    """Item i -> (image float32 (C, S, S) in [-1, 1], i). The environment is opened lazily (per worker process)."""

    def __init__(self, folder: str | Path, image_size: int, channels: int = 3):
        self.folder = Path(folder)
        self.image_size = image_size
        self.channels = channels
        self._env = None
        env = self._open()
        with env.begin(write=False) as txn:
            raw = txn.get(b"length")
            if raw is None:
                raise PdaeError(f"LMDB {self.folder} has no 'length' key; it is not a Diff-AE style image LMDB.")
            try:
                self.length = int(raw.decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                raise PdaeError(f"LMDB {self.folder}: key 'length' holds {raw[:20]!r}, not an integer.") from None
            self.resolution = self._find_resolution(txn)
        if self.length <= 0:
            raise PdaeError(f"LMDB {self.folder} is empty (length {self.length}); point prepare.folder at a dataset.")

    def _open(self):  # noqa: ANN202
        if self._env is None:
            lmdb = _import_lmdb(self.folder)
            try:
                self._env = lmdb.open(str(self.folder), readonly=True, lock=False, readahead=False, meminit=False)
            except lmdb.Error as err:
                raise PdaeError(f"LMDB {self.folder} cannot be opened ({err}); check the folder.") from None
        return self._env

    def _find_resolution(self, txn) -> int:  # noqa: ANN001
        # Prefer a stored copy at the target size; otherwise the resolution of the first image key.
        if txn.get(f"{self.image_size}-00000".encode()) is not None:
            return self.image_size
        with txn.cursor() as cur:
            for key in cur.iternext(keys=True, values=False):
                head = bytes(key).decode("utf-8", "replace").split("-", 1)[0]
                if head.isdigit():
                    return int(head)
        raise PdaeError(f"LMDB {self.folder} has no '<res>-<index>' image keys; it is not a Diff-AE style LMDB.")

    def key(self, index: int) -> str:
        return f"{self.resolution}-{index:05d}"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        key = self.key(index)
        with self._open().begin(write=False) as txn:
            data = txn.get(key.encode())
        if data is None:
            raise PdaeError(f"LMDB {self.folder}: key '{key}' is missing although length is {self.length}.")
        return decode_image(bytes(data), self.image_size, self.channels, f"{self.folder}[{key}]"), index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None}


def stack_dataset(dataset: Dataset, progress: bool = False, desc: str = "images") -> torch.Tensor:
    """Load every item of a (image, index) dataset -> float32 (N, C, S, S)."""
    from tqdm.auto import tqdm

    first = dataset[0][0]
    out = torch.empty((len(dataset), *first.shape), dtype=first.dtype)  # preallocated: no second copy
    out[0] = first
    items: Iterable[int] = range(1, len(dataset))
    for i in tqdm(items, desc=desc, disable=not progress, leave=False, initial=1, total=len(dataset)):
        out[i] = dataset[i][0]
    return out


def open_image_dataset(folder: str | Path, image_size: int, channels: int | None = None) -> Dataset:
    """Streaming dataset over an image folder or a Diff-AE LMDB; items (image (C, S, S) in [-1, 1], index)."""
    if is_lmdb_dir(folder):
        return LmdbImageDataset(folder, image_size, channels or 3)
    return ImageFileDataset(list_image_files(folder), image_size, channels or 3)


def _match_rows(names: list[list[str]], table: pd.DataFrame, source: str, describe: Callable[[int], str]) -> list[int]:
    """Row index of the table for each image (first alias that matches); an image without a row raises."""
    lookup = {name: i for i, name in enumerate(table["filename"])}
    rows: list[int] = []
    missing: list[int] = []
    for i, aliases in enumerate(names):
        row = next((lookup[a] for a in aliases if a in lookup), None)
        if row is None:
            missing.append(i)
        else:
            rows.append(row)
    if missing:
        raise PdaeError(
            f"image {describe(missing[0])} has no row in the attribute table {source}"
            f" ({len(missing)} image(s) without a row); add the rows or remove those images."
        )
    return rows


def load_folder_data(
    folder: str | Path,
    image_size: int,
    channels: int | None = None,
    attributes: str | Path | None = None,
    filename_column: str = "filename",
    progress: bool = False,
) -> RawData:
    """Read an image folder or Diff-AE LMDB and its optional attribute table.

    Returns images float32 (N, C, S, S) in [-1, 1] and a table with `filename`
    plus the binary attribute columns (int 0/1) and `label` of the table, in image order. The table is checked
    before any image is decoded; every image must have exactly one row (extra rows are ignored and counted).
    C is `channels` when given; otherwise 1 when every image is grey (R = G = B everywhere), else 3.
    """
    folder = Path(folder)
    detect, channels = channels is None, channels or 3
    table = read_attribute_table(attributes, filename_column) if attributes is not None else None
    if is_lmdb_dir(folder):
        dataset: Dataset = LmdbImageDataset(folder, image_size, channels)
        keys = [dataset.key(i) for i in range(len(dataset))]
        filenames = keys
        aliases = [[k, str(i), f"{i}.jpg", f"{i}.png"] for i, k in enumerate(keys)]
    else:
        files = list_image_files(folder)
        filenames = [p.relative_to(folder).as_posix() for p in files]
        aliases = [[n] for n in filenames]
        dataset = ImageFileDataset(files, image_size, channels, names=[str(p) for p in files])
    out = pd.DataFrame({"filename": filenames})
    info: dict[str, int] = {}
    if table is not None:
        rows = _match_rows(aliases, table, str(attributes), lambda i: str(folder / filenames[i]))
        picked = table.iloc[rows].reset_index(drop=True)
        out = pd.concat([out, picked.drop(columns=["filename"])], axis=1)
        info["attribute_rows_unused"] = len(table) - len(rows)
    images = stack_dataset(dataset, progress=progress, desc="loading images")
    if detect and is_greyscale(images):
        images = images[:, :1].contiguous()
    return RawData(images=images, table=out, info=info)


def is_greyscale(images: torch.Tensor) -> bool:
    """True when RGB images (N, 3, H, W) have equal channels everywhere (a greyscale set decoded as RGB)."""
    return images.shape[1] == 3 and bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())
