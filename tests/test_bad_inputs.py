"""The bad-input matrix: malformed images, attribute tables, params, checkpoints, URLs and CLI arguments.

Every case goes through a real entry point where that is cheap — a stage script executed as __main__ in a temporary
project (PDAE_TRACKING=off), the `pdae` CLI through typer's CliRunner — or a library call otherwise, and must give:
a non-zero exit, exactly one error line naming the offending thing and the fix, no traceback, and no output written
(the project tree is unchanged apart from a resumable download's `.partial`). One case also runs as a real
subprocess. Summary table: docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pdae.errors import PdaeError
from tests.faults import (
    ROOT,
    changed_files,
    closed_port,
    error_lines,
    folder_project,
    http_server,
    image_bytes,
    in_project,
    png_bytes,
    png_header_only,
    run_stage,
    serve_bytes,
    snapshot,
    write_params,
)

TINY_BASE = {"image_size": 8, "threads": 1, "device": "cpu"}
SERVED = b"not really a model archive " * 4096
SERVED_SHA = hashlib.sha256(SERVED).hexdigest()
WRONG_SHA = "0" * 64
# A small official PDAE denoise_fn config (config.yml layout).
PDAE_CONFIG = {
    "model": "FFHQDenoiseFn",
    "input_channel": 3,
    "base_channel": 32,
    "channel_multiplier": [1, 2],
    "num_residual_blocks_of_a_block": 1,
    "attention_resolutions": [2],
    "num_heads": 1,
    "head_channel": -1,
}


# What a case runs: ("stage", name) | ("cli", args) | ("call", fn raising PdaeError).
Invocation = tuple[str, object]


@dataclass(frozen=True)
class Case:
    category: str
    project: str  # "folder": images + attribute table; "tiny": prepared digits + models; "empty": a bare folder
    setup: Callable[[Path, str], Invocation]  # (project, server URL) -> invocation
    expect: tuple[str, ...]  # substrings of the error line: the thing and the fix
    code: int = 1  # 1: pdae's user error; 2: a command-line usage error (click)
    allow: str | None = None  # regex of files the failed run may leave (a resumable download)
    noise: str | None = None  # regex of a tolerated third-party warning printed before the error (known issue)


CASES: dict[str, Case] = {}


def case(category: str, project: str, *expect: str, code: int = 1, allow: str | None = None, noise: str | None = None):
    def register(fn: Callable[[Path, str], Invocation]) -> Callable[[Path, str], Invocation]:
        name = fn.__name__.removeprefix("case_").replace("_", "-")
        CASES[name] = Case(category, project, fn, expect, code, allow, noise)
        return fn

    return register


def _replace_image(project: Path, old: str, new: str, data: bytes) -> None:
    """Swap imgs/<old> for imgs/<new> holding `data`, renaming its attribute-table row."""
    (project / "imgs" / old).unlink()
    (project / "imgs" / new).write_bytes(data)
    table = project / "attrs.csv"
    table.write_text(table.read_text().replace(old, new))


def _edit_table(project: Path, fn: Callable[[list[str]], list[str]]) -> None:
    table = project / "attrs.csv"
    table.write_text("\n".join(fn(table.read_text().splitlines())) + "\n")


def _params(project: Path, **sections: dict) -> None:
    """Write params.yaml: the project's own base settings updated with `sections`."""
    raw = yaml.safe_load((project / "params.yaml").read_text()) if (project / "params.yaml").exists() else {}
    raw = raw or {"base": dict(TINY_BASE)}
    for name, values in sections.items():
        raw[name] = {**(raw.get(name) or {}), **values}
    write_params(project, raw)


# ---- images (prepare stage on an image folder) --------------------------------------------------------------------
@case("image", "folder", "002.png", "truncated", "replace or delete it")
def case_truncated_png(p: Path, url: str) -> Invocation:
    data = (p / "imgs/002.png").read_bytes()
    (p / "imgs/002.png").write_bytes(data[: len(data) // 2])
    return ("stage", "prepare")


@case("image", "folder", "004.png", "0-byte", "replace it with a valid image")
def case_zero_byte_image(p: Path, url: str) -> Invocation:
    (p / "imgs/004.png").write_bytes(b"")
    return ("stage", "prepare")


@case("image", "folder", "003.png", "unrecognised image format", "replace or delete it")
def case_not_an_image(p: Path, url: str) -> Invocation:
    (p / "imgs/003.png").write_text("this is a text file with a .png name")
    return ("stage", "prepare")


@case("image", "folder", "005.tif", "mode 'F'", "save it as an 8-bit RGB or greyscale image")
def case_float_tiff(p: Path, url: str) -> Invocation:
    _replace_image(p, "005.png", "005.tif", image_bytes(np.random.rand(12, 10).astype(np.float32), "TIFF"))
    return ("stage", "prepare")


@case("image", "folder", "001.png", "mode 'I;16'", "save it as an 8-bit RGB or greyscale image")
def case_16bit_png(p: Path, url: str) -> Invocation:
    (p / "imgs/001.png").write_bytes(image_bytes((np.arange(120, dtype=np.uint16) * 500).reshape(12, 10), "PNG"))
    return ("stage", "prepare")


@case("image", "folder", "000.png", "too large", "decompression bomb", "downscale it")
def case_decompression_bomb(p: Path, url: str) -> Invocation:
    (p / "imgs/000.png").write_bytes(png_header_only(100_000, 100_000))
    return ("stage", "prepare")


@case("image", "folder", "000.png", "too large", "downscale it")
def case_huge_dimensions_below_pil_error_limit(p: Path, url: str) -> Invocation:
    (p / "imgs/000.png").write_bytes(png_header_only(12_000, 12_000))  # PIL itself would only warn and decode
    return ("stage", "prepare")


@case("image", "tiny", "bad.png", "truncated", "replace or delete it")
def case_truncated_png_given_to_the_cli(p: Path, url: str) -> Invocation:
    (p / "good.png").write_bytes(png_bytes((8, 8), "L"))
    (p / "bad.png").write_bytes(png_bytes((8, 8), "L")[:40])
    return ("cli", ["interpolate", "good.png", "bad.png", "--steps", "2", "--out", "out.png"])


# ---- attribute tables (prepare stage) -----------------------------------------------------------------------------
@case("table", "folder", "attrs.csv", "no column 'filename'", "prepare.filename_column")
def case_table_missing_column(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [rows[0].replace("filename", "file"), *rows[1:]])
    return ("stage", "prepare")


@case("table", "folder", "attrs.csv", "'002.png' already has a row", "keep one row per image")
def case_table_duplicate_ids(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [*rows, rows[3]])
    return ("stage", "prepare")


@case("table", "folder", "attrs.csv", "line 3", "column 'smiling'", "non-binary value '2'", "must be 0/1 or -1/+1")
def case_table_non_binary(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [*rows[:2], "001.png,2,1", *rows[3:]])
    return ("stage", "prepare")


@case("table", "folder", "attrs.csv", "column 'smiling'", "missing value (NaN)", "must be 0/1 or -1/+1")
def case_table_nan(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [*rows[:4], "003.png,,0", *rows[5:]])
    return ("stage", "prepare")


@case("table", "folder", "005.png", "has no row in the attribute table", "add the rows or remove those images")
def case_table_missing_row(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: rows[:-1])
    return ("stage", "prepare")


@case("table", "folder", "attrs.csv", "label '1.5' is not a class index", "integers 0, 1, 2")
def case_table_bad_label(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [*rows[:2], "001.png,1,1.5", *rows[3:]])
    return ("stage", "prepare")


@case("table", "folder", "attrs.csv", "UTF-8", "save it as UTF-8")
def case_table_not_utf8(p: Path, url: str) -> Invocation:
    (p / "attrs.csv").write_bytes((p / "attrs.csv").read_bytes().replace(b"smiling", b"souri\xe9"))
    return ("stage", "prepare")


# ---- params ------------------------------------------------------------------------------------------------------
@case("params", "folder", "prepare.test_fraction", "valid number", "'half'")
def case_param_wrong_type(p: Path, url: str) -> Invocation:
    _params(p, prepare={"test_fraction": "half"})
    return ("stage", "prepare")


@case("params", "tiny", "baseline.batch_size", "greater than or equal to 1", "-8")
def case_param_negative_size(p: Path, url: str) -> Invocation:
    _params(p, baseline={"batch_size": -8})
    return ("stage", "baseline")


@case("params", "folder", "prepare.tets_fraction", "unknown key", "allowed keys: test_fraction")
def case_param_unknown_key(p: Path, url: str) -> Invocation:
    _params(p, prepare={"tets_fraction": 0.3})
    return ("stage", "prepare")


@case("params", "folder", "unknown section 'trian'", "known sections: base")
def case_param_unknown_section(p: Path, url: str) -> Invocation:
    _params(p, trian={"lr": 1e-4})
    return ("stage", "prepare")


@case("params", "folder", "base.image_size", "must be a power of two (got 12)")
def case_param_not_power_of_two(p: Path, url: str) -> Invocation:
    _params(p, base={"image_size": 12})
    return ("stage", "prepare")


@case("params", "folder", "params.yaml", "not valid YAML (line 3", "fix its syntax")
def case_param_yaml_syntax(p: Path, url: str) -> Invocation:
    (p / "params.yaml").write_text("base:\n  seed: [1, 2\n")
    return ("stage", "prepare")


@case("params", "folder", "base.dataset is 'folder' but prepare.folder is not set", "set prepare.folder")
def case_param_folder_dataset_without_folder(p: Path, url: str) -> Invocation:
    write_params(p, {"base": {"dataset": "folder", "image_size": 8, "threads": 1, "device": "cpu"}})
    return ("stage", "prepare")


@case("params", "tiny", "baseline", "source 'url' needs baseline.url and baseline.sha256")
def case_param_url_source_without_checksum(p: Path, url: str) -> Invocation:
    _params(p, baseline={"source": "url", "url": f"{url}/model.zip"})
    return ("stage", "baseline")


@case("params", "tiny", "baseline.channels", "not divisible by 2**4", "params.yaml")
def case_param_levels_exceed_image_size(p: Path, url: str) -> Invocation:
    _params(p, baseline={"channels": [8, 8, 8, 8, 8], "attention_head_dim": 8})
    return ("stage", "baseline")


def case_param_cuda_without_gpu(p: Path, url: str) -> Invocation:
    _params(p, base={"device": "cuda"})
    return ("stage", "prepare")


if not torch.cuda.is_available():  # only an error on a machine without a GPU
    case("params", "folder", "device 'cuda'", "no CUDA GPU", "base.device: auto or cpu")(case_param_cuda_without_gpu)


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _pdae_weights(p: Path) -> Path:
    return p / "models/pdae/pdae.safetensors"


@case("checkpoint", "tiny", "pdae.safetensors", "has shape", "re-train or use matching files")
def case_checkpoint_wrong_architecture(p: Path, url: str) -> Invocation:
    from pdae.io import save_tensors
    from pdae.nets.pdae import PDAE, load_backbone

    other = PDAE(load_backbone(p / "models/baseline"), z_dim=4)  # the config still says z_dim 8
    save_tensors(_pdae_weights(p), other.state_dict())
    return ("stage", "encode")


@case("checkpoint", "tiny", "pdae_config.json", "trained on a backbone", "load the baseline model it was trained with")
def case_checkpoint_other_backbone(p: Path, url: str) -> Invocation:
    from pdae.baseline import save_baseline
    from pdae.nets.unet import build_unet

    save_baseline(build_unet(8, 1, [8, 8], 1, 8), p / "models/baseline")
    return ("stage", "encode")


@case("checkpoint", "tiny", "pdae.safetensors", "1 missing", "re-train or use matching files")
def case_checkpoint_missing_keys(p: Path, url: str) -> Invocation:
    from pdae.io import load_tensors, save_tensors

    tensors = load_tensors(_pdae_weights(p))
    tensors.pop(sorted(tensors)[0])
    save_tensors(_pdae_weights(p), tensors)
    return ("stage", "encode")


@case("checkpoint", "tiny", "pdae.safetensors", "not a readable safetensors file", "re-create it")
def case_checkpoint_corrupted_safetensors(p: Path, url: str) -> Invocation:
    data = bytearray(_pdae_weights(p).read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    _pdae_weights(p).write_bytes(bytes(data))
    return ("stage", "encode")


@case("checkpoint", "tiny", "models/baseline", "Unable to load weights", "re-create it or fix the path")
def case_checkpoint_truncated_baseline(p: Path, url: str) -> Invocation:
    weights = p / "models/baseline/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ("stage", "encode")


@case("checkpoint", "empty", "checkpoint.pt", "not a readable torch checkpoint", "download it again")
def case_checkpoint_truncated_official(p: Path, url: str) -> Invocation:
    torch.save({"ema_denoise_fn": {"w": torch.zeros(1000)}}, p / "checkpoint.pt")
    (p / "checkpoint.pt").write_bytes((p / "checkpoint.pt").read_bytes()[:500])
    (p / "config.yml").write_text(yaml.safe_dump({"denoise_fn_config": PDAE_CONFIG}))
    return ("cli", ["convert", "checkpoint.pt", "out", "--kind", "pdae-official"])


@case("checkpoint", "empty", "last.ckpt", "missing keys", "the config does not describe this checkpoint")
def case_checkpoint_official_missing_keys(p: Path, url: str) -> Invocation:
    torch.save({"state_dict": {"ema_model.time_embed.0.weight": torch.zeros(512, 128)}}, p / "last.ckpt")
    return ("cli", ["convert", "last.ckpt", "out", "--kind", "diffae", "--config", "ffhq128"])


@case("checkpoint", "tiny", "label_classifier/model.safetensors", "size mismatch", "re-run the prepare stage")
def case_checkpoint_label_classifier_other_width(p: Path, url: str) -> Invocation:
    from pdae.data.classifier import LabelClassifier
    from pdae.io import save_tensors
    from pdae.scoring import load_scorer

    save_tensors(p / "data/prepared/label_classifier/model.safetensors", LabelClassifier(1, 8, 10, 4).state_dict())
    return ("call", lambda: load_scorer(p / "data/prepared"))


# ---- URLs (baseline stage, source: url, against a 127.0.0.1 server) ----------------------------------------------
def _url_source(p: Path, url: str, sha256: str) -> Invocation:
    _params(p, baseline={"source": "url", "url": url, "sha256": sha256})
    return ("stage", "baseline")


@case("url", "tiny", "/missing.zip", "HTTP 404", "check the URL")
def case_url_404(p: Path, url: str) -> Invocation:
    return _url_source(p, f"{url}/missing.zip", SERVED_SHA)


@case("url", "tiny", "/model.zip", "checksum mismatch", f"got {SERVED_SHA}", "check the URL and the expected sha256")
def case_url_checksum_mismatch(p: Path, url: str) -> Invocation:
    return _url_source(p, f"{url}/model.zip", WRONG_SHA)


@case("url", "tiny", "/cut.zip", "interrupted", "run the same command again to resume", allow=r"\.partial$")
def case_url_interrupted_transfer(p: Path, url: str) -> Invocation:
    return _url_source(p, f"{url}/cut.zip", SERVED_SHA)


@case("url", "tiny", "cannot connect to http://127.0.0.1", "ConnectionError", "check the URL and your network")
def case_url_connection_refused(p: Path, url: str) -> Invocation:
    return _url_source(p, f"http://127.0.0.1:{closed_port()}/model.zip", SERVED_SHA)


@case("url", "tiny", "ftp://127.0.0.1/model.zip", "only http(s) URLs")
def case_url_unsupported_scheme(p: Path, url: str) -> Invocation:
    return _url_source(p, "ftp://127.0.0.1/model.zip", SERVED_SHA)


# ---- CLI arguments -----------------------------------------------------------------------------------------------
@case("cli", "empty", "nope.yaml", "not found", "pass --params")
def case_cli_missing_params_file(p: Path, url: str) -> Invocation:
    return ("cli", ["params", "--params", "nope.yaml"])


@case("cli", "empty", "override 'trainlr=1'", "must look like section.key=value")
def case_cli_bad_override(p: Path, url: str) -> Invocation:
    write_params(p, {"base": TINY_BASE})
    return ("cli", ["params", "-S", "trainlr=1"])


@case("cli", "empty", "--kind 'bogus'", "use one of pdae-official, diffae, adm, improved-diffusion")
def case_cli_unknown_kind(p: Path, url: str) -> Invocation:
    return ("cli", ["convert", "src", "dst", "--kind", "bogus"])


@case("cli", "empty", "exactly two images")
def case_cli_one_image_to_interpolate(p: Path, url: str) -> Invocation:
    return ("cli", ["interpolate", "a.png"])


@case("cli", "empty", "nowhere", "baseline", "run the baseline stage")
def case_cli_missing_model_folder(p: Path, url: str) -> Invocation:
    return ("cli", ["interpolate", "a.png", "b.png", "--baseline", "nowhere"])


@case("cli", "empty", "owner/not-cached", "neither a folder nor a cached hub id", "run the baseline stage")
def case_cli_uncached_hub_id(p: Path, url: str) -> Invocation:
    return ("cli", ["interpolate", "a.png", "b.png", "--baseline", "owner/not-cached"])


@case("cli", "tiny", "image not found: nope.png", "pass an existing PNG/JPG file")
def case_cli_missing_image(p: Path, url: str) -> Invocation:
    (p / "good.png").write_bytes(png_bytes((8, 8), "L"))
    return ("cli", ["interpolate", "nope.png", "good.png", "--out", "out.png"])


@case("cli", "empty", "'--steps'", "0 is out of range; use 1..1000", "pdae interpolate --help", code=2)
def case_cli_out_of_range_option(p: Path, url: str) -> Invocation:
    return ("cli", ["interpolate", "a.png", "b.png", "--steps", "0"])


@case("cli", "empty", "unknown solver 'euler'", "use one of ddim, dpmpp2m, dpmpp3m, unipc")
def case_cli_unknown_solver(p: Path, url: str) -> Invocation:
    return ("cli", ["interpolate", "a.png", "b.png", "--solver", "euler"])


@case("cli", "empty", "No such command 'frobnicate'", "pdae --help", code=2)
def case_cli_unknown_command(p: Path, url: str) -> Invocation:
    return ("cli", ["frobnicate"])


# ---- values: one range layer for params, attribute labels and CLI options (issue 20) ----------------------------
@case("table", "folder", "attrs.csv", "label 'inf' is not a class index", "up to 65535")
def case_table_infinite_label(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [*rows[:2], "001.png,1,inf", *rows[3:]])
    return ("stage", "prepare")


@case("table", "folder", "attrs.csv", "label '1e18' is not a class index", "up to 65535")
def case_table_huge_label(p: Path, url: str) -> Invocation:
    _edit_table(p, lambda rows: [*rows[:2], "001.png,1,1e18", *rows[3:]])
    return ("stage", "prepare")


@case("params", "folder", "base.seed", "4294967296 is out of range", "0..4294967295")
def case_param_seed_out_of_range(p: Path, url: str) -> Invocation:
    _params(p, base={"seed": 2**32})
    return ("stage", "prepare")


@case("params", "tiny", "baseline.attention_head_dim", "1e+23 is out of range", "at most 8192")
def case_param_absurd_size(p: Path, url: str) -> Invocation:
    _params(p, baseline={"attention_head_dim": 1e23})
    return ("stage", "baseline")


@case("params", "tiny", "baseline.channels", "100000 is out of range", "at most 8192")
def case_param_absurd_width(p: Path, url: str) -> Invocation:
    _params(p, baseline={"channels": [8, 100_000]})
    return ("stage", "baseline")


@case("params", "tiny", "baseline.lr", "finite number", "(got inf)")
def case_param_infinite_float(p: Path, url: str) -> Invocation:
    _params(p, baseline={"lr": float("inf")})
    return ("stage", "baseline")


@case("params", "folder", "params.yaml", "key 'seed' appears twice", "line 2")
def case_param_duplicate_key(p: Path, url: str) -> Invocation:
    (p / "params.yaml").write_text("base:\n  seed: 1\n  seed: 2\n")
    return ("stage", "prepare")


@case("cli", "tiny", "params file not found: nope.yaml")
def case_cli_evaluate_missing_params_file(p: Path, url: str) -> Invocation:
    return ("cli", ["evaluate", "--params", "nope.yaml", "--metrics", "ssim", "--threads", "1"])


@case("cli", "tiny", "'--out'", "is a folder", "pass a file path", code=2)
def case_cli_output_is_a_folder(p: Path, url: str) -> Invocation:
    (p / "outdir").mkdir()
    return ("cli", ["reconstruct", "--index", "0", "--steps", "2", "--out", "outdir"])


@case("cli", "tiny", "'--scale'", "100000 is out of range", "1..64", code=2)
def case_cli_absurd_upscaling(p: Path, url: str) -> Invocation:
    return ("cli", ["reconstruct", "--index", "0", "--steps", "2", "--scale", "100000"])


@case("cli", "tiny", "'--steps'", "0 is out of range", "1..1000", code=2)
def case_cli_zero_steps(p: Path, url: str) -> Invocation:
    return ("cli", ["encode", "x.png", "--x-t", "--steps", "0"])


@case("cli", "empty", "--run-id", "no MLflow store", "MLFLOW_TRACKING_URI")
def case_cli_run_id_without_a_store(p: Path, url: str) -> Invocation:
    (p / "dvc.yaml").write_text("stages: {}\n")
    return ("cli", ["evaluate", "--run-id", "0123abcd", "--threads", "1"])


# ---- archives (baseline stage, source: url, a sha256-verified archive that is not safe) -------------------------
def _zip_bytes(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


ESCAPING_ZIP = _zip_bytes({"model/config.json": b"{}", "../../escaped.txt": b"written outside"})


@case("archive", "tiny", "escape.zip", "points outside the archive folder", "refusing to unpack it")
def case_archive_zip_path_escape(p: Path, url: str) -> Invocation:
    return _url_source(p, f"{url}/escape.zip", hashlib.sha256(ESCAPING_ZIP).hexdigest())


# ---- the test ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    routes = {"/model.zip": serve_bytes(SERVED), "/cut.zip": serve_bytes(SERVED, cut=len(SERVED) // 3)}
    routes["/escape.zip"] = serve_bytes(ESCAPING_ZIP)
    with http_server(routes) as url:
        yield url


def _make_project(kind: str, tmp_path: Path, request) -> Path:
    if kind == "folder":
        return folder_project(tmp_path / "project")
    if kind == "tiny":
        project = request.getfixturevalue("tiny_project")
        write_params(project, {"base": dict(TINY_BASE)})
        return project
    (tmp_path / "project").mkdir()
    return tmp_path / "project"


def _usage_error(output: str) -> list[str]:
    """A click usage error (rich prints its message in a box): the message and the help hint as one line."""
    inside = " ".join(m.group(1).strip() for m in re.finditer(r"│(.*)│", output))
    hint = next((line for line in output.splitlines() if line.startswith("Try '")), "")
    return [f"{inside} ({hint})"] if inside else error_lines(output, "Error:")


def _invoke(project: Path, invocation: Invocation, capsys) -> tuple[int, list[str], str]:
    """Run the invocation; (exit code, its error lines, everything it printed)."""
    kind, target = invocation
    if kind == "stage":
        code = run_stage(project, str(target))
        out = capsys.readouterr().err
        return code, error_lines(out), out
    if kind == "cli":
        from pdae.cli import app

        with in_project(project, {"PDAE_TRACKING": "off"}):
            res = CliRunner().invoke(app, list(target))  # type: ignore[arg-type]
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception  # an uncaught exception = a traceback for the user
        return res.exit_code, error_lines(res.output) or _usage_error(res.output), res.output
    with pytest.raises(PdaeError) as info:
        target()  # type: ignore[operator]
    return 1, [f"error: {info.value}"], str(info.value)


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id: str, tmp_path: Path, request, server: str, capsys) -> None:
    case = CASES[case_id]
    project = _make_project(case.project, tmp_path, request)
    invocation = case.setup(project, server)
    before = snapshot(project)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, lines, output = _invoke(project, invocation, capsys)
    noise = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert all(case.noise and re.search(case.noise, n) for n in noise), noise
    assert code == case.code, output
    assert len(lines) == 1 and "Traceback" not in output, output
    with capsys.disabled():  # visible with `pytest -s`: the message a user would see
        print(f"\n[{case_id}] exit {code}: {lines[0]}")
    for text in case.expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    changed = [f for f in changed_files(before, snapshot(project)) if not (case.allow and re.search(case.allow, f))]
    assert not changed, f"the failed run wrote {changed}"
    assert not list(project.rglob("*.tmp")), "temporary files left behind"


def test_matrix_covers_every_category() -> None:
    categories = {c.category for c in CASES.values()}
    assert categories == {"image", "table", "params", "checkpoint", "url", "cli", "archive"} and len(CASES) >= 25


# ---- the same contract across a real process boundary --------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["truncated-png"])
def test_stage_script_in_a_subprocess(case_id: str, tmp_path: Path) -> None:
    """`python stages/prepare.py` itself: stderr is exactly one line, exit code 1, nothing written."""
    case = CASES[case_id]
    project = folder_project(tmp_path / "project")
    case.setup(project, "")
    before = snapshot(project)
    env = {**os.environ, "PDAE_TRACKING": "off"}
    res = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py")], cwd=project, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and lines and lines[-1].startswith("error: "), res.stderr
    # anything before the error line is a (cleared) progress bar, as seen when stderr is not a terminal
    assert all(re.search(r"\d+/\d+ \[", line) for line in lines[:-1]), res.stderr
    assert all(text in lines[-1] for text in case.expect), res.stderr
    assert not changed_files(before, snapshot(project))


# ---- every numeric option of the CLI has a range, and a value outside it is one line naming option and value -------
def _numeric_options() -> list[tuple[str, str, object]]:
    """(command, option flag, its Ranged parser) for every int/float option of every command."""
    import inspect
    import typing

    from pdae.cli import app
    from pdae.commands.options import Ranged

    found = []
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback)
        for name, param in inspect.signature(command.callback).parameters.items():
            numeric = {int, float} & set(typing.get_args(hints[name]) or [hints[name]])
            inner = [a for t in typing.get_args(hints[name]) for a in (typing.get_args(t) or [t])]
            if not (numeric or {int, float} & set(inner)) or hints[name] is bool:
                continue
            parser = getattr(param.default, "parser", None)
            assert isinstance(parser, Ranged), f"{command.name} {name}: numeric option without a range"
            flag = next(d for d in param.default.param_decls if d.startswith("--"))
            found.append((command.name, flag, parser))
    return found


NUMERIC_OPTIONS = _numeric_options()


def test_every_numeric_option_is_ranged() -> None:
    flags = {(c, f) for c, f, _ in NUMERIC_OPTIONS}
    assert len(flags) >= 25 and ("evaluate", "--fid-real") in flags and ("manipulate", "--scale") in flags


@pytest.mark.parametrize("command,flag,parser", NUMERIC_OPTIONS, ids=[f"{c}{f}" for c, f, _ in NUMERIC_OPTIONS])
def test_numeric_option_out_of_range_is_one_line(command: str, flag: str, parser, tmp_path: Path) -> None:
    from pdae.cli import app

    bad = (
        ["nan", "inf", str(parser.high * 2 + 1)]
        if parser.kind is float
        else [str(parser.low - 1), str(parser.high + 1), "2.5"]
    )
    required = {"encode": ["x.png"], "convert": ["src", "dst"], "manipulate": ["--attr", "a"]}.get(command, [])
    for value in bad:
        with in_project(tmp_path, {"PDAE_TRACKING": "off"}):
            res = CliRunner().invoke(app, [command, flag, value, *required])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        (line,) = _usage_error(res.output)
        assert f"'{flag}'" in line and value in line and (parser.span in line or "is not an integer" in line), line
    assert not any(tmp_path.iterdir())


# ---- every numeric param has a range: huge ints and non-finite floats are one line naming the key ---------------
def _numeric_params() -> list[tuple[str, str, object]]:
    from pdae.config import SECTIONS

    found = []
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            text = str(field.annotation)
            if "Literal" in text or "str" in text or field.annotation is bool:
                continue
            scalar = float("inf") if "float" in text else 10**13 if "int" in text else None
            if scalar is not None:
                found.append((section, name, [scalar] if text.startswith("list") else scalar))
    return found


NUMERIC_PARAMS = _numeric_params()


@pytest.mark.parametrize("section,name,value", NUMERIC_PARAMS, ids=[f"{s}.{n}" for s, n, _ in NUMERIC_PARAMS])
def test_numeric_param_out_of_range_is_one_line(section: str, name: str, value: object) -> None:
    from pdae.config import parse_section

    with pytest.raises(PdaeError) as info:
        parse_section(section, {name: value})
    text = str(info.value)
    assert text.startswith(f"params.yaml: {section}.{name}") and "\n" not in text, text
    assert ("finite number" in text) if "inf" in str(value) else ("out of range" in text or "less than" in text), text


def test_every_section_has_numeric_params_checked() -> None:
    sections = {s for s, _, _ in NUMERIC_PARAMS}
    assert sections >= {"base", "prepare", "baseline", "train", "encode", "classify", "latent", "evaluate"}
    assert len(NUMERIC_PARAMS) >= 70


@pytest.mark.parametrize("seed,ok", [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_seed_range_is_the_libraries_range(seed: int, ok: bool) -> None:
    from pdae.config import parse_section

    if ok:
        assert parse_section("base", {"seed": seed}).seed == seed
    else:
        with pytest.raises(PdaeError, match=r"base.seed: .* 0..4294967295"):
            parse_section("base", {"seed": seed})


def test_zero_steps_is_an_error_not_the_default() -> None:
    """steps=0 used to fall back to 100 steps silently (and be reported as 0)."""
    from pdae.diffusion import Schedule, ddim_grid
    from pdae.sampling import _grid

    with pytest.raises(PdaeError, match=r"1\.\.1000 \(got 0\)"):
        _grid(Schedule.linear(1000), 0, None)
    assert _grid(Schedule.linear(1000), None, None) == ddim_grid(1000, 100)
