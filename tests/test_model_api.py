"""DiffusionAutoencoder (pdae.model), `pdae export` and the folder format, on the tiny project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdae.cli import app
from pdae.errors import PdaeError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def add_latent_and_directions(project: Path) -> None:
    """Give the tiny project a (random) latent DPM, attribute directions, params.yaml and metrics, as a run has."""
    from pdae.io import load_tensors, write_json
    from pdae.latent import LatentDPM, save_latent
    from pdae.nets.latent import LatentMLP
    from pdae.probes import AttributeDirections, Normaliser

    stats = load_tensors(project / "latents/stats.safetensors")
    gen = torch.Generator().manual_seed(1)
    mlp = LatentMLP(8, depth=2, width=16, time_dim=8, time_width=16)
    save_latent(LatentDPM(mlp, stats["mean"], stats["std"]), project / "models/latent")
    w = torch.randn(2, 8, generator=gen)
    dirs = AttributeDirections(
        ["digit_0", "digit_1"],
        w / w.norm(dim=1, keepdim=True),
        w,
        torch.zeros(2),
        Normaliser(stats["mean"], stats["std"]),
    )
    dirs.save(project / "models/classifier", extra={"direction_c": 0.01})
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_json(project / "metrics/prepare.json", {"dataset": "digits", "n_train": 100, "n_test": 20})
    write_json(project / "metrics/train.json", {"final_loss": 0.5, "gap": {"t": [1, 2]}})


@pytest.fixture()
def run_dir(tiny_project, monkeypatch) -> Path:
    add_latent_and_directions(tiny_project)
    monkeypatch.chdir(tiny_project)
    return tiny_project


def _export(out: str = "export") -> Path:
    res = runner.invoke(app, ["export", out])
    assert res.exit_code == 0, res.output
    return Path(out).resolve()


def test_export_folder_format_and_card(run_dir):
    folder = _export()
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == [
        "README.md", "config.json", "directions/config.json", "directions/directions.safetensors",
        "latent/latent.safetensors", "latent/latent_config.json", "pdae/pdae.safetensors", "pdae/pdae_config.json",
        "scheduler/scheduler_config.json", "stats/config.json", "stats/stats.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "pdae-autoencoder-v1" and cfg["z_dim"] == 8 and cfg["attributes"] == ["digit_0", "digit_1"]
    assert cfg["sampling"]["latent_steps"] == 50 and cfg["sampling"]["shift_fraction"] == 1.0  # from params.yaml
    card = (folder / "README.md").read_text()
    from pdae.export import sha256_file

    for name in names[1:]:  # every file but the card itself is listed with its digest
        assert f"| `{name}` | `{sha256_file(folder / name)}` |" in card
    assert "source: `train`" in card and "dataset: `digits`" in card and "n_train: 100" in card
    assert "| final_loss | 0.5 |" in card and "probe_c: 1.0" in card  # metrics and params sections
    # Weights are the run's tensors exactly.
    from pdae.io import load_tensors

    for a, b in (("pdae/pdae.safetensors", "models/pdae/pdae.safetensors"),
                 ("latent/latent.safetensors", "models/latent/latent.safetensors"),
                 ("stats/stats.safetensors", "latents/stats.safetensors"),
                 ("directions/directions.safetensors", "models/classifier/directions.safetensors"),
                 ("unet/diffusion_pytorch_model.safetensors",
                  "models/baseline/diffusion_pytorch_model.safetensors")):  # fmt: skip
        ta, tb = load_tensors(folder / a), load_tensors(run_dir / b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


FRESH = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from pdae import DiffusionAutoencoder
ae = DiffusionAutoencoder.from_pretrained(sys.argv[1])
x = load_file(sys.argv[2])["x"]
z = ae.encode(x)
rec = ae.reconstruct(x, steps=5)
rnd = ae.reconstruct(x, steps=5, x_T="random", generator=torch.Generator().manual_seed(3))
save_file({"z": z, "rec": rec, "rnd": rnd}, sys.argv[3])
"""


def test_export_loads_in_a_fresh_process_bitwise(run_dir, tmp_path):
    """The issue's promise: with only the folder, same z and reconstructions as the library on the run files."""
    from safetensors.torch import load_file, save_file

    from pdae.autoencode import encode, load_models, reconstruct
    from pdae.data import load_split

    folder = _export()
    x, _ = load_split(run_dir / "data/prepared", "test")
    x = x[:4].contiguous()
    model, schedule = load_models(run_dir / "models/baseline", run_dir / "models/pdae")
    z_ref = encode(model, x)
    rec_ref = reconstruct(model, x, schedule, steps=5)
    rnd_ref = reconstruct(model, x, schedule, steps=5, x_T="random", generator=torch.Generator().manual_seed(3))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copytree(folder, alone / "model")  # the folder alone: nothing else of the project beside it
    save_file({"x": x}, str(alone / "x.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH), "model", "x.safetensors", "out.safetensors"],
        cwd=alone, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(alone / "out.safetensors"))
    assert torch.equal(got["z"], z_ref)
    assert torch.equal(got["rec"], rec_ref)
    assert torch.equal(got["rnd"], rnd_ref)


def test_methods_match_the_library_functions(run_dir):
    from pdae.autoencode import decode, encode, invert, load_models
    from pdae.data import load_split
    from pdae.edit import interpolate, manipulate
    from pdae.latent import load_latent, sample_latents
    from pdae.model import DiffusionAutoencoder
    from pdae.probes import AttributeDirections

    ae = DiffusionAutoencoder.from_pretrained(_export())
    model, schedule = load_models(run_dir / "models/baseline", run_dir / "models/pdae")
    x, _ = load_split(run_dir / "data/prepared", "test")
    x = x[:2]
    z = encode(model, x)
    x_T = invert(model, x, z, schedule, 4)
    assert torch.equal(ae.invert(x, steps=4), x_T)
    assert torch.equal(ae.decode(z, x_T, steps=4), decode(model, z, x_T, schedule, 4))
    dirs = AttributeDirections.load(run_dir / "models/classifier")
    ref = manipulate(model, schedule, x, dirs.normaliser, dirs.direction("digit_1"), [0.0, 2.0], 4)
    assert torch.equal(ae.manipulate(x, "digit_1", scale=[0.0, 2.0], steps=4), ref)
    one = manipulate(model, schedule, x, dirs.normaliser, dirs.direction("digit_1"), [2.0], 4)[:, 0]
    assert torch.equal(ae.manipulate(x, "digit_1", scale=2.0, steps=4), one)
    frames = interpolate(model, schedule, x[:1], x[1:], torch.linspace(0, 1, 3).tolist(), 4, ["mix"])["mix"]
    assert torch.equal(ae.interpolate(x[:1], x[1:], frames=3, mode="mix", steps=4), frames)
    # sample: latent DDIM then random x_T from one generator, decoded with the run's shift_fraction
    imgs, zs = ae.sample(3, steps=4, latent_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt",
                         return_z=True)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    z_ref = sample_latents(load_latent(run_dir / "models/latent"), 3, steps=3, generator=gen)
    x_ref = decode(model, z_ref, torch.randn(3, 1, 8, 8, generator=gen), schedule, 4)
    assert torch.equal(zs, z_ref) and torch.equal(imgs, x_ref)


def test_image_forms_in_and_out(run_dir, tmp_path):
    from PIL import Image

    from pdae.data import load_split
    from pdae.data.base import uint8_to_unit
    from pdae.io import to_uint8
    from pdae.model import DiffusionAutoencoder

    ae = DiffusionAutoencoder.from_run(classifier="models/classifier")
    x, _ = load_split(run_dir / "data/prepared", "test")
    u8 = to_uint8(x[:2])  # (2, 1, 8, 8)
    z = ae.encode(uint8_to_unit(u8))  # what an 8-bit file of these images holds
    hwc = u8.permute(0, 2, 3, 1).numpy()
    pils = [Image.fromarray(a[..., 0]) for a in hwc]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(pils):
        im.save(photos / f"{i}.png")
    for given in (hwc, u8.numpy(), u8, pils, [photos / "0.png", photos / "1.png"], str(photos)):
        assert torch.equal(ae.encode(given), z), type(given)
    big = pils[0].resize((32, 32), Image.Resampling.NEAREST)  # resized back like the training data
    assert ae.encode(big).shape == (1, 8)
    rec = ae.reconstruct(hwc, steps=3)
    assert isinstance(rec, np.ndarray) and rec.dtype == np.uint8 and rec.shape == (2, 8, 8, 1)
    flt = ae.reconstruct(x[:2].numpy(), steps=3)  # float channels-first array in, same form out
    assert flt.dtype == np.float32 and flt.shape == (2, 1, 8, 8) and -1 <= flt.min() and flt.max() <= 1
    one = ae.reconstruct(pils[0], steps=3)
    assert isinstance(one, Image.Image) and one.size == (8, 8) and one.mode == "L"
    grid = ae.manipulate(pils, "digit_0", scale=[0.0, 1.0], steps=3)
    assert len(grid) == 2 and len(grid[0]) == 2 and isinstance(grid[1][1], Image.Image)
    t = ae.reconstruct(x[0], steps=3, output_type="pt")
    assert t.shape == (1, 8, 8) and t.dtype == torch.float32
    np.testing.assert_array_equal(np.asarray(ae.reconstruct(x[:1], steps=3, output_type="pil")[0]),
                                  to_uint8(ae.reconstruct(x[:1], steps=3))[0, 0].numpy())  # fmt: skip


def test_dtype_and_device_like_diffusers(run_dir):
    from pdae.data import load_split
    from pdae.model import DiffusionAutoencoder

    x, _ = load_split(run_dir / "data/prepared", "test")
    ae = DiffusionAutoencoder.from_run()
    z32, rec32 = ae.encode(x[:2]), ae.reconstruct(x[:2], steps=3)
    bf = DiffusionAutoencoder.from_pretrained(_export(), torch_dtype=torch.bfloat16, device="cpu")
    assert bf.dtype == torch.bfloat16 and bf.device == torch.device("cpu")
    z16, rec16 = bf.encode(x[:2]), bf.reconstruct(x[:2], steps=3)
    assert z16.dtype == torch.float32 and rec16.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits: codes and reconstructions agree to that precision, not bitwise.
    torch.testing.assert_close(z16, z32, atol=0.05 * float(z32.abs().max()), rtol=0.05)
    assert (rec16 - rec32).abs().mean() < 0.05
    assert ae.to(torch.float64).dtype == torch.float64 and ae.to("cpu", torch.float32).dtype == torch.float32


def test_round_trip_and_clear_errors(run_dir, tmp_path, monkeypatch):
    from pdae.errors import PdaeError
    from pdae.model import DiffusionAutoencoder

    ae = DiffusionAutoencoder.from_run()  # no latent / stats / directions
    folder = ae.save_pretrained(tmp_path / "bare")
    again = DiffusionAutoencoder.from_pretrained(folder)
    assert again.latent is None and again.attributes == [] and again.z_dim == 8
    with pytest.raises(PdaeError, match="no latent DPM"):
        again.sample(2)
    with pytest.raises(PdaeError, match="no attribute directions"):
        again.manipulate(torch.zeros(1, 1, 8, 8), "digit_0")
    with pytest.raises(PdaeError, match="does not match the model input"):
        again.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(PdaeError, match="model folder not found"):
        DiffusionAutoencoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PdaeError, match="not an earlier model folder"):
        ae.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PdaeError, match="Hugging Face Hub"):
        DiffusionAutoencoder.from_pretrained("nobody/no-such-model")


def test_export_push_stops_before_the_network(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["export", "out", "--push", "someone/model"])
    assert res.exit_code == 1 and "HF_HUB_OFFLINE" in res.output.strip().splitlines()[-1], res.output
    assert not Path("out").exists()  # checked before anything is written
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(run_dir / "hf_home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    res = runner.invoke(app, ["export", "out", "--push", "someone/model"])
    assert res.exit_code == 1 and "no Hugging Face token" in res.output, res.output
    res = runner.invoke(app, ["export", "out", "--push", "not a repo"])
    assert res.exit_code == 1 and "owner/name" in res.output, res.output


def test_export_missing_run_and_partial_components(run_dir):
    res = runner.invoke(app, ["export", "out", "--pdae", "nowhere"])
    assert res.exit_code == 1 and "dvc repro train" in res.output and not Path("out").exists(), res.output
    shutil.rmtree("models/latent")
    res = runner.invoke(app, ["export", "out"])
    assert res.exit_code == 0 and "left out the latent DPM" in res.output, res.output
    assert json.loads(Path("out/config.json").read_text())["components"]["latent"] is None


def test_commands_accept_an_exported_folder(run_dir):
    """--pdae EXPORT gives the same outputs as the run's folders (both load through DiffusionAutoencoder)."""
    _export("exported")
    common = ["--index", "1", "--steps", "3", "--threads", "1", "--device", "cpu"]
    for pdae_dir, out in (("models/pdae", "a.png"), ("exported", "b.png")):
        res = runner.invoke(app, ["reconstruct", *common, "--pdae", pdae_dir, "--out", out])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["encode", "photos", "--pdae", pdae_dir, "--threads", "1", "-o", f"{out}.z"])
        assert res.exit_code == 1 and "image not found: photos" in res.output  # same input checks either way
    assert Path("a.png").read_bytes() == Path("b.png").read_bytes()
    res = runner.invoke(app, ["interpolate", "-i", "0", "-i", "1", "--steps", "2", "--frames", "2", "--device", "cpu",
                              "--pdae", "exported", "--baseline", "nowhere", "-o", "i.png"])  # fmt: skip
    assert res.exit_code == 0 and Path("i.png").is_file(), res.output
    shutil.move("models", "moved")  # the exported folder alone carries the latent DPM and the directions
    for cmd in (["sample", "--n", "2", "--steps", "2"], ["manipulate", "-i", "0", "-a", "digit_1", "--steps", "2"]):
        res = runner.invoke(app, [*cmd, "--pdae", "exported", "--device", "cpu", "-o", "x.png"])
        assert res.exit_code == 0 and Path("x.png").is_file(), res.output
        Path("x.png").unlink()


def test_served_encoder_from_an_exported_folder(run_dir):
    from pdae.io import load_tensors
    from pdae.serve import export_encoder, load_encoder

    _export("exported")
    a = load_tensors(export_encoder("models/pdae", "enc_a") / "encoder.safetensors")
    b = load_tensors(export_encoder("exported", "enc_b") / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    net, cfg = load_encoder("enc_b")
    assert cfg["z_dim"] == 8 and net(torch.zeros(1, 1, 8, 8)).shape == (1, 8)


def test_hub_id_resolves_through_the_huggingface_cache(run_dir, tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub.snapshot_download; offline it is served from the cache layout."""
    from pdae.model import DiffusionAutoencoder

    folder, sha = _export(), "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-pdae"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ae = DiffusionAutoencoder.from_pretrained("someone/tiny-pdae", cache_dir=tmp_path / "hub")
    x = torch.zeros(1, 1, 8, 8)
    assert torch.equal(ae.encode(x), DiffusionAutoencoder.from_pretrained(folder).encode(x))
    with pytest.raises(PdaeError, match="revision"):
        DiffusionAutoencoder.from_pretrained("someone/tiny-pdae", cache_dir=tmp_path / "hub", revision="v2")
