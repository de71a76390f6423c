"""Attribute tables: CSV with a filename column, or the CelebA / CelebAMask-HQ text layout; strict validation.

CelebA `list_attr_celeba.txt` and CelebAMask-HQ `CelebAMask-HQ-attribute-anno.txt` share one layout:
line 1 = row count, line 2 = attribute names, then `filename v1 v2 ...` with ±1 values (whitespace separated).
Attribute values are 0/1 or -1/+1 per column (±1 becomes 0/1); an optional `label` column holds class indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pdae.errors import PdaeError

# Largest class index a `label` column may hold (the label classifier has one output per class).
MAX_LABEL = 65_535


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise PdaeError(f"prepare.attributes {path} not found; set prepare.attributes to an existing table or null.")
    if path.stat().st_size == 0:
        raise PdaeError(f"attribute table {path} is empty (0 bytes); write its header and rows or unset it.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise PdaeError(f"attribute table {path} cannot be read as UTF-8 text ({err}); save it as UTF-8.") from None


def _parse_celeba(path: Path, lines: list[str]) -> tuple[pd.DataFrame, list[int]]:
    """CelebA-style text -> string DataFrame (`filename`, names...) and the 1-based line number of each row."""
    count = int(lines[0].strip())
    if len(lines) < 2 or not lines[1].split():
        raise PdaeError(f"attribute table {path}: line 2 must list the attribute names (CelebA layout).")
    names = lines[1].split()
    if names[0].lower() in ("filename", "image_id", "file") and len(lines) > 2:
        first_row = lines[2].split()
        if len(first_row) == len(names):  # header that also names the filename column
            names = names[1:]
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != len(names) + 1:
            raise PdaeError(
                f"attribute table {path} line {number} ({tokens[0]}): has {len(tokens) - 1} values but line 2 "
                f"names {len(names)} attributes; fix or remove the row."
            )
        rows.append(tokens)
        line_numbers.append(number)
    if len(rows) != count:
        raise PdaeError(
            f"attribute table {path}: line 1 declares {count} rows but {len(rows)} follow; "
            "add the missing rows or correct the count."
        )
    return pd.DataFrame(rows, columns=["filename", *names], dtype=str), line_numbers


def _parse_csv(path: Path, filename_column: str) -> tuple[pd.DataFrame, list[int]]:
    try:
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PdaeError(f"attribute table {path} is not a valid CSV ({msg}); fix the file.") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if filename_column not in frame.columns:
        raise PdaeError(
            f"attribute table {path} has no column '{filename_column}' (columns: {', '.join(frame.columns[:8])}); "
            "add it or set prepare.filename_column to the column holding image file names."
        )
    if filename_column != "filename" and "filename" in frame.columns:
        raise PdaeError(f"attribute table {path}: column 'filename' is reserved; rename it.")
    frame = frame.rename(columns={filename_column: "filename"})
    frame = frame[["filename", *[c for c in frame.columns if c != "filename"]]]
    return frame, [i + 2 for i in range(len(frame))]


def _validate(path: Path, frame: pd.DataFrame, line_numbers: list[int]) -> pd.DataFrame:
    """String table -> `filename` (str) + int64 columns (attributes 0/1, `label` >= 0); any bad cell raises."""
    dup_names = [c for c in frame.columns if list(frame.columns).count(c) > 1]
    if dup_names:
        raise PdaeError(f"attribute table {path}: column '{dup_names[0]}' appears twice; rename one.")
    for reserved in ("id", "split"):
        if reserved in frame.columns:
            raise PdaeError(f"attribute table {path}: column '{reserved}' is reserved by pdae; rename it.")
    names = frame["filename"]
    blank = names.isna() | (names.fillna("").str.strip() == "")
    if blank.any():
        line = line_numbers[int(np.flatnonzero(blank.to_numpy())[0])]
        raise PdaeError(f"attribute table {path} line {line}: the filename is empty; fill it or delete the row.")
    names = names.str.strip()
    dups = names.duplicated(keep="first").to_numpy()
    if dups.any():
        i = int(np.flatnonzero(dups)[0])
        first = line_numbers[int(np.flatnonzero((names == names.iloc[i]).to_numpy())[0])]
        raise PdaeError(
            f"attribute table {path} line {line_numbers[i]}: image '{names.iloc[i]}' already has a row "
            f"(line {first}); keep one row per image."
        )
    out = pd.DataFrame({"filename": names.to_numpy()})
    for col in frame.columns[1:]:
        raw = frame[col]
        values = pd.to_numeric(raw.map(lambda v: v.strip() if isinstance(v, str) else v), errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "a missing value (NaN)" if pd.isna(raw.iloc[i]) else f"the non-numeric value {raw.iloc[i]!r}"
            raise PdaeError(
                f"attribute table {path} line {line_numbers[i]} ({names.iloc[i]}): column '{col}' has {what}; "
                "attribute cells must be 0/1 or -1/+1."
            )
        arr = values.to_numpy(dtype=np.float64)
        if col == "label":
            bad = ~np.isfinite(arr) | (arr < 0) | (arr != np.floor(arr)) | (arr > MAX_LABEL)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise PdaeError(
                    f"attribute table {path} line {line_numbers[i]} ({names.iloc[i]}): label {raw.iloc[i]!r} is not "
                    f"a class index; labels must be integers 0, 1, 2, ... up to {MAX_LABEL}."
                )
            out["label"] = arr.astype(np.int64)
            continue
        allowed = (-1.0, 1.0) if (arr == -1).any() else (0.0, 1.0)
        bad = ~np.isin(arr, allowed)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PdaeError(
                f"attribute table {path} line {line_numbers[i]} ({names.iloc[i]}): column '{col}' has the "
                f"non-binary value {raw.iloc[i]!r}; attribute cells must be 0/1 or -1/+1 (class indices belong in "
                "a 'label' column)."
            )
        out[col] = (arr > 0).astype(np.int64)
    return out


def read_attribute_table(path: str | Path, filename_column: str = "filename") -> pd.DataFrame:
    """Read and validate an attribute table (CSV or CelebA layout, auto-detected by a row count on line 1).

    Returns a DataFrame with `filename` (str), binary attribute columns (int64 0/1, ±1 mapped to 0/1) and
    `label` (int64 >= 0) when the table has one. Every problem raises PdaeError naming the file and line.
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first.isdigit():
        frame, line_numbers = _parse_celeba(path, lines)
    else:
        frame, line_numbers = _parse_csv(path, filename_column)
    return _validate(path, frame, line_numbers)
