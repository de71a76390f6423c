"""One rank of a 2-process CPU (gloo) run of the shared training loop; started by tests/test_ddp.py."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from pdae.train import TrainSpec, train


def loss_fn(mods, batch, gen):
    x = batch[0]
    return ((mods["m"](x + 0.1 * torch.randn(x.shape, generator=gen)) - x) ** 2).mean()


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    data = (torch.randn(32, 4, generator=torch.Generator().manual_seed(1)),)
    spec = TrainSpec(images=8 * 6, batch_size=8, lr=1e-2, ema_decay=0.9, seed=3)
    rank = int(os.environ["RANK"])
    try:
        res = train({"m": model}, loss_fn, data, spec, None, torch.device("cpu"), progress=False)
        (open(f"{out}/steps{rank}", "w")).write(str(res.steps))
    finally:  # rank 1 leaves train() with SystemExit(0); both save their live weights
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
