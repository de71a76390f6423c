"""Label classifier: a small CNN on the dataset's `label` column that later stages use to score generated images
(class agreement, confident fraction) and whose penultimate features give a Fréchet distance."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pdae.config import PrepareConfig
from pdae.errors import PdaeError
from pdae.io import load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "pdae-label-classifier-v1"


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# VGG-style CNN: two 3x3 conv-BN-ReLU per level, 2x2 max-pool between levels down to 4x4, global average pool.
class LabelClassifier(nn.Module):
    """Images float (N, C, S, S) in [-1, 1] -> class logits (N, K). Features: F = width * min(S / 4, 4)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8 (got {image_size})")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.width = width
        levels = int(math.log2(image_size)) - 2  # pools needed to reach 4x4
        layers: list[nn.Module] = []
        cin = in_channels
        for level in range(levels + 1):
            cout = width * min(2**level, 4)
            layers += [_conv_bn(cin, cout), _conv_bn(cout, cout)]
            if level < levels:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.feature_dim = cin
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(cin, num_classes)

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "width": self.width,
        }

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) in [-1, 1] -> penultimate features (N, F), differentiable."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels or images.shape[-1] != self.image_size:
            raise PdaeError(
                f"label classifier expects images (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}; score images at the prepared resolution and channel count."
            )

    @torch.no_grad()
    def _batched(self, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int):
        self._check(images)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            outs = [fn(images[i : i + batch_size].to(device).float()).cpu() for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.zeros(0, self.num_classes)

    def predict_proba(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (N, C, S, S) in [-1, 1] -> class probabilities float32 (N, K) on CPU (eval mode, no grad)."""
        return self._batched(images, lambda x: self(x).softmax(dim=1), batch_size)

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (N, C, S, S) in [-1, 1] -> penultimate features float32 (N, F) on CPU (eval mode, no grad)."""
        out = self._batched(images, self.embed, batch_size)
        return out if len(images) else torch.zeros(0, self.feature_dim)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of (N, C, H, W) by an integer offset in [-max_shift, max_shift]^2 (edge replicated)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            sel = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, dy : dy + h, dx : dx + w]
    return out


def train_label_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    cfg: PrepareConfig,
    seed: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    lr: float = 3e-3,
    num_classes: int | None = None,
) -> LabelClassifier:
    """Train on images float (N, C, S, S) in [-1, 1] and labels int64 (N,) in [0, K).

    AdamW with a one-cycle schedule for `cfg.classifier_epochs` epochs, width `cfg.classifier_width`, random
    shifts of up to S/16 px (at least 1) as augmentation, seeded batches. `num_classes` defaults to max label + 1.
    Returns the model in eval mode on CPU.
    """
    if train_images.ndim != 4 or len(train_images) != len(train_labels) or len(train_images) == 0:
        raise ValueError("train_images must be (N, C, S, S) with N == len(train_labels) > 0")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = train_labels.long()
    num_classes = max(num_classes or 0, int(labels.max()) + 1)
    model = LabelClassifier(train_images.shape[1], train_images.shape[-1], num_classes, cfg.classifier_width)
    model.to(device).train()
    epochs = cfg.classifier_epochs
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    max_shift = max(1, train_images.shape[-1] // 16)
    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc="label classifier", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(train_images), generator=gen)
        total, correct = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = random_shift(train_images[idx].float(), max_shift, gen).to(device)
            y = labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{total / len(order):.4f}", acc=f"{correct / len(order):.4f}")
    return model.cpu().eval()


def evaluate_label_classifier(
    model: LabelClassifier, images: torch.Tensor, labels: torch.Tensor, threshold: float = 0.9
) -> dict[str, float]:
    """Accuracy and the fraction of images whose top class probability is >= `threshold` (images in [-1, 1])."""
    proba = model.predict_proba(images)
    top, pred = proba.max(dim=1)
    return {
        "accuracy": float((pred == labels.long()).float().mean()) if len(labels) else float("nan"),
        "confident_fraction": float((top >= threshold).float().mean()) if len(labels) else float("nan"),
    }


def save_label_classifier(model: LabelClassifier, directory: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` into `directory` (each file atomically)."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_NAME, model.state_dict(), metadata={"format": FORMAT})
    write_json(directory / CONFIG_NAME, model.config())
    return directory


def has_label_classifier(directory: str | Path) -> bool:
    """True when `directory` holds a trained classifier (False if missing or skipped for lack of labels)."""
    path = Path(directory) / CONFIG_NAME
    try:
        config = read_json(path) if path.is_file() else None
    except PdaeError:
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT and "skipped" not in config


def load_label_classifier(directory: str | Path, device: torch.device | str = "cpu") -> LabelClassifier:
    """Load a classifier saved by `save_label_classifier` in eval mode; missing/corrupt files raise PdaeError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PdaeError(f"label classifier folder not found: {directory} — run the prepare stage (dvc repro prepare).")
    config = read_json(directory / CONFIG_NAME, what="label classifier config")
    keys = ("in_channels", "image_size", "num_classes", "width")
    if isinstance(config, dict) and config.get("format") == FORMAT and "skipped" in config:
        raise PdaeError(
            f"no label classifier in {directory}: it was skipped at prepare time ({config['skipped']}); "
            "label-based metrics need a dataset with a 'label' column."
        )
    valid = isinstance(config, dict) and config.get("format") == FORMAT
    if not valid or not all(isinstance(config.get(k), int) for k in keys):
        raise PdaeError(
            f"{directory / CONFIG_NAME} is not a pdae label classifier config; re-create it with the prepare stage."
        )
    try:
        model = LabelClassifier(*(config[k] for k in keys))
    except (ValueError, RuntimeError) as err:
        raise PdaeError(f"{directory / CONFIG_NAME} has invalid values ({err}); re-create it.") from None
    state = load_tensors(directory / WEIGHTS_NAME, what="label classifier weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        first = lines[min(1, len(lines) - 1)][:200]  # torch: a generic first line, then one line per problem
        raise PdaeError(
            f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME} ({first}); re-run the prepare stage."
        ) from None
    return model.to(device).eval()
