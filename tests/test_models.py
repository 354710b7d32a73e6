import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_fast.config import Config, ConfigError
from repa_fast.losses import manifold_gram_loss, token_loss
from repa_fast.models import (
    AlignHead,
    HookManager,
    MLPAlignHead,
    SD15UNetAligned,
    build_align_head,
    build_aligned_unet,
    build_unet,
    lora_config,
    lora_target_modules,
)
from repa_fast.models.unet import LORA_PREFIXES


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet("tiny")


def fresh_tiny(tiny_unet):
    unet = build_unet("tiny")
    unet.load_state_dict(tiny_unet.state_dict())
    return unet


def tiny_inputs(B=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 4, 16, 16, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randn(B, 77, 32, generator=g))


def test_align_head_source_test_on_16x16_grid():
    head = AlignHead(in_ch=1280, D=1024)
    tokens = head(torch.randn(2, 1280, 8, 8))
    assert tokens.shape == (2, 256, 1024)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(2, 256), atol=1e-5)


def test_align_head_math_and_grid():
    torch.manual_seed(0)
    head = AlignHead(in_ch=16, D=64, num_tokens=64).double()
    feat = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    conv, gn = head.proj[0], head.proj[1]
    x = F.gelu(F.group_norm(F.conv2d(feat, conv.weight), 32, gn.weight, gn.bias, gn.eps))
    x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    x = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(head(feat), x / x.norm(dim=-1, keepdim=True))
    same = AlignHead(in_ch=16, D=64, num_tokens=16).double()  # map already 4x4: no resampling
    assert same(feat).shape == (3, 16, 64)
    with pytest.raises(ValueError, match="square"):
        AlignHead(16, 64, num_tokens=200)
    with pytest.raises(ValueError, match=r"\[B,16,H,W\]"):
        head(torch.randn(2, 8, 4, 4, dtype=torch.float64))


def np_bilinear(h: int, H: int) -> np.ndarray:
    """[H, h] matrix of bilinear resampling h -> H (align_corners=False, edges clamped), from the formula."""
    m = np.zeros((H, h))
    for i in range(H):
        src = max((i + 0.5) * h / H - 0.5, 0.0)
        i0 = min(int(np.floor(src)), h - 1)
        i1 = min(i0 + 1, h - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def np_silu(v):
    return v / (1 + np.exp(-v))


def test_mlp_head_float64_formula_shape_and_norm():
    torch.manual_seed(0)
    head = MLPAlignHead(in_ch=16, D=24, num_tokens=36, hidden=40).double()
    feat = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    tokens = head(feat)
    assert tokens.shape == (3, 36, 24) and tokens.dtype == torch.float64
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, 36, dtype=torch.float64))
    W = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [w.shape for w, _ in W] == [(40, 16), (40, 40), (24, 40)]
    x = feat.numpy().transpose(0, 2, 3, 1)  # [B, 4, 4, C]: the MLP on every position of the feature map
    x = np_silu(x @ W[0][0].T + W[0][1])
    x = np_silu(x @ W[1][0].T + W[1][1])
    x = x @ W[2][0].T + W[2][1]
    up = np_bilinear(4, 6)
    x = np.einsum("Yy,Xx,byxd->bYXd", up, up, x).reshape(3, 36, 24)  # then upsample 4x4 -> 6x6
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(tokens.detach().numpy(), x, rtol=1e-10, atol=1e-12)
    assert MLPAlignHead(16, 24, num_tokens=16, hidden=8)(feat.float()).shape == (3, 16, 24)  # no resampling
    with pytest.raises(ValueError, match=r"MLPAlignHead.*\[B,16,H,W\]"):
        head(torch.randn(2, 8, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="'align_head'.*'linear'"):
        build_align_head("linear", 16, 24, 36)
    with pytest.raises(ConfigError, match="'align_head'"):
        Config(align_head="linear")


def test_mlp_head_in_the_model_and_its_gradient_reaches_the_unet(tiny_unet):
    config = Config(model="tiny", align_head="mlp", align_layers=["mid", "dec_first"], dino_D=64, dino_N=64,
                    lora_rank=4, kernels="triton")
    model = build_aligned_unet(config)
    assert model.head_type == "mlp"
    head = model.align_heads["mid"]
    assert isinstance(head, MLPAlignHead) and head.in_ch == 128  # channels read from the U-Net
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [2048, 2048, 64]  # REPA's width
    model(*tiny_inputs())
    tokens = model.get_aligned_tokens()  # kernels=triton: the mlp head runs in torch all the same
    assert all(t.shape == (2, 64, 64) for t in tokens.values())
    torch.testing.assert_close(tokens["mid"].norm(dim=-1), torch.ones(2, 64))
    token_loss(tokens["mid"], torch.randn(2, 64, 64)).backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n and n.startswith("unet.mid_block")}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.align_heads["mid"].parameters())
    # without LoRA the U-Net's own weights upstream of the hook get the gradient
    full = SD15UNetAligned(fresh_tiny(tiny_unet), ["mid"], D=64, num_tokens=64, align_head="mlp")
    full(*tiny_inputs())
    token_loss(full.get_aligned_tokens()["mid"], torch.randn(2, 64, 64)).backward()
    assert full.unet.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0


def test_hook_manager_errors_name_the_layer():
    lin = torch.nn.Linear(3, 3)
    hooks = HookManager()
    hooks.register_hook(lin, "mid")
    with pytest.raises(KeyError, match="'mid'.*forward"):
        hooks.get_feature("mid")
    with pytest.raises(KeyError, match="'enc_last'.*registered"):
        hooks.get_feature("enc_last")
    out = lin(torch.randn(2, 3, requires_grad=True))
    assert hooks.get_feature("mid") is out and hooks.get_feature("mid").requires_grad
    assert hooks.pop_feature("mid") is out
    with pytest.raises(KeyError):
        hooks.pop_feature("mid")
    lin(torch.randn(2, 3))
    hooks.clear()
    assert not hooks.features
    hooks.remove_all_hooks()
    lin(torch.randn(2, 3))
    assert not hooks.features


def test_sd15_unet_aligned_shapes_all_layers(tiny_unet):
    model = SD15UNetAligned(fresh_tiny(tiny_unet), ["enc_last", "mid", "dec_first"], D=64, num_tokens=64)
    out = model(*tiny_inputs())
    assert out.shape == (2, 4, 16, 16)
    tokens = model.get_aligned_tokens()
    assert set(tokens) == {"enc_last", "mid", "dec_first"}
    for t in tokens.values():
        assert t.shape == (2, 64, 64)
    # channel counts come from the U-Net (128 in the tiny one), not an assumed 1280
    assert all(h.in_ch == 128 for h in model.align_heads.values())
    model.clear_features()
    with pytest.raises(KeyError, match="no feature captured for layer 'enc_last'"):
        model.get_aligned_tokens()
    with pytest.raises(ValueError, match="middle"):
        SD15UNetAligned(fresh_tiny(tiny_unet), ["middle"], D=64)


@pytest.mark.slow
def test_source_design_unet_test_full_sd15_config():
    torch.manual_seed(0)
    model = SD15UNetAligned(build_unet("sd15"), align_layers=["mid"], D=1024)
    assert model.align_heads["mid"].in_ch == 1280
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64), torch.randint(0, 1000, (1,)), torch.randn(1, 77, 768))
        tokens = model.get_aligned_tokens()
    assert out.shape == (1, 4, 64, 64)
    assert tokens["mid"].shape == (1, 256, 1024)
    assert torch.allclose(tokens["mid"].norm(dim=-1), torch.ones(1, 256), atol=1e-5)
    # LoRA targets of the real topology: 8 attention projections in mid_block + 17 resnet convs
    assert len(lora_target_modules(model.unet, "attention-only")) == 8
    assert len(lora_target_modules(model.unet, "attn+conv")) == 25


@pytest.mark.parametrize("targets,expected", [("attention-only", 8), ("attn+conv", 25)])
def test_lora_wraps_exactly_the_whitelisted_modules(tiny_unet, targets, expected):
    unet = fresh_tiny(tiny_unet)
    names = lora_target_modules(unet, targets)
    assert len(names) == expected == len(set(names))
    assert all(n.startswith(tuple(p + "." for p in LORA_PREFIXES)) for n in names)
    model = SD15UNetAligned(unet, ["mid"], D=64, num_tokens=64, lora_config=lora_config(unet, 4, lora_targets=targets))
    wrapped = sorted(n for n, m in model.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    assert wrapped == sorted(names)
    if targets == "attention-only":
        assert all(".attentions." in n for n in wrapped)


def test_alignment_loss_reaches_lora_of_hooked_block(tiny_unet):
    unet = fresh_tiny(tiny_unet)
    model = SD15UNetAligned(unet, ["mid"], D=64, num_tokens=64, lora_config=lora_config(unet, 4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("align_heads.") for n in trainable)
    assert any(n.startswith("align_heads.") for n in trainable)

    model(*tiny_inputs())
    pred = model.get_aligned_tokens()["mid"]
    target = torch.randn_like(pred)
    (token_loss(pred, target) + manifold_gram_loss(pred, target)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    mid_lora_b = [g for n, g in grads.items() if n.startswith("unet.mid_block") and "lora_B" in n]
    assert mid_lora_b and all(g is not None and g.abs().sum() > 0 for g in mid_lora_b)
    # up_blocks.0 runs after the hooked block: the alignment loss alone cannot reach it
    after = [g for n, g in grads.items() if n.startswith("unet.up_blocks.0") and "lora_" in n]
    assert after and all(g is None or g.abs().sum() == 0 for g in after)


def test_detach_ablation_stops_the_alignment_gradient(tiny_unet):
    unet = fresh_tiny(tiny_unet)
    model = SD15UNetAligned(unet, ["mid"], D=64, num_tokens=64, lora_config=lora_config(unet, 4),
                            detach_features=True)
    model(*tiny_inputs())
    pred = model.get_aligned_tokens()["mid"]
    token_loss(pred, torch.randn_like(pred)).backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is None or g.abs().sum() == 0 for g in lora)


def test_build_unet_from_local_folder(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path / "sd" / "unet")
    loaded = build_unet(str(tmp_path / "sd"))
    for (n, a), (_, b) in zip(tiny_unet.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="model"):
        build_unet(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_unet(str(tmp_path / "empty"))


def test_one_forward_gives_prediction_tokens_and_losses(tiny_unet):
    model = SD15UNetAligned(fresh_tiny(tiny_unet), ["enc_last", "mid"], D=64, num_tokens=64)
    x, t, ehs = tiny_inputs(3)
    with torch.no_grad():
        pred = model(x, t, ehs)  # the source design's call: prediction, features kept
        legacy = model.get_aligned_tokens()
        model.clear_features()
        out = model(x, t, ehs, return_tokens=True)
    assert not model.hook_manager.features  # consumed inside forward: nothing outlives the call
    torch.testing.assert_close(out.sample, pred)
    assert set(out.tokens) == {"enc_last", "mid"} and out.loss_token is None
    for layer in legacy:
        torch.testing.assert_close(out.tokens[layer], legacy[layer])
    g = torch.Generator().manual_seed(3)
    dino = {layer: torch.randn(3, 64, 64, generator=g).half() for layer in ("enc_last", "mid")}
    scored = model(x, t, ehs, target_tokens=dino)
    assert not model.hook_manager.features
    lt = sum(token_loss(legacy[k], dino[k]) for k in legacy) / 2
    lm = sum(manifold_gram_loss(legacy[k], dino[k]) for k in legacy) / 2
    torch.testing.assert_close(scored.loss_token, lt)
    torch.testing.assert_close(scored.loss_manifold, lm)
    scored.loss_token.backward()  # the graph reaches the heads from the same call
    assert all(p.grad is not None for p in model.align_heads.parameters())
    with pytest.raises(KeyError, match="no DINO tokens for align layer 'enc_last'"):
        model(x, t, ehs, target_tokens={"mid": dino["mid"]})
    assert not model.hook_manager.features  # a failed call keeps nothing either


@pytest.mark.parametrize("targets", ["attention-only", "attn+conv"])
def test_untrained_align_layers_match_the_gradients(tiny_unet, targets):
    """The start-up warning's predicate agrees with where the alignment gradient really goes."""
    unet = fresh_tiny(tiny_unet)
    layers = ["enc_last", "mid", "dec_first"]
    model = SD15UNetAligned(unet, layers, D=64, num_tokens=64, lora_config=lora_config(unet, 4, lora_targets=targets))
    with torch.no_grad():  # LoRA B starts at zero: make every adapter live so gradients flow through it
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    untrained = model.untrained_align_layers()
    for layer in layers:
        model.zero_grad(set_to_none=True)
        out = model(*tiny_inputs(), return_tokens=True)
        out.tokens[layer].square().sum().backward()
        reached = any(p.grad is not None and p.grad.abs().sum() > 0
                      for n, p in model.named_parameters() if "lora_" in n)
        assert reached == (layer not in untrained), (layer, targets, untrained)
    assert ("enc_last" in untrained) == (targets == "attention-only")  # down_blocks.3 holds no attention
    plain = fresh_tiny(tiny_unet)
    detached = SD15UNetAligned(plain, ["mid"], D=64, num_tokens=64, detach_features=True,
                               lora_config=lora_config(plain, 4))
    assert detached.untrained_align_layers() == ["mid"]
