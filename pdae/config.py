"""Typed configuration mirroring params.yaml. The only place defaults live.

Each params.yaml section maps to one frozen pydantic model. `load_params` validates the sections a caller reads and
turns any problem into one PdaeError line that names the key, e.g.
``params.yaml: train.lr: Input should be greater than 0 (got -1)``. Besides each field's own bounds, one validator on
`Section` gives every field of every section (present and future) a range: floats finite, ints bounded by name
(seeds, layer widths, run lengths, other counts); a key given twice in params.yaml is an error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pdae.errors import PdaeError

PARAMS_FILE = "params.yaml"


# Ranges every section shares, applied by name to each int (and each int in a list) by `Section._ranges`; floats
# must be finite everywhere (allow_inf_nan=False). Sizes of network layers are bounded so that a typo such as
# z_dim: 1e23 is an error line and not an allocation attempt; any other count is bounded by MAX_COUNT.
SEED_MAX = 2**32 - 1  # numpy's seed range (torch accepts more)
MAX_COUNT = 2**24  # images per set, batch sizes, steps ...: far beyond a run this machine class can hold
MAX_LENGTH = 10**10  # training lengths in images seen, iteration counts
MAX_WIDTH = 8192  # widths and channel counts of a layer, latent dimensions
LENGTH_FIELDS = ("images", "classcond_images", "checkpoint_every", "max_iter", "fewshot_draws")
WIDTH_FIELDS = ("z_dim", "width", "channels", "encoder_channels", "attention_head_dim", "classifier_width")


def _int_range(name: str) -> tuple[int, int, str]:
    """(low, high, why) of an int field called `name` (low applies on top of the field's own bounds)."""
    if name == "seed" or name.endswith("_seed"):
        return 0, SEED_MAX, "the seed range of numpy and torch"
    if name in WIDTH_FIELDS:
        return -MAX_WIDTH, MAX_WIDTH, "a layer width this machine can allocate"
    if name in LENGTH_FIELDS:
        return -MAX_LENGTH, MAX_LENGTH, "a run length that can finish"
    return -MAX_COUNT, MAX_COUNT, "a count this machine can allocate"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _huge_floats(cls, value: Any, info: ValidationInfo) -> Any:
        """A float too large for any int field (e.g. z_dim: 1e23) is reported as out of range, not as unparsable."""
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, float) and math.isfinite(item) and abs(item) > MAX_LENGTH:
                annotation = str(cls.model_fields[info.field_name].annotation) if info.field_name else ""
                if "int" in annotation and "float" not in annotation:
                    _, high, why = _int_range(info.field_name or "")
                    raise ValueError(f"{item:g} is out of range: it must be at most {high} ({why})")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _ranges(cls, value: Any, info: ValidationInfo) -> Any:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool):
                low, high, why = _int_range(info.field_name or "")
                if not low <= item <= high:
                    shown = f"{item:.3g}" if abs(item) >= 10**12 else str(item)
                    bound = f"in {low}..{high}" if low == 0 else f"at most {high}" if item > high else f">= {low}"
                    raise ValueError(f"{shown} is out of range: it must be {bound} ({why})")
        return value


# Shared settings: seed, dataset, resolution, device and CPU threads.
class BaseConfig(Section):
    seed: int = 0
    dataset: Literal["digits", "shapes", "folder"] = "digits"
    image_size: int = Field(16, ge=8, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(2, ge=1, le=256)

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (got {v})")
        return v


# Dataset preparation and the label classifier that scores generated images.
class PrepareConfig(Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(0.1, ge=0, lt=1)  # of the train split, held out for choosing settings
    folder: str | None = None  # image folder (dataset: folder)
    attributes: str | None = None  # CSV with a filename column, or CelebA-style ±1 table
    filename_column: str = "filename"
    channels: Literal[1, 3] | None = None  # folder data: force greyscale/RGB (default: 1 if every image is grey)
    shapes_count: int = Field(3000, ge=50)
    classifier_epochs: int = Field(30, ge=0)
    classifier_width: int = Field(32, ge=4)


# Baseline (frozen) DPM: where it comes from and, for source=train, how it is pre-trained.
class BaselineConfig(Section):
    source: Literal["train", "diffusers", "url", "pdae-official", "diffae", "adm", "improved-diffusion"] = "train"
    path: str | None = None  # diffusers hub id or folder; local official checkpoint
    url: str | None = None
    sha256: str | None = None
    config: str | None = None  # official sources: PDAE config.yml path, Diff-AE config file or preset name
    sample_size: int | None = Field(None, ge=8)  # official sources: image size when the config lacks it
    class_label: int | None = Field(None, ge=0)  # class-conditional DPMs: the label (e.g. a null label) they run with
    channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    images: int = Field(120_000, ge=0)  # training length in images seen
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1+n)/(10+n)) at step n; the official code has none
    bf16: bool = False
    checkpoint_every: int = Field(500, ge=1)  # optimizer steps
    n_samples: int = Field(256, ge=1)
    sample_steps: int = Field(100, ge=1, le=1000)

    @model_validator(mode="after")
    def _source_fields(self) -> BaselineConfig:
        if self.source in ("diffusers", "pdae-official", "diffae", "adm", "improved-diffusion") and not (
            self.path or self.url
        ):
            raise ValueError(f"source '{self.source}' needs baseline.path (or baseline.url)")
        if self.source == "url" and not (self.url and self.sha256):
            raise ValueError("source 'url' needs baseline.url and baseline.sha256")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return self


# PDAE training (encoder E + gradient estimator G on the frozen baseline).
class TrainConfig(Section):
    z_dim: int = Field(64, ge=1)
    encoder_channels: list[int] | None = None  # default: derived from image size
    dropout: float = Field(0.0, ge=0, lt=1)
    images: int = Field(60_000, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1+n)/(10+n)) at step n; the official code has none
    g_skip_norm: Literal["separate", "joint"] = "separate"  # G's norm of cat(hidden, skip); official code: joint
    weighting: Literal["pdae", "uniform"] = "pdae"
    gamma: float = Field(0.1, ge=0, le=1)
    hflip: bool = False
    bf16: bool = False
    grad_checkpoint: bool = False  # recompute G's up-path activations in the backward pass (less memory)
    accumulate: int = Field(1, ge=1)  # micro-batches per optimizer step (effective batch = batch_size x accumulate)
    checkpoint_every: int = Field(200, ge=1)
    eval_images: int = Field(200, ge=1)  # test images for the reconstruction metrics
    eval_steps: int = Field(100, ge=1, le=1000)


# Latent encoding of the prepared splits.
class EncodeConfig(Section):
    batch_size: int = Field(256, ge=1)
    xT_images: int = Field(200, ge=0)  # test images whose x_T is inferred
    xT_steps: int = Field(100, ge=1, le=1000)


# Attribute probes (z vs pixels vs the bare DPM's x_T), edit directions, manipulation and interpolation.
class ClassifyConfig(Section):
    probe_c: float = Field(1.0, gt=0)  # inverse L2 strength of the logistic-regression probes
    # inverse L2 strength of the probes whose normals are edit directions; several: chosen on the validation split
    direction_c: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0], min_length=1)
    selection_images: int = Field(10, ge=2)  # validation images for choosing direction_c (manipulation success)
    max_iter: int = Field(2000, ge=10)
    xT_steps: int = Field(20, ge=1, le=1000)  # bare-DPM DDIM inversion steps for the x_T probe
    batch_size: int = Field(256, ge=1)
    steps: int = Field(50, ge=1, le=1000)  # DDIM steps (inversion and decoding) for manipulation/interpolation
    scales: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0], min_length=1)
    manipulation_images: int = Field(50, ge=2)  # test images for manipulation_success and the figures (>= 1 pair)
    figure_images: int = Field(8, ge=1)
    interpolate_pairs: int = Field(4, ge=1)
    interpolate_frames: int = Field(8, ge=2)

    @field_validator("direction_c", mode="before")
    @classmethod
    def _c_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("direction_c")
    @classmethod
    def _c_positive(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError(f"every candidate must be > 0 (got {v})")
        return v


# Latent DPM on normalised z (unconditional + few-shot generation) and the class-conditional G study.
class LatentConfig(Section):
    depth: int = Field(9, ge=2)  # layers of the MLP in all, as the paper counts: depth - 1 hidden + output (paper: 10)
    width: int = Field(256, ge=4)  # hidden width (paper: 2048 for z_dim 512)
    dropout: float = Field(0.0, ge=0, lt=1)
    beta: float = Field(0.008, gt=0, lt=1)  # constant beta of the latent diffusion
    T: int = Field(1000, ge=2)
    loss: Literal["l1", "l2"] = "l1"
    images: int = Field(250_000, ge=0)  # training length in latents seen
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1+n)/(10+n)) at step n; the official code has none
    checkpoint_every: int = Field(500, ge=1)
    clip_noise: bool = False  # clamp z_T ~ N(0, I) to [-1, 1] (official code: true)
    clip_x0: bool = False  # clamp the latent DDIM x0 prediction to [-1, 1] in normalised space (official: true)
    latent_steps: int = Field(50, ge=1)  # latent DDIM steps
    steps: int = Field(50, ge=1, le=1000)  # image DDIM steps when decoding (and for the bare DPM)
    solver: Literal["ddim", "dpmpp2m", "dpmpp3m", "unipc"] = "ddim"  # image decoding solver (pdae.solvers)
    latent_solver: Literal["ddim", "dpmpp2m", "dpmpp3m", "unipc"] = "ddim"  # the latent DPM's own sampling solver
    shift_fraction: float = Field(1.0, ge=0, le=1)  # G on for this first fraction of decoding steps (paper: 0.7)
    n_samples: int = Field(1000, ge=2)  # unconditional samples (latent DPM and bare DPM) for the FD
    study_samples: int = Field(200, ge=0)  # paired samples per clamp setting in the clamp study
    eval_batch_size: int = Field(500, ge=1)  # images per sampling batch
    fewshot_k: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    fewshot_samples: int = Field(16, ge=1)  # decoded images per class and K
    fewshot_draws: int = Field(4000, ge=1)  # cap on latent-DPM draws (the rejection-sampling pool)
    fewshot_attributes: list[str] | None = None  # condition columns of attributes.csv; None: the `label` column
    fewshot_threshold: float = Field(0.5, gt=0, lt=1)  # a draw is accepted for class c when p(c | z) >= this
    # inverse L2 strengths of the few-shot logistic regression; several: chosen by validation F1 of the acceptance
    fewshot_c: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0], min_length=1)
    fewshot_boot: int = Field(200, ge=2)  # bootstrap resamples of the few-shot FD / KID intervals
    fewshot_features: Literal["classifier", "inception"] = "classifier"  # feature space of the few-shot FD / KID
    fewshot_real: int | None = Field(None, ge=5)  # cap on real train images per class (FD / KID reference)
    scorer_epochs: int = Field(30, ge=1)  # training length of the attribute scorers (conditions other than `label`)
    classcond_images: int = Field(10_000, ge=0)  # class-conditional G training length (0 = skip)
    classcond_batch_size: int = Field(64, ge=1)
    classcond_lr: float = Field(5e-4, gt=0)
    classcond_scales: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], min_length=1)
    classcond_samples: int = Field(6, ge=1)  # images per class and scale (same x_T for every scale)

    @field_validator("fewshot_c", mode="before")
    @classmethod
    def _c_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("fewshot_c")
    @classmethod
    def _c_positive(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError(f"every candidate must be > 0 (got {v})")
        return v


# Evaluation: reconstruction table, FID/KID sets, gap curve, report and the served encoder (sized for 2 CPU cores).
class EvaluateConfig(Section):
    steps: list[int] = Field(default_factory=lambda: [10, 20, 50, 100], min_length=1)  # decoding steps T
    inversion_steps: int | None = Field(100, ge=1, le=1000)  # None: T-step inversion per T; else one shared
    n_images: int | None = Field(None, ge=2)  # test images in the reconstruction table (None: the whole split)
    metrics: list[Literal["ssim", "mse", "lpips", "fid"]] = Field(
        default_factory=lambda: ["ssim", "mse", "lpips", "fid"], min_length=1
    )
    fid_samples: int = Field(1000, ge=3)  # images per generated FID/KID set
    fid_real: int | None = Field(None, ge=3)  # real reference images (train split; None: all of it)
    fid_steps: int = Field(50, ge=1, le=1000)  # DDIM steps of every generated FID/KID set
    kid_subset_size: int = Field(100, ge=2)  # torch-fidelity KID subsets (kept below the smallest set size)
    n_boot: int = Field(100, ge=2)  # bootstrap resamples of every interval (FID, KID, classifier FD, gap)
    gap_images: int | None = Field(None, ge=1)  # test images of the gap curve (None: the whole split)
    batch_size: int = Field(256, ge=1)
    log_models: bool = True  # log models/ + the served encoder (pyfunc) to the MLflow run

    @field_validator("steps")
    @classmethod
    def _steps_range(cls, value: list[int]) -> list[int]:
        if any(not 1 <= s <= 1000 for s in value) or len(set(value)) != len(value):
            raise ValueError(f"steps must be distinct integers in [1, 1000] (got {value})")
        return sorted(value)


SECTIONS: dict[str, type[Section]] = {
    "base": BaseConfig,
    "prepare": PrepareConfig,
    "baseline": BaselineConfig,
    "train": TrainConfig,
    "encode": EncodeConfig,
    "classify": ClassifyConfig,
    "latent": LatentConfig,
    "evaluate": EvaluateConfig,
}


def _format_error(section: str, err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (section, *first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"unknown key; allowed keys: {', '.join(SECTIONS[section].model_fields)}"
    elif "input" in first and first["type"] not in ("value_error", "model_type", "missing"):
        msg = f"{msg} (got {first['input']!r})"
    return f"{source}: {loc}: {msg}."


def parse_section(section: str, values: dict[str, Any] | None, source: str = PARAMS_FILE) -> Section:
    """Validate one section's dict into its typed model."""
    if section not in SECTIONS:
        raise PdaeError(f"{source}: unknown section '{section}'; known sections: {', '.join(SECTIONS)}.")
    if values is not None and not isinstance(values, dict):
        raise PdaeError(f"{source}: section '{section}' must be a mapping of keys to values.")
    try:
        return SECTIONS[section](**(values or {}))
    except ValidationError as err:
        raise PdaeError(_format_error(section, err, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply dotted `section.key=value` overrides (values parsed as YAML) to a raw params dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise PdaeError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4).")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise PdaeError(f"override '{item}': section '{section}' is not a mapping.")
        out[section][name] = yaml.safe_load(value)
    return out


# yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently).
class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                continue  # complex keys: left to the section validation
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' appears twice (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PdaeError(f"params file not found: {path} — run from the project folder or pass --params.")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        detail = f"line {mark.line + 1}: {problem}" if mark is not None and problem else str(err).splitlines()[0]
        raise PdaeError(f"{path} is not valid YAML ({detail}); fix its syntax.") from None
    if not isinstance(raw, dict):
        raise PdaeError(f"{path} must be a mapping of sections.")
    return raw


def load_params(
    path: str | Path = PARAMS_FILE, sections: list[str] | None = None, overrides: list[str] | None = None
) -> dict[str, Section]:
    """Read params.yaml, apply overrides, validate `sections` (default: all present + base)."""
    raw = apply_overrides(read_params_file(path), overrides)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise PdaeError(f"{path}: unknown section '{unknown[0]}'; known sections: {', '.join(SECTIONS)}.")
    wanted = sections if sections is not None else list(SECTIONS)
    if "base" not in wanted:
        wanted = ["base", *wanted]
    return {name: parse_section(name, raw.get(name), str(path)) for name in wanted}


def as_dict(section: Section) -> dict[str, Any]:
    """Plain dict of a section (for logging)."""
    return section.model_dump()
