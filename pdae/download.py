"""Verified downloads (streaming, atomic `dest.partial` then rename, resumable, sha256-checked) and safe unpacking.

HTTP(S) goes through `requests`; Google Drive file links go through `gdown` (optional extra `pdae[gdrive]`).
`extract_archive` unpacks .zip and .tar(.gz/.bz2/.xz) archives with no path escape, no links, bounded sizes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlparse

from pdae.errors import PdaeError

CHUNK = 1 << 20
# Network reads are small so that an interrupted transfer keeps nearly everything it received.
NET_CHUNK = 1 << 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_GDRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
# Bounds of an unpacked archive: members, and bytes (also never more than the free disk space).
MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 64 << 30


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def is_google_drive(url: str) -> bool:
    return (urlparse(url).hostname or "").lower() in _GDRIVE_HOSTS


def _finish(partial: Path, dest: Path, url: str, sha256: str) -> Path:
    """Verify `partial` and rename it to `dest`; a wrong digest deletes it and raises."""
    actual = sha256_file(partial)
    if actual != sha256:
        partial.unlink(missing_ok=True)
        raise PdaeError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; the file was deleted — check the "
            "URL and the expected sha256."
        )
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, dest)
    return dest


def download(url: str, dest: str | os.PathLike, sha256: str, progress: bool = True, timeout: float = 30) -> Path:
    """Download `url` to `dest` and verify its sha256; returns `dest`.

    - `dest` already present with the expected digest: returned without any request.
    - Data streams into `dest.partial`; an interrupted transfer keeps it and the next call resumes with an HTTP Range
      request (restarting from zero if the server ignores ranges). Only a verified file is renamed to `dest`.
    - A checksum mismatch deletes the downloaded file. Every failure is a one-line PdaeError naming the URL and fix.
    - Google Drive file links are fetched with `gdown` (pip install 'pdae[gdrive]').

    Args:
        url: http(s) URL or Google Drive file link.
        dest: target file path (parent folders are created).
        sha256: expected hex digest (64 characters, case-insensitive).
        progress: show a progress bar on stderr.
        timeout: seconds to wait for the connection and for each read.
    """
    dest = Path(dest)
    sha256 = str(sha256).strip().lower()
    if not _HEX64.match(sha256):
        raise PdaeError(f"sha256 for {url} must be 64 hex digits (got {sha256!r}); copy it from the release notes.")
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download(url, dest, sha256, progress, timeout)
    except BaseException:
        remove_empty_dirs(created)  # a failed download leaves no empty folder (a resumable .partial keeps its own)
        raise


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first) that are empty; others are left alone."""
    for folder in sorted(folders, key=lambda d: len(d.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def _download(url: str, dest: Path, sha256: str, progress: bool, timeout: float) -> Path:
    partial = dest.with_name(dest.name + ".partial")
    if is_google_drive(url):
        _gdown(url, partial, progress)
    else:
        scheme = urlparse(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise PdaeError(f"cannot download {url}: only http(s) URLs and Google Drive links are supported.")
        resumed = _http(url, partial, progress, timeout)
        if resumed and sha256_file(partial) != sha256:
            # a stale partial file (e.g. of an older upload) spoils the resumed copy: fetch once more from zero
            partial.unlink()
            _http(url, partial, progress, timeout)
    return _finish(partial, dest, url, sha256)


def _http(url: str, partial: Path, progress: bool, timeout: float) -> bool:
    """Stream `url` into `partial`, resuming from its current size when the server honours Range.

    Returns whether existing bytes of `partial` were kept (resumed or already complete).
    """
    import requests

    offset = partial.stat().st_size if partial.is_file() else 0
    headers = (
        {"Range": f"bytes={offset}-", "Accept-Encoding": "identity"} if offset else {"Accept-Encoding": "identity"}
    )
    fix = "check your network (or proxy) and run the same command again to resume"
    try:
        resp = requests.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True)
    except requests.exceptions.Timeout:
        raise PdaeError(f"download of {url} timed out after {timeout:g} s; {fix}.") from None
    except requests.exceptions.RequestException as err:
        reason = type(err).__name__
        raise PdaeError(f"cannot connect to {url} ({reason}); check the URL and your network (or proxy).") from None
    with resp:
        if offset and resp.status_code == 416:  # the partial file already holds everything
            return True
        if offset and resp.status_code == 206 and _range_start(resp) != offset:  # an unusable range: start over
            partial.unlink()
            resp.close()
            return _http(url, partial, progress, timeout)
        if resp.status_code >= 400:
            hint = "the file is not there: check the URL" if resp.status_code == 404 else fix
            raise PdaeError(f"download of {url} failed: HTTP {resp.status_code} {resp.reason}; {hint}.")
        resumed = offset > 0 and resp.status_code == 206
        mode = "ab" if resumed else "wb"
        done = offset if resumed else 0
        length = resp.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        bar = _bar(progress, total, done, url)
        try:
            with open(partial, mode) as fh:
                for block in resp.iter_content(NET_CHUNK):
                    fh.write(block)
                    done += len(block)
                    if bar is not None:
                        bar.update(len(block))
        except (requests.exceptions.RequestException, OSError) as err:
            raise PdaeError(
                f"download of {url} was interrupted after {done} bytes ({type(err).__name__}); {fix}."
            ) from None
        finally:
            if bar is not None:
                bar.close()
    if total is not None and done < total:
        raise PdaeError(f"download of {url} was interrupted after {done} of {total} bytes; {fix}.")
    return resumed


def _range_start(resp) -> int | None:
    """First byte offset of a 206 response's Content-Range ('bytes START-END/TOTAL')."""
    match = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _bar(progress: bool, total: int | None, initial: int, url: str):
    if not progress:
        return None
    from tqdm import tqdm

    name = Path(urlparse(url).path).name or url
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)


def _gdown(url: str, partial: Path, progress: bool) -> None:
    """Fetch a Google Drive file link into `partial` with gdown."""
    if "/folders/" in url:
        raise PdaeError(f"{url} is a Google Drive folder; open it and use the share link of the single file you need.")
    try:
        import gdown
    except ImportError:
        raise PdaeError(
            f"{url} is a Google Drive link, which needs gdown: pip install 'pdae[gdrive]' (or download it by hand)."
        ) from None
    try:
        out = gdown.download(url, output=str(partial), quiet=not progress, fuzzy=True, resume=True)
    except Exception as err:  # gdown raises its own and requests' exception types
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PdaeError(
            f"Google Drive download of {url} failed ({msg}); retry later or download it by hand."
        ) from None
    if not out or not partial.is_file():
        raise PdaeError(
            f"Google Drive download of {url} failed (quota or permission); retry later or download by hand."
        )


def _archive_error(archive: Path, problem: str) -> PdaeError:
    return PdaeError(f"{archive} is not a safe archive: {problem}; refusing to unpack it — check where it came from.")


def _check_totals(archive: Path, dest: Path, count: int, total: int, max_bytes: int) -> None:
    if count > MAX_MEMBERS:
        raise _archive_error(archive, f"it holds {count} members (at most {MAX_MEMBERS})")
    free = shutil.disk_usage(dest).free
    if total > min(max_bytes, free):
        raise _archive_error(
            archive, f"it unpacks to {total / 2**30:.3g} GiB (limit {min(max_bytes, free) / 2**30:.3g} GiB)"
        )


def _member_target(archive: Path, dest: Path, name: str) -> Path:
    """Where member `name` would land in `dest`; absolute paths, drive letters and `..` are refused."""
    clean = name.replace("\\", "/")
    target = (dest / clean).resolve()
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean) or ".." in clean.split("/"):
        raise _archive_error(archive, f"member '{name}' points outside the archive folder")
    if not target.is_relative_to(dest.resolve()):
        raise _archive_error(archive, f"member '{name}' points outside the archive folder")
    return target


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_totals(archive, dest, len(infos), sum(i.file_size for i in infos), max_bytes)
        written = 0
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                raise _archive_error(archive, f"member '{info.filename}' is a symbolic link")
            target = _member_target(archive, dest, info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                for block in iter(lambda: src.read(CHUNK), b""):  # count real bytes: headers may understate them
                    written += len(block)
                    if written > max_bytes:
                        raise _archive_error(archive, f"it unpacks to more than {max_bytes / 2**30:.3g} GiB")
                    out.write(block)


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        _check_totals(archive, dest, len(members), sum(m.size for m in members if m.isfile()), max_bytes)
        for member in members:
            if member.issym() or member.islnk():
                raise _archive_error(archive, f"member '{member.name}' is a link")
            _member_target(archive, dest, member.name)
        # tarfile's "data" filter also refuses absolute paths, `..`, devices and odd permissions
        tf.extractall(dest, filter="data")


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, max_bytes: int | None = None) -> Path:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) archive into the existing empty folder `dest`; returns `dest`.

    Refused with one PdaeError line, before or while writing: members with absolute paths or `..`, symbolic or hard
    links, more than MAX_MEMBERS members, more than `max_bytes` (default MAX_UNPACKED_BYTES) or the free disk
    space unpacked. The caller owns
    `dest` and removes it on failure.
    """
    archive, dest = Path(archive), Path(dest)
    max_bytes = MAX_UNPACKED_BYTES if max_bytes is None else max_bytes
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, max_bytes)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, max_bytes)
        else:
            raise _archive_error(archive, "it is neither a .zip nor a .tar(.gz) archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise _archive_error(archive, f"it is damaged ({type(err).__name__})") from None
    except OSError as err:
        raise PdaeError(
            f"cannot unpack {archive} into {dest} ({err.strerror or type(err).__name__}); free disk space."
        ) from None
    return dest
