"""Share a pipeline run: the DVC outputs as one DiffusionAutoencoder folder with a model card, and Hub upload.

`export_run` reads models/baseline, models/pdae, models/latent, latents/stats.safetensors and models/classifier,
writes the folder of `pdae.model` plus README.md (the model card: usage, data, the baseline DPM's origin, the run's
params.yaml and metrics/*.json, sha256 of every file) and moves it into place only when complete.
`push_folder` uploads it with huggingface_hub.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pdae.errors import PdaeError

CARD_NAME = "README.md"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `folder` except the model card, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != CARD_NAME)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def read_params(path: Path) -> dict[str, Any]:
    """params.yaml as a plain dict ({} when absent)."""
    import yaml

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PdaeError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix it or pass --params.") from None
    if not isinstance(data, dict):
        raise PdaeError(f"{path} does not hold a mapping of sections; pass the run's params.yaml.")
    return data


def read_metrics(folder: Path) -> dict[str, Any]:
    """{stage: metrics dict} from metrics/*.json ({} when the folder is absent)."""
    from pdae.io import read_json

    if not folder.is_dir():
        return {}
    return {p.stem: read_json(p, what="metrics file") for p in sorted(folder.glob("*.json"))}


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _scalars(metrics: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    flat = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None]
    nested = {k: v for k, v in metrics.items() if not (isinstance(v, (int, float, str, bool)) or v is None)}
    return flat, nested


def _baseline_origin(params: dict[str, Any], metrics: dict[str, Any], unet_cfg: dict[str, Any]) -> list[str]:
    base = params.get("baseline") or {}
    source = base.get("source") or (metrics.get("baseline") or {}).get("source") or "unknown"
    lines = [f"- source: `{source}`"]
    if source == "train":
        images = base.get("images")
        lines.append(f"- pre-trained by this run's baseline stage on the train split above ({images} images seen)")
    for key in ("path", "url", "sha256"):
        if base.get(key):
            lines.append(f"- {key}: `{base[key]}`")
    lines.append(
        f"- architecture: diffusers UNet2DModel, {unet_cfg.get('in_channels')}×{unet_cfg.get('sample_size')}², "
        f"block_out_channels {list(unet_cfg.get('block_out_channels') or [])}"
    )
    if (metrics.get("baseline") or {}).get("parameters"):
        lines.append(f"- parameters: {metrics['baseline']['parameters']:,}")
    return lines


def model_card(folder: Path, params: dict[str, Any], metrics: dict[str, Any], commit: str | None) -> str:
    """The README.md text for an exported folder (its files must already be written)."""
    import yaml

    from pdae.io import read_json

    cfg = read_json(folder / "config.json", what="model config")
    unet_cfg = read_json(folder / "unet" / "config.json", what="UNet config")
    base = params.get("base") or {}
    dataset = base.get("dataset") or (metrics.get("prepare") or {}).get("dataset") or "unknown"
    size, z_dim = cfg["image_size"], cfg["z_dim"]
    parts = {k: v for k, v in cfg["components"].items() if v}
    lines = [
        "---",
        "library_name: pdae",
        "tags: [pdae, diffusion, autoencoder, representation-learning]",
        "---",
        "",
        f"# PDAE diffusion autoencoder: {dataset}, {cfg['in_channels']}×{size}², z_dim {z_dim}",
        "",
        "A frozen pre-trained diffusion model (DPM) turned into an autoencoder by an encoder E and a gradient "
        "estimator G (PDAE, arXiv 2212.12990): z = E(x0) is a semantic code, and G shifts the DPM's reverse "
        "process so that it reconstructs the image from (z, x_T).",
        "",
        "```python",
        "from pdae import DiffusionAutoencoder",
        "",
        'ae = DiffusionAutoencoder.from_pretrained("path/or/hub-id")',
        'z = ae.encode("photos/")             # (N, z_dim) semantic codes',
        'images = ae.reconstruct("photos/")   # PIL images',
        "```",
        "",
        f"Components: {', '.join(f'`{v}/`' for v in parts.values())}. Attributes for `manipulate`: "
        f"{', '.join(cfg.get('attributes') or []) or '(none)'}. Sampling defaults: `{json.dumps(cfg['sampling'])}`.",
        "",
        "## Data",
        "",
        f"- dataset: `{dataset}` at {size}×{size} px",
    ]
    prep = metrics.get("prepare") or {}
    for key in ("n_train", "n_test", "n_attributes"):
        if key in prep:
            lines.append(f"- {key}: {prep[key]}")
    if (params.get("prepare") or {}).get("folder"):
        lines.append(f"- image folder: `{params['prepare']['folder']}`")
    lines += ["", "## Baseline DPM (frozen)", "", *_baseline_origin(params, metrics, unet_cfg), ""]
    lines += [
        "## Run",
        "",
        f"- pdae {cfg.get('pdae_version')}, exported {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    if commit:
        lines.append(f"- git commit: `{commit}`")
    lines += ["", "### Parameters (params.yaml)", "", "```yaml", yaml.safe_dump(params, sort_keys=False).rstrip()]
    lines += ["```", "", "### Metrics (metrics/*.json)", ""]
    for stage, values in metrics.items():
        flat, nested = _scalars(values if isinstance(values, dict) else {"value": values})
        lines += [f"#### {stage}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in flat]
        if nested:
            lines += ["", "<details><summary>nested values</summary>", "", "```json", json.dumps(nested, indent=1)]
            lines += ["```", "", "</details>"]
        lines.append("")
    if not metrics:
        lines += ["(no metrics found)", ""]
    lines += ["## Files (sha256)", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{name}` | `{digest}` |" for name, digest in file_digests(folder).items()]
    return "\n".join(lines) + "\n"


def export_run(
    out: str | os.PathLike,
    baseline: Path = Path("models/baseline"),
    pdae_dir: Path = Path("models/pdae"),
    latent: Path | None = Path("models/latent"),
    stats: Path | None = Path("latents/stats.safetensors"),
    classifier: Path | None = Path("models/classifier"),
    params: Path = Path("params.yaml"),
    metrics: Path = Path("metrics"),
) -> tuple[Path, list[str]]:
    """Write the model folder `out` from a run's outputs; returns (out, notes on components left out).

    baseline and pdae_dir are required; an absent latent / stats / classifier is left out with a note. `out`
    must be new, empty or an earlier export (replaced only when the new one is complete).
    """
    from pdae.model import CONFIG_NAME, FORMAT, SAMPLING_DEFAULTS, DiffusionAutoencoder

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        cfg_path = out / CONFIG_NAME
        if not (cfg_path.is_file() and FORMAT in cfg_path.read_text(errors="replace")):
            raise PdaeError(f"{out} exists and is not an earlier export; pass a new or empty folder.")
    run_params, run_metrics = read_params(params), read_metrics(metrics)
    latent_params = run_params.get("latent") or {}
    sampling = {k: latent_params[k] for k in SAMPLING_DEFAULTS if k in latent_params}
    notes, optional = [], {}
    for name, path, what in (
        ("latent", latent, "latent DPM (sample() unavailable)"),
        ("stats", stats, "z statistics (manipulate() with a direction tensor unavailable)"),
        ("classifier", classifier, "attribute directions (manipulate() by name unavailable)"),
    ):
        present = path is not None and (path.is_file() if name == "stats" else path.is_dir())
        optional[name] = path if present else None
        if not present:
            notes.append(f"left out the {what}: {path} not found")
    ae = DiffusionAutoencoder.from_run(baseline, pdae_dir, **optional, sampling=sampling)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = ae.save_pretrained(stage / "model")
        card = model_card(folder, run_params, run_metrics, git_commit(params.resolve().parent))
        (folder / CARD_NAME).write_text(card)
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out, notes


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_push(repo_id: str) -> str:
    """The Hub token for uploading to `repo_id`, or a PdaeError saying what is missing (checked before exporting)."""
    from pdae.model_io import HUB_ID

    if not HUB_ID.fullmatch(repo_id):
        raise PdaeError(f"--push '{repo_id}' is not a Hub repo id; use owner/name.")
    if _offline():
        raise PdaeError("cannot push: HF_HUB_OFFLINE is set; unset it (and log in) to upload to the Hub.")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PdaeError("cannot push: no Hugging Face token; run `hf auth login` or set HF_TOKEN, then retry.")
    return token


def push_folder(folder: Path, repo_id: str, token: str, private: bool = False) -> str:
    """Create (if needed) the model repo and upload the folder in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload PDAE model (pdae export)")
    except Exception as err:  # network, auth and permission errors of huggingface_hub
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PdaeError(
            f"upload to {repo_id} failed ({first}); the folder {folder} is complete, retry later."
        ) from None
    return str(url)
