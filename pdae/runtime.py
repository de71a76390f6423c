"""Process setup shared by stages and the CLI: seeds, thread count, device."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pdae.errors import PdaeError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a user error."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one GPU per process
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PdaeError(f"device '{device}' requested but no CUDA GPU is visible; set base.device: auto or cpu.")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise PdaeError(f"device '{device}' is not a valid torch device ({err}); use auto, cpu or cuda.") from None


def setup(seed: int, threads: int, device: str = "auto") -> torch.device:
    """Seed all RNGs, pin the CPU thread count, flush float32 denormals; return the device.

    Runs on the CPU are bitwise reproducible at a fixed thread count: besides the seeds and threads this needs
    deterministic kernels, because the backward of a gather with repeated indices (the latent MLP's per-timestep
    features, class embeddings) accumulates in a thread-dependent order otherwise. On CUDA the defaults are kept.
    Denormals: DDIM inversion near t = 0 produces float32 denormals, which run ~10x slower on x86 CPUs.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    seed_everything(seed)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return dev
