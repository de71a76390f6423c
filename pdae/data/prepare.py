"""The prepare step (dataset -> split tensors, attribute table, label classifier) and readers of its output.

Layout of a prepared folder:
  train.safetensors, test.safetensors  `images` float32 (N, C, S, S) in [-1, 1], `ids` int64 (N,)
  attributes.csv                       `id` (= row number), `split`, [`filename`], binary attributes 0/1, [`label`]
  validation.json                      {"ids": [...]} ids of train rows held out for choosing settings (an index
                                       list into the train split, not a copy; the test split is never used for it)
  label_classifier/                    model.safetensors + config.json (absent when the dataset has no label)
  samples.png                          grid of train images
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pdae.config import BaseConfig, PrepareConfig
from pdae.data.base import RESERVED_COLUMNS, RawData, set_channels
from pdae.data.classifier import evaluate_label_classifier, save_label_classifier, train_label_classifier
from pdae.errors import PdaeError
from pdae.io import load_tensors, read_json, save_image_grid, save_tensors, write_csv, write_json

SPLITS = ("train", "test")
VALIDATION_NAME = "validation.json"


def load_raw_dataset(base: BaseConfig, cfg: PrepareConfig, progress: bool = False) -> RawData:
    """The whole dataset named by `base.dataset`, images (N, C, S, S) in [-1, 1] at `base.image_size`."""
    if base.dataset == "digits":
        from pdae.data.embedded import load_digits_data

        raw = load_digits_data(base.image_size)
    elif base.dataset == "shapes":
        from pdae.data.embedded import make_shapes_data

        raw = make_shapes_data(cfg.shapes_count, base.image_size, base.seed)
    else:
        if not cfg.folder:
            raise PdaeError(
                "base.dataset is 'folder' but prepare.folder is not set; set prepare.folder to an image folder "
                "(and optionally prepare.attributes to its attribute table)."
            )
        from pdae.data.folder import load_folder_data

        raw = load_folder_data(
            cfg.folder, base.image_size, cfg.channels, cfg.attributes, cfg.filename_column, progress=progress
        )
    raw.images = set_channels(raw.images, cfg.channels).float().contiguous()
    if not torch.isfinite(raw.images).all():
        raise PdaeError(f"dataset '{base.dataset}' produced non-finite pixel values; check the source images.")
    return raw


def split_indices(n: int, labels: np.ndarray | None, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of range(n), stratified by `labels` when every class has >= 2 members.

    Returns sorted int64 index arrays (train, test); both are non-empty.
    """
    from sklearn.model_selection import train_test_split

    if n < 2:
        raise PdaeError(f"the dataset has {n} image(s); at least 2 are needed for a train/test split.")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    index = np.arange(n)
    stratify = None
    if labels is not None:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        if counts.min() >= 2 and n_test >= len(counts) and n - n_test >= len(counts):
            stratify = labels
    train, test = train_test_split(index, test_size=n_test, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def validation_indices(train_idx: np.ndarray, labels: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Seeded validation subset (sorted int64 ids) of the train ids `train_idx`, stratified like `split_indices`.

    Empty when `fraction` is 0 or the train split has fewer than 2 rows. The seed is offset from the train/test one
    so the two draws are independent.
    """
    n_val = min(len(train_idx) - 1, round(len(train_idx) * fraction)) if len(train_idx) >= 2 else 0
    if n_val <= 0:
        return np.zeros(0, dtype=np.int64)
    sub = None if labels is None else labels[train_idx]
    _, val = split_indices(len(train_idx), sub, n_val / len(train_idx), seed + 1)
    return np.sort(train_idx[val]).astype(np.int64)


def _attribute_frame(raw: RawData, test_idx: np.ndarray) -> pd.DataFrame:
    """attributes.csv: id, split, [filename], attributes (int 0/1), [label]."""
    table = raw.table.reset_index(drop=True)
    split = np.full(len(table), "train", dtype=object)
    split[test_idx] = "test"
    frame = pd.DataFrame({"id": np.arange(len(table), dtype=np.int64), "split": split})
    if "filename" in table.columns:
        frame["filename"] = table["filename"].astype(str)
    for col in table.columns:
        if col not in RESERVED_COLUMNS:
            frame[col] = table[col].astype(np.int64)
    if "label" in table.columns:
        frame["label"] = table["label"].astype(np.int64)
    return frame


def _classifier(
    raw: RawData, train_idx: np.ndarray, test_idx: np.ndarray, cfg: PrepareConfig, seed: int, out: Path, **kw: Any
) -> dict[str, Any]:
    """Train/evaluate/save the label classifier into `out`; without labels write nothing and report why."""
    reason = None
    if not raw.has_label:
        reason = "no label column in the dataset"
    elif cfg.classifier_epochs == 0:
        reason = "prepare.classifier_epochs is 0"
    elif raw.table["label"].nunique() < 2:
        reason = "the label column has fewer than 2 classes"
    if reason is not None:
        return {"skipped": reason}
    labels = torch.from_numpy(np.array(raw.table["label"], dtype=np.int64))
    start = time.time()
    k = int(labels.max()) + 1
    model = train_label_classifier(raw.images[train_idx], labels[train_idx], cfg, seed, num_classes=k, **kw)
    seconds = time.time() - start
    save_label_classifier(model, out)
    test = evaluate_label_classifier(model, raw.images[test_idx], labels[test_idx])
    train = evaluate_label_classifier(model, raw.images[train_idx], labels[train_idx])
    return {
        "num_classes": model.num_classes,
        "test_accuracy": round(test["accuracy"], 5),
        "test_confident_fraction": round(test["confident_fraction"], 5),
        "train_accuracy": round(train["accuracy"], 5),
        "epochs": cfg.classifier_epochs,
        "train_seconds": round(seconds, 1),
    }


def prepare_dataset(
    base: BaseConfig,
    cfg: PrepareConfig,
    out_dir: Path,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict:
    """Build the prepared folder `out_dir` (layout in the module docstring) and return its metrics.

    Everything is written into a temporary folder beside `out_dir` that replaces `out_dir` only at the end, so a
    failure (bad input, interruption) never leaves a half-written output. `device` (default from `base.device`)
    is used to train the label classifier.
    """
    from pdae.runtime import resolve_device

    out_dir = Path(out_dir)
    device = resolve_device(base.device) if device is None else device
    raw = load_raw_dataset(base, cfg, progress=progress)
    labels = raw.table["label"].to_numpy(dtype=np.int64) if raw.has_label else None
    train_idx, test_idx = split_indices(len(raw.images), labels, cfg.test_fraction, base.seed)
    val_idx = validation_indices(train_idx, labels, cfg.validation_fraction, base.seed)
    frame = _attribute_frame(raw, test_idx)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = {"dataset": base.dataset, "image_size": base.image_size, "channels": raw.images.shape[1]}
        for split, idx in (("train", train_idx), ("test", test_idx)):
            tensors = {"images": raw.images[idx], "ids": torch.from_numpy(idx)}
            save_tensors(tmp / f"{split}.safetensors", tensors, metadata={**meta, "split": split})
        write_csv(tmp / "attributes.csv", frame)
        write_json(tmp / VALIDATION_NAME, {"ids": val_idx.tolist(), "fraction": cfg.validation_fraction})
        grid = raw.images[train_idx[:64]]
        save_image_grid(tmp / "samples.png", grid, nrow=8, scale=max(1, 64 // base.image_size))
        classifier = _classifier(
            raw, train_idx, test_idx, cfg, base.seed, tmp / "label_classifier", progress=progress, device=device
        )
        if out_dir.is_dir() and not out_dir.is_symlink():
            shutil.rmtree(out_dir)
        elif out_dir.exists() or out_dir.is_symlink():
            out_dir.unlink()
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; give the output folder the usual permissions
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics: dict[str, Any] = {
        "dataset": base.dataset,
        "image_size": base.image_size,
        "channels": int(raw.images.shape[1]),
        "n_images": len(raw.images),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "n_validation": len(val_idx),  # held-out subset of the train split for every choice of a setting
        "n_attributes": len(binary_attribute_names(frame)),
        **{k: v for k, v in raw.info.items()},
        "classifier": classifier,
    }
    return metrics


def load_split(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one prepared split -> (images float32 (N, C, S, S) in [-1, 1], ids int64 (N,))."""
    if split not in SPLITS:
        raise PdaeError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}.")
    prepared_dir = Path(prepared_dir)
    if not prepared_dir.is_dir():
        raise PdaeError(f"prepared data folder not found: {prepared_dir} — run the prepare stage (dvc repro prepare).")
    path = prepared_dir / f"{split}.safetensors"
    tensors = load_tensors(path, what=f"prepared {split} split")
    images, ids = tensors.get("images"), tensors.get("ids")
    if images is None or ids is None:
        raise PdaeError(f"{path} lacks the 'images' or 'ids' tensor; re-run the prepare stage (dvc repro prepare).")
    if images.ndim != 4 or ids.ndim != 1 or len(images) != len(ids):
        raise PdaeError(
            f"{path}: images {tuple(images.shape)} / ids {tuple(ids.shape)} are not (N, C, H, W) / (N,); "
            "re-run the prepare stage."
        )
    return images.float(), ids.long()


def load_validation_ids(prepared_dir: str | Path) -> torch.Tensor:
    """Ids int64 (V,) of the validation rows (a subset of the train split's ids) of a prepared folder."""
    path = Path(prepared_dir) / VALIDATION_NAME
    if not path.is_file():
        raise PdaeError(f"{path} not found (prepared before validation splits existed); re-run the prepare stage.")
    data = read_json(path, what="validation split")
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise PdaeError(f"{path} has no integer list 'ids'; re-run the prepare stage (dvc repro prepare).")
    return torch.tensor(ids, dtype=torch.long)


def validation_mask(train_ids: torch.Tensor, val_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (N,) over the train split's ids (N,): True where the row is in the validation split."""
    return torch.isin(train_ids.long(), val_ids.long())


def load_attributes(prepared_dir: str | Path) -> pd.DataFrame:
    """Read attributes.csv of a prepared folder; row i has `id` == i (the ids stored in the split files)."""
    path = Path(prepared_dir) / "attributes.csv"
    if not path.is_file():
        raise PdaeError(f"attribute file not found: {path} — run the prepare stage (dvc repro prepare).")
    try:
        frame = pd.read_csv(path, dtype={"filename": str, "split": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PdaeError(f"{path} is not a readable CSV ({type(err).__name__}); re-run the prepare stage.") from None
    if "id" not in frame.columns or not np.array_equal(frame["id"].to_numpy(), np.arange(len(frame))):
        raise PdaeError(f"{path}: column 'id' must be 0..N-1 in row order; re-run the prepare stage.")
    return frame


def binary_attribute_names(df: pd.DataFrame) -> list[str]:
    """Columns of an attributes frame that are binary (0/1) attributes, i.e. not id/split/filename/label."""
    names = []
    for col in df.columns:
        if col in RESERVED_COLUMNS or not pd.api.types.is_numeric_dtype(df[col]):
            continue
        if set(pd.unique(df[col])) <= {0, 1}:
            names.append(col)
    return names
