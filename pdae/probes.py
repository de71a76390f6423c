"""Linear probes on representations: per-dimension normalisation, attribute AUROC, label accuracy, directions.

docs/method.md §5/§6: z is normalised per dimension with the train-split mean/std; a logistic-regression probe per
binary attribute is fitted on the train split and scored by AUROC on the test split (never the training images). The
unit normal w/‖w‖ of a probe fitted on normalised z is the attribute's edit direction (it points toward the positive
class). The same probes on raw pixels and on the bare DPM's inverted x_T are the comparison the method rests on.

The classify stage takes the edit directions from probes with a stronger L2 penalty than the AUROC probes: on the
16 px digits the normal of a weakly regularised probe leans on low-variance code dimensions that G barely renders
(measured: 0.61 vs 0.91 manipulation success at s = 2 for C = 1 vs C = 0.01).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pdae.errors import PdaeError
from pdae.io import load_metadata, load_tensors, save_tensors, write_json

DIRECTIONS_NAME = "directions.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "pdae-directions-v1"


# Per-dimension affine normalisation z_n = (z - mean) / std with the train-split statistics.
@dataclass(frozen=True)
class Normaliser:
    """mean, std: float32 (d,); std > 0."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor, eps: float = 1e-6) -> Normaliser:
        """Statistics of x (N, ...) over the batch dimension (std clamped to >= eps; constant features -> 0)."""
        flat = x.flatten(1).float()
        std = flat.std(0) if len(flat) > 1 else torch.ones(flat.shape[1])
        return cls(flat.mean(0), std.clamp_min(eps))

    @classmethod
    def from_stats(cls, path: str | Path) -> Normaliser:
        """Read a `mean`/`std` safetensors file (latents/stats.safetensors from the encode stage)."""
        tensors = load_tensors(path, what="latent statistics")
        if "mean" not in tensors or "std" not in tensors or tensors["mean"].shape != tensors["std"].shape:
            raise PdaeError(f"{path} lacks matching 'mean'/'std' tensors; re-run the encode stage (dvc repro encode).")
        return cls(tensors["mean"].float(), tensors["std"].float())

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def normalise(self, z: Tensor) -> Tensor:
        """(N, ...) raw -> (N, d) normalised (features flattened)."""
        return (z.flatten(1).float() - self.mean.to(z.device)) / self.std.to(z.device)

    def denormalise(self, zn: Tensor) -> Tensor:
        """(N, d) normalised -> (N, d) raw."""
        return zn.float() * self.std.to(zn.device) + self.mean.to(zn.device)


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def fit_probe(x: Tensor | np.ndarray, y: np.ndarray, C: float = 1.0, max_iter: int = 2000):
    """L2 logistic regression (lbfgs; multinomial for >2 classes) on features x (N, F), labels y (N,)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(_numpy(x), np.asarray(y))
    return probe


def probe_auroc(probe, x: Tensor | np.ndarray, y: np.ndarray) -> float | None:
    """Test AUROC of a binary probe; None when y (N,) holds a single class (AUROC undefined)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, probe.decision_function(_numpy(x))))


def unit_direction(probe) -> Tensor:
    """w/‖w‖ float32 (F,) of a binary probe: moving along it raises the positive-class (y = 1) score."""
    w = torch.as_tensor(probe.coef_[0], dtype=torch.float64)
    return (w / w.norm().clamp_min(1e-12)).float()


def attribute_probes(
    x_train: Tensor | np.ndarray,
    y_train: pd.DataFrame,
    x_test: Tensor | np.ndarray,
    y_test: pd.DataFrame,
    names: Sequence[str],
    C: float = 1.0,
    max_iter: int = 2000,
) -> dict[str, tuple[object | None, float | None]]:
    """One binary probe per attribute column of `y_train`/`y_test` (0/1) -> {name: (probe or None, test AUROC)}.

    x_train (N, F) and x_test (M, F) should already be standardised. An attribute constant on the train split gets
    (None, None).
    """
    xtr, xte = _numpy(x_train), _numpy(x_test)
    out: dict[str, tuple[object | None, float | None]] = {}
    for name in names:
        ytr = y_train[name].to_numpy()
        if len(np.unique(ytr)) < 2:
            out[name] = (None, None)
            continue
        probe = fit_probe(xtr, ytr, C, max_iter)
        out[name] = (probe, probe_auroc(probe, xte, y_test[name].to_numpy()))
    return out


def linear_accuracy(
    x_train: Tensor | np.ndarray,
    y_train: np.ndarray,
    x_test: Tensor | np.ndarray,
    y_test: np.ndarray,
    C: float = 1.0,
    max_iter: int = 2000,
) -> tuple[float | None, object | None]:
    """Multi-class logistic-regression test accuracy on integer labels; (None, None) with < 2 train classes."""
    if len(np.unique(y_train)) < 2:
        return None, None
    probe = fit_probe(x_train, y_train, C, max_iter)
    return float((probe.predict(_numpy(x_test)) == np.asarray(y_test)).mean()), probe


def standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten (N, ...) features and standardise both splits with the TRAIN mean/std -> (N, F), (M, F)."""
    norm = Normaliser.fit(train)
    return norm.normalise(train), norm.normalise(test)


@torch.no_grad()
def dpm_inversion(eps_fn, images: Tensor, schedule, steps: int, batch_size: int = 256, progress: bool = False):
    """The bare DPM's DDIM-inverted x_T (N, C, H, W) on the CPU; eps_fn(x, t) -> eps runs on its own device."""
    from pdae.sampling import ddim_invert, plain

    dev = next(eps_fn.parameters()).device if hasattr(eps_fn, "parameters") else images.device
    outs = [
        ddim_invert(plain(eps_fn), images[i : i + batch_size].to(dev), schedule, steps, progress=progress).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outs) if outs else images.clone()


def load_codes(path: str | Path, ids: Tensor) -> Tensor:
    """z (N, d) from a latents split file, checked against the prepared split's ids (N,)."""
    tensors = load_tensors(path, what="latent codes")
    if "z" not in tensors or "ids" not in tensors or not torch.equal(tensors["ids"].long(), ids.long()):
        raise PdaeError(f"{path} does not match the prepared split (ids differ); re-run the encode stage.")
    return tensors["z"].float()


def probe_suite(
    features: dict[str, tuple[Tensor, Tensor]],
    train: pd.DataFrame,
    test: pd.DataFrame,
    names: Sequence[str],
    C: float = 1.0,
    max_iter: int = 2000,
) -> tuple[pd.DataFrame, dict, dict]:
    """Attribute probes and label accuracy for each feature set {kind: (train (N, F), test (M, F)), standardised}.

    `train`/`test`: attribute rows aligned with the features. Returns (per-attribute table with one `auroc_<kind>`
    column per kind, metrics {auroc_mean_<kind>, linear_acc_<kind>, auroc: {attr: {kind: value}}},
    {kind: probes from `attribute_probes`}).
    """
    table = pd.DataFrame({"attribute": list(names), "test_positive": [float(test[n].mean()) for n in names]})
    metrics: dict = {}
    per_attr: dict[str, dict[str, float | None]] = {n: {} for n in names}
    probes: dict = {}
    for kind, (xtr, xte) in features.items():
        probes[kind] = attribute_probes(xtr, train, xte, test, names, C, max_iter)
        aurocs = {n: probes[kind][n][1] for n in names}
        table[f"auroc_{kind}"] = [aurocs[n] for n in names]
        metrics[f"auroc_mean_{kind}"] = mean_auroc(aurocs)
        for n in names:
            per_attr[n][kind] = aurocs[n]
        if "label" in train.columns:
            acc, _ = linear_accuracy(xtr, train["label"].to_numpy(), xte, test["label"].to_numpy(), C, max_iter)
            metrics[f"linear_acc_{kind}"] = acc
    metrics["auroc"] = per_attr
    return table, metrics, probes


def mean_auroc(values: dict[str, float | None]) -> float | None:
    """Mean over the defined AUROCs (None when none is defined)."""
    vals = [v for v in values.values() if v is not None]
    return float(np.mean(vals)) if vals else None


def class_attributes(frame: pd.DataFrame, names: Sequence[str]) -> dict[int, str]:
    """Map label k -> the binary attribute equal to (label == k) on every row (digits: k -> digit_k).

    Empty when the frame has no `label` column or no attribute is a class indicator.
    """
    if "label" not in frame.columns:
        return {}
    labels = frame["label"].to_numpy()
    out: dict[int, str] = {}
    for k in sorted(int(v) for v in np.unique(labels)):
        hit = [n for n in names if np.array_equal(frame[n].to_numpy() == 1, labels == k)]
        if hit:
            out[k] = hit[0]
    return out


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table of a DataFrame (floats rounded, None/NaN shown as '–')."""

    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "–"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.astype(object).itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


# Edit directions of the attributes on normalised z, with the normaliser they belong to.
@dataclass(frozen=True)
class AttributeDirections:
    """names: A attributes; directions: unit vectors (A, d); coef (A, d) / intercept (A,): the probes on
    normalised z (logit = coef · z_n + intercept); normaliser: the train statistics of z."""

    names: list[str]
    directions: Tensor
    coef: Tensor
    intercept: Tensor
    normaliser: Normaliser

    @classmethod
    def from_probes(cls, probes: dict[str, tuple[object | None, float | None]], normaliser: Normaliser):
        """Collect the fitted probes (attributes without a probe are left out)."""
        fitted = {n: p for n, (p, _) in probes.items() if p is not None}
        d = normaliser.dim
        coef = torch.stack([torch.as_tensor(p.coef_[0]).float() for p in fitted.values()]) if fitted else None
        return cls(
            names=list(fitted),
            directions=torch.stack([unit_direction(p) for p in fitted.values()]) if fitted else torch.empty(0, d),
            coef=coef if coef is not None else torch.empty(0, d),
            intercept=torch.tensor([float(p.intercept_[0]) for p in fitted.values()], dtype=torch.float32),
            normaliser=normaliser,
        )

    def direction(self, name: str) -> Tensor:
        """Unit direction (d,) of attribute `name`; an unknown name raises PdaeError listing the known ones."""
        if name not in self.names:
            known = ", ".join(self.names) or "(none)"
            raise PdaeError(f"unknown attribute '{name}'; known attributes: {known}.")
        return self.directions[self.names.index(name)]

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Atomically write directions.safetensors (+ config.json with the names and `extra` facts)."""
        directory = Path(directory)
        tensors = {
            "directions": self.directions,
            "coef": self.coef,
            "intercept": self.intercept,
            "mean": self.normaliser.mean,
            "std": self.normaliser.std,
        }
        meta = {"format": FORMAT, "attributes": json.dumps(self.names)}
        save_tensors(directory / DIRECTIONS_NAME, tensors, metadata=meta)
        write_json(directory / CONFIG_NAME, {"format": FORMAT, "attributes": self.names, **(extra or {})})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AttributeDirections:
        """Read a folder written by `save` (models/classifier); problems raise PdaeError naming the stage to run."""
        path = Path(directory) / DIRECTIONS_NAME
        if not path.is_file():
            raise PdaeError(f"attribute directions not found: {path} — run the classify stage (dvc repro classify).")
        tensors = load_tensors(path, what="attribute directions")
        meta = load_metadata(path)
        try:
            names = json.loads(meta["attributes"])
            dirs, mean, std = tensors["directions"], tensors["mean"], tensors["std"]
            coef, intercept = tensors["coef"], tensors["intercept"]
        except (KeyError, json.JSONDecodeError):
            raise PdaeError(f"{path} is not a directions file ({FORMAT}); re-run the classify stage.") from None
        if dirs.shape != (len(names), mean.numel()) or coef.shape != dirs.shape:
            raise PdaeError(f"{path}: tensor shapes do not match its attribute list; re-run the classify stage.")
        return cls(list(names), dirs.float(), coef.float(), intercept.float(), Normaliser(mean.float(), std.float()))


def classify_report(table: pd.DataFrame, metrics: dict) -> str:
    """Markdown report of the classify stage: per-attribute AUROC table, means, label accuracy, manipulation."""
    kinds = [c.removeprefix("auroc_") for c in table.columns if c.startswith("auroc_")]
    lines = [
        "# Linear attribute probes",
        "",
        "Logistic regression per binary attribute, fitted on the train split, AUROC on the test split. Features:"
        " `z` (PDAE code, normalised with the train statistics), `pixels` and `xT` (the bare DPM's DDIM-inverted"
        f" x_T, {metrics.get('xT_probe_steps')} steps), both standardised with train statistics.",
        "",
        markdown_table(table),
        "| mean | | " + " | ".join(_fmt(metrics.get(f"auroc_mean_{k}")) for k in kinds) + " |",
        "",
    ]
    if any(f"linear_acc_{k}" in metrics for k in kinds):
        lines += ["Multi-class linear probe on `label`, test accuracy:", ""]
        lines += [f"- {k}: {_fmt(metrics.get(f'linear_acc_{k}'))}" for k in kinds] + [""]
    if metrics.get("direction_auroc_mean_z") is not None:
        lines += [
            "Edit directions (models/classifier) are the unit normals of probes on z with a stronger L2 penalty"
            f" (`classify.direction_c` = {_fmt(metrics.get('direction_c'))}, {_direction_choice(metrics)}); their"
            f" mean test AUROC is {_fmt(metrics['direction_auroc_mean_z'])}.",
            "",
        ]
    if metrics.get("manipulation_success") is not None:
        lines += [
            f"Manipulation success at scale {metrics.get('manipulation_scale')}: "
            f"{_fmt(metrics['manipulation_success'])} (share of test images with label != k that the label"
            " classifier assigns to k after the edit along k's attribute, mean over k).",
            "",
        ]
    return "\n".join(lines)


def _direction_choice(metrics: dict) -> str:
    why = (metrics.get("direction_c_selection") or {}).get("why")
    return f"not selected: {why}" if why else "chosen by manipulation success on validation images"


def _fmt(value: object) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
