"""The served encoder: input layouts, the pyfunc round trip and `mlflow models serve` over REST."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pdae.errors import PdaeError
from pdae.serve import export_encoder, load_encoder, log_encoder, to_model_input


def test_input_layouts_agree():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    ref = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(to_model_input(u8, 8, 3), ref)  # uint8 NHWC
    assert torch.equal(to_model_input(u8.transpose(0, 3, 1, 2), 8, 3), ref)  # uint8 NCHW
    assert torch.equal(to_model_input(ref.numpy(), 8, 3), ref)  # float NCHW in [-1, 1]
    assert torch.equal(to_model_input(u8[0], 8, 3), ref[:1])  # one HWC image
    assert torch.equal(to_model_input(u8.astype(np.int64).tolist(), 8, 3), ref)  # JSON ints
    grey = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    assert to_model_input(grey, 8, 1).shape == (1, 1, 8, 8)
    with pytest.raises(PdaeError, match="do not match the encoder input"):
        to_model_input(np.zeros((2, 3, 16, 16), np.float32), 8, 3)
    with pytest.raises(PdaeError, match="numeric"):
        to_model_input(np.array([["a"]]), 8, 1)


def test_exported_encoder_matches_the_model(tiny_project, tmp_path):
    from pdae.autoencode import encode, load_models
    from pdae.data import load_split

    model, _ = load_models(tiny_project / "models/baseline", tiny_project / "models/pdae")
    x, _ = load_split(tiny_project / "data/prepared", "test")
    net, cfg = load_encoder(export_encoder(tiny_project / "models/pdae", tmp_path / "enc"))
    assert cfg["z_dim"] == model.z_dim
    with torch.no_grad():
        assert torch.allclose(net(x[:4]), encode(model, x[:4]), atol=1e-6)


def _log(tiny_project: Path) -> str:
    """Log the tiny encoder in a fresh MLflow run of the temporary store; returns the run id."""
    import mlflow

    from pdae.tracking import stage_run

    with stage_run("serve-test") as run:
        info = log_encoder(run, tiny_project / "models/pdae")
        assert info is not None
        return mlflow.active_run().info.run_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_served_encoder_over_rest(tiny_project, mlflow_tmp, monkeypatch):
    """`mlflow models serve --env-manager local` on 127.0.0.1 answers z == pdae.autoencode.encode within 1e-5."""
    from pdae.autoencode import encode, load_models
    from pdae.data import load_split

    mlflow_cli = Path(sys.executable).parent / "mlflow"
    if not mlflow_cli.exists() and shutil.which("mlflow") is None:
        pytest.skip("the `mlflow` command is not installed next to this Python")
    monkeypatch.chdir(tiny_project)  # the sqlite store keeps artifacts under ./mlruns
    run_id = _log(tiny_project)
    model, _ = load_models(tiny_project / "models/baseline", tiny_project / "models/pdae")
    x, _ = load_split(tiny_project / "data/prepared", "test")
    images = x[:2]
    expected = encode(model, images).numpy()
    import mlflow.pyfunc

    local = mlflow.pyfunc.load_model(f"runs:/{run_id}/encoder")  # in-process round trip first (cheap, clearer)
    assert np.abs(local.predict(images.numpy()) - expected).max() < 1e-5

    port = _free_port()
    cmd = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "models", "serve", "-m", f"runs:/{run_id}/encoder"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # uvicorn of this venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_tmp, "OMP_NUM_THREADS": "1", "PATH": path}
    log = (tiny_project / "serve.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=tiny_project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline, answer = time.time() + 150, None
        uint8 = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)  # HWC pixels
        while time.time() < deadline and proc.poll() is None:
            try:
                answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images.numpy().tolist()})
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        if answer is None:
            log.flush()
            tail = (tiny_project / "serve.log").read_text()[-1500:]
            if "No such command" in tail or "not installed" in tail:
                pytest.skip(f"`mlflow models serve` unavailable offline: {tail.splitlines()[-1]}")
            pytest.fail(f"mlflow models serve did not answer (exit code {proc.poll()}):\n{tail}")
        z = np.asarray(answer["predictions"], dtype=np.float32)
        assert z.shape == expected.shape and np.abs(z - expected).max() < 1e-5
        z8 = np.asarray(_post(f"http://127.0.0.1:{port}/invocations", {"inputs": uint8.tolist()})["predictions"])
        assert np.abs(z8 - encode(model, torch.from_numpy(uint8).permute(0, 3, 1, 2) / 127.5 - 1).numpy()).max() < 1e-5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()
