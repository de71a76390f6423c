"""The evaluate / encode / reconstruct / sample / gap commands through typer.testing.CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdae.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """The commands pin threads and flush denormals (process-wide); restore the test defaults afterwards."""
    yield
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)


def _models(project: Path) -> list[str]:
    return ["--baseline", str(project / "models/baseline"), "--pdae", str(project / "models/pdae"), "--threads", "1"]


def _defaults(tmp_path: Path) -> str:
    """A params file with every section at its defaults (a missing --params file is an error)."""
    path = tmp_path / "defaults.yaml"
    path.write_text("latent: {}\n")
    return str(path)


def _ok(args: list[str]):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def _error(args: list[str], *fragments: str) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(f in line for f in fragments), res.output
    return line


def test_every_command_has_help():
    for cmd in ("evaluate", "encode", "reconstruct", "sample", "gap"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output and len(res.output) > 300, cmd
    listing = runner.invoke(app, ["--help"]).output
    assert listing.index("evaluate") < listing.index("encode") < listing.index("params")


def test_encode_files_match_the_library(tiny_project, tmp_path):
    from PIL import Image

    from pdae.autoencode import encode, load_models
    from pdae.data import load_split
    from pdae.io import load_metadata, load_tensors, to_uint8

    x, _ = load_split(tiny_project / "data/prepared", "test")
    files = []
    for i in range(2):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(to_uint8(x[i : i + 1])[0, 0].numpy()).save(files[-1])
    out = tmp_path / "z.safetensors"
    _ok(["encode", *map(str, files), "--out", str(out), "--x-t", "--steps", "2", *_models(tiny_project)])
    saved = load_tensors(out)
    model, _ = load_models(tiny_project / "models/baseline", tiny_project / "models/pdae")
    pixels = to_uint8(x[:2]).float() / 127.5 - 1  # what the PNG files hold
    assert torch.allclose(saved["z"], encode(model, pixels), atol=1e-5) and saved["x_T"].shape == (2, 1, 8, 8)
    assert json.loads(load_metadata(out)["files"]) == [str(f) for f in files]
    _error(["encode", str(tmp_path / "nope.png"), *_models(tiny_project)], "image not found")


def test_missing_model_folder_names_the_stage(tiny_project, tmp_path):
    args = ["--baseline", str(tiny_project / "models/baseline"), "--pdae", str(tmp_path / "none"), "--threads", "1"]
    _error(["reconstruct", "--index", "0", *args], "dvc repro train")
    _error(["gap", "--baseline", str(tmp_path / "none"), "--threads", "1"], "dvc repro baseline")
    _error(["sample", "--latent", str(tmp_path / "none"), *_models(tiny_project)], "dvc repro latent")


def test_reconstruct_index_and_errors(tiny_project, tmp_path):
    from PIL import Image

    out = tmp_path / "rec.png"
    common = ["--steps", "2", "--out", str(out), "--data", str(tiny_project / "data/prepared"), *_models(tiny_project)]
    res = _ok(["reconstruct", "--index", "3", "--scale", "1", *common])
    assert "MSE" in res.output and Image.open(out).size == (2 * 8 + 3, 8 + 2)  # input | reconstruction
    _ok(["reconstruct", "--index", "0", "--x-t", "random", "--no-compare", *common])
    data = common[4:6]
    _error(["reconstruct", *_models(tiny_project)], "exactly one")
    _error(["reconstruct", "--index", "99999", *data, *_models(tiny_project)], "out of range")
    _error(["reconstruct", "--index", "0", "--x-t", "maybe", *_models(tiny_project)], "--x-t")
    res = _ok(["reconstruct", "--index", "3", "--solver", "dpmpp2m", "--inversion-steps", "3", *common])
    assert "dpmpp2m 2 steps" in res.output
    _error(["reconstruct", "--index", "0", "--solver", "euler", *common], "unknown solver 'euler'", "dpmpp2m")


def test_gap_and_sample(tiny_project, tmp_path):
    from tests.test_evaluate import tiny_latent

    data = ["--data", str(tiny_project / "data/prepared")]
    res = _ok(["gap", "--n-images", "4", "--csv", str(tmp_path / "gap.csv"), *data, *_models(tiny_project)])
    assert "gap reduction" in res.output and (tmp_path / "gap.csv").is_file()
    latent = tiny_latent(tiny_project)
    out, z = tmp_path / "samples.png", tmp_path / "z.safetensors"
    args = ["sample", "--n", "4", "--steps", "2", "--latent", str(latent), "--out", str(out), "--save-z", str(z)]
    _ok([*args, "--params", _defaults(tmp_path), *_models(tiny_project)])
    assert out.is_file() and z.is_file()


def test_evaluate_prints_table_and_writes_json(tiny_project, tmp_path):
    out = tmp_path / "eval.json"
    data = ["--data", str(tiny_project / "data/prepared"), "--params", _defaults(tmp_path)]
    args = ["evaluate", "--steps", "2,3", "--n-images", "3", "--metrics", "ssim,mse", "--out", str(out), *data]
    res = _ok([*args, *_models(tiny_project)])
    assert "PDAE (inferred x_T)" in res.output and "DDIM baseline" in res.output and "gap reduction" in res.output
    m = json.loads(out.read_text())
    assert set(m["reconstruction"]) == {"T2", "T3"} and m["n_images"] == 3 and "fid" not in m
    assert np.isfinite(m["reconstruction"]["T3"]["pdae_random"]["mse"])
    _error(["evaluate", "--metrics", "ssim,psnr", *data, *_models(tiny_project)], "evaluate.metrics")
    _error(["evaluate", "--steps", "ten", *data, *_models(tiny_project)], "--steps")


def test_evaluate_run_id(tiny_project, tmp_path, mlflow_tmp, monkeypatch):
    import mlflow

    from pdae.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    with stage_run("train") as run:
        run.log_artifact(tiny_project / "models/baseline", "models/baseline")
        run.log_artifact(tiny_project / "models/pdae", "models/pdae")
        run_id = mlflow.active_run().info.run_id
    data = ["--data", str(tiny_project / "data/prepared"), "--params", _defaults(tmp_path)]
    args = ["evaluate", "--run-id", run_id, "--steps", "2", "--n-images", "2", "--metrics", "mse", *data]
    assert "PDAE (random x_T)" in _ok([*args, "--threads", "1"]).output
    _error(["evaluate", "--run-id", "0" * 32, *data, "--threads", "1"], "has no artifact models/baseline")
