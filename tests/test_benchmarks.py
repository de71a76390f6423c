"""Smoke tests of the benchmarks: the Diff-AE-style model and each script's functions at tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import p1_efficiency as p1
from benchmarks import p2_step_cost as p2
from benchmarks import p3_sampler as p3
from benchmarks import p4_pipeline as p4
from benchmarks import p6_solvers as p6
from benchmarks.common import interleaved, paired_ratio, table
from benchmarks.diffae_style import (
    CondUNet,
    DiffAEStyle,
    count_parameters,
    diffae_loss,
    level_plan,
    matched_channels,
    train_diffae,
)
from pdae.config import BaseConfig, TrainConfig
from pdae.diffusion import Schedule
from pdae.errors import PdaeError
from pdae.sampling import ddim_invert, ddim_sample


def _tiny_model() -> DiffAEStyle:
    torch.manual_seed(0)
    return DiffAEStyle(8, 1, 4, [8, 16], attention_head_dim=8)


# ---- the Diff-AE-style model -------------------------------------------------------------------------------------
def test_diffae_style_starts_at_zero_and_conditions_on_z():
    model = _tiny_model().eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    z = model.encode(x)
    assert z.shape == (3, 4)
    assert torch.equal(model(x, t, z), torch.zeros(3, 1, 8, 8))  # zero-initialised residual branches and output
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a, b = model(x, t, z), model(x, t, z + 1.0)
    assert a.shape == (3, 1, 8, 8) and not torch.allclose(a, b)
    assert torch.allclose(model(x, torch.tensor(500), z)[1], a[1], atol=1e-6)  # scalar t broadcasts
    eps, g = model.model_fn(z)(x, t)
    assert g is None and torch.equal(eps, a)


def test_diffae_style_every_resblock_sees_z_and_samplers_run():
    model = _tiny_model().eval()
    blocks = [m for m in model.unet.modules() if hasattr(m, "z_proj")]
    # down: 1 + down + 1 ; mid: 2 ; up: 2 + 1 up + 2  (the level plan of build_unet with layers_per_block=1)
    assert len(blocks) == 3 + 2 + 5
    assert [b.resample for b in blocks].count("down") == 1 and [b.resample for b in blocks].count("up") == 1
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    fn = model.model_fn(model.encode(x))
    s = Schedule.linear(1000)
    rec = ddim_sample(fn, ddim_invert(fn, x, s, 5), s, 5)
    assert rec.shape == x.shape and torch.isfinite(rec).all()


def test_matched_channels_picks_the_closest_width():
    target = count_parameters(CondUNet(8, 1, [16, 32], 4, attention_head_dim=8))
    assert matched_channels(target, [8, 16], 8, 1, 4, attention_head_dim=8) == [16, 32]
    assert level_plan([32, 64, 64], 40) == [40, 80, 80]


def test_diffae_loss_consumes_the_generator_like_pdae_loss():
    from pdae.fit import pdae_loss
    from pdae.nets import PDAE, Backbone, build_unet

    s = Schedule.linear(1000)
    model = _tiny_model()
    pdae = PDAE(Backbone(build_unet(8, 1, [8, 16], 1, 8)), 4)
    x0 = (torch.rand(4, 1, 8, 8) * 2 - 1,)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    diffae_loss(s)({"encoder": model.encoder, "unet": model.unet}, x0, g1).backward()
    pdae_loss(pdae.backbone, s)({"encoder": pdae.encoder, "gradient": pdae.gradient}, x0, g2)
    assert torch.equal(g1.get_state(), g2.get_state())  # same (t, eps) draws step for step


def test_train_diffae_resumes_into_successive_checkpoints(tmp_path: Path):
    s, base = Schedule.linear(1000), BaseConfig(image_size=8, seed=0)
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    cfg = TrainConfig(z_dim=4, batch_size=8, images=16)
    ckpt = tmp_path / "state.safetensors"
    _, r1 = train_diffae(_tiny_model(), s, x, base, cfg, torch.device("cpu"), ckpt)
    m2, r2 = train_diffae(_tiny_model(), s, x, base, cfg.model_copy(update={"images": 32}), torch.device("cpu"), ckpt)
    m3, _ = train_diffae(_tiny_model(), s, x, base, cfg.model_copy(update={"images": 32}), torch.device("cpu"), None)
    assert (r1.images_seen, r2.images_seen, r2.resumed_from) == (16, 32, 2)
    for a, b in zip(m2.parameters(), m3.parameters(), strict=True):
        assert torch.equal(a, b)  # resumed = uninterrupted


# ---- common -------------------------------------------------------------------------------------------------------
def test_interleaved_and_paired_ratio():
    calls: list[str] = []
    res = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"] and len(res["a"]["wall"]) == 2
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert "| x " in table([[1, 0.5, None]], ["x", "y", "z"])


# ---- P1 -----------------------------------------------------------------------------------------------------------
def test_images_to_reach_interpolates_and_bounds():
    curve = [(1000, 0.2), (4000, 0.6)]
    hit = p1.images_to_reach(curve, 0.4, True)
    assert hit["bound"] == "exact" and math.isclose(hit["images"], 2000.0)  # midway in log(images)
    assert p1.images_to_reach(curve, 0.1, True) == {"images": 1000.0, "bound": "at_most"}
    assert p1.images_to_reach(curve, 0.9, True) == {"images": 4000.0, "bound": "more_than"}
    assert math.isclose(p1.images_to_reach([(0, 1.0), (100, 0.0)], 0.25, False)["images"], 75.0)  # linear from 0


def test_ratios_on_synthetic_curves():
    rows = {
        "pdae": [{"images": 0, "random_ssim": 0.1}, {"images": 100, "random_ssim": 0.5}],
        "diffae": [{"images": 100, "random_ssim": 0.2}, {"images": 400, "random_ssim": 0.6}],
    }
    r = p1.ratios(rows, baseline_images=300)["random_ssim"]
    need = r["diffae_images_to_reach_pdae_final"]
    assert need["bound"] == "exact" and 100 < need["images"] < 400
    assert math.isclose(r["diffae_over_pdae"]["ratio"], need["images"] / 100)
    assert math.isclose(r["diffae_over_pdae_plus_pretraining"]["ratio"], need["images"] / 400)
    assert r["diffae_final_over_pdae_needed"] == {"ratio": 4.0, "bound": "less_than"}  # PDAE never reaches 0.6
    (eq,) = r["equal_quality"]
    assert eq["pdae_images"] == 100 and math.isclose(eq["ratio"], need["images"] / 100)
    again = p1.reanalyse({"rows": rows, "inputs": {"baseline_images": 300}, "ratios": {}})
    assert again["ratios"]["random_ssim"] == p1.ratios(rows, 300)["random_ssim"] and again["met"] is True


def test_ratios_not_defined_for_non_monotone_curves_or_quality_reached_at_0_images():
    rows = {
        "pdae": [
            {"images": 0, "random_ssim": 0.1, "inferred_ssim": 0.99, "random_mse": 0.5},
            {"images": 100, "random_ssim": 0.5, "inferred_ssim": 0.995, "random_mse": 0.2},
            {"images": 200, "random_ssim": 0.6, "inferred_ssim": 0.996, "random_mse": 0.1},
        ],
        "diffae": [
            {"images": 100, "random_ssim": 0.2, "inferred_ssim": 0.993, "random_mse": 0.9},
            {"images": 400, "random_ssim": 0.7, "inferred_ssim": 0.98, "random_mse": 0.4},
            {"images": 800, "random_ssim": 0.8, "inferred_ssim": 0.997, "random_mse": 0.05},
        ],
    }
    rows["pdae"][0]["random_agreement"] = 1.0  # a quality PDAE has before any training
    for r in rows["pdae"] + rows["diffae"]:
        r.setdefault("random_agreement", 1.0)
    out = p1.ratios(rows, baseline_images=None)
    assert out["random_ssim"].get("not_defined") is None and out["random_ssim"]["diffae_over_pdae"]["ratio"] > 1
    assert out["random_mse"].get("not_defined") is None
    assert (
        "Diff-AE-style curve not monotone (0.993 at 100 images -> 0.98 at 400)" in out["inferred_ssim"]["not_defined"]
    )
    assert "PDAE at 0 images (1) already reaches PDAE's final 1" in out["random_agreement"]["not_defined"]
    for key in ("inferred_ssim", "random_agreement"):
        assert out[key]["diffae_over_pdae"] == {"ratio": None, "bound": "not defined",
                                                "reason": out[key]["not_defined"]}  # fmt: skip
    rows["pdae"][1]["random_ssim"] = 0.05  # a dip makes the headline ill-defined, so the target is not met
    res = p1.reanalyse({"rows": rows, "inputs": {"baseline_images": None}, "ratios": {}})
    assert "PDAE curve not monotone" in res["ratios"]["random_ssim"]["not_defined"] and res["met"] is False


def test_p1_run_on_the_tiny_project(tiny_project_template: Path, tmp_path: Path):
    settings = {
        "pdae_checkpoints": [0, 32],
        "diffae_checkpoints": [32, 64],
        "eval_images": 4,
        "steps": 3,
        "train_overrides": {"batch_size": 16, "z_dim": 8},
    }
    root = tiny_project_template
    res = p1.run(tmp_path, settings, root / "data/prepared", root / "models/baseline", threads=1, log=lambda m: None)
    assert [r["images"] for r in res["rows"]["pdae"]] == [0, 32]
    assert [r["images"] for r in res["rows"]["diffae"]] == [32, 64]
    assert set(p1.METRICS) <= set(res["rows"]["diffae"][-1])
    assert "random_ssim" in res["ratios"] and "headline" in p1.report(res)
    json.dumps(res)  # JSON-serialisable
    assert not list(tmp_path.glob("*_state.safetensors"))  # training checkpoints cleaned up


# ---- P2 -----------------------------------------------------------------------------------------------------------
def test_p1_checkpoint_lists_from_the_command_line():
    import argparse

    assert p1._counts("0,4096, 8192") == [0, 4096, 8192]
    for bad in ("5,3", "4096,4096", "-1,2", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            p1._counts(bad)


def test_saved_bytes_counts_distinct_non_parameter_storages():
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    _, nbytes, count = p2.saved_bytes(lambda: (a * b).sum(), set())
    assert (nbytes, count) == (80, 2)
    _, nbytes, _ = p2.saved_bytes(lambda: (a * b).sum(), {a.untyped_storage().data_ptr()})
    assert nbytes == 40


def test_p2_run_small():
    res = p2.run(batch_size=2, rounds=2, repeats=1, warmup=1)
    r = res["ratios"]
    assert r["time_wall_pdae_over_diffae"] > 0 and 0 < r["activation_pdae_over_diffae"] < 10
    assert all(m["activation_bytes"] > 0 and m["peak_step_bytes"] > 0 for m in res["models"].values())
    assert "activation memory" in p2.report(res)


# ---- P3 -----------------------------------------------------------------------------------------------------------
def test_p3_run_small():
    res = p3.run(batch=2, steps=3, rounds=1)
    for m in res["models"].values():
        assert m["network_evaluations"] == 6
        assert m["inversion_images_per_second"] > 0 and m["overhead_decomposed_cpu"] >= 0
    assert res["primary"] == "overhead_decomposed_cpu" and "overhead" in p3.report(res)


# ---- P4 -----------------------------------------------------------------------------------------------------------
def test_p4_project_copy_and_parsing(tmp_path: Path):
    project = p4.make_project(tmp_path / "proj", tiny=True, overrides=["train.lr=0.001"])
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["base"]["image_size"] == 8 and params["train"]["lr"] == 0.001
    assert (project / ".dvc").is_dir() and (project / "stages").is_dir() and (project / "pdae/__init__.py").is_file()
    assert not list((project / "pdae").rglob("__pycache__"))
    order = p4.stage_order(project)
    assert order[:3] == ["prepare", "baseline", "train"]
    assert p4.stage_metrics_files(project)["train"] == ["metrics/train.json"]
    (project / "metrics").mkdir()
    (project / "metrics/train.json").write_text(json.dumps({"stage_seconds": 12.5}))
    secs = p4.read_stage_seconds(project)
    assert secs["train"] == 12.5 and secs["prepare"] is None
    walls = p4.stage_times([("prepare", 1.0), ("baseline", 3.0)], total=10.0)
    assert walls == {"prepare": 2.0, "baseline": 7.0}
    res = {
        "params": "tiny",
        "stages": {k: {"wall_seconds": v, "stage_seconds": None} for k, v in walls.items()},
        "repro_from_empty_seconds": 10.0,
        "repro_from_empty_cpu_seconds": 9.0,
        "noop_repro_seconds": 1.0,
        "noop_repro_cpu_seconds": 0.9,
    }
    assert "no-op dvc repro" in p4.report(res)


def test_p2_checkpointing_small():
    root = Path(__file__).resolve().parents[1]
    res = p2.run_checkpointing(batch_size=2, rounds=1, params=root / "params.yaml")
    v = res["variants"]
    assert v["checkpointed"]["activation_bytes_retained"] < v["plain"]["activation_bytes_retained"]
    assert "activation memory" in p2.report_checkpointing(res)
    json.dumps(res)


def test_p6_run_on_the_tiny_project(tiny_project, tmp_path: Path):
    from tests.test_evaluate import tiny_latent

    tiny_latent(tiny_project)
    before = sorted(p.relative_to(tiny_project) for p in tiny_project.rglob("*"))
    args = ["--root", str(tiny_project), "--nfe", "3", "6", "--n-images", "4", "--n-samples", "8"]
    res = p6.main([*args, "--inversion-steps", "3", "--threads", "1", "--out", str(tmp_path)])
    assert [(r["solver"], r["nfe"]) for r in res["rows"]] == [(s, n) for s in p6.SOLVERS for n in (3, 6)]
    assert all(0 <= r["latent_fd_lo"] <= r["latent_fd_hi"] and r["latent_fd"] > 0 for r in res["rows"])
    assert (tmp_path / "p6_solvers.json").is_file() and (tmp_path / "p6_solvers.png").is_file()
    assert sorted(p.relative_to(tiny_project) for p in tiny_project.rglob("*")) == before  # root left untouched
    with pytest.raises(PdaeError, match="lacks models/baseline, models/pdae, models/latent"):
        p6.main(["--root", str(tmp_path), "--out", str(tmp_path)])


@pytest.mark.parametrize("module", [p1, p2, p3, p4, p6])
def test_scripts_have_a_main_and_a_report(module):
    assert callable(module.main) and callable(module.report)
