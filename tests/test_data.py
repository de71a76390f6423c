"""Data layer: embedded datasets, folder/LMDB loading with attribute tables, validation errors, prepared layout."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pdae.config import BaseConfig, PrepareConfig
from pdae.data import (
    ImageFileDataset,
    binary_attribute_names,
    load_attributes,
    load_raw_dataset,
    load_split,
    load_validation_ids,
    open_image_dataset,
    prepare_dataset,
    read_attribute_table,
    split_indices,
    validation_mask,
)
from pdae.data.embedded import load_digits_data, make_shapes_data
from pdae.errors import PdaeError

NO_CLF = {"classifier_epochs": 0}


def _png(rng: np.random.Generator, size: tuple[int, int] = (20, 12), mode: str = "RGB") -> bytes:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


# Six tiny images of mixed sizes/modes and their attributes (glasses ±1, smiling 0/1, label).
def _image_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "imgs"
    folder.mkdir()
    for i in range(n):
        mode = "L" if i == 1 else "RGB"
        (folder / f"{i:03d}.png").write_bytes(_png(rng, (20 + i, 12 + 2 * i), mode))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _csv(path: Path, n: int = 6, **extra: list) -> Path:
    frame = pd.DataFrame(
        {
            "filename": [f"{i:03d}.png" for i in range(n)],
            "glasses": [1, -1] * (n // 2),
            "smiling": [0, 1, 1] * (n // 3),
        }
    )
    for k, v in extra.items():
        frame[k] = v
    frame.to_csv(path, index=False)
    return path


def _celeba(path: Path, n: int = 6, count: int | None = None, names: str = "Eyeglasses Smiling") -> Path:
    rows = [f"{i:03d}.png  {1 if i % 2 else -1} {-1 if i % 3 else 1}" for i in range(n)]
    path.write_text(f"{n if count is None else count}\n{names}\n" + "\n".join(rows) + "\n")
    return path


def _prepare(tmp_path: Path, dataset: str = "folder", size: int = 8, seed: int = 0, **prepare) -> tuple[dict, Path]:
    out = tmp_path / "out" / "prepared"
    base = BaseConfig(dataset=dataset, image_size=size, device="cpu", seed=seed)
    metrics = prepare_dataset(base, PrepareConfig(**prepare), out, progress=False)
    return metrics, out


def test_digits_shapes_ranges_and_attributes() -> None:
    raw = load_digits_data(16)
    assert raw.images.shape == (1797, 1, 16, 16) and raw.images.dtype == torch.float32
    assert raw.images.min() >= -1 and raw.images.max() <= 1 and raw.images.max() > 0.9
    onehot = raw.table[[f"digit_{k}" for k in range(10)]].to_numpy()
    assert (onehot.sum(axis=1) == 1).all() and (onehot.argmax(1) == raw.table["label"].to_numpy()).all()


def test_split_is_stratified_seeded_and_disjoint() -> None:
    labels = load_digits_data(8).table["label"].to_numpy()
    train, test = split_indices(len(labels), labels, 0.2, seed=0)
    assert len(test) == round(0.2 * 1797) and len(set(train) | set(test)) == 1797 and not set(train) & set(test)
    frac = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.abs(frac - 0.2).max() < 0.02
    again = split_indices(len(labels), labels, 0.2, seed=0)
    assert np.array_equal(again[1], test) and not np.array_equal(split_indices(1797, labels, 0.2, 1)[1], test)


def test_validation_split_is_a_seeded_stratified_subset_of_train(tmp_path: Path) -> None:
    metrics, out = _prepare(tmp_path, dataset="digits", size=8, **NO_CLF)
    _, train_ids = load_split(out, "train")
    _, test_ids = load_split(out, "test")
    val = load_validation_ids(out)
    assert metrics["n_validation"] == len(val) == round(0.1 * metrics["n_train"])
    mask = validation_mask(train_ids, val)
    assert int(mask.sum()) == len(val) and not torch.isin(val, test_ids).any()  # ids into train, never test
    labels = load_attributes(out)["label"].to_numpy()
    frac = np.bincount(labels[val.numpy()], minlength=10) / np.bincount(labels[train_ids.numpy()], minlength=10)
    assert np.abs(frac - 0.1).max() < 0.02
    _, again = _prepare(tmp_path / "again", dataset="digits", size=8, **NO_CLF)
    assert torch.equal(load_validation_ids(again), val)
    _, other = _prepare(tmp_path / "seed1", dataset="digits", size=8, seed=1, **NO_CLF)
    assert not torch.equal(load_validation_ids(other), val)
    _, none = _prepare(tmp_path / "none", dataset="digits", size=8, validation_fraction=0.0, **NO_CLF)
    assert len(load_validation_ids(none)) == 0
    (out / "validation.json").unlink()
    with pytest.raises(PdaeError, match="re-run the prepare stage"):
        load_validation_ids(out)


def test_prepare_digits_layout_and_determinism(tmp_path: Path) -> None:
    metrics, out = _prepare(tmp_path, dataset="digits", size=16, **NO_CLF)
    assert metrics["n_train"] + metrics["n_test"] == 1797 and metrics["channels"] == 1
    assert metrics["n_attributes"] == 10 and "skipped" in metrics["classifier"]
    images, ids = load_split(out, "train")
    test_images, test_ids = load_split(out, "test")
    assert images.shape[1:] == (1, 16, 16) and ids.dtype == torch.int64 and len(images) == metrics["n_train"]
    attrs = load_attributes(out)
    assert list(attrs.columns[:2]) == ["id", "split"] and attrs.columns[-1] == "label"
    assert (attrs.loc[ids.numpy(), "split"] == "train").all()
    assert (attrs.loc[test_ids.numpy(), "split"] == "test").all()
    assert binary_attribute_names(attrs) == [f"digit_{k}" for k in range(10)]
    assert (out / "samples.png").is_file() and not (out / "label_classifier").exists()
    direct = load_digits_data(16).images
    assert torch.equal(images, direct[ids]) and torch.equal(test_images, direct[test_ids])
    _, out2 = _prepare(tmp_path / "again", dataset="digits", size=16, **NO_CLF)
    assert torch.equal(load_split(out2, "test")[1], test_ids)


def test_shapes_deterministic_and_attributes_match_pixels() -> None:
    a, b = make_shapes_data(60, 16, seed=3), make_shapes_data(60, 16, seed=3)
    assert torch.equal(a.images, b.images) and a.table.equals(b.table)
    assert not torch.equal(a.images, make_shapes_data(60, 16, seed=4).images)
    x, t = a.images, a.table
    assert x.shape == (60, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (t[["shape_square", "shape_circle", "shape_triangle"]].sum(axis=1) == 1).all()
    assert (t[["colour_red", "colour_green", "colour_blue"]].sum(axis=1) == 1).all()
    assert (t[["shape_square", "shape_circle", "shape_triangle"]].to_numpy().argmax(1) == t["label"]).all()
    ink = (x + 1).sum(dim=(2, 3))  # (N, 3) per-channel mass
    colour = t[["colour_red", "colour_green", "colour_blue"]].to_numpy().argmax(1)
    assert (ink.argmax(1).numpy() == colour).all()
    mass = (x + 1).sum(1)
    cols = (mass.sum(1) * torch.arange(16)).sum(1) / mass.sum((1, 2))
    assert ((cols < 7.5).numpy() == t["pos_left"].to_numpy().astype(bool)).all()
    area = mass.sum((1, 2)).numpy()
    same = t["shape_square"].to_numpy() == 1
    large = t["size_large"].to_numpy() == 1
    assert area[same & large].min() > area[same & ~large].max()


def test_prepare_shapes(tmp_path: Path) -> None:
    metrics, out = _prepare(tmp_path, dataset="shapes", size=16, shapes_count=60, **NO_CLF)
    attrs = load_attributes(out)
    assert metrics["channels"] == 3 and len(attrs) == 60 and "pos_top" in binary_attribute_names(attrs)


@pytest.mark.parametrize("fmt", ["csv", "celeba", "celebamask"])
def test_folder_with_attribute_tables(tmp_path: Path, fmt: str) -> None:
    folder = _image_folder(tmp_path)
    if fmt == "csv":
        table = _csv(tmp_path / "attrs.csv", label=[0, 1, 2, 0, 1, 2])
    else:
        name = "list_attr_celeba.txt" if fmt == "celeba" else "CelebAMask-HQ-attribute-anno.txt"
        table = _celeba(tmp_path / name)
    metrics, out = _prepare(tmp_path, folder=str(folder), attributes=str(table), **NO_CLF)
    attrs = load_attributes(out)
    assert list(attrs["filename"]) == [f"{i:03d}.png" for i in range(6)]
    names = binary_attribute_names(attrs)
    assert len(names) == 2 and set(attrs[names[0]]) <= {0, 1}
    if fmt == "csv":
        assert list(attrs["glasses"]) == [1, 0] * 3 and list(attrs["label"]) == [0, 1, 2] * 2
    else:
        assert list(attrs["Eyeglasses"]) == [0, 1] * 3 and "label" not in attrs.columns
    train, _ = load_split(out, "train")
    assert train.shape[1:] == (3, 8, 8) and metrics["n_images"] == 6


def test_folder_greyscale_without_table_and_streaming(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path)
    metrics, out = _prepare(tmp_path, folder=str(folder), channels=1)
    assert metrics["channels"] == 1 and "skipped" in metrics["classifier"]
    assert list(load_attributes(out).columns) == ["id", "split", "filename"]
    files = sorted(folder.glob("*.png"))
    ds = ImageFileDataset(files, image_size=8, channels=3)
    x, i = ds[1]
    assert x.shape == (3, 8, 8) and i == 1 and torch.equal(x[0], x[2])  # greyscale source -> equal channels


def test_all_greyscale_folder_stays_single_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png(rng, (10, 10), "L"))
    metrics, out = _prepare(tmp_path, folder=str(folder), **NO_CLF)
    assert metrics["channels"] == 1 and load_split(out, "train")[0].shape[1] == 1
    (folder / "4.png").write_bytes(_png(rng, (10, 10), "RGB"))  # one colour image: the set is RGB
    metrics, _ = _prepare(tmp_path / "mixed", folder=str(folder), **NO_CLF)
    assert metrics["channels"] == 3
    metrics, _ = _prepare(tmp_path / "forced", folder=str(folder), channels=3, **NO_CLF)
    assert metrics["channels"] == 3


def test_extra_table_rows_are_ignored_and_counted(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path, n=3)
    table = _celeba(tmp_path / "list_attr_celeba.txt", n=6)
    metrics, _ = _prepare(tmp_path, folder=str(folder), attributes=str(table))
    assert metrics["attribute_rows_unused"] == 3


def test_lmdb_layout(tmp_path: Path) -> None:
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(1)
    db = tmp_path / "celebahq.lmdb"
    with lmdb.open(str(db), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i in range(5):
            txn.put(f"32-{i:05d}".encode(), _png(rng, (32, 32)))
        txn.put(b"length", b"5")
    names = "Smiling Young"
    rows = "\n".join(f"{i}.jpg {1 if i % 2 else -1} 1" for i in range(5))
    (tmp_path / "anno.txt").write_text(f"5\n{names}\n{rows}\n")
    metrics, out = _prepare(tmp_path, folder=str(db), attributes=str(tmp_path / "anno.txt"))
    attrs = load_attributes(out)
    assert metrics["n_images"] == 5 and list(attrs["filename"]) == [f"32-{i:05d}" for i in range(5)]
    assert list(attrs["Smiling"]) == [0, 1, 0, 1, 0]
    stream = open_image_dataset(db, image_size=8)
    images, ids = load_split(out, "train")
    assert len(stream) == 5 and torch.equal(stream[int(ids[0])][0], images[0])


def test_lmdb_missing_package_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # makes `import lmdb` raise ImportError
    with pytest.raises(PdaeError, match=r"pip install pdae\[lmdb\]"):
        _prepare(tmp_path, folder=str(tmp_path / "db"))


# Each case: (what to break, text the one-line error must contain).
BAD_CASES = {
    "empty_folder": "contains no image files",
    "missing_folder": "does not exist",
    "garbage_image": "003.png",
    "truncated_image": "002.png",
    "zero_byte": "004.png",
    "image_without_row": "005.png",
    "duplicate_row": "already has a row",
    "count_mismatch": "declares 7 rows",
    "short_row": "line 4",
    "no_filename_column": "no column 'filename'",
    "non_binary": "non-binary value '2'",
    "nan": "missing value (NaN)",
    "missing_table": "not found",
    "no_folder_param": "prepare.folder is not set",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_raise_one_line_and_write_nothing(tmp_path: Path, case: str) -> None:
    folder = _image_folder(tmp_path)
    table = _csv(tmp_path / "attrs.csv")
    prepare: dict = {"folder": str(folder), "attributes": str(table)}
    frame = pd.read_csv(table, dtype=str)
    if case == "empty_folder":
        for p in folder.iterdir():
            p.unlink()
    elif case == "missing_folder":
        prepare["folder"] = str(tmp_path / "nope")
    elif case == "garbage_image":
        (folder / "003.png").write_bytes(b"\x89PNG not really an image")
    elif case == "truncated_image":
        data = (folder / "002.png").read_bytes()
        (folder / "002.png").write_bytes(data[: len(data) // 2])
    elif case == "zero_byte":
        (folder / "004.png").write_bytes(b"")
    elif case == "image_without_row":
        frame.iloc[:5].to_csv(table, index=False)
    elif case == "duplicate_row":
        pd.concat([frame, frame.iloc[[2]]]).to_csv(table, index=False)
    elif case == "count_mismatch":
        prepare["attributes"] = str(_celeba(tmp_path / "list_attr_celeba.txt", count=7))
    elif case == "short_row":
        path = _celeba(tmp_path / "list_attr_celeba.txt")
        lines = path.read_text().splitlines()
        lines[3] = lines[3].rsplit(" ", 1)[0]
        path.write_text("\n".join(lines) + "\n")
        prepare["attributes"] = str(path)
    elif case == "no_filename_column":
        frame.rename(columns={"filename": "file"}).to_csv(table, index=False)
    elif case == "non_binary":
        frame.loc[1, "smiling"] = "2"
        frame.to_csv(table, index=False)
    elif case == "nan":
        frame.loc[3, "glasses"] = None
        frame.to_csv(table, index=False)
    elif case == "missing_table":
        prepare["attributes"] = str(tmp_path / "missing.csv")
    elif case == "no_folder_param":
        prepare = {}
    with pytest.raises(PdaeError) as err:
        _prepare(tmp_path, **prepare)
    message = str(err.value)
    assert "\n" not in message and BAD_CASES[case] in message, message
    out_parent = tmp_path / "out"
    assert not out_parent.exists() or not any(out_parent.iterdir())


def test_failed_prepare_keeps_nothing_and_rerun_replaces_old_output(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path)
    _, out = _prepare(tmp_path, folder=str(folder))
    (out / "stale.txt").write_text("old")
    _, out = _prepare(tmp_path, folder=str(folder))
    assert not (out / "stale.txt").exists() and (out / "train.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]


def test_table_reader_maps_pm1_and_rejects_reserved(tmp_path: Path) -> None:
    table = read_attribute_table(_celeba(tmp_path / "a.txt"))
    assert list(table.columns) == ["filename", "Eyeglasses", "Smiling"] and table["Eyeglasses"].dtype == np.int64
    with pytest.raises(PdaeError, match="reserved"):
        read_attribute_table(_csv(tmp_path / "b.csv", split=["x"] * 6))
    with pytest.raises(PdaeError, match="class index"):
        read_attribute_table(_csv(tmp_path / "c.csv", label=[0, 1, 2, 0, 1, 1.5]))


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(PdaeError, match="dvc repro prepare"):
        load_split(tmp_path / "nothing", "train")
    with pytest.raises(PdaeError, match="unknown split"):
        load_split(tmp_path, "valid")
    (tmp_path / "train.safetensors").write_bytes(b"garbage")
    with pytest.raises(PdaeError, match="train.safetensors"):
        load_split(tmp_path, "train")
    with pytest.raises(PdaeError, match="attributes.csv"):
        load_attributes(tmp_path)


def test_channels_override_for_embedded(tmp_path: Path) -> None:
    raw = load_raw_dataset(BaseConfig(dataset="digits", image_size=8), PrepareConfig(channels=3))
    assert raw.images.shape[1] == 3 and torch.equal(raw.images[:, 0], raw.images[:, 2])
