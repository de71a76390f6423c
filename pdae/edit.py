"""Attribute manipulation and interpolation on top of the autoencoding API (docs/method.md §5).

- Manipulation: z_n' = z_n + s * sqrt(d) * w/‖w‖ in normalised space, de-normalise, decode with the x_T inverted
  from the ORIGINAL z (so only the semantics move, the stochastic details stay).
- Interpolation: Lerp of z with Slerp of x_T; or "G mixing": both codes drive G at every step and the shifts are
  mixed, g = (1 - a) G(x_t, z1, t) + a G(x_t, z2, t), again from Slerp-ed x_T.
Images are (N, C, H, W) in [-1, 1]; the model is a PDAE in eval mode (pdae.autoencode.load_models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from pdae.autoencode import decode, encode, invert, lerp, slerp
from pdae.diffusion import Schedule
from pdae.errors import PdaeError
from pdae.probes import AttributeDirections, Normaliser
from pdae.sampling import ModelFn
from pdae.solvers import solver_sample

MODES = ("lerp", "mix")


def load_image(path: str | Path, image_size: int, channels: int) -> Tensor:
    """One image file (PNG/JPG/...) centre-cropped, resized to `image_size` -> (1, channels, S, S) in [-1, 1]."""
    from pdae.data.folder import decode_image

    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"image not found: {path}; pass an existing PNG/JPG file or use --index N.")
    return decode_image(path, image_size, channels, str(path)).unsqueeze(0)


def edit_codes(z: Tensor, normaliser: Normaliser, direction: Tensor, scales: Sequence[float]) -> Tensor:
    """Move raw codes z (N, d) along unit direction(s) (d,) or (N, d) in normalised space -> raw (S, N, d).

    Row s is denormalise(normalise(z) + scales[s] * sqrt(d) * direction), computed in raw space as
    z + scales[s] * sqrt(d) * direction * std (so scale 0 returns z exactly).
    """
    z = z.flatten(1).float()
    step = math.sqrt(z.shape[1]) * direction.to(z).expand_as(z) * normaliser.std.to(z)
    return torch.stack([z + float(s) * step for s in scales])


@torch.no_grad()
def manipulate(
    model,
    schedule: Schedule,
    images: Tensor,
    normaliser: Normaliser,
    direction: Tensor,
    scales: Sequence[float],
    steps: int = 100,
    *,
    z: Tensor | None = None,
    x_T: Tensor | None = None,
    batch_size: int = 256,
    progress: bool = False,
    solver: str = "ddim",
    inversion_steps: int | None = None,
) -> Tensor:
    """Edited images (N, S, C, H, W) in [-1, 1] for images (N, C, H, W) and `scales` (S values).

    `direction`: unit vector (d,) or one per image (N, d) in normalised z space. z and x_T (inferred from the
    original z with DDIM, `inversion_steps` (None: `steps`)) are computed when not given. Decoding: `solver`, `steps`.
    """
    z = encode(model, images, batch_size) if z is None else z
    if x_T is None:
        x_T = invert(model, images, z, schedule, inversion_steps or steps, batch_size, progress)
    codes = edit_codes(z, normaliser, direction, scales)  # (S, N, d)
    n_scales = codes.shape[0]
    out = decode(
        model,
        codes.flatten(0, 1),
        x_T.repeat(n_scales, 1, 1, 1),
        schedule,
        steps,
        sampler=solver,
        batch_size=batch_size,
        progress=progress,
    )
    return out.unflatten(0, (n_scales, len(images))).transpose(0, 1)


def mixed_model_fn(model, z1: Tensor, z2: Tensor, alpha: Tensor) -> ModelFn:
    """Sampler callable (x_t, t) -> (eps_hat, (1 - a) G(x_t, z1, t) + a G(x_t, z2, t)); z1, z2 (N, d), alpha (N,).

    One frozen down-path pass per step feeds the frozen up path and both G evaluations.
    """
    a = alpha.view(-1, 1, 1, 1)

    def fn(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        feats = model.features(x_t, t)
        eps = model.backbone.eps_from_features(feats)
        g1, g2 = model.gradient(feats, z1), model.gradient(feats, z2)
        return eps, (1 - a.to(g1)) * g1 + a.to(g1) * g2

    return fn


@torch.no_grad()
def interpolate(
    model,
    schedule: Schedule,
    images_a: Tensor,
    images_b: Tensor,
    alphas: Sequence[float],
    steps: int = 100,
    modes: Sequence[str] = MODES,
    batch_size: int = 256,
    progress: bool = False,
    solver: str = "ddim",
    inversion_steps: int | None = None,
) -> dict[str, Tensor]:
    """Interpolations between image pairs (N, C, H, W) -> {mode: (N, F, C, H, W)} for F = len(alphas).

    Each image's (z, x_T) is inferred first (DDIM, `inversion_steps`, None: `steps`); x_T is always Slerp-ed.
    `lerp`: decode Lerp(z1, z2; a). `mix`: decode with the G outputs of z1 and z2 mixed by a (`mixed_model_fn`).
    Decoding uses `solver` with `steps` network evaluations.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise PdaeError(f"unknown interpolation mode '{bad[0]}'; use one of: {', '.join(MODES)}.")
    n, n_frames = len(images_a), len(alphas)
    z = encode(model, torch.cat([images_a, images_b]), batch_size)
    x_T = invert(model, torch.cat([images_a, images_b]), z, schedule, inversion_steps or steps, batch_size, progress)
    z1, z2, xt1, xt2 = z[:n], z[n:], x_T[:n], x_T[n:]
    # Frame-major (F, N, ...) flattened to F*N, reshaped to (N, F, ...) at the end.
    xts = torch.cat([slerp(xt1, xt2, float(a)) for a in alphas])
    out: dict[str, Tensor] = {}
    if "lerp" in modes:
        zs = torch.cat([lerp(z1, z2, float(a)) for a in alphas])
        frames = decode(model, zs, xts, schedule, steps, sampler=solver, batch_size=batch_size, progress=progress)
        out["lerp"] = frames.unflatten(0, (n_frames, n)).transpose(0, 1)
    if "mix" in modes:
        dev = next(model.parameters()).device
        za, zb = z1.repeat(n_frames, 1), z2.repeat(n_frames, 1)
        al = torch.tensor([float(a) for a in alphas]).repeat_interleave(n)
        chunks = []
        for i in range(0, len(xts), batch_size):
            sl = slice(i, i + batch_size)
            fn = mixed_model_fn(model, za[sl].to(dev), zb[sl].to(dev), al[sl].to(dev))
            frame = solver_sample(fn, xts[sl].to(dev), schedule, steps, solver, progress=progress)
            chunks.append(frame.clamp(-1, 1).cpu())
        out["mix"] = torch.cat(chunks).unflatten(0, (n_frames, n)).transpose(0, 1)
    return out


@torch.no_grad()
def manipulation_success(
    model,
    schedule: Schedule,
    scorer,
    images: Tensor,
    labels: Tensor,
    directions: AttributeDirections,
    class_attrs: dict[int, str],
    scale: float,
    steps: int = 100,
    batch_size: int = 256,
    progress: bool = False,
    solver: str = "ddim",
    inversion_steps: int | None = None,
    *,
    z: Tensor | None = None,
    x_T: Tensor | None = None,
    reconstruction: bool = True,
) -> dict:
    """Share of images (label != k) that `scorer` assigns to class k after an edit along `class_attrs[k]`.

    images (N, C, H, W), labels (N,). z (N, d) and x_T (DDIM inversion from z with `inversion_steps`, None: `steps`)
    are computed when not given (pass them to score several direction sets on the same images); decoding: `solver`
    with `steps` evaluations. Returns `manipulation_success` (mean over k), `per_class` {k: share}, and
    `reconstruction_agreement` (scale 0: share still classified as their own label; None with reconstruction=False,
    which skips that decode).
    """
    z = encode(model, images, batch_size) if z is None else z
    x_T = invert(model, images, z, schedule, inversion_steps or steps, batch_size, progress) if x_T is None else x_T
    recon_ok = None
    if reconstruction:
        recon = decode(model, z, x_T, schedule, steps, sampler=solver, batch_size=batch_size, progress=progress)
        recon_ok = (scorer.predict_proba(recon).argmax(1) == labels).double().mean().item()
    norm, codes, xts, targets = directions.normaliser, [], [], []
    for k, name in sorted(class_attrs.items()):
        sel = labels != k
        if not sel.any():
            continue
        codes.append(edit_codes(z[sel], norm, directions.direction(name), [scale])[0])
        xts.append(x_T[sel])
        targets.append(torch.full((int(sel.sum()),), k))
    if not codes:
        return {"manipulation_success": None, "per_class": {}, "reconstruction_agreement": recon_ok}
    edited = decode(
        model,
        torch.cat(codes),
        torch.cat(xts),
        schedule,
        steps,
        sampler=solver,
        batch_size=batch_size,
        progress=progress,
    )
    target = torch.cat(targets)
    hit = (scorer.predict_proba(edited).argmax(1) == target).double()
    per_class = {int(k): hit[target == k].mean().item() for k in target.unique()}
    return {
        "manipulation_success": sum(per_class.values()) / len(per_class),
        "per_class": per_class,
        "reconstruction_agreement": recon_ok,
    }


def select_direction_c(
    model, schedule: Schedule, scorer, images: Tensor, labels: Tensor, fit, candidates: Sequence[float],
    class_attrs: dict[int, str], scale: float, steps: int = 100, batch_size: int = 256,
) -> dict:  # fmt: skip
    """Choose the L2 strength of the edit-direction probes by manipulation success on validation images.

    fit(C) -> AttributeDirections fitted with inverse strength C on rows that exclude the validation images
    (N, C, H, W) with labels (N,). z and x_T are inferred once and shared by every candidate. Ties go to the earlier
    candidate. Returns {"candidates", "validation_manipulation_success", "selected", "validation_images"}.
    """
    z = encode(model, images, batch_size)
    x_T = invert(model, images, z, schedule, steps, batch_size)
    scores = []
    for c in candidates:
        res = manipulation_success(model, schedule, scorer, images, labels, fit(c), class_attrs, scale, steps,
                                   batch_size, z=z, x_T=x_T, reconstruction=False)  # fmt: skip
        scores.append(res["manipulation_success"])
    best = max(range(len(scores)), key=lambda i: -1.0 if scores[i] is None else scores[i])
    return {"candidates": list(candidates), "validation_manipulation_success": scores, "selected": candidates[best],
            "validation_images": len(images)}  # fmt: skip


def balanced_subset(labels: Tensor | None, n: int, seed: int = 0, size: int | None = None) -> Tensor:
    """Indices (<= n,) of a seeded subset that cycles through the classes (consecutive entries differ in label).

    Without labels (None), a seeded random subset of range(size).
    """
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        return torch.randperm(int(size or 0), generator=gen)[:n]
    pools = [torch.nonzero(labels == k).flatten() for k in labels.unique()]
    pools = [p[torch.randperm(len(p), generator=gen)].tolist() for p in pools]
    out: list[int] = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return torch.tensor(out, dtype=torch.long)


def figure_targets(labels: Tensor | None, class_attrs: dict[int, str], names: Sequence[str], n: int) -> list[str]:
    """An edit attribute per figure row: a class other than the image's own (cycling), else the names in turn."""
    if labels is not None and class_attrs:
        classes = sorted(class_attrs)
        out = []
        for i in range(n):
            others = [k for k in classes if k != int(labels[i])] or classes
            out.append(class_attrs[others[i % len(others)]])
        return out
    if not names:
        raise PdaeError("no attribute directions to manipulate; the dataset has no usable binary attribute.")
    return [names[i % len(names)] for i in range(n)]


def _grid_axes(grid: Tensor, rows: Sequence[str], cols: Sequence[str], title: str):
    """A matplotlib figure showing a uint8 (H, W, 3) grid with one label per row and per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 40 + 1.5), max(2.0, h / 40 + 0.8)))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([(i + 0.5) * w / len(cols) for i in range(len(cols))], list(cols), fontsize=7)
    ax.set_yticks([(i + 0.5) * h / len(rows) for i in range(len(rows))], list(rows), fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    return fig


def manipulation_figure(edited: Tensor, row_labels: Sequence[str], scales: Sequence[float], zoom: int = 4):
    """Figure of edited images (N, S, C, H, W): rows = images (labelled), columns = scales."""
    from pdae.io import image_grid

    grid = image_grid(edited.flatten(0, 1), nrow=edited.shape[1], scale=zoom)
    return _grid_axes(grid, row_labels, [f"s={s:g}" for s in scales], "Attribute manipulation (x_T from original z)")


def interpolation_figure(frames: dict[str, Tensor], alphas: Sequence[float], zoom: int = 4):
    """Figure of interpolations {mode: (N, F, C, H, W)}: for each pair one row per mode, columns = alphas."""
    from pdae.io import image_grid

    modes = list(frames)
    stacked = torch.stack([frames[m] for m in modes], dim=1).flatten(0, 1)  # (N * M, F, C, H, W)
    rows = [f"pair {i} {m}" for i in range(len(frames[modes[0]])) for m in modes]
    grid = image_grid(stacked.flatten(0, 1), nrow=stacked.shape[1], scale=zoom)
    title = "Interpolation: lerp z + slerp x_T, and G mixing"
    return _grid_axes(grid, rows, [f"{a:.2g}" for a in alphas], title)
