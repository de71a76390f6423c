"""Official PDAE / Diff-AE checkpoints -> diffusers UNet2DModel: numerics against an independent reference forward,
full key accounting, and refusal of files that need arbitrary unpickling."""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import UNet2DModel

from pdae.convert import convert_checkpoint, convert_to_folder, diffae_preset, diffae_spec, pdae_spec
from pdae.errors import PdaeError

TOL = 1e-5

# PDAE layout: attention at two levels (downsampling factors 2 and 4), one head, legacy QKV order.
PDAE_CFG = {
    "model": "FFHQDenoiseFn",
    "dims": 2,
    "input_channel": 3,
    "base_channel": 32,
    "channel_multiplier": [1, 2, 2],
    "num_residual_blocks_of_a_block": 1,
    "dropout": 0.0,
    "attention_resolutions": [2, 4],
    "use_new_attention_order": False,
    "num_heads": 1,
    "head_channel": -1,
}
# Diff-AE layout: attention at 8 px of a 16 px config (level 1) with 4 heads, 2 res blocks, wider time embedding.
DIFFAE_CONF = {
    "image_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "channel_mult": (1, 2, 2),
    "num_res_blocks": 2,
    "attention_resolutions": (8,),
    "num_heads": 4,
    "num_head_channels": -1,
    "embed_channels": 160,
    "dropout": 0.1,
    "resblock_updown": True,
    "use_new_attention_order": False,
    "resnet_two_cond": False,
}


# ---- official layout: key names and shapes, written from the architecture description ---------------------------
def official_shapes(
    base, mult, nres, attn_levels, in_ch, out_ch, emb, updown=True, scale_shift=True, classes=None
) -> dict[str, tuple[int, ...]]:
    """updown False: conv resampling (`op` / `conv`); scale_shift False: emb_layers output o channels (ADM flags)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(p, i, o):
        shapes.update({f"{p}.weight": (o, i), f"{p}.bias": (o,)})

    def conv(p, i, o, k=3):
        shapes.update({f"{p}.weight": (o, i, k, k), f"{p}.bias": (o,)})

    def norm(p, c):
        shapes.update({f"{p}.weight": (c,), f"{p}.bias": (c,)})

    def res(p, i, o):
        norm(f"{p}.in_layers.0", i)
        conv(f"{p}.in_layers.2", i, o)
        lin(f"{p}.emb_layers.1", emb, 2 * o if scale_shift else o)
        norm(f"{p}.out_layers.0", o)
        conv(f"{p}.out_layers.3", o, o)
        if i != o:
            conv(f"{p}.skip_connection", i, o, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        shapes.update({f"{p}.qkv.weight": (3 * c, c, 1), f"{p}.qkv.bias": (3 * c,)})
        shapes.update({f"{p}.proj_out.weight": (c, c, 1), f"{p}.proj_out.bias": (c,)})

    lin("time_embed.0", base, emb)
    lin("time_embed.2", emb, emb)
    conv("input_blocks.0.0", in_ch, base)
    if classes:
        shapes["label_emb.weight"] = (classes, emb)
    ch, skips, k = base, [base], 1
    for lv, m in enumerate(mult):
        for _ in range(nres):
            res(f"input_blocks.{k}.0", ch, m * base)
            ch = m * base
            if lv in attn_levels:
                attn(f"input_blocks.{k}.1", ch)
            skips.append(ch)
            k += 1
        if lv < len(mult) - 1:
            res(f"input_blocks.{k}.0", ch, ch) if updown else conv(f"input_blocks.{k}.0.op", ch, ch)
            skips.append(ch)
            k += 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    k = 0
    for lv in reversed(range(len(mult))):
        for j in range(nres + 1):
            res(f"output_blocks.{k}.0", ch + skips.pop(), mult[lv] * base)
            ch, n = mult[lv] * base, 1
            if lv in attn_levels:
                attn(f"output_blocks.{k}.1", ch)
                n = 2
            if lv and j == nres:
                res(f"output_blocks.{k}.{n}", ch, ch) if updown else conv(f"output_blocks.{k}.{n}.conv", ch, ch)
            k += 1
    norm("out.0", ch)
    conv("out.2", ch, out_ch)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if len(shape) == 1 and ("norm" in key or "layers.0" in key or key.startswith("out.0")) and "proj" not in key:
            base = 1.0 if key.endswith("weight") else 0.0
            out[key] = base + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


# ---- independent reference forward on official keys -------------------------------------------------------------
def ref_time_embedding(S, t, base):
    """Sinusoid [cos, sin] of width `base` (no frequency shift) -> Linear -> SiLU -> Linear."""
    half = base // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    e = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = F.silu(F.linear(e, S["time_embed.0.weight"], S["time_embed.0.bias"]))
    return F.linear(h, S["time_embed.2.weight"], S["time_embed.2.bias"])


def _gn(S, p, x):
    return F.group_norm(x, 32, S[f"{p}.weight"], S[f"{p}.bias"], eps=1e-5)


def ref_resblock(S, p, x, emb, updown=None):
    """GN-SiLU-(resample)-conv, scale-shift GN by the time embedding (or, with an o-wide emb_layers, the embedding
    added before the GN), SiLU-conv, plus (1x1-conv) skip."""
    h = F.silu(_gn(S, f"{p}.in_layers.0", x))
    if updown == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif updown == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    h = F.conv2d(h, S[f"{p}.in_layers.2.weight"], S[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), S[f"{p}.emb_layers.1.weight"], S[f"{p}.emb_layers.1.bias"])
    if e.shape[1] == 2 * h.shape[1]:
        scale, shift = e.chunk(2, dim=1)
        h = _gn(S, f"{p}.out_layers.0", h) * (1 + scale[..., None, None]) + shift[..., None, None]
    else:
        h = _gn(S, f"{p}.out_layers.0", h + e[..., None, None])
    h = F.conv2d(F.silu(h), S[f"{p}.out_layers.3.weight"], S[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in S:
        x = F.conv2d(x, S[f"{p}.skip_connection.weight"], S[f"{p}.skip_connection.bias"])
    return x + h


def ref_attention(S, p, x, heads, new_order=False):
    """Fused 1x1 qkv; legacy order splits heads first, then q/k/v; softmax(q.k / sqrt(d)) v; proj; residual."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(S, f"{p}.norm", flat), S[f"{p}.qkv.weight"], S[f"{p}.qkv.bias"])
    d = c // heads
    if new_order:
        q, k, v = (z.reshape(b * heads, d, -1) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (flat + F.conv1d(a, S[f"{p}.proj_out.weight"], S[f"{p}.proj_out.bias"])).reshape(b, c, hh, ww)


def ref_unet(S, x, t, base, levels, nres, attn_levels, heads_of, new_order=False, y=None):
    """Whole official UNet from the blocks above (skips pushed after every input block, popped per output block).

    Conv resampling when the state has `op` / `conv` resamplers; y: class labels (N,) for a `label_emb` model.
    """
    emb = ref_time_embedding(S, t, base)
    if y is not None:
        emb = emb + S["label_emb.weight"][y]
    h = F.conv2d(x, S["input_blocks.0.0.weight"], S["input_blocks.0.0.bias"], padding=1)
    hs, k = [h], 1
    for lv in range(levels):
        for _ in range(nres):
            h = ref_resblock(S, f"input_blocks.{k}.0", h, emb)
            if lv in attn_levels:
                h = ref_attention(S, f"input_blocks.{k}.1", h, heads_of(h.shape[1]), new_order)
            hs.append(h)
            k += 1
        if lv < levels - 1 and f"input_blocks.{k}.0.op.weight" in S:
            h = F.conv2d(h, S[f"input_blocks.{k}.0.op.weight"], S[f"input_blocks.{k}.0.op.bias"], stride=2, padding=1)
            hs.append(h)
            k += 1
        elif lv < levels - 1:
            h = ref_resblock(S, f"input_blocks.{k}.0", h, emb, "down")
            hs.append(h)
            k += 1
    h = ref_resblock(S, "middle_block.0", h, emb)
    h = ref_attention(S, "middle_block.1", h, heads_of(h.shape[1]), new_order)
    h = ref_resblock(S, "middle_block.2", h, emb)
    k = 0
    for lv in reversed(range(levels)):
        for j in range(nres + 1):
            p = f"output_blocks.{k}"
            h = ref_resblock(S, f"{p}.0", torch.cat([h, hs.pop()], dim=1), emb)
            n = 1
            if lv in attn_levels:
                h = ref_attention(S, f"{p}.1", h, heads_of(h.shape[1]), new_order)
                n = 2
            if lv and j == nres and f"{p}.{n}.conv.weight" in S:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = F.conv2d(h, S[f"{p}.{n}.conv.weight"], S[f"{p}.{n}.conv.bias"], padding=1)
            elif lv and j == nres:
                h = ref_resblock(S, f"{p}.{n}", h, emb, "up")
            k += 1
    h = F.silu(_gn(S, "out.0", h))
    return F.conv2d(h, S["out.2.weight"], S["out.2.bias"], padding=1)


# ---- fixtures: official files on disk -----------------------------------------------------------------------------
def pdae_state(cfg=PDAE_CFG, seed=0):
    mult, base = cfg["channel_multiplier"], cfg["base_channel"]
    levels = [lv for lv in range(len(mult)) if 2**lv in cfg["attention_resolutions"]]
    shapes = official_shapes(base, mult, cfg["num_residual_blocks_of_a_block"], levels, 3, 3, 4 * base)
    return random_state(shapes, seed)


def write_pdae(folder: Path, state, cfg=PDAE_CFG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"step": 10, "denoise_fn": state, "ema_denoise_fn": state, "scaler": {"scale": 65536.0}}
    torch.save(ckpt, folder / "checkpoint.pt")
    (folder / "config.yml").write_text(
        yaml.safe_dump({"denoise_fn_config": cfg, "diffusion_config": {"timesteps": 1000}})
    )
    return folder


def diffae_state(conf=DIFFAE_CONF, seed=1):
    mult = conf["channel_mult"]
    levels = [lv for lv in range(len(mult)) if conf["image_size"] // 2**lv in conf["attention_resolutions"]]
    shapes = official_shapes(
        conf["model_channels"], mult, conf["num_res_blocks"], levels, 3, 3, conf["embed_channels"]
    )
    return random_state(shapes, seed)


def write_diffae(folder: Path, state, hparams=True, extra=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"ema_model.{k}": v for k, v in state.items()}
    sd.update({f"model.{k}": v + 1 for k, v in state.items()})
    sd["x_T"] = torch.randn(4, 3, 16, 16)
    ckpt = {"epoch": 1, "global_step": 5, "pytorch-lightning_version": "1.4.5", "state_dict": sd}
    if hparams:
        ckpt["hyper_parameters"] = {"net_ch": 32, "model_conf": dict(DIFFAE_CONF)}
    ckpt.update(extra or {})
    torch.save(ckpt, folder / "last.ckpt")
    return folder / "last.ckpt"


# ---- numerics ------------------------------------------------------------------------------------------------------
def _check_components(model: UNet2DModel, S, base, nres, heads, new_order=False):
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 37, 500, 999])
    emb = ref_time_embedding(S, t, base)
    with torch.no_grad():
        ours = model.time_embedding(model.time_proj(t))
        assert (ours - emb).abs().max() < TOL
        # first ResBlock of level 1 (channel change: 1x1 skip conv), and the level-0 down-sampling ResBlock
        x = torch.randn(4, base, 8, 8, generator=g)
        k = nres + 2
        assert (
            model.down_blocks[1].resnets[0](x, emb) - ref_resblock(S, f"input_blocks.{k}.0", x, emb)
        ).abs().max() < TOL
        down = ref_resblock(S, f"input_blocks.{nres + 1}.0", x, emb, "down")
        assert (model.down_blocks[0].downsamplers[0](x, emb) - down).abs().max() < TOL
        # attention after that ResBlock
        y = torch.randn(4, 2 * base, 4, 4, generator=g)
        ref = ref_attention(S, f"input_blocks.{k}.1", y, heads, new_order)
        assert (model.down_blocks[1].attentions[0](y) - ref).abs().max() < TOL


def test_pdae_official_matches_reference(tmp_path):
    S = pdae_state()
    model = convert_checkpoint(write_pdae(tmp_path / "pre-trained-dpms" / "tiny", S), "pdae-official")
    assert model.config.sample_size is None and model.config.resnet_time_scale_shift == "scale_shift"
    assert [type(b).__name__ for b in model.down_blocks] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D"] * 1 + [
        "AttnDownBlock2D"
    ]
    _check_components(model, S, 32, 1, heads=1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 811])
    with torch.no_grad():
        ref = ref_unet(S, x, t, 32, 3, 1, {1, 2}, lambda c: 1)
        assert (model(x, t).sample - ref).abs().max() < TOL


def test_sample_size_from_folder_name_or_argument(tmp_path):
    folder = write_pdae(tmp_path / "pre-trained-dpms" / "tiny16", pdae_state())
    assert convert_checkpoint(folder, "pdae-official").config.sample_size == 16
    assert convert_checkpoint(folder, "pdae-official", sample_size=32).config.sample_size == 32


def test_pdae_training_step_on_converted_model(tmp_path):
    from pdae.diffusion import Schedule
    from pdae.fit import pdae_loss
    from pdae.nets.backbone import Backbone
    from pdae.nets.pdae import PDAE

    unet = convert_checkpoint(write_diffae(tmp_path / "checkpoints" / "tiny", diffae_state()), "diffae")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = unet(x, torch.tensor([10, 900])).sample
    backbone = Backbone(unet)
    assert (backbone(x, torch.tensor([10, 900])) - expected).abs().max() < TOL
    model = PDAE(backbone, z_dim=8)
    mods = {"encoder": model.encoder, "gradient": model.gradient}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    loss = pdae_loss(backbone, Schedule.linear())(mods, (x.clamp(-1, 1),), torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(p.grad is None for p in unet.parameters())


def test_pdae_new_attention_order_and_head_channels(tmp_path):
    cfg = {**PDAE_CFG, "use_new_attention_order": True, "head_channel": 16, "attention_resolutions": [2]}
    S = pdae_state(cfg, seed=5)
    model = convert_checkpoint(write_pdae(tmp_path / "m", S, cfg) / "checkpoint.pt", "pdae-official")
    assert model.mid_block.attentions[0].heads == 4 and model.down_blocks[1].attentions[0].heads == 4
    _check_components(model, S, 32, 1, heads=4, new_order=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        ref = ref_unet(S, x, t, 32, 3, 1, {1}, lambda c: c // 16, new_order=True)
        assert (model(x, t).sample - ref).abs().max() < TOL


def test_diffae_matches_reference_with_heads(tmp_path):
    S = diffae_state()
    model = convert_checkpoint(write_diffae(tmp_path / "checkpoints" / "tiny", S), "diffae")
    assert model.config.sample_size == 16 and model.config.time_embedding_dim == 160
    assert model.down_blocks[1].attentions[0].heads == 4 and model.mid_block.attentions[0].heads == 4
    assert type(model.down_blocks[0].downsamplers[0]).__name__ == "ResnetBlock2D"
    assert type(model.up_blocks[0].upsamplers[0]).__name__ == "ResnetBlock2D"
    _check_components(model, S, 32, 2, heads=4)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 640])
    with torch.no_grad():
        ref = ref_unet(S, x, t, 32, 3, 2, {1}, lambda c: 4)
        assert (model(x, t).sample - ref).abs().max() < TOL


def test_diffae_explicit_config_and_folder_output(tmp_path):
    S = diffae_state()
    src = write_diffae(tmp_path / "ck", S, hparams=False)
    with pytest.raises(PdaeError, match="no model config found"):
        convert_checkpoint(src, "diffae")
    dst = convert_to_folder(src, "diffae", tmp_path / "out" / "unet", config=dict(DIFFAE_CONF))
    assert (dst / "config.json").is_file() and (dst / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["unet"]  # no temporary folders left
    reloaded = UNet2DModel.from_pretrained(dst, local_files_only=True)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([250])
    with torch.no_grad():
        assert (reloaded(x, t).sample - ref_unet(S, x, t, 32, 3, 2, {1}, lambda c: 4)).abs().max() < TOL
    convert_to_folder(src, "diffae", dst, config=dict(DIFFAE_CONF))  # replacing a model folder is allowed
    (tmp_path / "notes").mkdir()
    with pytest.raises(PdaeError, match="not a diffusers model folder"):
        convert_to_folder(src, "diffae", tmp_path / "notes", config=dict(DIFFAE_CONF))


# ---- key accounting ------------------------------------------------------------------------------------------------
def test_stray_key_is_an_error(tmp_path):
    S = pdae_state()
    S["input_blocks.1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(PdaeError, match=r"unexpected keys input_blocks\.1\.0\.extra\.weight"):
        convert_checkpoint(write_pdae(tmp_path / "m", S), "pdae-official")


def test_missing_key_is_an_error(tmp_path):
    S = pdae_state()
    del S["middle_block.1.qkv.weight"]
    with pytest.raises(PdaeError, match=r"missing keys middle_block\.1\.qkv\.weight"):
        convert_checkpoint(write_pdae(tmp_path / "m", S), "pdae-official")
    S = diffae_state()
    del S["output_blocks.2.0.skip_connection.bias"]
    with pytest.raises(PdaeError, match="missing keys output_blocks.2.0.skip_connection.bias"):
        convert_checkpoint(write_diffae(tmp_path / "d", S), "diffae")


def test_wrong_config_is_an_error(tmp_path):
    folder = write_pdae(tmp_path / "m", pdae_state())
    with pytest.raises(PdaeError, match="does not describe this checkpoint"):
        convert_checkpoint(folder, "pdae-official", config={**PDAE_CFG, "channel_multiplier": [1, 2, 4]})
    with pytest.raises(PdaeError, match="does not describe this checkpoint"):
        convert_checkpoint(folder, "pdae-official", config={**PDAE_CFG, "attention_resolutions": [2]})
    with pytest.raises(PdaeError, match="missing key 'base_channel'"):
        convert_checkpoint(folder, "pdae-official", config={k: v for k, v in PDAE_CFG.items() if k != "base_channel"})


def test_diffae_rejects_foreign_entries_and_autoencoders(tmp_path):
    S = diffae_state()
    src = write_diffae(tmp_path / "d", S, extra={})
    sd = torch.load(src, weights_only=True)
    sd["state_dict"]["ema_model_encoder.x"] = torch.zeros(1)
    torch.save(sd, src)
    with pytest.raises(PdaeError, match="unexpected state_dict entries ema_model_encoder.x"):
        convert_checkpoint(src, "diffae")
    with pytest.raises(PdaeError, match="not a DDIM baseline"):
        diffae_spec({**DIFFAE_CONF, "resnet_two_cond": True})


def test_presets_and_head_limits():
    spec = diffae_spec(diffae_preset("ffhq128_ddpm_130M"))
    assert spec.channels == (128, 128, 256, 384, 512) and spec.attention_levels == (3,)
    cfg = spec.diffusers_config()
    assert cfg["attention_head_dim"] is None and "time_embedding_dim" not in cfg
    assert cfg["down_block_types"][3] == "AttnDownBlock2D" and cfg["up_block_types"][1] == "AttnUpBlock2D"
    for name in ("horse128", "bedroom128", "celeba64"):
        assert diffae_spec(diffae_preset(name)).channels == spec.channels
    with pytest.raises(PdaeError, match="cannot express"):
        pdae_spec({**PDAE_CFG, "num_heads": 4, "attention_resolutions": [1, 2]})


# ---- unsafe files --------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    write_pdae(folder, pdae_state())
    torch.save({"ema_denoise_fn": pdae_state(), "payload": _Evil(marker)}, folder / "checkpoint.pt")
    with pytest.raises(PdaeError, match="cannot be loaded safely.*system") as info:
        convert_checkpoint(folder, "pdae-official")
    assert "\n" not in str(info.value)
    src = write_diffae(tmp_path / "d", diffae_state(), extra={"callbacks": {"x": _Evil(marker)}})
    with pytest.raises(PdaeError, match="cannot be loaded safely"):
        convert_checkpoint(src, "diffae")
    legacy = tmp_path / "legacy.pt"  # pre-zip torch format: cannot be scanned, still refused
    torch.save({"ema_denoise_fn": _Evil(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(PdaeError, match="needs arbitrary unpickling"):
        convert_checkpoint(legacy, "pdae-official", config=PDAE_CFG)
    assert not marker.exists()


def test_lightning_bookkeeping_loads_inert(tmp_path, monkeypatch):
    """Old Lightning keys callbacks by class and stores hyper_parameters as AttributeDict; neither is ever resolved,
    and even a Lightning-named callable is replaced by an inert stand-in instead of being called."""
    marker = tmp_path / "called"
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.utilities.parsing"]
    mods = {n: types.ModuleType(n) for n in names}

    class ModelCheckpoint:
        pass

    class AttributeDict(dict):
        pass

    def touch(path):
        Path(path).write_text("ran")

    for obj, mod in ((ModelCheckpoint, names[1]), (AttributeDict, names[2]), (touch, names[1])):
        obj.__module__, obj.__qualname__ = mod, obj.__name__
        setattr(mods[mod], obj.__name__, obj)

    class Hook:
        def __reduce__(self):
            return (touch, (str(marker),))

    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    extra = {
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}, "hook": Hook()},
        "hyper_parameters": AttributeDict(model_conf=dict(DIFFAE_CONF)),
    }
    S = diffae_state()
    src = write_diffae(tmp_path / "d", S, hparams=False, extra=extra)
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    model = convert_checkpoint(src, "diffae")  # config read from the AttributeDict hyper_parameters
    assert not marker.exists()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([99])
    with torch.no_grad():
        assert (model(x, t).sample - ref_unet(S, x, t, 32, 3, 2, {1}, lambda c: 4)).abs().max() < TOL


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(PdaeError, match="checkpoint not found"):
        convert_checkpoint(tmp_path / "nothing", "pdae-official")
    torch.save({"ema_denoise_fn": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(PdaeError, match="config.yml not found"):
        convert_checkpoint(tmp_path, "pdae-official")
    with pytest.raises(PdaeError, match="checkpoint not found"):
        convert_checkpoint(tmp_path / "nothing", "diffae", config="ffhq128")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(PdaeError, match="not a readable torch checkpoint"):
        convert_checkpoint(tmp_path / "junk.ckpt", "diffae", config="ffhq128")
    with pytest.raises(PdaeError, match="unknown checkpoint kind"):
        convert_checkpoint(tmp_path, "other")  # type: ignore[arg-type]
