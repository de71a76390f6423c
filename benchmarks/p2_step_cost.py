"""P2 — step cost: one PDAE training step vs one Diff-AE-style training step at equal batch, in one process.

Time: full training steps as `pdae.train.train` runs them (loss forward, backward, Adam step, EMA update), the two
models timed alternately (order flipped every round) and compared as the median of per-round ratios; wall-clock and
process-CPU time both reported. The bare baseline UNet's own pre-training step is timed alongside for reference.

Memory (CPU has no torch.cuda.max_memory_allocated; tracemalloc does not see torch's allocator):
- activation memory = bytes of the distinct storages autograd saves for backward during the loss forward, collected
  with `torch.autograd.graph.saved_tensors_hooks` (parameters and buffers excluded). This is what the forward keeps
  alive until backward, the part that differs between the two designs (the target metric);
- peak step memory = the maximum "Total Allocated" of torch's CPU allocator seen by `torch.profiler`
  (profile_memory=True) over one full step (forward, backward, optimizer step, EMA), counted from the step's start
  (after zero_grad): activations + gradients + temporaries, not weights or optimizer state held before the step.
On CUDA the peak is `torch.cuda.max_memory_allocated` over one step instead.

    python -m benchmarks.p2_step_cost [--batch 64] [--rounds 30] [--threads 1] [--tag _threads2]

`--checkpointing` instead measures PDAE's step with and without gradient checkpointing of G (train.grad_checkpoint)
at the 128 px preset's architecture (configs/ffhq128.yaml: 3-channel 128 px UNet, z_dim 512) on a small batch,
writing p2_step_cost_checkpointing.json. With checkpointing, the inputs a block keeps for its recomputation are held
by the checkpoint, not by autograd's saved tensors: activation memory there is the saved tensors plus those inputs
(distinct storages, `retained_activation_bytes`), for both variants:

    python -m benchmarks.p2_step_cost --checkpointing [--batch 4] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

from benchmarks.common import (
    build_pair,
    interleaved,
    load_configs,
    machine,
    paired_ratio,
    save_result,
    summary,
    table,
)
from benchmarks.diffae_style import diffae_loss
from pdae.baseline import eps_loss
from pdae.diffusion import Schedule
from pdae.fit import pdae_loss
from pdae.train import TrainSpec, ema_update

TARGET_TIME, TARGET_ACT = 1.0, 0.8
TARGET_CKPT_ACT, TARGET_CKPT_TIME = 0.4, 1.35


# One training step of the shared loop, split so that memory probes can wrap its parts.
class Stepper:
    def __init__(
        self, mods: dict[str, nn.Module], loss_fn: Callable, batch: tuple[Tensor, ...], spec: TrainSpec, seed: int
    ) -> None:
        self.mods = {k: m.train() for k, m in mods.items()}
        self.ema = {k: _frozen_copy(m) for k, m in self.mods.items()}
        self.params = [p for m in self.mods.values() for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=spec.lr, betas=spec.betas)
        self.loss_fn, self.batch, self.spec = loss_fn, batch, spec
        self.gen = torch.Generator().manual_seed(seed)
        self.n = 0

    def loss(self) -> Tensor:
        return self.loss_fn(self.mods, self.batch, self.gen)

    def finish(self, loss: Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.n += 1
        for k in self.mods:
            ema_update(self.ema[k], self.mods[k], self.spec.ema_decay, self.n)

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.finish(self.loss())


def _frozen_copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).eval().requires_grad_(False)


def _storage_ptrs(modules: list[nn.Module]) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}


def saved_bytes(fn: Callable[[], Tensor], exclude: set[int]) -> tuple[Tensor, int, int]:
    """Run `fn` (a forward returning a loss) and return (its result, bytes, count) of the distinct storages autograd
    saved for backward, ignoring storages whose data pointer is in `exclude` (parameters, buffers)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()), len(seen)


def activation_bytes(step: Stepper, exclude: set[int]) -> tuple[int, int]:
    """(bytes, count) of distinct non-parameter storages saved for backward by one loss forward (then the step)."""
    step.opt.zero_grad(set_to_none=True)
    loss, nbytes, count = saved_bytes(step.loss, exclude)
    step.finish(loss)
    return nbytes, count


def peak_step_bytes(step: Stepper) -> int:
    """Peak bytes allocated during one full step, from its start (see the module docstring)."""
    step.opt.zero_grad(set_to_none=True)
    if step.params[0].is_cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step.finish(step.loss())
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.finish(step.loss())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    return int(max(totals, default=0))


def build_steppers(batch_size: int, seed: int = 0, params: str | None = None) -> tuple[dict[str, Stepper], dict]:
    """The three steppers (pdae, diffae, bare_unet) on one fixed random batch of the default image shape."""
    from pdae.nets.unet import build_unet

    base, bcfg, tcfg = load_configs(*([params] if params else []))
    torch.manual_seed(seed)
    unet = build_unet(base.image_size, 1, bcfg.channels, bcfg.layers_per_block, bcfg.attention_head_dim)
    pdae, diffae, counts = build_pair(unet, tcfg.z_dim, tcfg.encoder_channels, tcfg.dropout)
    schedule = Schedule.linear(1000)
    x0 = (torch.rand(batch_size, 1, base.image_size, base.image_size) * 2 - 1,)
    spec = TrainSpec(images=0, batch_size=batch_size, lr=tcfg.lr, ema_decay=tcfg.ema_decay)
    bare = build_unet(base.image_size, 1, bcfg.channels, bcfg.layers_per_block, bcfg.attention_head_dim)
    steppers = {
        "pdae": Stepper(
            {"encoder": pdae.encoder, "gradient": pdae.gradient},
            pdae_loss(pdae.backbone, schedule, tcfg.weighting, tcfg.gamma),
            x0,
            spec,
            seed,
        ),
        "diffae": Stepper({"encoder": diffae.encoder, "unet": diffae.unet}, diffae_loss(schedule), x0, spec, seed),
        "bare_unet": Stepper({"unet": bare}, eps_loss(schedule), x0, spec, seed),
    }
    info = {"parameters": counts, "diffae_channels": diffae.config["channels"], "image_size": base.image_size}
    info["_exclude"] = _storage_ptrs([pdae, pdae.backbone, diffae, bare])
    return steppers, info


def run(batch_size: int = 64, rounds: int = 30, repeats: int = 2, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    steppers, info = build_steppers(batch_size, seed)
    exclude = info.pop("_exclude")
    for s in steppers.values():  # warm-up before any measurement (allocator, Adam state)
        for _ in range(warmup):
            s()
    act = {k: activation_bytes(s, exclude) for k, s in steppers.items()}
    peak = {k: max(peak_step_bytes(s) for _ in range(2)) for k, s in steppers.items()}
    times = interleaved(dict(steppers), rounds=rounds, repeats=repeats, warmup=0)
    ratios = {
        "time_wall_pdae_over_diffae": paired_ratio(times["pdae"]["wall"], times["diffae"]["wall"]),
        "time_cpu_pdae_over_diffae": paired_ratio(times["pdae"]["cpu"], times["diffae"]["cpu"]),
        "time_wall_pdae_over_bare_unet": paired_ratio(times["pdae"]["wall"], times["bare_unet"]["wall"]),
        "time_wall_diffae_over_bare_unet": paired_ratio(times["diffae"]["wall"], times["bare_unet"]["wall"]),
        "activation_pdae_over_diffae": act["pdae"][0] / act["diffae"][0],
        "peak_step_pdae_over_diffae": peak["pdae"] / peak["diffae"] if peak["diffae"] else None,
    }
    models = {}
    for k in steppers:
        wall = summary(times[k]["wall"])
        models[k] = {
            "step_seconds_wall": wall,
            "step_seconds_cpu": summary(times[k]["cpu"]),
            "images_per_second_wall": batch_size / wall["median"],
            "activation_bytes": act[k][0],
            "saved_tensors": act[k][1],
            "peak_step_bytes": peak[k],
        }
    return {
        "benchmark": "P2 step cost",
        "batch_size": batch_size,
        "rounds": rounds,
        "repeats_per_round": repeats,
        **info,
        "models": models,
        "ratios": ratios,
        "targets": {"time_wall_pdae_over_diffae": TARGET_TIME, "activation_pdae_over_diffae": TARGET_ACT},
        "met": {
            "time": ratios["time_wall_pdae_over_diffae"] <= TARGET_TIME,
            "activation_memory": ratios["activation_pdae_over_diffae"] <= TARGET_ACT,
        },
        "memory_method": "activation: saved_tensors_hooks distinct storages; peak: torch.profiler CPU allocator",
        "machine": machine(),
    }


def retained_activation_bytes(step: Stepper, exclude: set[int]) -> int:
    """Bytes of the distinct non-parameter storages one loss forward keeps for backward (then the step finishes):
    autograd's saved tensors outside checkpointed blocks, plus the inputs each checkpointed block of G holds for its
    recomputation (counted by wrapping `torch.utils.checkpoint.checkpoint` as pdae.nets.gradient calls it)."""
    import pdae.nets.gradient as gmod

    seen: dict[int, int] = {}

    def note(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    real = gmod.checkpoint

    def spy(fn: Callable, *args: Any, **kw: Any) -> Tensor:
        for a in args:
            if isinstance(a, Tensor):
                note(a)
        return real(fn, *args, **kw)

    step.opt.zero_grad(set_to_none=True)
    gmod.checkpoint = spy
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            loss = step.loss()
    finally:
        gmod.checkpoint = real
    step.finish(loss)
    return sum(seen.values())


class _Checkpointed(Stepper):
    """A PDAE stepper that sets G's gradient checkpointing before every loss forward."""

    def __init__(self, flag: bool, gradient: nn.Module, *args: Any) -> None:
        super().__init__(*args)
        self.flag, self.gradient = flag, gradient

    def loss(self) -> Tensor:
        self.gradient.grad_checkpoint = self.flag
        return super().loss()


def run_checkpointing(
    batch_size: int = 4, rounds: int = 4, seed: int = 0, params: str | Path | None = None
) -> dict[str, Any]:
    """PDAE step with and without gradient checkpointing of G at the preset's architecture (see the docstring)."""
    from pdae.nets.backbone import Backbone
    from pdae.nets.pdae import PDAE
    from pdae.nets.unet import build_unet

    params = params or Path(__file__).resolve().parents[1] / "configs" / "ffhq128.yaml"
    base, bcfg, tcfg = load_configs(params)
    torch.manual_seed(seed)
    unet = build_unet(base.image_size, 3, bcfg.channels, bcfg.layers_per_block, bcfg.attention_head_dim)
    model = PDAE(Backbone(unet), tcfg.z_dim, tcfg.encoder_channels, tcfg.dropout)
    loss_fn = pdae_loss(model.backbone, Schedule.linear(1000), tcfg.weighting, tcfg.gamma)
    x0 = (torch.rand(batch_size, 3, base.image_size, base.image_size) * 2 - 1,)
    spec = TrainSpec(images=0, batch_size=batch_size, lr=tcfg.lr, ema_decay=tcfg.ema_decay)
    mods = {"encoder": model.encoder, "gradient": model.gradient}
    steppers = {k: _Checkpointed(k == "checkpointed", model.gradient, mods, loss_fn, x0, spec, seed)
                for k in ("plain", "checkpointed")}  # fmt: skip
    for s in steppers.values():
        s()
    exclude = _storage_ptrs([model, model.backbone])
    hooks = {k: activation_bytes(s, exclude)[0] for k, s in steppers.items()}
    retained = {k: retained_activation_bytes(s, exclude) for k, s in steppers.items()}
    peak = {k: peak_step_bytes(s) for k, s in steppers.items()}
    times = interleaved(dict(steppers), rounds=rounds, repeats=1, warmup=0)
    act_ratio = retained["checkpointed"] / retained["plain"]
    time_ratio = paired_ratio(times["checkpointed"]["wall"], times["plain"]["wall"])
    per_image = retained["plain"] / batch_size
    return {
        "benchmark": "P2 step cost: gradient checkpointing of G",
        "preset": str(Path(params).name),
        "image_size": base.image_size,
        "batch_size": batch_size,
        "rounds": rounds,
        "parameters": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "gradient": sum(p.numel() for p in model.gradient.parameters()),
            "encoder": sum(p.numel() for p in model.encoder.parameters()),
        },  # fmt: skip
        "variants": {
            k: {
                "activation_bytes_retained": retained[k],
                "saved_tensor_hook_bytes": hooks[k],
                "peak_step_bytes": peak[k],
                "step_seconds_wall": summary(times[k]["wall"]),
                "step_seconds_cpu": summary(times[k]["cpu"]),
            }
            for k in steppers
        },
        "ratios": {"activation_checkpointed_over_plain": act_ratio, "time_wall_checkpointed_over_plain": time_ratio},
        "activation_bytes_per_image_plain_float32": per_image,
        "targets": {"activation": TARGET_CKPT_ACT, "time": TARGET_CKPT_TIME},
        "met": {"activation_memory": act_ratio <= TARGET_CKPT_ACT, "time": time_ratio <= TARGET_CKPT_TIME},
        "note": "CPU float32; time is wall clock on a shared machine (paired median of interleaved rounds)",
        "machine": machine(),
    }


def report_checkpointing(res: dict[str, Any]) -> str:
    rows = [
        [k, round(v["activation_bytes_retained"] / 2**20, 1), round(v["peak_step_bytes"] / 2**20, 1),
         round(1000 * v["step_seconds_wall"]["median"])]
        for k, v in res["variants"].items()
    ]  # fmt: skip
    r = res["ratios"]
    return "\n".join(
        [
            table(rows, ["G", "activations MiB", "peak step MiB", "step ms (wall)"]),
            f"checkpointed / plain: activation memory {r['activation_checkpointed_over_plain']:.3f} "
            f"(target <= {TARGET_CKPT_ACT}), step time {r['time_wall_checkpointed_over_plain']:.3f} "
            f"(target <= {TARGET_CKPT_TIME})",
        ]
    )


def report(res: dict[str, Any]) -> str:
    rows = []
    for k, m in res["models"].items():
        rows.append(
            [
                k,
                1000 * m["step_seconds_wall"]["median"],
                1000 * m["step_seconds_cpu"]["median"],
                round(m["images_per_second_wall"], 1),
                round(m["activation_bytes"] / 2**20, 2),
                round(m["peak_step_bytes"] / 2**20, 2),
            ]
        )
    head = ["model", "step ms (wall, median)", "step ms (CPU)", "img/s", "activations MiB", "peak step MiB"]
    r = res["ratios"]
    lines = [
        table(rows, head),
        "",
        f"PDAE / Diff-AE-style step time (wall, paired median): {r['time_wall_pdae_over_diffae']:.3f}  "
        f"(CPU time {r['time_cpu_pdae_over_diffae']:.3f}; target <= {TARGET_TIME})",
        f"PDAE / Diff-AE-style activation memory: {r['activation_pdae_over_diffae']:.3f}  (target <= {TARGET_ACT}); "
        f"peak step memory: {r['peak_step_pdae_over_diffae']:.3f}",
        f"PDAE / bare UNet step: {r['time_wall_pdae_over_bare_unet']:.3f}; "
        f"Diff-AE-style / bare UNet: {r['time_wall_diffae_over_bare_unet']:.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="batch size of both steps (default: train.batch_size 64)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust under shared load)")
    ap.add_argument("--tag", default="", help="suffix of the results file name (p2_step_cost<tag>.json)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--checkpointing", action="store_true", help="G checkpointing at the 128 px preset instead")
    ap.add_argument("--params", default=None, help="preset for --checkpointing (default configs/ffhq128.yaml)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpointing:
        res = run_checkpointing(args.batch, args.rounds, params=args.params)
        print(report_checkpointing(res))
        print(f"wrote {save_result('p2_step_cost_checkpointing' + args.tag, res, args.out)}")
        return res
    res = run(args.batch, args.rounds, args.repeats)
    print(report(res))
    print(f"wrote {save_result('p2_step_cost' + args.tag, res, args.out)}")
    return res


if __name__ == "__main__":
    main()
