"""Helpers for the reliability tests: hostile files, in-process stage runs, output snapshots, a 127.0.0.1 server."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# ---- hostile files -------------------------------------------------------------------------------------------------
# Unpickling this runs `touch <marker>`: a stand-in for any command an attacker would put in a checkpoint.
class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def write_evil_checkpoint(path: Path, marker: Path, payload: dict | None = None, legacy: bool = False) -> Path:
    """A torch.save pickle at `path` whose unpickling would create `marker` (zip format, or the legacy format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {**(payload or {}), "payload": Evil(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def png_bytes(size: tuple[int, int] = (10, 12), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG claiming `width` x `height` greyscale pixels (a decompression-bomb header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


# ---- projects ------------------------------------------------------------------------------------------------------
def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def folder_project(root: Path, n: int = 6) -> Path:
    """A project reading `imgs/` (n small PNGs) and `attrs.csv` (filename, smiling 0/1, label)."""
    root.mkdir(parents=True, exist_ok=True)
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(n):
        (imgs / f"{i:03d}.png").write_bytes(png_bytes((10 + i, 12), "RGB" if i % 2 else "L", seed=i))
    rows = ["filename,smiling,label"] + [f"{i:03d}.png,{i % 2},{i % 3}" for i in range(n)]
    (root / "attrs.csv").write_text("\n".join(rows) + "\n")
    base = {"dataset": "folder", "image_size": 8, "threads": 1, "device": "cpu"}
    write_params(
        root, {"base": base, "prepare": {"folder": "imgs", "attributes": "attrs.csv", "classifier_epochs": 0}}
    )
    return root


# Everything under `root` except caches: relative path -> (size, mtime_ns). Equal snapshots = nothing written.
def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts:
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def changed_files(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


# ---- running entry points ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def in_project(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """Run in `cwd` with `env` set; restore cwd, env and the torch globals a stage script changes."""
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in env}
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)


def run_stage(project: Path, stage: str, env: dict[str, str] | None = None) -> int:
    """Execute stages/<stage>.py as __main__ inside `project` (tracking off); returns its exit code.

    Any exception other than SystemExit propagates: for a user error that is the traceback the test forbids.
    """
    env = {"PDAE_TRACKING": "off", **(env or {})}
    with in_project(project, env):
        try:
            runpy.run_path(str(ROOT / "stages" / f"{stage}.py"), run_name="__main__")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    return 0


def error_lines(stderr: str, prefix: str = "error:") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


# ---- a local HTTP server -------------------------------------------------------------------------------------------
# path -> handler(request) writing the whole response; unknown paths get 404.
Route = Callable[[BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def http_server(routes: dict[str, Route]) -> Iterator[str]:
    """Serve `routes` on 127.0.0.1 (random port) in a thread; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0])
            if route is None:
                self.send_error(404, "Not Found")
            else:
                route(self)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def serve_bytes(data: bytes, cut: int | None = None) -> Route:
    """A route answering `data`; with `cut`, it announces the full length but closes after `cut` bytes."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data if cut is None else data[:cut])
        handler.wfile.flush()
        handler.close_connection = True

    return route


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
