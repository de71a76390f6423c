"""Autoencoding commands: encode, reconstruct, sample, gap — thin wrappers over pdae.autoencode / pdae.evaluate."""

from __future__ import annotations

from pathlib import Path

import typer

from pdae.commands import options
from pdae.errors import PdaeError

BASELINE = typer.Option(Path("models/baseline"), "--baseline", help="Baseline DPM folder (baseline stage).")
PDAE_DIR = typer.Option(
    Path("models/pdae"), "--pdae", help="PDAE model folder (train stage), or a folder from `pdae export`."
)
DATA = typer.Option(Path("data/prepared"), "--data", help="Prepared data folder (prepare stage).")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda.")
SEED = options.seed(0, help="Random seed (random x_T, sample subsets).")
THREADS = options.count(2, "--threads", help="CPU threads.", high=256)
BATCH = options.count(256, "--batch-size", help="Images per network call.", high=options.MAX_BATCH)
STEPS_RANGE = {"low": 1, "high": 1000}
SOLVER = typer.Option("ddim", "--solver", help="Decoding solver: ddim | dpmpp2m | dpmpp3m | unipc.")


def prepare(seed: int, threads: int, device: str):
    """Seed, pin threads, flush float32 denormals (pdae.runtime.setup); -> device."""
    from pdae.runtime import setup

    return setup(seed, threads, device)


def load(baseline: Path, pdae_dir: Path, device):
    """(model, schedule) of the run's folders, or of an exported model folder given as --pdae; a missing folder
    names the stage to run."""
    from pdae.model import open_model

    ae = open_model(baseline, pdae_dir, device)
    return ae.model, ae.schedule


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def read_images(paths: list[Path], image_size: int, channels: int):
    """Image files (folders expanded) -> (images float32 (N, C, S, S) in [-1, 1], names)."""
    import torch

    from pdae.data.folder import IMAGE_EXTENSIONS, decode_image, list_image_files

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += list_image_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise PdaeError(f"image not found: {path}; pass image files ({', '.join(IMAGE_EXTENSIONS)}) or folders.")
    if not files:
        raise PdaeError("no images given; pass image files or folders.")
    images = torch.stack([decode_image(f, image_size, channels, str(f)) for f in files])
    return images, [str(f) for f in files]


def encode_cmd(
    images: list[Path] = typer.Argument(..., help="Image files or folders (resized/centre-cropped to the model)."),
    out: Path = options.out_file(Path("z.safetensors"), "--out", "-o", help="Output safetensors (z, optional x_T)."),
    x_t: bool = typer.Option(False, "--x-t/--no-x-t", help="Also infer the stochastic code x_T (DDIM inversion)."),
    steps: int = options.count(100, "--steps", help="Inversion steps for --x-t.", **STEPS_RANGE),
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    device: str = DEVICE,
    threads: int = THREADS,
    batch_size: int = BATCH,
) -> None:
    """Encode images to semantic codes z (N, z_dim); writes z (and the file names) to a safetensors file."""
    import json

    from pdae.autoencode import encode, invert
    from pdae.io import save_tensors

    dev = prepare(0, threads, device)
    model, schedule = load(baseline, pdae_dir, dev)
    x, names = read_images(images, model.backbone.image_size, model.backbone.in_channels)
    z = encode(model, x, batch_size)
    tensors = {"z": z}
    if x_t:
        tensors["x_T"] = invert(model, x, z, schedule, steps, batch_size, progress=True)
    save_tensors(out, tensors, metadata={"files": json.dumps(names), "x_T_steps": steps if x_t else ""})
    typer.echo(f"wrote {out}: z {tuple(z.shape)}" + (f", x_T {tuple(tensors['x_T'].shape)}" if x_t else ""))


def reconstruct_cmd(
    image: Path | None = typer.Argument(None, help="Image file to reconstruct (or use --index)."),
    index: int | None = options.count(None, "--index", help="Reconstruct test image N of --data.", low=0),
    x_t: str = typer.Option("inferred", "--x-t", help="inferred (DDIM inversion, near-exact) | random (same z)."),
    steps: int = options.count(
        100, "--steps", help="Network evaluations of the decoding (and of the inversion).", **STEPS_RANGE
    ),
    solver: str = SOLVER,
    inversion_steps: int | None = options.count(
        None, "--inversion-steps", help="DDIM inversion steps for --x-t inferred (default: --steps).", high=1000
    ),
    out: Path = options.out_file(Path("reconstruction.png"), "--out", "-o", help="Output PNG."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Write input | reconstruction side by side."),
    scale: int = options.count(4, "--scale", help="Pixel upscaling of the PNG.", high=options.MAX_ZOOM),
    data: Path = DATA,
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    device: str = DEVICE,
    seed: int = SEED,
    threads: int = THREADS,
) -> None:
    """Autoencode one image: z = E(x0), x_T inferred (DDIM inversion) or random, decoded; prints MSE and SSIM."""
    import torch

    from pdae.autoencode import reconstruct
    from pdae.io import save_image_grid
    from pdae.metrics import mse, ssim
    from pdae.solvers import check_solver

    check_solver(solver)
    if x_t not in ("inferred", "random"):
        raise PdaeError(f"--x-t must be inferred or random, not '{x_t}'.")
    if (image is None) == (index is None):
        raise PdaeError("pass exactly one of IMAGE or --index N.")
    dev = prepare(seed, threads, device)
    model, schedule = load(baseline, pdae_dir, dev)
    if image is not None:
        x, _ = read_images([image], model.backbone.image_size, model.backbone.in_channels)
    else:
        from pdae.data import load_split
        from pdae.evaluate import require_dir

        test_x, _ = load_split(require_dir(data, "data"), "test")
        if not 0 <= index < len(test_x):
            raise PdaeError(
                f"--index {index} is out of range: {data} has {len(test_x)} test images (0..{len(test_x) - 1})."
            )
        x = test_x[index : index + 1]
    gen = torch.Generator().manual_seed(seed)
    rec = reconstruct(
        model,
        x,
        schedule,
        steps,
        x_T=x_t,
        generator=gen,
        progress=True,
        solver=solver,
        inversion_steps=inversion_steps,
    )
    grid = torch.cat([x, rec]) if compare else rec
    save_image_grid(out, grid, nrow=len(grid), scale=scale)
    typer.echo(
        f"wrote {out}  (x_T {x_t}, {solver} {steps} steps)  "
        f"MSE {mse(rec, x).item():.3g}  SSIM {ssim(rec, x).item():.4f}"
    )


def sample_cmd(
    n: int = options.count(16, "--n", help="Number of images.", high=options.MAX_IMAGES),
    steps: int = options.count(50, "--steps", help="Network evaluations when decoding the images.", **STEPS_RANGE),
    solver: str | None = typer.Option(
        None, "--solver", help="Image decoding solver: ddim | dpmpp2m | dpmpp3m | unipc (default: latent.solver)."
    ),
    latent_solver: str | None = typer.Option(
        None, "--latent-solver", help="The latent DPM's solver (same choices; default: latent.latent_solver)."
    ),
    out: Path = options.out_file(Path("samples.png"), "--out", "-o", help="Output PNG grid."),
    save_z: Path | None = options.out_file(None, "--save-z", help="Also write the sampled z (safetensors)."),
    latent: Path = typer.Option(Path("models/latent"), "--latent", help="Latent DPM folder (latent stage)."),
    params: Path | None = typer.Option(
        None, "--params", help="params.yaml whose `latent` section is used [params.yaml, defaults if absent]."
    ),
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    device: str = DEVICE,
    seed: int = SEED,
    threads: int = THREADS,
) -> None:
    """Unconditional samples: z from the latent DPM, random x_T, decoded by PDAE (G for the first 70% of steps)."""
    import math

    from pdae.config import LatentConfig, load_params
    from pdae.evaluate import LatentSampling, latent_dpm_samples
    from pdae.io import save_image_grid, save_tensors
    from pdae.model import is_model_folder
    from pdae.solvers import check_solver

    for name in (solver, latent_solver):
        if name is not None:
            check_solver(name)
    if is_model_folder(pdae_dir):  # an exported model carries its own latent DPM
        latent = pdae_dir / "latent"
    if not latent.is_dir():
        raise PdaeError(f"latent DPM folder not found: {latent} — run the latent stage (dvc repro latent) first.")
    path = params or Path("params.yaml")
    lat = load_params(path, sections=["latent"])["latent"] if params or path.is_file() else LatentConfig()
    dev = prepare(seed, threads, device)
    model, schedule = load(baseline, pdae_dir, dev)
    sampling = LatentSampling(
        lat.latent_steps,
        lat.clip_noise,
        lat.clip_x0,
        lat.shift_fraction,
        solver or lat.solver,
        latent_solver or lat.latent_solver,
    )
    with console(stderr=True).status(f"sampling {n} latents and decoding them"):
        images, z, reason = latent_dpm_samples(model, schedule, latent, n, steps, sampling, seed)
    if images is None:
        raise PdaeError(f"cannot sample: {reason}.")
    if save_z is not None:
        save_tensors(save_z, {"z": z})
    save_image_grid(out, images, nrow=math.ceil(math.sqrt(n)), scale=2)
    typer.echo(f"wrote {out}: {n} samples ({sampling.solver} {steps} decoding steps)")


def gap_cmd(
    n_images: int = options.count(64, "--n-images", help="Test images averaged per t.", high=options.MAX_IMAGES),
    out: Path | None = options.out_file(None, "--out", "-o", help="Save the curve as a PNG figure."),
    csv: Path | None = options.out_file(None, "--csv", help="Save the curve as CSV (t, gap_without, gap_with, ratio)"),
    data: Path = DATA,
    baseline: Path = BASELINE,
    pdae_dir: Path = PDAE_DIR,
    device: str = DEVICE,
    seed: int = SEED,
    threads: int = THREADS,
) -> None:
    """Posterior-mean-gap curve: MSE of predicted vs true posterior mean over t, without and with PDAE's shift."""
    from rich.table import Table

    from pdae.data import load_split
    from pdae.diagnostics import gap_reduction, plot_gap
    from pdae.evaluate import gap_frame, require_dir
    from pdae.io import save_figure, write_csv

    dev = prepare(seed, threads, device)
    model, schedule = load(baseline, pdae_dir, dev)
    test_x, _ = load_split(require_dir(data, "data"), "test")
    with console(stderr=True).status(f"gap curve on {min(n_images, len(test_x))} test images"):
        frame = gap_frame(model, schedule, test_x[:n_images], seed)
    table = Table("t", "gap without shift", "gap with shift", "ratio", title="Posterior mean gap")
    for row in frame.itertuples():
        table.add_row(str(row.t), f"{row.gap_without:.4g}", f"{row.gap_with:.4g}", f"{row.ratio:.3f}")
    con = console()
    con.print(table)
    con.print(f"gap reduction (t >= T/10): {gap_reduction(frame, schedule.T):.4f}")
    if out is not None:
        save_figure(out, plot_gap(frame))
    if csv is not None:
        write_csv(csv, frame)


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_cmd)
    app.command("reconstruct")(reconstruct_cmd)
    app.command("sample")(sample_cmd)
    app.command("gap")(gap_cmd)
