"""guided-diffusion (ADM) and improved-diffusion checkpoints: conversion, schedules, adapter, refusals, CLI.

State dicts are built by tests/test_convert.py's `official_shapes` (the official key layout, written from the
architecture description) and checked against its independent reference forward `ref_unet`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdae.baseline import acquire_baseline, load_schedule, load_unet
from pdae.cli import app
from pdae.config import BaseConfig, BaselineConfig
from pdae.convert import convert_dpm, convert_to_folder
from pdae.errors import PdaeError
from pdae.nets.adapter import read_dpm_spec
from pdae.nets.backbone import Backbone, load_backbone
from tests.test_convert import TOL, official_shapes, random_state, ref_unet

# (kind, flags, official layout: base, mult, nres, attention levels, heads per width, updown, scale_shift, new order)
CASES = {
    "adm-sigma-class": (
        "adm",
        "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 "
        "--num_head_channels 16 --learn_sigma True --class_cond True --resblock_updown True "
        "--use_scale_shift_norm True --diffusion_steps 1000 --noise_schedule cosine",
        (32, (1, 2), 1, {1}, lambda c: c // 16, True, True, False),
    ),
    "adm-x0-conv": (
        "adm",
        "--image_size 16 --channel_mult 1,2,2 --num_channels 32 --num_res_blocks 2 --attention_resolutions 8,4 "
        "--num_heads 2 --resblock_updown False --use_scale_shift_norm False --predict_xstart True "
        "--use_new_attention_order True --diffusion_steps 500 --noise_schedule linear",
        (32, (1, 2, 2), 2, {1, 2}, lambda c: 2, False, False, True),
    ),
    "adm-fixed-heads": (
        "adm",
        "--image_size 16 --channel_mult 1,2,3 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8,4 "
        "--num_heads 4 --resblock_updown True --diffusion_steps 1000 --noise_schedule linear",
        (32, (1, 2, 3), 1, {1, 2}, lambda c: 4, True, True, False),
    ),
    "improved-cosine-4000": (
        "improved-diffusion",
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 --num_heads 1 "
        "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine",
        (32, (1, 2, 2, 2), 1, {1}, lambda c: 1, False, True, False),
    ),
}


def write_case(tmp_path, name: str, seed: int = 0):
    kind, flags, (base, mult, nres, attn, heads_of, updown, ss, new) = CASES[name]
    out_ch = 6 if "learn_sigma True" in flags else 3
    classes = 1000 if "class_cond True" in flags else None
    shapes = official_shapes(base, mult, nres, attn, 3, out_ch, 4 * base, updown, ss, classes)
    state = random_state(shapes, seed)
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    return kind, flags, state, path


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_matches_reference(tmp_path, name) -> None:
    """Every output channel (eps / x0 and the variance half) of the converted UNet equals the reference forward."""
    kind, flags, state, path = write_case(tmp_path, name)
    base, mult, nres, attn, heads_of, *_, new = CASES[name][2]
    unet, sched, adapter = convert_dpm(path, kind, flags)
    scale, size = adapter["timestep_scale"], unet.config.sample_size
    assert adapter["attention_heads"] == (4 if name == "adm-fixed-heads" else None)
    x, t = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 371])
    y = torch.tensor([5, 999]) if unet.class_embedding is not None else None
    with torch.no_grad():
        ref = ref_unet(state, x, t * scale, base, len(mult), nres, attn, heads_of, new, y=y)
        out = unet(x, t * scale, class_labels=y).sample
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)


def test_fixed_heads_over_different_widths_through_the_folder(tmp_path) -> None:
    """4 heads on 64- and 96-channel attention: recorded in pdae_dpm.json and applied by load_backbone (and G)."""
    kind, flags, state, path = write_case(tmp_path, "adm-fixed-heads")
    convert_to_folder(path, kind, tmp_path / "out", config=flags)
    assert read_dpm_spec(tmp_path / "out").attention_heads == 4
    backbone = load_backbone(tmp_path / "out")
    assert {b.attention_heads for b in backbone.plan.blocks} == {0, 4} and backbone.plan.mid_attention_heads == 4
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        ref = ref_unet(state, x, t, 32, 3, 1, {1, 2}, lambda c: 4)
        one_head = ref_unet(state, x, t, 32, 3, 1, {1, 2}, lambda c: 1)
    torch.testing.assert_close(backbone(x, t), ref, rtol=0, atol=TOL)
    assert (ref - one_head).abs().max() > 1e-3  # the head count matters for these weights


def test_learned_sigma_and_class_label_through_the_adapter(tmp_path) -> None:
    """The folder written by convert_to_folder runs as eps: first half of the 6 channels, with the chosen label."""
    kind, flags, state, path = write_case(tmp_path, "adm-sigma-class")
    with pytest.raises(PdaeError, match="class-conditional .*1000 labels.*class_label"):
        convert_to_folder(path, kind, tmp_path / "out", config=flags)
    assert not (tmp_path / "out").exists()
    convert_to_folder(path, kind, tmp_path / "out", config=flags, class_label=7)
    spec = read_dpm_spec(tmp_path / "out")
    assert (spec.class_label, spec.prediction_type, spec.schedule.T) == (7, "epsilon", 1000)
    backbone = load_backbone(tmp_path / "out")
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = ref_unet(state, x, t, 32, 2, 1, {1}, lambda c: c // 16, y=torch.full((3,), 7))
    torch.testing.assert_close(backbone(x, t), ref[:, :3], rtol=0, atol=TOL)


def test_x0_model_and_rescaled_timesteps_give_eps(tmp_path) -> None:
    kind, flags, state, path = write_case(tmp_path, "adm-x0-conv")
    convert_to_folder(path, kind, tmp_path / "x0", config=flags)
    backbone, schedule = load_backbone(tmp_path / "x0"), load_schedule(tmp_path / "x0")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 499])
    with torch.no_grad():
        x0 = ref_unet(state, x, t, 32, 3, 2, {1, 2}, lambda c: 2, True)
    torch.testing.assert_close(backbone(x, t), schedule.eps_from_x0(x, t, x0), rtol=0, atol=1e-4)
    # improved-diffusion rescales timesteps by default: the network sees t * 1000 / T
    kind, flags, state, path = write_case(tmp_path, "improved-cosine-4000")
    convert_to_folder(path, kind, tmp_path / "imp", config=flags)
    spec = read_dpm_spec(tmp_path / "imp")
    assert spec.timestep_scale == 0.25 and spec.schedule.T == 4000
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([4, 3999])
    with torch.no_grad():
        ref = ref_unet(state, x, t * 0.25, 32, 4, 1, {1}, lambda c: 1)
    torch.testing.assert_close(load_backbone(tmp_path / "imp")(x, t), ref[:, :3], rtol=0, atol=TOL)


def _official_abar(schedule: str, T: int) -> np.ndarray:
    """The two codes' get_named_beta_schedule, written from their description (float64)."""
    if schedule == "linear":
        betas = np.linspace(0.1 / T, 20.0 / T, T, dtype=np.float64)
    else:
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("schedule,T", [("linear", 1000), ("linear", 500), ("cosine", 4000), ("cosine", 100)])
def test_flag_schedules(schedule, T) -> None:
    from pdae.convert.adm import adm_spec
    from pdae.nets.adapter import schedule_from_config

    flags = {"image_size": 32, "num_channels": 32, "diffusion_steps": T, "noise_schedule": schedule}
    _, sched, scale = adm_spec("improved-diffusion", flags, "flags")  # scale: the timestep input scale
    assert scale == 1000 / T
    ours = schedule_from_config(sched).abar.numpy()
    np.testing.assert_allclose(ours, _official_abar(schedule, T), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "kind,flags,words",
    [
        ("adm", "--image_size 512 --num_channels 32", "fractional multipliers"),
        ("adm", "--image_size 64 --num_channels 32 --num_heads_upsample 2", "num_heads_upsample 2"),
        ("adm", "--image_size 64 --num_chanels 32", "unknown adm flags num_chanels"),
        ("adm", "--large_size 256 --small_size 64 --num_channels 192", "super-resolution model"),
        ("adm", "--image_size 64 --learn_sigma maybe", "learn_sigma must be True or False"),
        ("improved-diffusion", "--image_size 128", "no default channel_mult for image_size 128"),
        ("improved-diffusion", "--image_size 32 --noise_schedule sqrt", "noise_schedule 'sqrt'"),
        ("adm", "image_size 64", "not found"),
    ],
)
def test_unsupported_flags_are_refused(tmp_path, kind, flags, words) -> None:
    path = tmp_path / "m.pt"
    torch.save({"time_embed.0.weight": torch.zeros(1)}, path)
    with pytest.raises(PdaeError, match=words) as err:
        convert_dpm(path, kind, flags)
    assert "\n" not in str(err.value)


def test_foreign_families_are_refused(tmp_path) -> None:
    """Score-SDE (Fourier time), EDM / VE schedulers and text-conditioned UNets: one line naming what was found."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    sde = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",), layers_per_block=1, time_embedding_type="fourier", norm_num_groups=8,
    )  # fmt: skip
    with pytest.raises(PdaeError, match="'fourier' time embedding .*score-SDE"):
        Backbone(sde)
    text = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",), layers_per_block=1, cross_attention_dim=8, norm_num_groups=8,
    )  # fmt: skip
    text.save_pretrained(tmp_path / "sd" / "unet")
    with pytest.raises(PdaeError, match="holds a UNet2DConditionModel, not a UNet2DModel"):
        load_unet(tmp_path / "sd")
    folder = tmp_path / "ve"
    sde.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 348}))
    base = BaseConfig(image_size=8, seed=0)
    with pytest.raises(PdaeError, match="ScoreSdeVeScheduler is a score-SDE variance-exploding"):
        acquire_baseline(BaselineConfig(source="diffusers", path=str(folder)), base, torch.zeros(1, 3, 8, 8),
                         tmp_path / "out", torch.device("cpu"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_baseline_stage_source_adm(tmp_path) -> None:
    """baseline.source=adm converts once into models/baseline with schedule, prediction type and label."""
    kind, flags, state, path = write_case(tmp_path, "adm-sigma-class")
    cfg = BaselineConfig(source="adm", path=str(path), config=flags, class_label=3)
    acquire_baseline(cfg, BaseConfig(image_size=16, seed=0), torch.zeros(1, 3, 16, 16), tmp_path / "bl", "cpu")
    spec = read_dpm_spec(tmp_path / "bl")
    assert spec.class_label == 3 and spec.schedule.T == 1000
    np.testing.assert_allclose(spec.schedule.abar.numpy(), _official_abar("cosine", 1000), rtol=1e-12)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([250])
    with torch.no_grad():
        ref = ref_unet(state, x, t, 32, 2, 1, {1}, lambda c: c // 16, y=torch.tensor([3]))
    torch.testing.assert_close(load_backbone(tmp_path / "bl")(x, t), ref[:, :3], rtol=0, atol=TOL)


def test_cli_convert_kinds(tmp_path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, ["convert", "--help"], terminal_width=200).output
    for kind in ("pdae-official", "diffae", "adm", "improved-diffusion"):
        assert kind in help_text
    _, flags, _, path = write_case(tmp_path, "improved-cosine-4000")
    res = runner.invoke(app, ["convert", str(path), str(tmp_path / "o"), "--kind", "improved-diffusion",
                              f"--config={flags}"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "scheduler_config.json").read_text())["beta_schedule"] == "squaredcos_cap_v2"
    res = runner.invoke(app, ["convert", str(path), str(tmp_path / "p"), "--kind", "score-sde"])
    assert res.exit_code != 0 and "--kind 'score-sde' is not supported" in res.output
    assert not (tmp_path / "p").exists()
