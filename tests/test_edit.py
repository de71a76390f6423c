"""Manipulation, interpolation, the classify stage and the `manipulate` / `interpolate` CLI on the tiny project."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pdae.autoencode import decode, encode, invert, lerp, load_models, slerp
from pdae.edit import balanced_subset, edit_codes, figure_targets, interpolate, manipulate, mixed_model_fn
from pdae.probes import AttributeDirections, Normaliser

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_models(tiny_project_template):
    return load_models(tiny_project_template / "models/baseline", tiny_project_template / "models/pdae")


def _write_directions(project: Path, names: list[str], z_dim: int = 8) -> AttributeDirections:
    dirs = torch.nn.functional.normalize(torch.randn(len(names), z_dim), dim=1)
    norm = Normaliser(torch.zeros(z_dim), torch.ones(z_dim))
    out = AttributeDirections(names, dirs, dirs.clone(), torch.zeros(len(names)), norm)
    out.save(project / "models/classifier")
    return out


# --- slerp / lerp identities -------------------------------------------------------------------------------------


def test_slerp_endpoints_exact_and_norm_preserved():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    b_eq = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for alpha in (0.1, 0.5, 0.9):
        mid = slerp(a, b_eq, alpha)
        assert torch.allclose(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-5)


def test_slerp_half_of_orthogonal_vectors_and_lerp():
    e1, e2 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    half = slerp(e1 * 2, e2, 0.5)
    assert torch.allclose(half, torch.tensor([[math.sqrt(2), math.sqrt(2), 0.0]]), atol=1e-6)
    assert torch.allclose(lerp(e1, e2, 0.25), torch.tensor([[0.75, 0.5, 0.0]]))


# --- edits and interpolation on the tiny model ----------------------------------------------------------------------


def test_edit_codes_moves_by_s_sqrt_d_in_normalised_space():
    z = torch.randn(4, 16) * 3 + 1
    norm = Normaliser.fit(torch.randn(100, 16) * 3 + 1)
    w = torch.nn.functional.normalize(torch.randn(16), dim=0)
    codes = edit_codes(z, norm, w, [0.0, 0.5, -1.0])
    assert codes.shape == (3, 4, 16) and torch.equal(codes[0], z)
    moved = norm.normalise(codes[1]) - norm.normalise(z)
    assert torch.allclose(moved, 0.5 * 4.0 * w.expand(4, -1), atol=1e-4)  # s * sqrt(16) * w
    per_image = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    assert torch.allclose(norm.normalise(edit_codes(z, norm, per_image, [1.0])[0]) - norm.normalise(z), 4 * per_image,
                          atol=1e-4)  # fmt: skip


def test_manipulate_scale_zero_is_reconstruction(tiny_models):
    model, schedule = tiny_models
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    norm = Normaliser(torch.zeros(8), torch.ones(8))
    out = manipulate(model, schedule, x, norm, torch.eye(8)[0], [0.0, 2.0], steps=3)
    assert out.shape == (3, 2, 1, 8, 8) and out.abs().max() <= 1
    z = encode(model, x)
    recon = decode(model, z, invert(model, x, z, schedule, 3), schedule, 3)
    assert torch.allclose(out[:, 0], recon, atol=1e-4)  # batch composition changes CPU rounding slightly
    assert not torch.allclose(out[:, 1], recon, atol=1e-3)


def test_mixed_model_fn_endpoints_match_single_codes(tiny_models):
    model, _ = tiny_models
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 100])
    z1, z2 = torch.randn(2, 8), torch.randn(2, 8)
    eps, g0 = mixed_model_fn(model, z1, z2, torch.zeros(2))(x, t)
    _, g1 = mixed_model_fn(model, z1, z2, torch.ones(2))(x, t)
    _, gh = mixed_model_fn(model, z1, z2, torch.full((2,), 0.5))(x, t)
    ref_eps, ref_g1 = model.model_fn(z1)(x, t)
    assert torch.allclose(eps, ref_eps) and torch.allclose(g0, ref_g1, atol=1e-6)
    assert torch.allclose(g1, model.model_fn(z2)(x, t)[1], atol=1e-6)
    assert torch.allclose(gh, (g0 + g1) / 2, atol=1e-6)


def test_interpolate_shapes_and_endpoints(tiny_models):
    model, schedule = tiny_models
    a, b = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    out = interpolate(model, schedule, a, b, [0.0, 0.5, 1.0], steps=3)
    assert set(out) == {"lerp", "mix"} and out["lerp"].shape == out["mix"].shape == (2, 3, 1, 8, 8)
    assert torch.allclose(out["lerp"][:, 0], out["mix"][:, 0], atol=1e-5)  # alpha 0: both are image a's decoding
    assert torch.allclose(out["lerp"][:, 2], out["mix"][:, 2], atol=1e-5)
    with pytest.raises(Exception, match="unknown interpolation mode"):
        interpolate(model, schedule, a, b, [0.0], steps=2, modes=["cubic"])


def test_balanced_subset_cycles_classes_and_figure_targets():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    sub = balanced_subset(labels, 7, seed=1)
    assert labels[sub].tolist()[:6] == [0, 1, 2, 0, 1, 2] and len(set(sub.tolist())) == 7
    assert len(balanced_subset(None, 4, size=10)) == 4
    targets = figure_targets(labels[sub], {0: "c0", 1: "c1", 2: "c2"}, ["c0", "c1", "c2"], 6)
    assert all(t != f"c{int(k)}" for t, k in zip(targets, labels[sub][:6], strict=True))


# --- the classify stage ---------------------------------------------------------------------------------------------


def _load_stage():
    spec = importlib.util.spec_from_file_location("classify_stage", ROOT / "stages/classify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RecordingRun:
    def __init__(self) -> None:
        self.artifacts: list[str] = []
        self.metrics: dict = {}

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(Path(path).name)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)


def test_classify_stage_on_tiny_project(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    (tiny_project / "params.yaml").write_text(
        "base:\n  image_size: 8\n  threads: 1\n  device: cpu\n"
        "classify:\n  xT_steps: 2\n  steps: 2\n  scales: [0.0, 1.0]\n  manipulation_images: 20\n"
        "  figure_images: 3\n  interpolate_pairs: 2\n  interpolate_frames: 3\n  selection_images: 10\n"
    )
    run = _RecordingRun()
    monkeypatch.setattr("pdae.stage.stage_run", lambda name, params=None: contextlib.nullcontext(run))
    stage = _load_stage()
    from pdae.stage import stage_main

    stage_main("classify", ["classify"], stage.body, metrics_file="metrics/classify.json")
    metrics = json.loads((tiny_project / "metrics/classify.json").read_text())
    for key in ("auroc_mean_z", "auroc_mean_pixels", "auroc_mean_xT", "linear_acc_z", "linear_acc_pixels"):
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["auroc"]) == {f"digit_{k}" for k in range(10)}
    assert 0 <= metrics["manipulation_success"] <= 1 and metrics["manipulation_scale"] == 1.0
    assert metrics["xT_probe_steps"] == 2 and metrics["manipulation_images"] == 20
    assert 0 <= metrics["direction_auroc_mean_z"] <= 1
    sel = metrics["direction_c_selection"]  # chosen on validation images (train split), never on the test split
    assert sel["candidates"] == [0.01, 0.1, 1.0] and sel["validation_images"] == 10 and metrics["n_validation"] > 0
    scores = sel["validation_manipulation_success"]
    assert len(scores) == 3 and all(0 <= v <= 1 for v in scores)
    assert metrics["direction_c"] == sel["selected"] == sel["candidates"][scores.index(max(scores))]
    assert json.loads((tiny_project / "models/classifier/config.json").read_text())["direction_c"] == sel["selected"]
    dirs = AttributeDirections.load(tiny_project / "models/classifier")
    assert dirs.names == [f"digit_{k}" for k in range(10)] and dirs.directions.shape == (10, 8)
    assert torch.allclose(dirs.directions.norm(dim=1), torch.ones(10), atol=1e-5)
    table = pd.read_csv(tiny_project / "reports/classify.csv")
    assert list(table.columns) == ["attribute", "test_positive", "auroc_z", "auroc_pixels", "auroc_xT"]
    assert "| digit_0 |" in (tiny_project / "reports/classify.md").read_text()
    assert {"manipulation.png", "interpolation.png", "classify.md", "classify.json"} <= set(run.artifacts)
    assert run.metrics["manipulation_success"] == metrics["manipulation_success"]


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_manipulate_index_and_file(tiny_project, monkeypatch, tmp_path):
    from pdae.cli import app

    monkeypatch.chdir(tiny_project)
    _write_directions(tiny_project, ["digit_0", "digit_1"])
    res = runner.invoke(app, ["manipulate", "--index", "0", "--index", "5", "--attr", "digit_1", "-s", "0", "-s", "1",
                              "-s", "2", "--steps", "2", "--zoom", "2", "--out", "edit.png"])  # fmt: skip
    assert res.exit_code == 0, res.output
    with Image.open(tiny_project / "edit.png") as img:  # 2 rows x (input + 3 scales) of 16 px tiles, 1 px padding
        assert img.size == (4 * 17 + 1, 2 * 17 + 1)
    Image.fromarray((torch.rand(20, 30, 3) * 255).byte().numpy()).save(tmp_path / "in.jpg")
    res = runner.invoke(app, ["manipulate", str(tmp_path / "in.jpg"), "--attr", "digit_0", "--steps", "2",
                              "--zoom", "1", "--out", str(tmp_path / "o.png")])  # fmt: skip
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "o.png") as img:
        assert img.size == (4 * 9 + 1, 9 + 1)  # default scales 0, 1, 2 at 8 px


def test_cli_manipulate_errors(tiny_project, monkeypatch):
    from pdae.cli import app

    monkeypatch.chdir(tiny_project)
    res = runner.invoke(app, ["manipulate", "--index", "0", "--attr", "digit_1"])
    assert res.exit_code == 1 and "dvc repro classify" in res.output
    _write_directions(tiny_project, ["digit_0", "digit_1"])
    res = runner.invoke(app, ["manipulate", "--index", "0", "--attr", "smile"])
    assert res.exit_code == 1
    assert (
        "unknown attribute 'smile'; known attributes: digit_0, digit_1." in res.output
        and "Traceback" not in res.output
    )
    res = runner.invoke(app, ["manipulate", "--index", "99999", "--attr", "digit_0", "--steps", "1"])
    assert res.exit_code == 1 and "out of range" in res.output
    res = runner.invoke(app, ["manipulate", "nope.png", "--attr", "digit_0", "--steps", "1"])
    assert res.exit_code == 1 and "image not found: nope.png" in res.output


def test_cli_interpolate(tiny_project, monkeypatch):
    from pdae.cli import app

    monkeypatch.chdir(tiny_project)
    res = runner.invoke(app, ["interpolate", "--index", "1", "--index", "2", "--frames", "3", "--steps", "2",
                              "--zoom", "1", "--out", "interp.png"])  # fmt: skip
    assert res.exit_code == 0, res.output
    with Image.open(tiny_project / "interp.png") as img:  # rows lerp, mix; columns A + 3 frames + B
        assert img.size == (5 * 9 + 1, 2 * 9 + 1)
    fast = ["--solver", "unipc", "--inversion-steps", "3", "--mode", "mix", "--out", "fast.png"]
    res = runner.invoke(app, ["interpolate", "--index", "1", "--index", "2", "--frames", "3", "--steps", "2", *fast])
    assert res.exit_code == 0 and (tiny_project / "fast.png").is_file(), res.output
    res = runner.invoke(app, ["interpolate", "--index", "1"])
    assert res.exit_code == 1 and "exactly two images" in res.output
    res = runner.invoke(app, ["interpolate", "--index", "1", "--index", "2", "--mode", "cubic"])
    assert res.exit_code == 1 and "--mode 'cubic'" in res.output
