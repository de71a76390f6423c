"""The shared training loop: resume equality, EMA, NaN guard, checkpoint compatibility."""

import pytest
import torch
from torch import nn

from pdae.errors import PdaeError
from pdae.train import TrainSpec, ema_update, train


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.2)  # exercises the global RNG state in the checkpoint

    def forward(self, x):
        return self.drop(self.lin(x))


def loss_fn(mods, batch, gen):
    x = batch[0]
    noise = torch.randn(x.shape, generator=gen)
    return ((mods["m"](x + noise) - x) ** 2).mean()


def make_spec(**kw):
    base = dict(images=8 * 12, batch_size=8, lr=1e-2, ema_decay=0.9, checkpoint_every=4, seed=3, log_every=2)
    return TrainSpec(**{**base, **kw})


def fresh():
    torch.manual_seed(0)
    return Tiny()


DATA = (torch.randn(20, 4, generator=torch.Generator().manual_seed(1)),)


def test_resume_is_bitwise_equal(tmp_path):
    torch.manual_seed(123)
    full = train(
        {"m": fresh()}, loss_fn, DATA, make_spec(), tmp_path / "a.safetensors", torch.device("cpu"), progress=False
    )
    ckpt = tmp_path / "b.safetensors"
    torch.manual_seed(123)
    part = train(
        {"m": fresh()}, loss_fn, DATA, make_spec(), ckpt, torch.device("cpu"), progress=False, stop_after_steps=5
    )
    assert part.steps == 5 and ckpt.exists()
    # a crash after step 5: the checkpoint holds step 4; resume in a "new process" with a different global seed
    torch.manual_seed(999)
    resumed = train({"m": fresh()}, loss_fn, DATA, make_spec(), ckpt, torch.device("cpu"), progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 12
    for k, v in full.ema["m"].state_dict().items():
        assert torch.equal(v, resumed.ema["m"].state_dict()[k]), k


def test_incompatible_checkpoint_is_ignored(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    train({"m": fresh()}, loss_fn, DATA, make_spec(), ckpt, torch.device("cpu"), progress=False)
    other = train({"m": fresh()}, loss_fn, DATA, make_spec(lr=5e-3), ckpt, torch.device("cpu"), progress=False)
    assert other.resumed_from == 0 and other.steps == 12
    longer = train(
        {"m": fresh()}, loss_fn, DATA, make_spec(lr=5e-3, images=8 * 16), ckpt, torch.device("cpu"), progress=False
    )
    assert longer.resumed_from == 12 and longer.steps == 16


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    ckpt = tmp_path / "n.safetensors"
    calls = {"n": 0}

    def bad_loss(mods, batch, gen):
        calls["n"] += 1
        loss = loss_fn(mods, batch, gen)
        return loss * float("nan") if calls["n"] == 7 else loss

    with pytest.raises(PdaeError, match=r"loss became nan at step 6.*last good checkpoint"):
        train({"m": fresh()}, bad_loss, DATA, make_spec(), ckpt, torch.device("cpu"), progress=False)
    from pdae.io import load_metadata

    assert load_metadata(ckpt)["step"] == "4"


def test_ema_warmup():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.zero_()
        b.weight.fill_(1.0)
    ema_update(a, b, 0.999, step=0)  # decay = min(0.999, 1/10) = 0.1
    assert torch.allclose(a.weight, torch.full((2, 2), 0.9))
    with torch.no_grad():
        a.weight.zero_()
    ema_update(a, b, 0.99, step=0, warmup=False)  # the constant decay from the first step (official code)
    torch.testing.assert_close(a.weight, torch.full((2, 2), 0.01))
    from pdae.config import TrainConfig

    assert make_spec().ema_warmup and not TrainSpec.from_config(TrainConfig(ema_warmup=False), 0, {}).ema_warmup


def test_history_and_counts(tmp_path):
    res = train({"m": fresh()}, loss_fn, DATA, make_spec(), None, torch.device("cpu"), progress=False)
    assert res.images_seen == 96 and [h[0] for h in res.history] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(PdaeError, match="empty"):
        train({"m": fresh()}, loss_fn, (torch.empty(0, 4),), make_spec(), None, torch.device("cpu"), progress=False)


def test_bf16_autocast_trains_and_changes_numerics(tmp_path):
    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(5)
        res = train({"m": fresh()}, loss_fn, DATA, make_spec(bf16=bf16), None, torch.device("cpu"), progress=False)
        assert res.steps == 12 and all(torch.isfinite(torch.tensor(h[2])) for h in res.history)
        runs[bf16] = res.ema["m"].state_dict()["lin.weight"]
    # bfloat16 matmuls round differently: the weights differ, but only slightly
    assert not torch.equal(runs[False], runs[True])
    assert torch.allclose(runs[False], runs[True], atol=0.05)


def test_setup_makes_cpu_gradients_of_repeated_gathers_reproducible():
    """Backward of x[index] with repeated indices accumulates per thread; setup() selects deterministic kernels."""
    from pdae.runtime import setup

    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        assert setup(0, 2, "cpu").type == "cpu"
        assert torch.are_deterministic_algorithms_enabled()
        gen = torch.Generator().manual_seed(0)
        src = torch.randn(8, 256, generator=gen, requires_grad=True)
        index = torch.randint(0, 8, (4096,), generator=gen)
        upstream = torch.randn(4096, 256, generator=gen)
        grads = []
        for _ in range(5):
            src.grad = None
            (src[index] * upstream).sum().backward()
            grads.append(src.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


class Det(nn.Module):
    """No randomness: micro-batched and full-batch losses can be compared exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def det_loss(mods, batch, gen):
    x = batch[0]
    return ((mods["m"](x) - x.flip(-1)) ** 2).mean()


def test_accumulation_equals_one_big_batch(tmp_path):
    # 4 micro-batches of 5 == one batch of 20: same parameters, EMA and logged loss (tolerance: float32 sums in
    # another order, 1e-6).
    def run(bs, k):
        torch.manual_seed(0)
        spec = make_spec(images=20 * 6, batch_size=bs, accumulate=k, checkpoint_every=100)
        return train({"m": Det()}, det_loss, DATA, spec, None, torch.device("cpu"), progress=False)

    big, acc = run(20, 1), run(5, 4)
    assert big.steps == acc.steps == 6 and big.images_seen == acc.images_seen == 120
    for k, v in big.ema["m"].state_dict().items():
        torch.testing.assert_close(acc.ema["m"].state_dict()[k], v, atol=1e-6, rtol=1e-6)
    assert [h[:2] for h in big.history] == [h[:2] for h in acc.history]
    torch.testing.assert_close(torch.tensor([h[2] for h in acc.history]), torch.tensor([h[2] for h in big.history]))
    assert make_spec(accumulate=4).key() != make_spec().key()
    assert make_spec(accumulate=1).key() == make_spec().key()


def test_accumulated_run_resumes_bitwise(tmp_path):
    spec = make_spec(accumulate=2, batch_size=4)
    torch.manual_seed(1)
    full = train({"m": fresh()}, loss_fn, DATA, spec, tmp_path / "a.safetensors", torch.device("cpu"), progress=False)
    ckpt = tmp_path / "b.safetensors"
    torch.manual_seed(1)
    train({"m": fresh()}, loss_fn, DATA, spec, ckpt, torch.device("cpu"), progress=False, stop_after_steps=5)
    torch.manual_seed(7)
    resumed = train({"m": fresh()}, loss_fn, DATA, spec, ckpt, torch.device("cpu"), progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == full.steps == 12
    for k, v in full.ema["m"].state_dict().items():
        assert torch.equal(v, resumed.ema["m"].state_dict()[k]), k
