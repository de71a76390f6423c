"""The shared tiny project builds and loads through the public API."""

from pdae.autoencode import load_models
from pdae.io import load_tensors


def test_tiny_project_loads(tiny_project):
    model, schedule = load_models(tiny_project / "models/baseline", tiny_project / "models/pdae")
    assert model.z_dim == 8 and schedule.T == 1000
    z = load_tensors(tiny_project / "latents/train.safetensors")["z"]
    assert z.shape[1] == 8 and z.shape[0] > 1000
    assert load_tensors(tiny_project / "latents/xT_test.safetensors")["x_T"].shape == (16, 1, 8, 8)
