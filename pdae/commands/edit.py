"""Editing commands: attribute manipulation and interpolation of images with a trained PDAE."""

from __future__ import annotations

from pathlib import Path

import typer

from pdae.commands import options
from pdae.errors import PdaeError

IMAGES = typer.Argument(None, help="Image file(s) (PNG/JPG/...), centre-cropped and resized to the model size.")
INDEX = options.count(None, "--index", "-i", help="Test image of data/prepared by position (repeatable).", low=0)
STEPS = options.count(100, "--steps", help="Network evaluations of the decoding (and the inversion).", high=1000)
SOLVER = typer.Option("ddim", "--solver", help="Decoding solver: ddim | dpmpp2m | dpmpp3m | unipc.")
INV_STEPS = options.count(None, "--inversion-steps", help="DDIM inversion steps (default: --steps).", high=1000)
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda.")
ZOOM = options.count(4, "--zoom", help="Integer upscaling of the written PNG.", high=options.MAX_ZOOM)
BASELINE = typer.Option(Path("models/baseline"), "--baseline", help="Frozen DPM folder (baseline stage).")
PDAE_DIR = typer.Option(Path("models/pdae"), "--pdae", help="PDAE folder (train stage), or a `pdae export` folder.")
PREPARED = typer.Option(Path("data/prepared"), "--prepared", help="Prepared data folder (for --index).")


def _load_sources(
    images: list[Path] | None, index: list[int] | None, prepared: Path, size: int, channels: int
) -> tuple:
    """Images (N, C, S, S) in [-1, 1] from files, then from test-split positions; plus a short name for each."""
    import torch

    from pdae.edit import load_image

    tensors, names = [load_image(p, size, channels) for p in images or []], [p.name for p in images or []]
    if index:
        from pdae.data import load_split

        test, _ = load_split(prepared, "test")
        if tuple(test.shape[1:]) != (channels, size, size):
            raise PdaeError(
                f"{prepared} holds images {tuple(test.shape[1:])} but the model expects {(channels, size, size)}; "
                "pass the prepared folder the model was trained on (--prepared)."
            )
        for i in index:
            if not 0 <= i < len(test):
                raise PdaeError(f"--index {i} is out of range: the test split of {prepared} has {len(test)} images.")
            tensors.append(test[i : i + 1])
            names.append(f"test[{i}]")
    return (torch.cat(tensors) if tensors else None), names


def _models(baseline: Path, pdae_dir: Path, device: str):
    """(model, schedule) of the run's folders, or of an exported model folder given as --pdae."""
    from pdae.model import open_model

    ae = open_model(baseline, pdae_dir, device)
    return ae.model, ae.schedule


def manipulate_cmd(
    images: list[Path] | None = IMAGES,
    index: list[int] | None = INDEX,
    attr: str = typer.Option(..., "--attr", "-a", help="Attribute to move along (see models/classifier)."),
    scale: list[float] = options.real(
        [0.0, 1.0, 2.0], "--scale", "-s", help="Edit strength s in z_n + s·√d·w/‖w‖ (repeatable).", low=-100, high=100
    ),
    out: Path = options.out_file(Path("manipulation.png"), "--out", "-o", help="PNG to write."),
    steps: int = STEPS,
    solver: str = SOLVER,
    inversion_steps: int | None = INV_STEPS,
    device: str = DEVICE,
    zoom: int = ZOOM,
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    classifier: Path = typer.Option(Path("models/classifier"), "--classifier", help="classify stage output."),
    stats: Path | None = typer.Option(
        None, "--stats", help="z mean/std file; default: the copy of latents/stats.safetensors the directions use."
    ),
    prepared: Path = PREPARED,
) -> None:
    """Move images along an attribute direction; writes a PNG (rows: images; columns: input, then each scale)."""
    import torch

    from pdae.edit import manipulate
    from pdae.io import save_image_grid
    from pdae.model import is_model_folder
    from pdae.probes import AttributeDirections, Normaliser
    from pdae.solvers import check_solver

    check_solver(solver)
    if is_model_folder(pdae_dir):  # an exported model carries its own directions (with their z statistics)
        classifier = pdae_dir / "directions"
    directions = AttributeDirections.load(classifier)
    direction = directions.direction(attr)
    norm = Normaliser.from_stats(stats) if stats is not None else directions.normaliser
    if norm.dim != direction.numel():
        raise PdaeError(f"{stats}: {norm.dim} statistics but the directions in {classifier} have {direction.numel()}.")
    if not images and not index:
        raise PdaeError("give an image file or --index N (a test image of data/prepared).")
    model, schedule = _models(baseline, pdae_dir, device)
    if model.z_dim != norm.dim:
        raise PdaeError(
            f"{classifier} was fitted on z_dim {norm.dim} but {pdae_dir} has z_dim {model.z_dim}; re-run classify."
        )
    x, names = _load_sources(images, index, prepared, model.backbone.image_size, model.backbone.in_channels)
    edited = manipulate(
        model,
        schedule,
        x,
        norm,
        direction,
        scale,
        steps,
        progress=True,
        solver=solver,
        inversion_steps=inversion_steps,
    )
    grid = torch.cat([x.unsqueeze(1), edited], dim=1)  # (N, 1 + S, C, H, W)
    save_image_grid(out, grid.flatten(0, 1), nrow=grid.shape[1], scale=zoom)
    typer.echo(f"wrote {out}: rows {', '.join(names)}; columns input, " + ", ".join(f"s={s:g}" for s in scale))


def interpolate_cmd(
    images: list[Path] | None = IMAGES,
    index: list[int] | None = INDEX,
    frames: int = options.count(8, "--frames", "-f", help="Frames including both endpoints.", low=2, high=256),
    mode: str = typer.Option("both", "--mode", help="lerp (Lerp z + Slerp x_T) | mix (mix G outputs) | both."),
    out: Path = options.out_file(Path("interpolation.png"), "--out", "-o", help="PNG to write."),
    steps: int = STEPS,
    solver: str = SOLVER,
    inversion_steps: int | None = INV_STEPS,
    device: str = DEVICE,
    zoom: int = ZOOM,
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    prepared: Path = PREPARED,
) -> None:
    """Interpolate between two images; writes a PNG (rows: modes; columns: image A, frames, image B)."""
    import torch

    from pdae.edit import MODES, interpolate
    from pdae.io import save_image_grid
    from pdae.solvers import check_solver

    check_solver(solver)
    modes = list(MODES) if mode == "both" else [mode]
    if mode != "both" and mode not in MODES:
        raise PdaeError(f"--mode '{mode}' is not supported; use lerp, mix or both.")
    if len(images or []) + len(index or []) != 2:
        raise PdaeError("give exactly two images: two files, two --index values, or one of each.")
    model, schedule = _models(baseline, pdae_dir, device)
    x, names = _load_sources(images, index, prepared, model.backbone.image_size, model.backbone.in_channels)
    alphas = torch.linspace(0, 1, frames).tolist()
    res = interpolate(
        model,
        schedule,
        x[:1],
        x[1:],
        alphas,
        steps,
        modes,
        progress=True,
        solver=solver,
        inversion_steps=inversion_steps,
    )
    rows = [torch.cat([x[:1], res[m][0], x[1:]]) for m in modes]  # each (F + 2, C, H, W)
    save_image_grid(out, torch.cat(rows), nrow=frames + 2, scale=zoom)
    typer.echo(f"wrote {out}: {names[0]} → {names[1]}, rows {', '.join(modes)}, {frames} frames between the inputs")


def register(app: typer.Typer) -> None:
    app.command("manipulate")(manipulate_cmd)
    app.command("interpolate")(interpolate_cmd)
