"""Label classifier: shapes of outputs, save/load round trip, load errors, a 1-epoch tiny training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdae.config import BaseConfig, PrepareConfig
from pdae.data import (
    LabelClassifier,
    has_label_classifier,
    load_label_classifier,
    load_split,
    prepare_dataset,
    save_label_classifier,
    train_label_classifier,
)
from pdae.data.classifier import random_shift
from pdae.errors import PdaeError


def _tiny(num_classes: int = 3, channels: int = 1) -> LabelClassifier:
    return LabelClassifier(in_channels=channels, image_size=8, num_classes=num_classes, width=4)


def test_outputs_and_mode_restored() -> None:
    model = _tiny().train()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    proba = model.predict_proba(x, batch_size=2)
    assert proba.shape == (5, 3) and torch.allclose(proba.sum(1), torch.ones(5)) and not proba.requires_grad
    assert model.features(x).shape == (5, model.feature_dim) == (5, 8)
    assert model.training  # predict_proba/features switch to eval only temporarily
    assert model.num_classes == 3
    with pytest.raises(PdaeError, match="expects images"):
        model.predict_proba(torch.zeros(2, 3, 8, 8))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _tiny(channels=3)
    model.body[0][1].running_mean.fill_(0.25)  # non-default buffer must survive
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    save_label_classifier(model, tmp_path / "clf")
    loaded = load_label_classifier(tmp_path / "clf")
    assert not loaded.training and loaded.config() == model.config()
    assert torch.allclose(loaded.predict_proba(x), model.predict_proba(x))
    assert torch.allclose(loaded.features(x), model.features(x))
    assert has_label_classifier(tmp_path / "clf") and not has_label_classifier(tmp_path / "none")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(PdaeError, match="dvc repro prepare"):
        load_label_classifier(tmp_path / "missing")
    folder = save_label_classifier(_tiny(), tmp_path / "clf")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PdaeError, match="model.safetensors"):
        load_label_classifier(folder)
    save_label_classifier(_tiny(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "width": 8}))
    with pytest.raises(PdaeError, match="does not match"):
        load_label_classifier(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(PdaeError, match="config.json"):
        load_label_classifier(folder)
    (folder / "config.json").write_text(json.dumps({"format": config["format"], "skipped": "no label column"}))
    with pytest.raises(PdaeError, match="skipped"):
        load_label_classifier(folder)
    assert not has_label_classifier(folder)


def test_random_shift_moves_content_by_at_most_one_pixel() -> None:
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, :, 3, 4] = 1.0
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert ((rows - 3).abs() <= 1).all() and ((cols - 4).abs() <= 1).all() and len(set(pos.tolist())) == 9
    assert torch.equal(out, random_shift(x, 1, torch.Generator().manual_seed(0)))


def test_one_epoch_training_is_seeded() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.arange(40) % 2
    cfg = PrepareConfig(classifier_epochs=1, classifier_width=4)
    a = train_label_classifier(x, y, cfg, seed=1, progress=False)
    b = train_label_classifier(x, y, cfg, seed=1, progress=False)
    assert a.num_classes == 2 and not a.training
    assert torch.equal(a.predict_proba(x), b.predict_proba(x))


def test_prepare_trains_and_saves_classifier(tmp_path: Path) -> None:
    base = BaseConfig(dataset="shapes", image_size=8, device="cpu")
    cfg = PrepareConfig(shapes_count=60, classifier_epochs=1, classifier_width=4)
    metrics = prepare_dataset(base, cfg, tmp_path / "prepared", progress=False)
    clf = metrics["classifier"]
    assert clf["num_classes"] == 3 and 0 <= clf["test_accuracy"] <= 1 and 0 <= clf["test_confident_fraction"] <= 1
    model = load_label_classifier(tmp_path / "prepared" / "label_classifier")
    images, _ = load_split(tmp_path / "prepared", "test")
    assert model.predict_proba(images).shape == (len(images), 3)
