"""Worker processes for the crash-safety tests (tests/test_reliability.py); the parent SIGKILLs them.

`train_run` is a tiny deterministic `pdae.train.train` run (CPU, one thread, a checkpoint after every step) that
reports each finished step and, when training ends, writes its final model + EMA weights. Killed at any point and
started again, it resumes from its checkpoint; the final weights must equal those of an uninterrupted run bitwise.
`hold_atomic_write` stops in the middle of an atomic write so the parent can kill it there.

Run by hand:  python tests/crash_worker.py OUT_DIR   (prints `step N` lines; kill it and run it again to resume)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

STEPS = 60
BATCH = 8
CHECKPOINT = "checkpoints/state.safetensors"
FINAL = "final.safetensors"


# Conv + BatchNorm (buffers) + Dropout (global RNG): every piece of state a resume must restore.
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.conv(x)))))


def loss_fn(mods: Mapping[str, nn.Module], batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
    """Denoising loss on (N, 1, 8, 8) images; the noise comes from the loop's seeded generator."""
    x = batch[0]
    return ((mods["net"](x + 0.3 * torch.randn(x.shape, generator=gen)) - x) ** 2).mean()


def data() -> tuple[Tensor]:
    return (torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)


# The loop calls run.log_metrics every `log_every` (= 1) steps: used here as a per-step progress hook.
class _Progress:
    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.report(int(step or 0))


def train_run(out_dir: str, report: Callable[[int], None] = lambda step: None, steps: int = STEPS) -> None:
    """Train (or resume) under `out_dir`; on completion write FINAL with `model.*` and `ema.*` weights."""
    from pdae.io import save_tensors
    from pdae.train import TrainSpec, train

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TinyNet()
    spec = TrainSpec(
        images=steps * BATCH, batch_size=BATCH, lr=1e-2, ema_decay=0.9, checkpoint_every=1, seed=7, log_every=1
    )
    out = Path(out_dir)
    res = train({"net": net}, loss_fn, data(), spec, out / CHECKPOINT, torch.device("cpu"), run=_Progress(report),
                progress=False)  # fmt: skip
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in res.ema["net"].state_dict().items()})
    save_tensors(out / FINAL, tensors)


def shared_counter_reporter(counter, hold_at: int | None = None) -> Callable[[int], None]:  # noqa: ANN001
    """Report steps through a multiprocessing RawValue('i'); from step `hold_at` on, wait there (to be killed).

    The hold keeps a slow parent from missing its kill window: the kill still lands anywhere between the report of
    step hold_at - 1 and that of hold_at (checkpoint write of hold_at - 1, compute of hold_at), never after.
    """

    def report(step: int) -> None:
        counter.value = step
        while hold_at is not None and step >= hold_at:
            time.sleep(0.001)

    return report


def train_child(out_dir: str, hold_at: int | None, counter) -> None:  # noqa: ANN001
    """Process target: train_run reporting the last finished step through a shared RawValue('i')."""
    train_run(out_dir, shared_counter_reporter(counter, hold_at))


def hold_atomic_write(target: str, counter) -> None:  # noqa: ANN001
    """Start an atomic write of `target`, write half of the new content, signal (counter = 1) and wait forever."""
    from pdae.io import atomic_path

    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"new content, first half ")
            fh.flush()
            counter.value = 1
            time.sleep(600)
            fh.write(b"and second half")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/crash_worker.py OUT_DIR")
    train_run(sys.argv[1], lambda step: print(f"step {step}", flush=True))
    print(f"done: {Path(sys.argv[1]) / FINAL}")
