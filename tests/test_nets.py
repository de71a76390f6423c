"""Networks: backbone split equals the UNet, BeatGANs block types, G == 0 at init, frozen weights stay frozen,
encoder shapes, save/load round trip and its errors. Tiny models, deterministic."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from pdae.errors import PdaeError
from pdae.nets import PDAE, Backbone, Encoder, build_unet, load_backbone, load_pdae, save_pdae
from pdae.nets.encoder import ENCODER_PLANS, attention_level
from pdae.nets.layers import SelfAttention, upsample_conv3x3


def tiny_beatgans() -> UNet2DModel:
    return build_unet(16, 1, [16, 32], layers_per_block=1, attention_head_dim=8, dropout=0.1)


def tiny_ddpm() -> UNet2DModel:
    # google/ddpm-cifar10-32 layout (additive time norm, conv up/down sampling, attention at 1/2 res), tiny widths.
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,
        norm_num_groups=8,
        norm_eps=1e-6,
        dropout=0.1,
    )


def batch(unet: UNet2DModel, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.rand(n, c, s, s) * 2 - 1, torch.tensor([0, 499, 999, 250][:n])


def tiny_pdae(unet: UNet2DModel | None = None, **kw) -> PDAE:
    kw.setdefault("encoder_channels", [16, 32])
    return PDAE(Backbone(unet if unet is not None else tiny_beatgans()), z_dim=kw.pop("z_dim", 8), **kw)


def break_zero_init(model: PDAE, std: float = 0.02) -> None:
    """Give every all-zero trainable tensor small random values so that G != 0 and gradients flow everywhere."""
    with torch.no_grad():
        for p in model.trainable_parameters():
            if not p.any():
                p.normal_(0, std)


@pytest.mark.parametrize("make", [tiny_beatgans, tiny_ddpm])
def test_backbone_equals_unet(make) -> None:
    unet = make()
    backbone = Backbone(unet)
    backbone.train()  # stays in eval: dropout 0.1 must not act
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    x, t = batch(unet)
    with torch.no_grad():
        ref = unet(x, t).sample
    out = backbone(x, t)
    # the split forward and the UNet's own forward are different code paths: equal up to float rounding
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # scalar t broadcasts like diffusers
        torch.testing.assert_close(backbone(x[:1], 37), unet(x[:1], 37).sample, rtol=1e-5, atol=1e-5)
    feats = backbone.features(x, t)
    assert feats.h.shape[-1] == 16 // 2 ** (len(unet.config.block_out_channels) - 1)
    assert all(not s.requires_grad and s.grad_fn is None for s in (feats.emb, feats.h, *feats.skips))


@pytest.mark.parametrize("make", [tiny_beatgans, tiny_ddpm])
def test_gradient_estimator_mirrors_up_path(make) -> None:
    unet = make()
    model = tiny_pdae(unet)
    levels = model.gradient.levels
    assert len(levels) == len(unet.up_blocks)
    for level, block in zip(levels, unet.up_blocks, strict=True):
        ins = [r.conv1.in_channels + r.conv1_skip.in_channels for r in level.resnets]
        assert ins == [r.in_channels for r in block.resnets]
        assert [r.conv1.out_channels for r in level.resnets] == [r.out_channels for r in block.resnets]
        assert bool(len(level.attentions)) == hasattr(block, "attentions")
        assert (level.upsampler is None) == (block.upsamplers is None)
    # G is new and randomly initialised: no parameter is shared with the frozen UNet.
    frozen = {id(p) for p in unet.parameters()}
    assert not any(id(p) in frozen for p in model.trainable_parameters())


def test_beatgans_unet_block_types() -> None:
    unet = build_unet(16, 1, [32, 64, 64], layers_per_block=1, attention_head_dim=16, dropout=0.0)
    down, up = unet.down_blocks, unet.up_blocks
    # Resnet down/up sampling really built (diffusers ignores downsample_type on DownBlock2D): ResBlocks with down/up.
    for block in down[:-1]:
        assert isinstance(block.downsamplers[0], ResnetBlock2D) and block.downsamplers[0].down
    assert down[-1].downsamplers is None
    for block in up[:-1]:
        assert isinstance(block.upsamplers[0], ResnetBlock2D) and block.upsamplers[0].up
    assert up[-1].upsamplers is None
    # Attention only at the lowest resolution (and in the middle block, with its GroupNorm).
    assert [hasattr(b, "attentions") for b in down] == [False, False, True]
    assert [hasattr(b, "attentions") for b in up] == [True, False, False]
    assert unet.mid_block.attentions[0].group_norm is not None
    assert all(a.heads == 4 for a in unet.modules() if isinstance(a, Attention))
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert all(r.time_embedding_norm == "scale_shift" for r in resnets)
    for norm in (m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)):
        assert norm.num_channels % norm.num_groups == 0 and norm.num_groups == 8
    assert 0.8e6 < sum(p.numel() for p in unet.parameters()) < 1.6e6


def test_g_is_zero_at_init() -> None:
    model = tiny_pdae()
    x, t = batch(model.backbone.unet)
    z = model.encode(x)
    assert z.shape == (3, 8)
    eps_hat, g = model.eps_and_shift(x, t, z)
    assert torch.count_nonzero(g) == 0 and g.shape == x.shape
    eps_tilde = eps_hat + 0.7 * g
    assert torch.equal(eps_tilde, eps_hat)
    with torch.no_grad():  # the backbone split vs the UNet's own forward: different code paths
        torch.testing.assert_close(eps_hat, model.backbone.unet(x, t).sample, rtol=1e-5, atol=1e-5)
    assert eps_hat.grad_fn is None and g.requires_grad


def test_one_step_trains_only_encoder_and_g() -> None:
    model = tiny_pdae().train()
    unet = model.backbone.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.Adam(list(model.trainable_parameters()), lr=1e-3)
    x, t = batch(unet)
    eps = torch.randn_like(x)
    eps_hat, g = model.eps_and_shift(x, t, model.encode(x))
    loss = (eps - (eps_hat - 0.5 * g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not unet.training
    assert all(p.grad is None for p in unet.parameters())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    _, g = model.eps_and_shift(x, t, model.encode(x))
    assert g.abs().max() > 0


def test_gradients_reach_encoder() -> None:
    model = tiny_pdae()
    break_zero_init(model)
    x, t = batch(model.backbone.unet)
    _, g = model.eps_and_shift(x, t, model.encode(x))
    g.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.gradient.parameters())


def test_g_depends_on_z_and_t() -> None:
    model = tiny_pdae()
    break_zero_init(model, std=0.2)
    x, t = batch(model.backbone.unet)
    with torch.no_grad():
        z = model.encode(x)
        g = model.shift(x, t, z)
        assert not torch.allclose(g, model.shift(x, t, z + 1.0), atol=1e-5)
        assert not torch.allclose(g, model.shift(x, t.flip(0), z), atol=1e-5)
        assert torch.allclose(model.shift(x, t, z[:1]), model.shift(x, t, z[:1].expand(3, -1)), atol=1e-5)


@pytest.mark.parametrize("size", [4, 8])
def test_upsample_conv3x3_is_nearest_upsample_then_conv(size: int) -> None:
    x = torch.randn(2, 5, size, size)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(upsample_conv3x3(x, conv.weight, conv.bias), ref, atol=1e-5)


def test_parameters_state_dict_and_copies_exclude_backbone() -> None:
    model = tiny_pdae()
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    assert sum(p.numel() for p in model.parameters()) == n_trainable
    assert all(k.startswith(("encoder.", "gradient.")) for k in model.state_dict())
    ema = copy.deepcopy(model)
    assert ema.backbone is model.backbone and ema.gradient is not model.gradient
    model.double()
    assert model.backbone.unet.conv_in.weight.dtype == torch.float64
    model.float()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_encoder_shapes(size: int) -> None:
    enc = Encoder(size, 3, z_dim=16)
    z = enc(torch.rand(2, 3, size, size) * 2 - 1)
    assert z.shape == (2, 16)
    attn = [m for m in enc.modules() if isinstance(m, SelfAttention)]
    assert len(attn) == 1 and attn[0].heads == 4
    assert all(n.num_channels % n.num_groups == 0 for n in enc.modules() if isinstance(n, torch.nn.GroupNorm))
    assert torch.count_nonzero(attn[0].proj.weight) == 0


def test_encoder_paper_plans() -> None:
    assert Encoder(128, 3, 512).channels == [64, 128, 256, 256, 256] == ENCODER_PLANS[128]
    assert Encoder(64, 3, 512).channels == [64, 128, 128, 128]
    # attention after the conv whose output is 16x16 (128 px: third conv on 256 ch; 64 px: second conv on 128 ch)
    assert attention_level(128) == 2 and attention_level(64) == 1 and attention_level(16) == 0
    enc = Encoder(128, 3, 512)
    body = list(enc.body)
    i = next(k for k, m in enumerate(body) if isinstance(m, SelfAttention))
    assert body[i - 1].out_channels == 256 and enc.out.in_features == 256 * 16
    with pytest.raises(ValueError, match="entries"):
        Encoder(64, 3, 8, channels=[8, 8])


def test_model_fn_and_class_conditional() -> None:
    model = tiny_pdae(num_classes=3, z_dim=4)
    break_zero_init(model)
    x, t = batch(model.backbone.unet)
    z = model.encode(torch.tensor([0, 2, 1]))
    assert z.shape == (3, 4)
    fn = model.model_fn(z, scale=2.0)
    with torch.no_grad():
        eps_hat, g2 = fn(x, t)
        ref_eps, g = model.eps_and_shift(x, t, z)
        assert torch.equal(eps_hat, ref_eps) and torch.allclose(g2, 2 * g)
        assert torch.allclose(model.shift(x, t, z), g)


@pytest.mark.parametrize("make", [tiny_beatgans, tiny_ddpm])
def test_save_load_round_trip(tmp_path, make) -> None:
    model = tiny_pdae(make())
    break_zero_init(model)
    save_pdae(model, tmp_path / "pdae")
    assert sorted(p.name for p in (tmp_path / "pdae").iterdir()) == ["pdae.safetensors", "pdae_config.json"]
    loaded = load_pdae(tmp_path / "pdae", model.backbone)
    assert loaded.config == json.loads(json.dumps(model.config)) and not loaded.training
    model.eval()
    x, t = batch(model.backbone.unet)
    with torch.no_grad():
        z = model.encode(x)
        assert torch.equal(loaded.encode(x), z)
        for a, b in zip(model.eps_and_shift(x, t, z), loaded.eps_and_shift(x, t, z), strict=True):
            assert torch.equal(a, b)


def test_class_conditional_round_trip(tmp_path) -> None:
    model = tiny_pdae(num_classes=5)
    save_pdae(model, tmp_path)
    loaded = load_pdae(tmp_path, model.backbone)
    labels = torch.tensor([4, 0])
    assert torch.equal(loaded.encode(labels), model.encode(labels))


def test_load_errors_name_the_file(tmp_path) -> None:
    backbone = Backbone(tiny_beatgans())
    with pytest.raises(PdaeError, match="pdae_config.json"):
        load_pdae(tmp_path / "nothing", backbone)
    save_pdae(tiny_pdae(z_dim=8), tmp_path / "a")
    save_pdae(tiny_pdae(z_dim=16), tmp_path / "b")
    # Weights of another architecture under a config that does not describe them.
    (tmp_path / "b" / "pdae.safetensors").replace(tmp_path / "a" / "pdae.safetensors")
    with pytest.raises(PdaeError, match=r"a/pdae\.safetensors.*shape"):
        load_pdae(tmp_path / "a", backbone)
    save_pdae(tiny_pdae(encoder_channels=[8, 8]), tmp_path / "c")
    (tmp_path / "c" / "pdae.safetensors").replace(tmp_path / "a" / "pdae.safetensors")
    with pytest.raises(PdaeError, match=r"pdae\.safetensors.*(shape|missing|unexpected)"):
        load_pdae(tmp_path / "a", backbone)
    # A different backbone than the one the weights were trained on.
    save_pdae(tiny_pdae(), tmp_path / "d")
    with pytest.raises(PdaeError, match=r"d/pdae_config\.json.*backbone"):
        load_pdae(tmp_path / "d", Backbone(tiny_ddpm()))
    (tmp_path / "d" / "pdae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PdaeError, match=r"d/pdae\.safetensors"):
        load_pdae(tmp_path / "d", backbone)
    (tmp_path / "d" / "pdae.safetensors").unlink()
    with pytest.raises(PdaeError, match=r"d/pdae\.safetensors"):
        load_pdae(tmp_path / "d", backbone)
    (tmp_path / "d" / "pdae_config.json").write_text("{broken")
    with pytest.raises(PdaeError, match=r"d/pdae_config\.json"):
        load_pdae(tmp_path / "d", backbone)


def test_load_backbone(tmp_path) -> None:
    unet = tiny_ddpm()
    unet.save_pretrained(tmp_path / "baseline")
    backbone = load_backbone(tmp_path / "baseline")
    x, t = batch(unet)
    with torch.no_grad():
        # the loaded backbone's split forward vs the UNet's own forward: different code paths
        torch.testing.assert_close(backbone(x, t), unet.eval()(x, t).sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(PdaeError, match="missing_model"):
        load_backbone(tmp_path / "missing_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PdaeError, match="empty"):
        load_backbone(tmp_path / "empty")
    weights = next((tmp_path / "baseline").glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.raises(PdaeError, match="baseline"):
        load_backbone(tmp_path / "baseline")


def test_unsupported_backbones_raise() -> None:
    with pytest.raises(PdaeError, match="UNet2DModel"):
        Backbone(torch.nn.Conv2d(1, 1, 1))
    conditional = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=3,
    )
    with pytest.raises(PdaeError, match="class-conditional"):
        Backbone(conditional)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    # Same forward maths, recomputed in backward (dropout masks replayed): gradients equal within 1e-6 (float32;
    # bitwise is not promised).
    unet = tiny_beatgans()
    model = tiny_pdae(unet, dropout=0.1).train()
    break_zero_init(model)
    x, t = batch(unet)
    grads, outs = [], []
    for ckpt in (False, True):
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        model.gradient.grad_checkpoint = ckpt
        g = model.gradient(model.features(x, t), model.encode(x))
        (g**2).mean().backward()
        outs.append(g.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g0 in grads[0].items():
        torch.testing.assert_close(grads[1][name], g0, atol=1e-6, rtol=1e-5, msg=name)


def test_joint_skip_norm_is_one_groupnorm_over_the_concatenation(tmp_path) -> None:
    """skip_norm "joint" (official code): the up-path z-ResBlock equals GroupNorm -> SiLU -> conv over cat(h, skip)
    with the split convolutions put back together; the default "separate" is a different function."""
    import torch.nn.functional as F

    from pdae.nets.gradient import ZResBlock
    from pdae.nets.layers import modulate_twice

    gen = torch.Generator().manual_seed(0)
    block = ZResBlock(16, 8, 12, groups=8, skip_ch=16, skip_norm="joint")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x, skip = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen) * 3 + 1
    t_act, z_act = torch.randn(2, 12, generator=gen), torch.randn(2, 12, generator=gen)
    cat = torch.cat([x, skip], dim=1)
    assert block.norm1.num_channels == 32 and block.norm1.num_groups == 8
    a = F.silu(block.norm1(cat))
    h = F.conv2d(a, torch.cat([block.conv1.weight, block.conv1_skip.weight], 1), block.conv1.bias, padding=1)
    h = modulate_twice(h, block.norm2, block.t_proj(t_act), block.z_proj(z_act))
    short = F.conv2d(cat, torch.cat([block.shortcut.weight, block.shortcut_skip.weight], 1), block.shortcut.bias)
    expected = short + block.conv2(F.silu(h))
    torch.testing.assert_close(block(x, t_act, z_act, skip), expected, rtol=1e-5, atol=1e-5)
    separate = ZResBlock(16, 8, 12, groups=8, skip_ch=16)
    separate.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("norm1")}, strict=False)
    assert (separate(x, t_act, z_act, skip) - expected).abs().max() > 1e-3
    model = tiny_pdae(skip_norm="joint")  # stored in the config, rebuilt by load_pdae
    break_zero_init(model)
    save_pdae(model, tmp_path / "pdae")
    loaded = load_pdae(tmp_path / "pdae", model.backbone)
    assert loaded.config["skip_norm"] == "joint"
    xb, tb = batch(model.backbone.unet)
    with torch.no_grad():
        z = model.eval().encode(xb)
        torch.testing.assert_close(model.shift(xb, tb, z), loaded.shift(xb, tb, z), rtol=0, atol=0)
