"""Linear probes: normalisation, direction extraction, AUROC/accuracy pipeline, saved directions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pdae.errors import PdaeError
from pdae.io import save_tensors
from pdae.probes import (
    AttributeDirections,
    Normaliser,
    attribute_probes,
    class_attributes,
    classify_report,
    fit_probe,
    markdown_table,
    probe_suite,
    standardise,
    unit_direction,
)


def _separable(n: int = 400, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Gaussian points x (n, d) labelled by the side of a hyperplane with normal v (plus a margin gap)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=gen)
    v = v / v.norm()
    x = torch.randn(n, d, generator=gen) * 2 + 0.5
    x = x + 0.5 * torch.sign(x @ v)[:, None] * v  # push both classes away from the boundary
    return x, (x @ v > 0).numpy().astype(int), v


def test_normaliser_round_trip_and_stats_file(tmp_path):
    z = torch.randn(200, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1e-9]) + torch.arange(5.0)
    norm = Normaliser.fit(z)
    zn = norm.normalise(z)
    assert torch.allclose(zn[:, :4].mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(zn[:, :4].std(0), torch.ones(4), atol=1e-5)
    assert torch.allclose(norm.denormalise(zn), z, atol=1e-5)
    save_tensors(tmp_path / "stats.safetensors", {"mean": norm.mean, "std": norm.std})
    loaded = Normaliser.from_stats(tmp_path / "stats.safetensors")
    assert torch.equal(loaded.mean, norm.mean) and torch.equal(loaded.std, norm.std) and loaded.dim == 5
    with pytest.raises(PdaeError, match="encode"):
        save_tensors(tmp_path / "bad.safetensors", {"mean": norm.mean})
        Normaliser.from_stats(tmp_path / "bad.safetensors")


def test_standardise_uses_train_statistics():
    train, test = torch.randn(50, 2, 3, 3) * 4 + 1, torch.randn(20, 2, 3, 3)
    a, b = standardise(train, test)
    assert a.shape == (50, 18) and b.shape == (20, 18)
    assert torch.allclose(a.mean(0), torch.zeros(18), atol=1e-5)
    assert torch.allclose(b, (test.flatten(1) - train.flatten(1).mean(0)) / train.flatten(1).std(0), atol=1e-5)


def test_direction_is_unit_and_points_to_positive_class():
    x, y, v = _separable()
    probe = fit_probe(x, y)
    w = unit_direction(probe)
    assert w.shape == (6,) and abs(w.norm().item() - 1) < 1e-6
    assert torch.dot(w, v).item() > 0.9  # recovers the true normal, positive side
    # moving a point along w raises its positive-class probability
    p0 = probe.predict_proba(x[:1].double().numpy())[0, 1]
    p1 = probe.predict_proba((x[:1] + 2 * w).double().numpy())[0, 1]
    assert p1 > p0


def test_probe_suite_auroc_and_accuracy():
    x, y, _ = _separable(n=600)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"sep": y, "noise": rng.integers(0, 2, len(y)), "label": y + 2 * (x[:, 0] > 0.5).numpy()})
    frame["const"] = 0
    tr, te = slice(0, 400), slice(400, 600)
    feats = {"good": standardise(x[tr], x[te]), "bad": standardise(torch.randn(400, 6), torch.randn(200, 6))}
    names = ["sep", "noise", "const"]
    table, metrics, probes = probe_suite(feats, frame.iloc[tr], frame.iloc[te].reset_index(drop=True), names)
    assert list(table.columns) == ["attribute", "test_positive", "auroc_good", "auroc_bad"]
    assert metrics["auroc"]["sep"]["good"] > 0.97 and 0.3 < metrics["auroc"]["noise"]["good"] < 0.7
    assert metrics["auroc"]["const"]["good"] is None and probes["good"]["const"] == (None, None)
    assert metrics["auroc_mean_good"] == pytest.approx(
        (metrics["auroc"]["sep"]["good"] + metrics["auroc"]["noise"]["good"]) / 2
    )
    assert metrics["linear_acc_good"] > 0.85 and metrics["linear_acc_bad"] < 0.6
    report = classify_report(table, metrics)
    assert "| sep |" in report and "auroc_good" in report and "- good:" in report


def test_attribute_probes_single_class_test_split_gives_none():
    x, y, _ = _separable(n=100)
    frame = pd.DataFrame({"a": y})
    out = attribute_probes(x[:80], frame.iloc[:80], x[80:], pd.DataFrame({"a": np.ones(20, int)}), ["a"])
    assert out["a"][0] is not None and out["a"][1] is None


def test_class_attributes_maps_labels_to_indicator_columns():
    labels = np.array([0, 1, 2, 1, 0, 2])
    frame = pd.DataFrame({f"digit_{k}": (labels == k).astype(int) for k in range(3)})
    frame["other"] = [1, 0, 1, 0, 1, 0]
    frame["label"] = labels
    assert class_attributes(frame, ["other", "digit_0", "digit_1", "digit_2"]) == {
        0: "digit_0",
        1: "digit_1",
        2: "digit_2",
    }
    assert class_attributes(frame.drop(columns="label"), ["digit_0"]) == {}


def test_directions_save_load_and_errors(tmp_path):
    x, y, _ = _separable()
    norm = Normaliser.fit(x)
    probes = attribute_probes(norm.normalise(x), pd.DataFrame({"a": y, "b": 1 - y}), norm.normalise(x),
                              pd.DataFrame({"a": y, "b": 1 - y}), ["a", "b"])  # fmt: skip
    dirs = AttributeDirections.from_probes(probes, norm)
    dirs.save(tmp_path / "clf", extra={"note": "test"})
    loaded = AttributeDirections.load(tmp_path / "clf")
    assert loaded.names == ["a", "b"] and torch.equal(loaded.directions, dirs.directions)
    assert torch.allclose(loaded.directions.norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(loaded.direction("a"), -loaded.direction("b"), atol=1e-3)  # complementary attributes
    assert torch.equal(loaded.normaliser.mean, norm.mean)
    with pytest.raises(PdaeError, match=r"unknown attribute 'c'; known attributes: a, b"):
        loaded.direction("c")
    with pytest.raises(PdaeError, match="dvc repro classify"):
        AttributeDirections.load(tmp_path / "missing")


def test_markdown_table_formats_missing_values():
    text = markdown_table(pd.DataFrame({"name": ["a", "b"], "v": [0.123456, None]}))
    assert text.splitlines() == ["| name | v |", "|---|---|", "| a | 0.1235 |", "| b | – |"]
