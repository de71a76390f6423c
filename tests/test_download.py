"""pdae.download against a real HTTP server on 127.0.0.1 (Range support, 404, truncation + resume, checksums)."""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdae.download import download, sha256_file
from pdae.errors import PdaeError

DATA = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, several read chunks
DIGEST = hashlib.sha256(DATA).hexdigest()


# Serves DATA under a few paths; records every request's path and Range header.
class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state = self.server.state
        state["requests"].append((self.path, self.headers.get("Range")))
        if self.path == "/missing.bin":
            self.send_error(404, "Not Found")
            return
        if self.path == "/flaky.bin" and not state["flaky_done"]:
            state["flaky_done"] = True
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA[: len(DATA) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and self.path != "/norange.bin":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(DATA):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(DATA)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = {"requests": [], "flaky_done": False}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, httpd.state
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_renames(server, tmp_path):
    base, state = server
    dest = tmp_path / "sub" / "model.bin"
    out = download(f"{base}/file.bin", dest, DIGEST, progress=True)
    assert out == dest and dest.read_bytes() == DATA
    assert not (tmp_path / "sub" / "model.bin.partial").exists()
    assert state["requests"] == [("/file.bin", None)]


def test_existing_verified_file_makes_no_request(server, tmp_path):
    base, state = server
    dest = tmp_path / "model.bin"
    dest.write_bytes(DATA)
    assert download(f"{base}/file.bin", dest, DIGEST.upper(), progress=False) == dest
    assert state["requests"] == []


def test_existing_wrong_file_is_replaced(server, tmp_path):
    base, _ = server
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"old")
    download(f"{base}/file.bin", dest, DIGEST, progress=False)
    assert dest.read_bytes() == DATA


def test_404_is_one_line_error(server, tmp_path):
    base, _ = server
    dest = tmp_path / "model.bin"
    with pytest.raises(PdaeError, match=r"missing\.bin.*HTTP 404.*check the URL") as info:
        download(f"{base}/missing.bin", dest, DIGEST, progress=False)
    assert "\n" not in str(info.value)
    assert not dest.exists() and not (tmp_path / "model.bin.partial").exists()


def test_connection_refused(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/file.bin"
    with pytest.raises(PdaeError, match="cannot connect to " + url.replace(".", r"\.")):
        download(url, tmp_path / "m.bin", DIGEST, progress=False, timeout=5)


def test_truncated_transfer_then_resumes(server, tmp_path):
    base, state = server
    dest = tmp_path / "model.bin"
    partial = tmp_path / "model.bin.partial"
    with pytest.raises(PdaeError, match=r"flaky\.bin was interrupted after .*run the same command again"):
        download(f"{base}/flaky.bin", dest, DIGEST, progress=False)
    assert not dest.exists()
    kept = partial.stat().st_size
    assert 0 < kept < len(DATA)
    download(f"{base}/flaky.bin", dest, DIGEST, progress=False)
    assert dest.read_bytes() == DATA and not partial.exists()
    assert state["requests"][-1] == ("/flaky.bin", f"bytes={kept}-")


def test_resume_restarts_when_server_ignores_range(server, tmp_path):
    base, state = server
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.partial").write_bytes(DATA[:1000])
    download(f"{base}/norange.bin", dest, DIGEST, progress=False)
    assert dest.read_bytes() == DATA
    assert state["requests"] == [("/norange.bin", "bytes=1000-")]


def test_stale_partial_is_discarded(server, tmp_path):
    base, state = server
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.partial").write_bytes(b"x" * 5000)  # not a prefix of DATA
    download(f"{base}/file.bin", dest, DIGEST, progress=False)
    assert dest.read_bytes() == DATA
    assert [r[1] for r in state["requests"]] == ["bytes=5000-", None]


def test_complete_partial_is_verified_without_body(server, tmp_path):
    base, state = server
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.partial").write_bytes(DATA)
    download(f"{base}/file.bin", dest, DIGEST, progress=False)
    assert dest.read_bytes() == DATA
    assert state["requests"] == [("/file.bin", f"bytes={len(DATA)}-")]


def test_checksum_mismatch_deletes_and_names_digests(server, tmp_path):
    base, _ = server
    dest = tmp_path / "model.bin"
    wrong = "0" * 64
    with pytest.raises(PdaeError) as info:
        download(f"{base}/file.bin", dest, wrong, progress=False)
    msg = str(info.value)
    assert f"{base}/file.bin" in msg and wrong in msg and DIGEST in msg
    assert not dest.exists() and not (tmp_path / "model.bin.partial").exists()


def test_bad_sha_and_scheme(tmp_path):
    with pytest.raises(PdaeError, match="64 hex digits"):
        download("http://127.0.0.1:1/x", tmp_path / "x", "abc", progress=False)
    with pytest.raises(PdaeError, match="only http"):
        download("ftp://example.org/x", tmp_path / "x", DIGEST, progress=False)


def test_google_drive_without_gdown(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # makes `import gdown` fail
    with pytest.raises(PdaeError, match=r"pip install 'pdae\[gdrive\]'"):
        download("https://drive.google.com/file/d/abc/view", tmp_path / "x", DIGEST, progress=False)
    with pytest.raises(PdaeError, match="folder"):
        download("https://drive.google.com/drive/folders/abc", tmp_path / "x", DIGEST, progress=False)


def test_google_drive_through_gdown(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, output, quiet, fuzzy, resume):
        calls.append(url)
        with open(output, "wb") as fh:
            fh.write(DATA)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    dest = tmp_path / "ckpt.pt"
    download("https://drive.google.com/file/d/abc/view?usp=sharing", dest, DIGEST, progress=False)
    assert sha256_file(dest) == DIGEST and calls == ["https://drive.google.com/file/d/abc/view?usp=sharing"]
    with pytest.raises(PdaeError, match="checksum mismatch"):
        download("https://drive.google.com/file/d/abc/view", tmp_path / "other.pt", "1" * 64, progress=False)
    assert not (tmp_path / "other.pt").exists()
