"""DiffusionAutoencoder: a trained PDAE as one object (frozen DPM + E + G, optional latent DPM, z statistics and
attribute directions) with diffusers-style `from_pretrained` / `save_pretrained`.

Every method is a thin layer over the library functions (pdae.autoencode, pdae.edit, pdae.latent): for float32
weights the results are bitwise those of calling the functions on the run's files. Images go in and come out in
the forms of `pdae.inputs` (PIL, paths, arrays, tensors in [-1, 1]). docs/api.md has the copyable examples.

Folder format (every file readable without unpickling):

    config.json                      class, format, shapes, components, attribute names, sampling defaults
    unet/                            the frozen DPM: diffusers UNet2DModel (config.json + safetensors)
    scheduler/scheduler_config.json  its beta schedule (diffusers DDIMScheduler config)
    pdae/                            E and G: pdae_config.json + pdae.safetensors (pdae.nets.pdae.save_pdae)
    latent/                          latent DPM: latent_config.json + latent.safetensors (optional)
    stats/                           train-split z mean/std: config.json + stats.safetensors (optional)
    directions/                      attribute directions: config.json + directions.safetensors (optional)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pdae.errors import PdaeError
from pdae.inputs import ImageForm, from_batch, to_batch
from pdae.model_io import (  # noqa: F401  (re-exported: the folder format's names)
    CONFIG_NAME,
    FORMAT,
    SAMPLING_DEFAULTS,
    is_model_folder,
    read_folder,
    read_run,
    resolve_source,
    write_components,
)


class DiffusionAutoencoder:
    """A trained diffusion autoencoder. z = E(x0) is the semantic code (N, z_dim); x_T the stochastic code.

    Build it with `from_pretrained(folder or hub id)` or `from_run(...)` (pipeline outputs). Weights live on
    `.device` in `.dtype` (`.to("cuda")`, `.to(torch.bfloat16)`); the latent DPM always stays float32.
    """

    def __init__(
        self,
        model,
        schedule,
        scheduler_config: dict | None = None,
        latent=None,
        stats=None,
        directions=None,
        directions_extra: dict | None = None,
        sampling: dict | None = None,
    ) -> None:
        from pdae.baseline import scheduler_config as default_scheduler

        self.model = model.eval()
        self.schedule = schedule
        self.scheduler_config = dict(scheduler_config or default_scheduler())
        self.latent = latent.eval() if latent is not None else None
        self.stats = stats
        self.directions = directions
        self.directions_extra = dict(directions_extra or {})
        self.sampling = {**SAMPLING_DEFAULTS, **(sampling or {})}

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        baseline: str | os.PathLike = "models/baseline",
        pdae: str | os.PathLike = "models/pdae",
        latent: str | os.PathLike | None = None,
        stats: str | os.PathLike | None = None,
        classifier: str | os.PathLike | None = None,
        sampling: dict | None = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> DiffusionAutoencoder:
        """From the pipeline's outputs: models/baseline, models/pdae and optionally models/latent,
        latents/stats.safetensors, models/classifier (missing required folders name the stage to run)."""
        ae = cls(**read_run(baseline, pdae, latent, stats, classifier), sampling=sampling)
        ae._check()
        return ae.to(device, torch_dtype)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> DiffusionAutoencoder:
        """Load a folder written by `save_pretrained` / `pdae export`, or a Hub repo id (downloaded once, cached)."""
        hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        parts, sampling = read_folder(resolve_source(source, **hub))
        ae = cls(**parts, sampling=sampling)
        ae._check()
        return ae.to(device, torch_dtype)

    def _check(self) -> None:
        d = self.z_dim
        for what, n in (("z statistics", self.stats), ("attribute directions", self.directions)):
            dim = None if n is None else (n.dim if hasattr(n, "dim") else n.normaliser.dim)
            if dim is not None and dim != d:
                raise PdaeError(f"the {what} have {dim} dimensions but the encoder's z has {d}; re-run the pipeline.")
        if self.latent is not None and self.latent.mlp.z_dim != d:
            raise PdaeError(f"the latent DPM models {self.latent.mlp.z_dim}-d codes but z has {d}; re-run latent.")

    def config(self) -> dict[str, Any]:
        """The top-level config.json of `save_pretrained`."""
        import pdae

        return {
            "_class_name": type(self).__name__,
            "format": FORMAT,
            "pdae_version": pdae.__version__,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "z_dim": self.z_dim,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
            "components": {
                "unet": "unet",
                "scheduler": "scheduler",
                "pdae": "pdae",
                "latent": "latent" if self.latent is not None else None,
                "stats": "stats" if self.stats is not None else None,
                "directions": "directions" if self.directions is not None else None,
            },
            "attributes": self.attributes,
            "sampling": self.sampling,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the folder (see module doc) atomically; an existing non-empty folder must be an earlier save."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not is_model_folder(folder):
            raise PdaeError(f"{folder} exists and is not an earlier model folder; pass a new or empty folder.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write_components(self, tmp)
            os.chmod(tmp, 0o755)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    # ---- device, dtype, facts ------------------------------------------------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> DiffusionAutoencoder:
        """Move like torch: `.to("cuda")`, `.to(torch.float16)`, `.to("cuda", torch.bfloat16)`; returns self."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif a is not None:
                device = a
        if device is not None:
            from pdae.runtime import resolve_device

            device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if dtype is not None and not dtype.is_floating_point:
            raise PdaeError(f"torch_dtype must be a floating dtype (float32, float16, bfloat16), not {dtype}.")
        self.model.to(device=device, dtype=dtype)
        if self.latent is not None and device is not None:
            self.latent.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.model.backbone.image_size

    @property
    def in_channels(self) -> int:
        return self.model.backbone.in_channels

    @property
    def z_dim(self) -> int:
        return self.model.z_dim

    @property
    def attributes(self) -> list[str]:
        """Names `manipulate` accepts (the classify stage's binary attributes)."""
        return list(self.directions.names) if self.directions is not None else []

    def __repr__(self) -> str:
        extra = [n for n, v in (("latent", self.latent), ("stats", self.stats), ("directions", self.directions)) if v]
        return (
            f"DiffusionAutoencoder({self.in_channels}x{self.image_size}x{self.image_size}, z_dim={self.z_dim}, "
            f"device={self.device}, dtype={self.dtype}, with={extra})"
        )

    # ---- autoencoding --------------------------------------------------------------------------------------------

    def _images(self, images: Any) -> tuple[Tensor, ImageForm]:
        return to_batch(images, self.image_size, self.in_channels)

    def _precision(self):
        """Autocast for reduced-precision weights: the networks run in `dtype`, the samplers' state stays float32
        (DDIM's 1 - abar near t = 0 is not representable in 16-bit floats)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def encode(self, images: Any, batch_size: int = 256) -> Tensor:
        """Semantic codes z, float32 (N, z_dim) on the CPU, for images in any accepted form."""
        from pdae.autoencode import encode

        x, _ = self._images(images)
        with self._precision():
            return encode(self.model, x, batch_size)

    def invert(self, images: Any, z: Tensor | None = None, steps: int = 100, batch_size: int = 256) -> Tensor:
        """Stochastic codes x_T, float32 (N, C, H, W): DDIM inversion of the images given z (E(x0) if None)."""
        from pdae.autoencode import encode, invert

        x, _ = self._images(images)
        with self._precision():
            z = encode(self.model, x, batch_size) if z is None else z
            return invert(self.model, x, z, self.schedule, steps, batch_size)

    def decode(
        self,
        z: Tensor,
        x_T: Tensor | None = None,
        steps: int = 100,
        generator: torch.Generator | None = None,
        sampler: str = "ddim",
        shift_fraction: float = 1.0,
        output_type: str = "pt",
        batch_size: int = 256,
    ) -> Any:
        """Images from codes z (N, z_dim) and x_T (N, C, H, W) (random from `generator` when None)."""
        from pdae.autoencode import decode, random_xT

        z = torch.as_tensor(z).reshape(-1, self.z_dim)
        if x_T is None:
            x_T = random_xT(len(z), (self.in_channels, self.image_size, self.image_size), generator)
        with self._precision():
            out = decode(
                self.model, z, x_T, self.schedule, steps, sampler,
                shift_fraction=shift_fraction, generator=generator, batch_size=batch_size,
            )  # fmt: skip
        return from_batch(out, ImageForm("pt"), output_type)

    def reconstruct(
        self,
        images: Any,
        steps: int = 100,
        x_T: str = "inferred",
        generator: torch.Generator | None = None,
        output_type: str | None = None,
        batch_size: int = 256,
    ) -> Any:
        """Autoencode: z = E(x0), x_T inferred by inversion ("inferred", near-exact) or random ("random")."""
        from pdae.autoencode import decode, encode, invert, random_xT

        if x_T not in ("inferred", "random"):
            raise PdaeError(f"x_T must be 'inferred' or 'random', not '{x_T}'.")
        x, form = self._images(images)
        with self._precision():
            z = encode(self.model, x, batch_size)
            if x_T == "inferred":
                xt = invert(self.model, x, z, self.schedule, steps, batch_size)
            else:
                xt = random_xT(len(x), tuple(x.shape[1:]), generator)
            out = decode(self.model, z, xt, self.schedule, steps, batch_size=batch_size)
        return from_batch(out, form, output_type)

    def interpolate(
        self,
        images_a: Any,
        images_b: Any,
        frames: int = 8,
        mode: str = "lerp",
        steps: int = 100,
        output_type: str | None = None,
        batch_size: int = 256,
    ) -> Any:
        """`frames` images from a to b per pair (endpoints included): (N, F, ...) or (F, ...) for single images.

        mode "lerp": Lerp of z with Slerp of x_T; "mix": G's outputs for both codes mixed (pdae.edit.interpolate).
        """
        from pdae.edit import interpolate

        xa, form = self._images(images_a)
        xb, _ = self._images(images_b)
        if len(xa) != len(xb):
            raise PdaeError(f"interpolate needs as many images b as a ({len(xb)} vs {len(xa)}).")
        if frames < 2:
            raise PdaeError(f"frames must be at least 2 (the two endpoints), not {frames}.")
        alphas = torch.linspace(0, 1, frames).tolist()
        with self._precision():
            out = interpolate(self.model, self.schedule, xa, xb, alphas, steps, [mode], batch_size)[mode]
        return from_batch(out, form, output_type)

    def manipulate(
        self,
        images: Any,
        attribute: str | Tensor,
        scale: float | Sequence[float] = 1.0,
        steps: int = 100,
        output_type: str | None = None,
        batch_size: int = 256,
    ) -> Any:
        """Edit images toward more (scale > 0) or less (< 0) of `attribute`: z_n + s * sqrt(d) * w/|w|.

        `attribute`: a name in `.attributes`, or a direction tensor (z_dim,) in normalised z space (then the z
        statistics are used). A list of scales adds a scale axis: (N, S, ...).
        """
        from pdae.edit import manipulate

        if isinstance(attribute, str):
            if self.directions is None:
                raise PdaeError("this model has no attribute directions; export it with models/classifier.")
            direction, norm = self.directions.direction(attribute), self.directions.normaliser
        else:
            if self.stats is None:
                raise PdaeError("a direction tensor needs the model's z statistics (stats/), which it lacks.")
            direction, norm = torch.as_tensor(attribute).float().flatten(), self.stats
            if direction.numel() != self.z_dim:
                raise PdaeError(f"the direction has {direction.numel()} values but z has {self.z_dim}.")
            direction = direction / direction.norm().clamp_min(1e-12)
        scales = [float(scale)] if isinstance(scale, (int, float)) else [float(s) for s in scale]
        x, form = self._images(images)
        with self._precision():
            out = manipulate(self.model, self.schedule, x, norm, direction, scales, steps, batch_size=batch_size)
        return from_batch(out[:, 0] if isinstance(scale, (int, float)) else out, form, output_type)

    def sample(
        self,
        n: int = 16,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_z: bool = False,
        batch_size: int = 256,
        **sampling: Any,
    ) -> Any:
        """n new images: z from the latent DPM, random x_T, decoded with G for the first shift_fraction of steps.

        Defaults (steps, latent_steps, clip_noise, clip_x0, shift_fraction) are the run's (`.sampling`); override
        any by keyword. Returns the images, or (images, z (n, z_dim)) with return_z.
        """
        from pdae.autoencode import decode, random_xT
        from pdae.latent import sample_latents

        if self.latent is None:
            raise PdaeError("this model has no latent DPM; export it with models/latent to sample new images.")
        bad = sorted(set(sampling) - set(SAMPLING_DEFAULTS))
        if bad:
            raise PdaeError(f"unknown sampling option '{bad[0]}'; use: {', '.join(sorted(SAMPLING_DEFAULTS))}.")
        opt = {**self.sampling, **sampling}
        steps = int(steps or opt["steps"])
        z = sample_latents(
            self.latent, n, steps=int(opt["latent_steps"]), clip_noise=bool(opt["clip_noise"]),
            clip_x0=bool(opt["clip_x0"]), generator=generator,
        )  # fmt: skip
        x_T = random_xT(n, (self.in_channels, self.image_size, self.image_size), generator)
        with self._precision():
            out = decode(
                self.model, z, x_T, self.schedule, steps,
                shift_fraction=float(opt["shift_fraction"]), batch_size=batch_size,
            )  # fmt: skip
        images = from_batch(out, ImageForm("pt"), output_type)
        return (images, z) if return_z else images


def open_model(
    baseline: str | os.PathLike,
    pdae: str | os.PathLike,
    device: torch.device | str | None = None,
    **optional: Any,
) -> DiffusionAutoencoder:
    """The commands' loader: `pdae` is either an exported model folder (then `baseline` and `optional` are not
    needed) or the run's models/pdae next to `baseline` (optional: latent, stats, classifier, sampling)."""
    if is_model_folder(pdae):
        return DiffusionAutoencoder.from_pretrained(pdae, device=device)
    return DiffusionAutoencoder.from_run(baseline, pdae, device=device, **optional)
