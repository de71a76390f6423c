"""One training loop for every trainer (baseline DPM, PDAE, latent DPM, class-conditional G).

Given trainable modules, a loss callable and an in-memory dataset, it owns: seeded epoch shuffling, Adam/AdamW,
EMA with warm-up, bf16 autocast, gradient accumulation (`accumulate` micro-batches of batch_size per optimizer
step), gradient/NaN guard, progress bar, MLflow step metrics, atomic safetensors checkpoints holding
model/EMA/optimizer/RNG state, and automatic resume. A run resumed from its checkpoint ends bitwise equal to an
uninterrupted one (CPU, fixed thread count). Under `torchrun` (WORLD_SIZE > 1) the trainable modules alone
are wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA) and each rank takes its share
of every global batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pdae.errors import PdaeError
from pdae.io import load_metadata, load_tensors, remove_stale_temps, save_tensors

# loss_fn(modules, batch, generator) -> scalar loss. `modules` may hold DDP wrappers: call them, don't reach inside.
LossFn = Callable[[Mapping[str, nn.Module], tuple[Tensor, ...], torch.Generator], Tensor]


@dataclass(frozen=True)
class TrainSpec:
    images: int
    batch_size: int
    lr: float
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)); False: the constant decay (official code)
    checkpoint_every: int = 500
    seed: int = 0
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    bf16: bool = False
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    log_every: int = 25
    fingerprint: dict = field(default_factory=dict)  # anything else that makes a checkpoint incompatible

    @classmethod
    def from_config(cls, cfg: Any, seed: int, fingerprint: dict, **extra: Any) -> TrainSpec:
        """A spec from a stage config section holding images, batch_size, lr, ema_decay, checkpoint_every, bf16
        (and optionally ema_warmup)."""
        keys = ("images", "batch_size", "lr", "ema_decay", "checkpoint_every", "bf16")
        extra.setdefault("ema_warmup", getattr(cfg, "ema_warmup", True))
        extra.setdefault("accumulate", getattr(cfg, "accumulate", 1))
        return cls(**{k: getattr(cfg, k) for k in keys}, seed=seed, fingerprint=fingerprint, **extra)

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step: batch_size x accumulate."""
        return self.batch_size * self.accumulate

    @property
    def steps(self) -> int:
        return math.ceil(self.images / self.effective_batch) if self.images > 0 else 0

    def key(self) -> str:
        """Hash of everything except the training length (a longer run may resume a shorter one)."""
        d = asdict(self)
        for k in ("images", "checkpoint_every", "log_every"):
            d.pop(k)
        if d["accumulate"] == 1:
            d.pop("accumulate")  # keeps the keys of checkpoints written before accumulation existed
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    ema: dict[str, nn.Module]
    history: list[tuple[int, int, float]]  # (step, images seen, mean loss over the log window)
    steps: int
    images_seen: int
    seconds: float
    resumed_from: int = 0
    batch_size: int = 1

    @property
    def images_per_second(self) -> float:
        """Throughput of this process's part of the run (resumed steps excluded)."""
        return round((self.steps - self.resumed_from) * self.batch_size / max(self.seconds, 1e-9), 1)


# EMA, with warm-up by default: decay_n = min(decay, (1 + n) / (10 + n)); warmup=False uses `decay` from step 0.
@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int, warmup: bool = True) -> None:
    d = min(decay, (1 + step) / (10 + step)) if warmup else decay
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm.detach(), 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


# Only rank 0 continues past training (evaluation, outputs, tracking); the other ranks leave cleanly here.
def _finish_distributed(rank: int) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        raise SystemExit(0)


def _optimizer(params: list[nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    raise PdaeError(f"unknown optimizer '{spec.optimizer}'; use adam or adamw.")


def _save_checkpoint(
    path: Path,
    modules,
    ema,
    opt,
    gen: torch.Generator,
    perm: Tensor,
    pos: int,
    step: int,
    history: list,
    spec: TrainSpec,
) -> None:
    tensors: dict[str, Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"model.{name}.{k}"] = v
        for k, v in ema[name].state_dict().items():
            tensors[f"ema.{name}.{k}"] = v
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.gen"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["data.perm"] = perm
    if history:
        tensors["hist"] = torch.tensor(history, dtype=torch.float64)
    meta = {"step": str(step), "pos": str(pos), "key": spec.key(), "param_groups": json.dumps(osd["param_groups"])}
    save_tensors(path, tensors, meta)


def _load_checkpoint(path: Path, modules, ema, opt, gen: torch.Generator) -> tuple[int, int, Tensor, list]:
    t = load_tensors(path, "training checkpoint")
    meta = load_metadata(path)
    for name, mod in modules.items():
        for target, prefix in ((mod, f"model.{name}."), (ema[name], f"ema.{name}.")):
            sd = {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
            try:
                target.load_state_dict(sd, strict=True)
            except RuntimeError as err:
                raise PdaeError(
                    f"training checkpoint {path} does not match the model ({str(err).splitlines()[0]}); "
                    "delete it to start over."
                ) from None
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in t.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    gen.set_state(t["rng.gen"])
    torch.set_rng_state(t["rng.torch"])
    hist = [(int(a), int(b), float(c)) for a, b, c in t["hist"].tolist()] if "hist" in t else []
    return int(meta["step"]), int(meta["pos"]), t["data.perm"], hist


def checkpoint_compatible(path: Path, spec: TrainSpec) -> bool:
    try:
        return load_metadata(path).get("key") == spec.key()
    except PdaeError:
        return False


def train(
    modules: Mapping[str, nn.Module],
    loss_fn: LossFn,
    data: tuple[Tensor, ...],
    spec: TrainSpec,
    checkpoint: Path | None,
    device: torch.device,
    run: Any | None = None,
    desc: str = "train",
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train `modules` (moved to `device`) for spec.images images; returns EMA copies and the loss history.

    `data` tensors share their first dimension (N). A compatible checkpoint at `checkpoint` is resumed; an
    incompatible one (other settings) is ignored and overwritten. `stop_after_steps` ends early (tests).
    """
    rank, world = _dist()
    n = data[0].shape[0]
    if n == 0:
        raise PdaeError("training data is empty; check the prepared dataset.")
    if spec.accumulate < 1:
        raise PdaeError(f"accumulate must be at least 1 (got {spec.accumulate}).")
    if spec.batch_size % world:
        raise PdaeError(f"batch_size {spec.batch_size} must be divisible by the number of processes ({world}).")
    mods = {k: m.to(device).train() for k, m in modules.items()}
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in mods.items()}
    params = [p for m in mods.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise PdaeError("nothing to train: the trainable modules have no parameters requiring grad.")
    opt = _optimizer(params, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    noise_gen = gen
    perm, pos, step, history = torch.randperm(n, generator=gen), 0, 0, []
    resumed = 0
    if checkpoint is not None and rank == 0:
        remove_stale_temps(checkpoint)  # left by a run killed while writing its checkpoint
    if checkpoint is not None and checkpoint.is_file() and checkpoint_compatible(checkpoint, spec):
        step, pos, perm, history = _load_checkpoint(checkpoint, mods, ema, opt, gen)
        resumed = step
    elif checkpoint is not None and checkpoint.is_file() and rank == 0:
        warnings.warn(
            f"{desc}: {checkpoint} was written with other settings or is unreadable; training starts at step 0 "
            "and replaces it.",
            stacklevel=2,
        )
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        noise_gen = torch.Generator().manual_seed(spec.seed + 1000 * rank)
        call_mods = {k: DDP(m) for k, m in mods.items()}
    else:
        call_mods = mods
    total = spec.steps
    local_bs = spec.batch_size // world
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    window: list[float] = []
    start, start_step = time.time(), step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16)
    eff = spec.effective_batch
    while step < total:
        if pos + eff > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        chosen = perm[pos : pos + eff]
        pos += eff
        where = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint and checkpoint.exists() else ""
        opt.zero_grad(set_to_none=True)
        micro_losses = []
        for j in range(spec.accumulate):
            idx = chosen[j * spec.batch_size : (j + 1) * spec.batch_size][rank * local_bs : (rank + 1) * local_bs]
            batch = tuple(d[idx].to(device, non_blocking=True) for d in data)
            with autocast:
                loss = loss_fn(call_mods, batch, noise_gen)
            if not torch.isfinite(loss):
                raise PdaeError(f"{desc}: loss became {loss.item()} at step {step}{where}. Lower the learning rate.")
            (loss if spec.accumulate == 1 else loss / spec.accumulate).backward()
            micro_losses.append(loss.detach())
        if spec.accumulate > 1:
            loss = torch.stack(micro_losses).mean()
        gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        if not torch.isfinite(gnorm):
            raise PdaeError(f"{desc}: gradients became non-finite at step {step}{where}. Lower the learning rate.")
        opt.step()
        step += 1
        for k in mods:
            ema_update(ema[k], mods[k], spec.ema_decay, step, spec.ema_warmup)
        window.append(loss.item())
        if step % spec.log_every == 0 or step == total:
            mean = sum(window) / len(window)
            history.append((step, step * eff, mean))
            window = []
            if run is not None and rank == 0:
                run.log_metrics({f"{desc}_loss": mean}, step=step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if checkpoint is not None and rank == 0 and (step % spec.checkpoint_every == 0 or step == total):
            _save_checkpoint(checkpoint, mods, ema, opt, gen, perm, pos, step, history, spec)
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
            break
    if bar is not None:
        bar.close()
    if world > 1:
        _finish_distributed(rank)
    return TrainResult(
        ema=ema,
        history=history,
        steps=step,
        images_seen=step * eff,
        seconds=time.time() - start,
        resumed_from=resumed,
        batch_size=eff,
    )
