"""Reliability and security: SIGKILL crash safety with bitwise resume, atomic writes, malicious pickles at every
checkpoint reader, NaN/inf guards, tracking faults (unreachable / broken MLflow), loopback-only MLflow instructions.

Summary table: docs/reliability.md. The bad-input matrix lives in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import random
import re
import signal
import socket
import tarfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from pdae.errors import PdaeError
from pdae.io import load_metadata, load_tensors, remove_stale_temps, write_json
from pdae.stage import stage_main
from pdae.train import TrainSpec, train
from tests import crash_worker
from tests.faults import (
    ROOT,
    closed_port,
    error_lines,
    http_server,
    run_stage,
    serve_bytes,
    write_evil_checkpoint,
    write_params,
)

CPU = torch.device("cpu")


# ---- 1. crash safety -----------------------------------------------------------------------------------------------
# Children come from a forkserver that imported torch once: a fresh process per run without paying the import
# (torch._dynamo too: the first optimiser imports it lazily, ~2 s).
@pytest.fixture(scope="module")
def ctx():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "pdae.train", "tests.crash_worker"])
    return context


def _start(ctx, target, *args):
    counter = ctx.RawValue("i", 0)
    proc = ctx.Process(target=target, args=(*args, counter), daemon=True)
    proc.start()
    return proc, counter


def _finish(proc, timeout: float = 300) -> None:
    proc.join(timeout)
    assert proc.exitcode == 0, f"worker exit code {proc.exitcode}"


def _kill_after(proc, counter, target: int, delay: float, timeout: float = 300) -> int:
    """SIGKILL `proc` `delay` seconds after it reported step `target`; returns its last reported step."""
    deadline = time.monotonic() + timeout
    while counter.value < target and proc.is_alive():
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.001)
    time.sleep(delay)
    proc.kill()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL, f"worker was not killed (exit code {proc.exitcode})"
    return counter.value


def test_sigkill_at_five_random_points_then_resume_is_bitwise_equal(ctx, tmp_path: Path) -> None:
    ref, run = tmp_path / "reference", tmp_path / "killed"
    proc, _ = _start(ctx, crash_worker.train_child, str(ref), None)
    _finish(proc)
    rng = random.Random(2024)
    targets = sorted(rng.sample(range(5, crash_worker.STEPS - 20), 5))
    ckpt = run / crash_worker.CHECKPOINT
    for target in targets:
        # the worker holds at step target + 1, so the kill lands within one step after `target` even on a busy host
        proc, counter = _start(ctx, crash_worker.train_child, str(run), target + 1)
        last = _kill_after(proc, counter, target, delay=rng.uniform(0, 0.004))
        # wherever the kill landed (mid-step, mid-checkpoint-write), the checkpoint on disk is complete: it loads,
        # and it holds the last or the second-to-last reported step (checkpoint_every = 1)
        step = int(load_metadata(ckpt)["step"])
        assert load_tensors(ckpt, "checkpoint") and last - 1 <= step <= last
        assert not (run / crash_worker.FINAL).exists()
        visible = [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]
        temps = [p for p in run.rglob(".*") if p.is_file()]
        # a kill inside a checkpoint write can leave our temp file (".state.safetensors.*.tmp") and the safetensors
        # writer's own (".tmpXXXXXX"); neither is ever read as a checkpoint
        assert visible == [ckpt] and len(temps) <= 2
        assert all(p.name.endswith(".tmp") or p.name.startswith(".tmp") for p in temps)
        print(f"killed after step {last}: checkpoint holds step {step}, {len(temps)} temporary file(s) left")
    (ckpt.parent / ".state.safetensors.killed00.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write
    proc, _ = _start(ctx, crash_worker.train_child, str(run), None)
    _finish(proc)
    final, expected = load_tensors(run / crash_worker.FINAL), load_tensors(ref / crash_worker.FINAL)
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert not list(run.rglob("*.tmp")), "stale temporary files were not cleaned up on resume"


def test_atomic_write_killed_midway_keeps_the_old_file(ctx, tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"old": 1})
    before = target.read_bytes()
    proc, counter = _start(ctx, crash_worker.hold_atomic_write, str(target))
    _kill_after(proc, counter, 1, delay=0)
    assert target.read_bytes() == before  # the reader still sees the complete old file
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and re.fullmatch(r"\.metrics\.json\..+\.tmp", leftovers[0]), leftovers
    assert remove_stale_temps(target) == 1 and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# Stage scripts write their DVC outs only through pdae.io's atomic helpers (or library calls built on them).
DIRECT_WRITES = re.compile(
    r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"'][wax]|torch\.save\(|\.to_csv\(|\.savefig\(|np\.save|"
    r"\bsave_file\(|json\.dump\("
)


def test_stage_scripts_never_write_directly() -> None:
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((ROOT / "stages").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if DIRECT_WRITES.search(line)
    ]
    assert not offenders, "non-atomic writes in stage scripts (use pdae.io): " + "; ".join(offenders)


# ---- 3. safe loading: a malicious pickle at every checkpoint reader ------------------------------------------------
PDAE_CFG = {
    "model": "FFHQDenoiseFn",
    "dims": 2,
    "input_channel": 1,
    "base_channel": 32,
    "channel_multiplier": [1, 2],
    "num_residual_blocks_of_a_block": 1,
    "dropout": 0.0,
    "attention_resolutions": [2],
    "use_new_attention_order": False,
    "num_heads": 1,
    "head_channel": -1,
}
TINY_BASE = {"image_size": 8, "threads": 1, "device": "cpu"}


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: unpickled without protection, the test payload does run its command."""
    marker = tmp_path / "ran"
    evil = write_evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _evil_source(kind: str, project: Path, marker: Path) -> tuple[str, dict | Callable[[], object]]:
    """Plant a malicious checkpoint for reader `kind`: ("stage", baseline params) or ("", a library call)."""
    src = project / "evil"
    if kind in ("pdae-official", "pdae-official-legacy"):
        write_evil_checkpoint(src / "checkpoint.pt", marker, {"ema_denoise_fn": {}}, legacy=kind.endswith("legacy"))
        (src / "config.yml").write_text(yaml.safe_dump({"denoise_fn_config": PDAE_CFG}))
        return "baseline", {"source": "pdae-official", "path": str(src)}
    if kind == "diffae":
        write_evil_checkpoint(src / "last.ckpt", marker, {"state_dict": {}})
        return "baseline", {"source": "diffae", "path": str(src), "config": "celeba64"}
    if kind == "diffusers-bin":  # a diffusers folder whose weights are a pickle instead of safetensors
        src.mkdir()
        (src / "config.json").write_text((project / "models/baseline/config.json").read_text())
        write_evil_checkpoint(src / "diffusion_pytorch_model.bin", marker)
        return "baseline", {"source": "diffusers", "path": str(src)}
    if kind == "pdae-weights":
        write_evil_checkpoint(project / "models/pdae/pdae.safetensors", marker)
        return "encode", {}
    if kind == "label-classifier":
        from pdae.scoring import load_scorer

        write_evil_checkpoint(project / "data/prepared/label_classifier/model.safetensors", marker)
        return "", lambda: load_scorer(project / "data/prepared")
    if kind == "inception-weights":  # torch-fidelity itself would unpickle this file with weights_only=False
        from pdae.metrics import inception

        path = write_evil_checkpoint(src / "inception.pth", marker)
        return "", lambda: inception.load_pinned_weights(path, inception.STANDARD_SHA256, "Inception weights", "fix")
    if kind == "lpips-alexnet":
        from pdae.metrics.image import _lpips_model

        path = write_evil_checkpoint(src / "alexnet.pth", marker)
        return "", lambda: _lpips_model(str(path))
    raise AssertionError(kind)


# Reader -> text of the refusal (stage readers: the one error line; library readers: the exception).
READERS = {
    "pdae-official": "cannot be loaded safely",
    "pdae-official-legacy": "needs arbitrary unpickling",
    "diffae": "cannot be loaded safely",
    "diffusers-bin": "cannot load a diffusers UNet2DModel",
    "pdae-weights": "PDAE weights",
    "label-classifier": "label classifier weights",
    "inception-weights": "not the pinned 6726825d",
    "lpips-alexnet": "LPIPS AlexNet weights at .* not the pinned 7be5be79",
}


@pytest.mark.parametrize("kind", list(READERS))
def test_malicious_checkpoint_is_refused_and_never_runs(tiny_project: Path, capsys, kind: str) -> None:
    marker = tiny_project / "pwned"
    stage, what = _evil_source(kind, tiny_project, marker)
    if stage:
        write_params(tiny_project, {"base": TINY_BASE, "baseline": what})
        assert run_stage(tiny_project, stage) == 1
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and READERS[kind] in lines[0], lines
    else:
        with pytest.raises(Exception, match=READERS[kind]):
            what()
    assert not marker.exists()


def test_archive_cannot_write_outside_its_folder(tiny_project: Path, capsys) -> None:
    """baseline.source url with a (checksum-verified) tar.gz whose member path climbs out of the extraction folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("model/config.json", b"{}"), ("../../../escaped.txt", b"written outside")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    with http_server({"/model.tar.gz": serve_bytes(archive)}) as url:
        source = {"source": "url", "url": f"{url}/model.tar.gz", "sha256": hashlib.sha256(archive).hexdigest()}
        write_params(tiny_project, {"base": TINY_BASE, "baseline": source})
        code = run_stage(tiny_project, "baseline")
    assert not (tiny_project / "escaped.txt").exists(), "the archive wrote outside its extraction folder"
    assert code == 1 and len(error_lines(capsys.readouterr().err)) == 1


def test_malicious_training_checkpoint_is_ignored_and_replaced(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = write_evil_checkpoint(tmp_path / "state.safetensors", marker)
    torch.manual_seed(0)
    spec = TrainSpec(images=4 * 8, batch_size=8, lr=1e-2, checkpoint_every=1, seed=7)
    with pytest.warns(UserWarning, match="unreadable; training starts at step 0 and replaces it"):
        res = train({"net": crash_worker.TinyNet()}, crash_worker.loss_fn, crash_worker.data(), spec, ckpt, CPU,
                    progress=False)  # fmt: skip
    assert res.resumed_from == 0 and res.steps == 4 and not marker.exists()
    assert load_metadata(ckpt)["step"] == "4"  # overwritten by a safetensors checkpoint


# ---- 4. numerical faults -------------------------------------------------------------------------------------------
# Identity forward; the backward pass replaces the incoming gradient by `value` (inf or nan).
class _PoisonGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, value: float) -> torch.Tensor:  # noqa: ANN001
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return torch.full_like(grad, ctx.value), None


def _faulty_loss(fault: str, at_call: int):
    calls = {"n": 0}

    def loss_fn(mods, batch, gen):
        calls["n"] += 1
        hit = calls["n"] == at_call
        x = batch[0]
        out = mods["net"](x + 0.3 * torch.randn(x.shape, generator=gen))
        if hit and fault.endswith("grad"):
            out = _PoisonGrad.apply(out, float(fault.split("-")[0]))
        loss = ((out - x) ** 2).mean()
        if hit and fault.endswith("loss"):
            loss = loss * float(fault.split("-")[0])
        return loss

    return loss_fn


FAULTS = {
    "nan-loss": "loss became nan at step 7",
    "inf-loss": "loss became inf at step 7",
    "inf-grad": "gradients became non-finite at step 7",
    "nan-grad": "gradients became non-finite at step 7",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_numerical_fault_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, fault: str) -> None:
    def spec(steps: int) -> TrainSpec:
        return TrainSpec(
            images=steps * 8, batch_size=8, lr=1e-2, ema_decay=0.9, checkpoint_every=3, seed=7, log_every=1
        )

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return crash_worker.TinyNet()

    ckpt, ref = tmp_path / "state.safetensors", tmp_path / "ref.safetensors"
    with pytest.raises(PdaeError) as info:
        train({"net": net()}, _faulty_loss(fault, at_call=8), crash_worker.data(), spec(20), ckpt, CPU,
              progress=False)  # fmt: skip
    message = str(info.value)
    assert FAULTS[fault] in message and f"last good checkpoint is kept at {ckpt}" in message and "\n" not in message
    # the kept checkpoint is exactly the one of a clean 6-step run: finite and untouched by the bad step
    train({"net": net()}, crash_worker.loss_fn, crash_worker.data(), spec(6), ref, CPU, progress=False)
    kept, clean = load_tensors(ckpt), load_tensors(ref)
    assert load_metadata(ckpt)["step"] == "6" and kept.keys() == clean.keys()
    assert all(torch.equal(kept[k], clean[k]) for k in clean)
    assert all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())


def test_numerical_fault_in_a_stage_is_one_line_and_writes_no_metrics(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PDAE_TRACKING", "off")
    params, metrics = tmp_path / "params.yaml", tmp_path / "metrics.json"
    write_params(tmp_path, {"base": TINY_BASE})

    def body(cfg, run):
        spec = TrainSpec(images=20 * 8, batch_size=8, lr=1e-2, checkpoint_every=3, seed=7)
        train({"net": crash_worker.TinyNet()}, _faulty_loss("nan-loss", 5), crash_worker.data(), spec,
              tmp_path / "state.safetensors", CPU, progress=False)  # fmt: skip
        return {"never": 1}

    with pytest.raises(SystemExit) as info:
        stage_main("train", [], body, metrics_file=str(metrics), params_file=str(params))
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and err.startswith("error: train: loss became nan"), err
    assert not metrics.exists() and (tmp_path / "state.safetensors").exists()


# ---- 5. tracking faults --------------------------------------------------------------------------------------------
def _tracked_stage(tmp_path: Path, monkeypatch, uri: str) -> tuple[int | None, float, list[str]]:
    """stage_main with tracking on at `uri` and a body that records whether it ran: (exit code, seconds, ran)."""
    monkeypatch.setenv("PDAE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_params(tmp_path, {"base": TINY_BASE})
    ran: list[str] = []
    start = time.monotonic()
    code = None
    try:
        stage_main("probe", [], lambda cfg, run: ran.append("body") or {}, params_file=str(tmp_path / "params.yaml"))
    except SystemExit as exc:
        code = exc.code
    return code, time.monotonic() - start, ran


def test_unreachable_tracking_server_fails_fast_before_compute(tmp_path: Path, monkeypatch, capsys) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    code, seconds, ran = _tracked_stage(tmp_path, monkeypatch, uri)
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and not ran and seconds < 10
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0] and "PDAE_TRACKING=off" in lines[0]


def test_silent_tracking_server_fails_within_the_timeout(tmp_path: Path, monkeypatch, capsys) -> None:
    """A server that accepts connections but never answers (hung process, black-holing proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        code, seconds, ran = _tracked_stage(tmp_path, monkeypatch, uri)
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and not ran and seconds < 10 and "ReadTimeout" in lines[0], (seconds, lines)


def test_tracking_server_error_fails_fast(tmp_path: Path, monkeypatch, capsys) -> None:
    """A server answering 503 (MLflow's client would retry it with back-off for minutes)."""

    def unavailable(handler) -> None:
        handler.send_error(503, "Service Unavailable")

    with http_server({"/health": unavailable}) as uri:
        code, seconds, ran = _tracked_stage(tmp_path, monkeypatch, uri)
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and not ran and seconds < 10 and "HTTP 503" in lines[0], lines


def test_unopenable_tracking_store_fails_before_compute(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    code, _, ran = _tracked_stage(tmp_path, monkeypatch, uri)
    lines = error_lines(capsys.readouterr().err)
    assert code == 1 and not ran and len(lines) == 1 and "PDAE_TRACKING=off" in lines[0], lines


def test_mlflow_errors_after_compute_never_lose_results(tmp_path: Path, monkeypatch, mlflow_tmp: str) -> None:
    """Every MLflow call after the run started fails (logging, tags, even closing the run): the stage still
    finishes, its artifacts and metrics file are on disk, and each failure is only a warning."""
    import mlflow

    def broken(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("store went away")

    monkeypatch.setenv("PDAE_TRACKING", "on")
    write_params(tmp_path, {"base": TINY_BASE})
    artifact, metrics = tmp_path / "models" / "weights.safetensors", tmp_path / "metrics.json"

    def body(cfg, run):
        for name in ("log_artifact", "log_artifacts", "log_metrics", "log_params", "set_tags", "end_run"):
            monkeypatch.setattr(mlflow, name, broken)
        from pdae.io import save_tensors

        save_tensors(artifact, {"w": torch.ones(3)})  # "the trained model"
        run.log_artifact(artifact)
        run.log_metrics({"loss": 0.5}, step=1)
        run.set_tags({"k": "v"})
        return {"loss": 0.5}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stage_main("probe", [], body, metrics_file=str(metrics), params_file=str(tmp_path / "params.yaml"))
        finally:
            monkeypatch.undo()
            mlflow.end_run()
    assert torch.equal(load_tensors(artifact)["w"], torch.ones(3))
    assert yaml.safe_load(metrics.read_text())["loss"] == 0.5
    failed = {m.group(1) for w in caught if (m := re.match(r"MLflow (\w+) failed", str(w.message)))}
    assert {"log_artifact", "log_metrics", "set_tags", "end_run"} <= failed, failed


# ---- 6. MLflow UI instructions bind to the loopback interface -------------------------------------------------------
def test_readme_mlflow_commands_bind_to_loopback() -> None:
    commands = [
        line for line in (ROOT / "README.md").read_text().splitlines() if re.search(r"mlflow (ui|server)", line)
    ]
    assert commands, "README.md has no mlflow ui/server instruction"
    for line in commands:
        assert "--host 127.0.0.1" in line and "0.0.0.0" not in line, line
