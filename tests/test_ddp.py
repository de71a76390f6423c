"""Multi-process training: 2 CPU processes (gloo) through torchrun-style environment variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path: Path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(Path(__file__).resolve().parents[1]))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=env, stderr=subprocess.PIPE))
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    # only rank 0 continues past training; DDP kept both replicas identical after every step
    assert (tmp_path / "steps0").read_text() == "6" and not (tmp_path / "steps1").exists()
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    torch.manual_seed(0)
    assert not torch.equal(w0["weight"], torch.nn.Linear(4, 4).weight)  # it moved away from the initial weights
