"""Key-by-key mapping of an official UNet state dict onto diffusers' `UNet2DModel`, with full key accounting.

Official module paths (guided-diffusion / BeatGANs layout, shared by PDAE and Diff-AE):
`time_embed.{0,2}`, `input_blocks.{k}.{0: ResBlock | conv, 1: AttentionBlock}`, `middle_block.{0,1,2}`,
`output_blocks.{k}.{0: ResBlock, 1: AttentionBlock | up ResBlock, 2: up ResBlock}`, `out.{0: GroupNorm, 2: conv}`,
optional `label_emb`. ResBlock: `in_layers.{0 GN, 2 conv}`, `emb_layers.1`, `out_layers.{0 GN, 3 conv}`,
`skip_connection` (1x1 conv). AttentionBlock: `norm`, `qkv` (Conv1d C -> 3C), `proj_out` (Conv1d C -> C).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from pdae.convert.spec import UNetSpec
from pdae.errors import PdaeError

# diffusers ResnetBlock2D parameter names -> official ResBlock module names.
_RES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def module_plan(spec: UNetSpec) -> list[tuple[str, str, str]]:
    """(official module, diffusers module, kind) for every module with weights; kind in {plain, res, attn, down}.

    Conv resampling (resblock_updown False): the down conv is `op` (diffusers `conv`), the up conv `conv` (same).
    """
    n, nres, attn = len(spec.channel_mult), spec.num_res_blocks, set(spec.attention_levels)
    updown = spec.resblock_updown
    plan = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    if spec.num_classes is not None:
        plan.append(("label_emb", "class_embedding", "plain"))
    k = 1
    for lv in range(n):
        for j in range(nres):
            plan.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.resnets.{j}", "res"))
            if lv in attn:
                plan.append((f"input_blocks.{k}.1", f"down_blocks.{lv}.attentions.{j}", "attn"))
            k += 1
        if lv != n - 1:
            plan.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.downsamplers.0", "res" if updown else "down"))
            k += 1
    plan += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    k = 0
    for i, lv in enumerate(reversed(range(n))):
        for j in range(nres + 1):
            plan.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            m = 1
            if lv in attn:
                plan.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
                m = 2
            if lv > 0 and j == nres:
                plan.append((f"output_blocks.{k}.{m}", f"up_blocks.{i}.upsamplers.0", "res" if updown else "plain"))
            k += 1
    plan += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return plan


def split_qkv(qkv: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused qkv Conv1d weight (3C, C, 1) or bias (3C,) into q, k, v as Linear weights (C, C) / biases (C,).

    Legacy order (QKVAttentionLegacy) lays the 3C outputs out as (heads, [q, k, v], C/heads); the new order
    (QKVAttention) as ([q, k, v], heads, C/heads). Either way head h of q is rows h*C/heads..(h+1)*C/heads, which is
    how diffusers' Attention splits to_q/to_k/to_v into heads.
    """
    w = qkv.reshape(qkv.shape[0], -1)  # (3C, C) or (3C, 1) for a bias
    c = w.shape[0] // 3
    grouped = w.reshape(3, heads, c // heads, -1) if new_order else w.reshape(heads, 3, c // heads, -1).transpose(0, 1)
    q, k, v = (part.reshape(c, -1) for part in grouped)
    if qkv.dim() == 1:
        return q[:, 0], k[:, 0], v[:, 0]
    return q, k, v


def _source_for(kind: str, rest: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None, int | None]:
    """Official key suffix, an optional reshape and (for q/k/v) the chunk index, for one diffusers key suffix."""
    name, _, param = rest.rpartition(".")
    if kind == "plain":
        return rest, None, None
    if kind == "down":
        if name != "conv":
            raise KeyError(rest)
        return f"op.{param}", None, None
    if kind == "res":
        if name not in _RES:
            raise KeyError(rest)
        return f"{_RES[name]}.{param}", None, None
    if name == "group_norm":
        return f"norm.{param}", None, None
    if name in ("to_q", "to_k", "to_v"):
        return f"qkv.{param}", None, "qkv".index(name[-1])
    if name == "to_out.0":
        return f"proj_out.{param}", (lambda t: t.reshape(t.shape[0], -1) if t.dim() > 1 else t), None
    raise KeyError(rest)


def _listing(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_state_dict(
    spec: UNetSpec, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Fill every key of `target` (a diffusers state dict, for names and shapes) from `source` (official keys).

    Raises PdaeError naming a few keys when a source key is left over, a needed source key is missing, a target key
    has no source, or a shape disagrees (usually: the config does not describe this checkpoint).
    """
    bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PdaeError(f"{what}: entries {_listing(bad)} are not tensors; this is not a UNet state dict.")
    owners = sorted(module_plan(spec), key=lambda p: -len(p[1]))  # longest diffusers prefix first
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    unfilled: list[str] = []
    missing: list[str] = []
    for tkey, tval in target.items():
        owner = next(((s, t, kd) for s, t, kd in owners if tkey.startswith(t + ".")), None)
        if owner is None:
            unfilled.append(tkey)
            continue
        src_mod, tgt_mod, kind = owner
        try:
            suffix, reshape, chunk = _source_for(kind, tkey[len(tgt_mod) + 1 :])
        except KeyError:
            unfilled.append(tkey)
            continue
        skey = f"{src_mod}.{suffix}"
        if skey not in source:
            missing.append(skey)
            continue
        value = source[skey]
        if chunk is not None:
            value = split_qkv(value, spec.heads_at(value.shape[0] // 3), spec.new_attention_order)[chunk]
        elif reshape is not None:
            value = reshape(value)
        if tuple(value.shape) != tuple(tval.shape):
            raise PdaeError(
                f"{what}: {skey} has shape {tuple(source[skey].shape)} but the config needs {tuple(tval.shape)} "
                f"for {tkey}; the config does not describe this checkpoint."
            )
        out[tkey] = value.detach().to(dtype=tval.dtype).contiguous()
        used.add(skey)
    if missing:
        raise PdaeError(f"{what}: missing keys {_listing(missing)}; the config does not describe this checkpoint.")
    if unfilled:
        raise PdaeError(f"{what}: diffusers keys {_listing(unfilled)} have no source; the conversion is incomplete.")
    leftover = sorted(set(source) - used)
    if leftover:
        raise PdaeError(
            f"{what}: unexpected keys {_listing(leftover)} were not consumed; the config does not describe this "
            "checkpoint (check channel plan, attention levels and res blocks)."
        )
    return out
