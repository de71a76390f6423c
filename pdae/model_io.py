"""The DiffusionAutoencoder folder format (layout in pdae/model.py): read it, write it, find it on the Hub, and
read the same components from a pipeline run's outputs. Each component goes through its own module's loader."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pdae.errors import PdaeError

FORMAT = "pdae-autoencoder-v1"
CONFIG_NAME = "config.json"
STATS_NAME = "stats.safetensors"
SAMPLING_DEFAULTS = {"steps": 50, "latent_steps": 50, "clip_noise": False, "clip_x0": False, "shift_fraction": 1.0}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def read_json(path: Path) -> dict:
    """A JSON object from `path` ({} when the file is absent)."""
    from pdae.io import read_json as read

    return read(path, what="config") if path.is_file() else {}


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a local folder written by save_pretrained / `pdae export` (its config.json has our format)."""
    cfg = Path(path) / CONFIG_NAME
    return cfg.is_file() and read_json(cfg).get("format") == FORMAT


def resolve_source(source: str | os.PathLike, **hub: Any) -> Path:
    """A local folder for `source`: the folder itself, or a Hub repo id fetched with huggingface_hub (cached)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise PdaeError(f"{path} is a file; pass the folder written by save_pretrained or `pdae export`.")
        return path
    if not HUB_ID.fullmatch(str(source)):
        raise PdaeError(f"model folder not found: {source}; pass a folder from `pdae export` or a Hub id owner/name.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), library_name="pdae", **hub))
    except Exception as err:  # huggingface_hub raises many types (offline, 404, auth, network)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PdaeError(
            f"cannot get '{source}' from the Hugging Face Hub ({first}); check the id and your network "
            "(HF_HUB_OFFLINE, HF_TOKEN) or pass a local folder."
        ) from None


def _directions(folder: Path) -> tuple[Any, dict]:
    """(AttributeDirections, the facts of its config.json other than format/attributes)."""
    from pdae.probes import CONFIG_NAME as DIRECTIONS_CONFIG
    from pdae.probes import AttributeDirections

    extra = read_json(folder / DIRECTIONS_CONFIG)
    return AttributeDirections.load(folder), {k: v for k, v in extra.items() if k not in ("format", "attributes")}


def read_run(
    baseline: str | os.PathLike,
    pdae: str | os.PathLike,
    latent: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
    classifier: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The DiffusionAutoencoder constructor's components from a run's output folders (None: left out)."""
    from pdae.baseline import load_schedule
    from pdae.evaluate import require_dir
    from pdae.latent import load_latent
    from pdae.nets.pdae import load_backbone, load_pdae
    from pdae.probes import Normaliser

    # The baseline may also be a hub id already in the local cache (pdae.nets.backbone.load_backbone).
    hub_id = not Path(baseline).exists() and HUB_ID.fullmatch(str(baseline))
    backbone = load_backbone(baseline if hub_id else require_dir(baseline, "baseline"))
    model, schedule = load_pdae(require_dir(pdae, "pdae"), backbone), load_schedule(baseline)
    dirs, extra = _directions(Path(classifier)) if classifier is not None else (None, {})
    return {
        "model": model,
        "schedule": schedule,
        "scheduler_config": read_json(Path(baseline) / "scheduler_config.json") or None,
        "latent": load_latent(latent) if latent is not None else None,
        "stats": Normaliser.from_stats(stats) if stats is not None else None,
        "directions": dirs,
        "directions_extra": extra,
    }


def read_folder(root: Path) -> tuple[dict[str, Any], dict | None]:
    """(constructor components, sampling defaults) of a model folder; a foreign folder raises PdaeError."""
    from pdae.baseline import load_schedule
    from pdae.latent import load_latent
    from pdae.nets.pdae import load_backbone, load_pdae
    from pdae.probes import Normaliser

    cfg = read_json(root / CONFIG_NAME)
    if cfg.get("format") != FORMAT:
        raise PdaeError(
            f"{root / CONFIG_NAME} is not a {FORMAT} config (found format {cfg.get('format')!r}); pass a folder "
            "written by save_pretrained or `pdae export`."
        )
    parts = {"unet": "unet", "scheduler": "scheduler", "pdae": "pdae", **(cfg.get("components") or {})}

    def sub(name: str) -> Path | None:
        return root / parts[name] if parts.get(name) else None

    model = load_pdae(sub("pdae"), load_backbone(root, subfolder=parts["unet"]))
    dirs, extra = _directions(sub("directions")) if sub("directions") else (None, {})
    components = {
        "model": model,
        "schedule": load_schedule(sub("scheduler")),
        "scheduler_config": read_json(sub("scheduler") / "scheduler_config.json") or None,
        "latent": load_latent(sub("latent")) if sub("latent") else None,
        "stats": Normaliser.from_stats(sub("stats") / STATS_NAME) if sub("stats") else None,
        "directions": dirs,
        "directions_extra": extra,
    }
    return components, cfg.get("sampling")


def write_components(ae: Any, folder: Path) -> None:
    """Write every component of a DiffusionAutoencoder and the top-level config.json into `folder`."""
    from pdae.io import save_tensors, write_json
    from pdae.latent import save_latent
    from pdae.nets.pdae import save_pdae

    ae.model.backbone.unet.save_pretrained(folder / "unet", safe_serialization=True)
    write_json(folder / "scheduler" / "scheduler_config.json", ae.scheduler_config)
    save_pdae(ae.model, folder / "pdae")
    if ae.latent is not None:
        save_latent(ae.latent, folder / "latent")
    if ae.stats is not None:
        save_tensors(folder / "stats" / STATS_NAME, {"mean": ae.stats.mean, "std": ae.stats.std})
        write_json(folder / "stats" / "config.json", {"format": "pdae-stats-v1", "z_dim": ae.stats.dim})
    if ae.directions is not None:
        ae.directions.save(folder / "directions", extra=ae.directions_extra)
    write_json(folder / CONFIG_NAME, ae.config())
