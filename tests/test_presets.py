"""Paper presets (configs/*.yaml): complete, valid params files with the paper's values, and baselines that the
converter and the PDAE adapter accept. Nothing is trained or downloaded; full-size networks are built on the meta
device."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pdae.config import SECTIONS, load_params
from pdae.convert.api import DIFFAE_FILE, PDAE_FILES
from pdae.convert.spec import diffae_preset, diffae_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOC = ROOT / "docs" / "reproduce.md"

# Per-dataset values: image size, PDAE training length, latent MLP depth / weight decay / length, attribute table.
EXPECTED = {
    "ffhq128": (128, 64_000_000, 10, 0.01, 101_000_000, None),
    "celebahq128": (128, 64_000_000, 10, 0.01, 101_000_000, "CelebAMask-HQ-attribute-anno.txt"),
    "horse128": (128, 64_000_000, 20, 0.0, 2_001_000_000, None),
    "bedroom128": (128, 60_000_000, 20, 0.0, 2_001_000_000, None),
    "celeba64": (64, 36_000_000, 10, 0.01, 301_000_000, "list_attr_celeba.txt"),
}
# Keys allowed to differ between presets; everything else is shared.
PER_DATASET = {
    "base": {"image_size"},
    "prepare": {"test_fraction", "folder", "attributes"},
    "baseline": {"path", "config", "sample_size", "images"},
    "train": {"images"},
    "latent": {"depth", "images", "weight_decay", "fewshot_attributes"},
}
NAMES = sorted(EXPECTED)


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def load(name: str, overrides: list[str] | None = None) -> dict:
    return load_params(CONFIGS / f"{name}.yaml", sections=list(SECTIONS), overrides=overrides)


def diffae_alternative(name: str) -> list[str]:
    """The `-S baseline.key=value` overrides documented in the preset's comments (Diff-AE checkpoint instead)."""
    return re.findall(r"-S (baseline\.\w+=\S+)", (CONFIGS / f"{name}.yaml").read_text())


def test_the_five_presets_exist():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_preset_is_a_complete_valid_params_file(name):
    cfg = load(name)
    assert set(cfg) == set(SECTIONS)
    preset, default = raw(name), yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(preset) == set(SECTIONS)
    for section, values in default.items():
        missing = set(values) - set(preset[section])
        assert not missing, f"{name}: {section} lacks {sorted(missing)} of params.yaml"


@pytest.mark.parametrize("name", NAMES)
def test_paper_values(name):
    size, images, depth, wd, latent_images, attributes = EXPECTED[name]
    cfg = load(name)
    base, prep, bl, tr, lat, ev = (cfg[s] for s in ("base", "prepare", "baseline", "train", "latent", "evaluate"))
    assert (base.dataset, base.image_size, base.device) == ("folder", size, "auto")
    assert prep.folder.startswith("data/raw/")
    assert (Path(prep.attributes).name if prep.attributes else None) == attributes
    assert (tr.z_dim, tr.batch_size, tr.lr, tr.ema_decay) == (512, 128, 1e-4, 0.9999)
    assert (tr.weighting, tr.gamma, tr.hflip, tr.images) == ("pdae", 0.1, True, images)
    assert tr.dropout == 0.1 and not (tr.ema_warmup or bl.ema_warmup or lat.ema_warmup)  # official code
    assert tr.g_skip_norm == "joint"
    assert tr.images % tr.batch_size == 0
    assert (lat.depth, lat.width, lat.weight_decay, lat.images) == (depth, 2048, wd, latent_images)
    assert (lat.beta, lat.T, lat.loss, lat.lr, lat.batch_size, lat.ema_decay) == (0.008, 1000, "l1", 1e-3, 512, 0.9999)
    assert lat.clip_noise and lat.clip_x0 and lat.shift_fraction == 0.7
    assert ev.steps == [10, 20, 50, 100] and ev.inversion_steps == 1000 and ev.n_boot >= 2
    assert bl.sample_size == size


def test_attribute_presets_run_fewshot_on_the_d2c_pairs():
    for name in ("celeba64", "celebahq128"):
        lat = load(name)["latent"]
        assert lat.fewshot_attributes == ["Male", "Blond_Hair"] and lat.fewshot_features == "inception"
    assert load("ffhq128")["latent"].fewshot_attributes is None


def test_ffhq128_is_500k_steps_at_batch_128():
    tr = load("ffhq128")["train"]
    assert tr.images // tr.batch_size == 500_000


def test_presets_differ_only_in_per_dataset_keys():
    presets = {n: raw(n) for n in NAMES}
    for section, values in presets["ffhq128"].items():
        for key in set(values) - PER_DATASET.get(section, set()):
            seen = {n: p[section][key] for n, p in presets.items()}
            assert len({repr(v) for v in seen.values()}) == 1, f"{section}.{key} differs: {seen}"


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_layout(name):
    bl, size = load(name)["baseline"], EXPECTED[name][0]
    path = Path(bl.path)
    assert bl.source == "pdae-official"
    assert path.name == PDAE_FILES[0] and Path(bl.config) == path.with_name(PDAE_FILES[1])
    assert path.parent.name == name and path.parent.parent.name == "pre-trained-dpms"
    # the converter's fallback size (trailing digits of the folder) agrees with the preset
    assert int(re.search(r"(\d+)$", path.parent.name).group(1)) == size


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_converts_at_the_preset_paths(name, tmp_path, monkeypatch):
    """A tiny stand-in written where the preset looks goes through the baseline stage's conversion."""
    from pdae.baseline import acquire_baseline
    from tests.test_convert import pdae_state, write_pdae

    cfg = load(name)
    base, bl = cfg["base"], cfg["baseline"]
    monkeypatch.chdir(tmp_path)
    write_pdae(Path(bl.path).parent, pdae_state())
    size = base.image_size
    images = torch.zeros(1, 3, size, size)
    metrics, history = acquire_baseline(bl, base, images, "models/baseline", torch.device("cpu"))
    assert metrics["source"] == "pdae-official" and history == []
    config = yaml.safe_load((tmp_path / "models/baseline/config.json").read_text())
    assert config["sample_size"] == size


@pytest.mark.parametrize("name", NAMES)
def test_diffae_alternative(name):
    overrides = diffae_alternative(name)
    if name == "celeba64":  # Diff-AE publishes no CelebA64 DDIM checkpoint
        assert overrides == []
        return
    bl = load(name, overrides)["baseline"]
    assert bl.source == "diffae" and Path(bl.path).name == DIFFAE_FILE
    assert Path(bl.path).parent.name == bl.config and Path(bl.path).parent.parent.name == "checkpoints"
    spec = diffae_spec(diffae_preset(bl.config))
    assert spec.channels == (128, 128, 256, 384, 512) and spec.sample_size == 128


@pytest.mark.parametrize("name", [n for n in NAMES if diffae_preset(n) is not None])
def test_full_size_network_fits_the_adapter(name):
    """The paper's network for the preset, at the preset's size, builds in diffusers and PDAE wraps it."""
    from diffusers import UNet2DModel

    from pdae.nets.backbone import Backbone
    from pdae.nets.pdae import PDAE

    cfg = load(name)
    size, z_dim = cfg["base"].image_size, cfg["train"].z_dim
    unet_cfg = {**diffae_spec(diffae_preset(name)).diffusers_config(), "sample_size": cfg["baseline"].sample_size}
    with torch.device("meta"):
        unet = UNet2DModel(**unet_cfg)
        model = PDAE(Backbone(unet), z_dim, cfg["train"].encoder_channels, cfg["train"].dropout)
    assert model.backbone.image_size == size and model.z_dim == 512
    assert 90e6 < sum(p.numel() for p in unet.parameters()) < 110e6
    assert sum(p.numel() for p in model.trainable_parameters()) > 50e6


@pytest.mark.parametrize("name", NAMES)
def test_documented_overrides_reproduce_the_preset(name, tmp_path, monkeypatch):
    """docs/reproduce.md's snippet turns a preset into `dvc exp run -S` overrides; DVC's own parser applies them."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    doc = DOC.read_text()
    snippet = re.search(r"<<'EOF'\n(.*?)\nEOF", doc[doc.index("<!-- preset-overrides -->") :], re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", snippet, str(CONFIGS / f"{name}.yaml")], capture_output=True, text=True, check=True
    ).stdout
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for path, overrides in to_path_overrides([w for w in out.split() if w != "-S"]).items():
        apply_overrides(path, overrides)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == raw(name)


def test_reproduce_doc_names_every_preset():
    doc = DOC.read_text()
    for name in NAMES:
        assert f"configs/{name}.yaml" in doc
    assert "9.4e-6" in doc and "Verification of the conversion" in doc
