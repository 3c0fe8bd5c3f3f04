"""FastViT's and CrossViT's attention (attnzoo.compat.TimmFastVitAttention, TimmCrossAttention) against
timm's modules: float64 outputs and gradients (dropout included, under one seed), keys both ways, whole
models after `replace`, and the errors where timm asserts."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize

import attnzoo
from attnzoo.compat import TimmCrossAttention, TimmFastVitAttention
from attnzoo.convert import from_timm

fastvit = pytest.importorskip("timm.models.fastvit", reason="timm missing")
crossvit = pytest.importorskip("timm.models.crossvit", reason="timm missing")
D = torch.float64


def _same(theirs, ours, x) -> None:
    x = x.requires_grad_()
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [({"dim": 16, "head_dim": 8}, (2, 16, 3, 5)),
     ({"dim": 12, "head_dim": 4, "qkv_bias": True, "attn_drop": 0.3, "proj_drop": 0.2}, (2, 12, 4, 1))],
)
def test_fastvit_attention_matches_timm(kwargs, shape, train):
    theirs = randomize(fastvit.Attention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmFastVitAttention and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    TimmFastVitAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [{"dim": 16, "num_heads": 2},
     {"dim": 12, "num_heads": 3, "qkv_bias": True, "attn_drop": 0.3, "proj_drop": 0.2}],
)
def test_cross_attention_matches_timm(kwargs, train):
    theirs = randomize(crossvit.CrossAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmCrossAttention and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(2, 7, kwargs["dim"], dtype=D))
    theirs.scale = 0.3  # timm lets a user set it for older weights: the converter copies it
    _same(theirs, from_timm(theirs), torch.randn(2, 7, kwargs["dim"], dtype=D))


@pytest.mark.parametrize(
    ("arch", "kwargs", "size", "cls"),
    [("fastvit_sa12", {}, 64, "fastvit"), ("crossvit_tiny_240", {"img_size": 240}, 240, "crossvit")],
)
def test_whole_models_keep_their_logits_and_checkpoints(arch, kwargs, size, cls):
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model(arch, pretrained=False, num_classes=3, **kwargs), seed=3).eval()
    reference = copy.deepcopy(model)
    foreign = fastvit.Attention if cls == "fastvit" else crossvit.CrossAttention
    assert attnzoo.replace(model, foreign)
    assert not any(isinstance(m, foreign) for m in model.modules())
    x = torch.randn(1, 3, size, size, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)


def test_errors_where_timm_asserts():
    with pytest.raises(ValueError, match="head_dim \\(5\\) must divide dim \\(16\\)"):
        TimmFastVitAttention(16, 5)
    with pytest.raises(ValueError, match="C=16, got \\(1, 12, 2, 2\\)"):
        TimmFastVitAttention(16, 8)(torch.randn(1, 12, 2, 2))
    with pytest.raises(ValueError):
        TimmCrossAttention(16, 2)(torch.randn(2, 5, 12))


pool = pytest.importorskip("timm.layers.attention_pool", reason="timm missing")

POOL_CONFIGS = [
    {"in_features": 16, "num_heads": 2},
    {"in_features": 16, "out_features": 12, "num_heads": 4, "qk_norm": True, "latent_len": 3,
     "pool_type": "avg", "norm_layer": torch.nn.LayerNorm, "mlp_ratio": 2.0, "drop": 0.3},
    {"in_features": 12, "out_features": 0, "num_heads": 3, "q_proj": False, "latent_len": 2, "pool_type": "",
     "pos_embed": "abs", "feat_size": 7, "qkv_bias": False},
    {"in_features": 16, "num_heads": 2, "latent_dim": 8, "act_layer": torch.nn.ReLU},
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs", POOL_CONFIGS)
def test_attention_pool_latent_matches_timm(kwargs, train):
    from attnzoo.compat import TimmAttentionPoolLatent

    theirs = randomize(pool.AttentionPoolLatent(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmAttentionPoolLatent and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(2, 7, kwargs["in_features"], dtype=D))
    reloaded = TimmAttentionPoolLatent(**kwargs).double()
    reloaded.load_state_dict(theirs.state_dict(), strict=True)
    mask = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[..., 0] = True  # every latent keeps a token (timm gives NaN for none)
    x = torch.randn(2, 7, kwargs["in_features"], dtype=D)
    torch.manual_seed(2)
    want = theirs(x, attn_mask=mask)
    torch.manual_seed(2)
    torch.testing.assert_close(ours(x, attn_mask=mask), want, atol=1e-10, rtol=1e-10)


def test_a_siglip_vit_keeps_its_logits_and_checkpoint_after_replace():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=1, img_size=32,
                              num_classes=3)
    model = randomize(model, seed=4).eval()
    reference = copy.deepcopy(model)
    assert attnzoo.replace(model, pool.AttentionPoolLatent) == ["attn_pool"]
    x = torch.randn(2, 3, 32, 32, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)


def test_attention_pool_latent_errors():
    from attnzoo.compat import TimmAttentionPoolLatent

    with pytest.raises(ValueError, match="latent_dim must equal embed_dim"):
        TimmAttentionPoolLatent(16, num_heads=2, q_proj=False, latent_dim=8)
    with pytest.raises(ValueError, match="needs feat_size"):
        TimmAttentionPoolLatent(16, num_heads=2, pos_embed="abs")
    with pytest.raises(ValueError, match="pool_type"):
        TimmAttentionPoolLatent(16, num_heads=2, pool_type="max")
    with pytest.raises(ValueError, match="N=7"):
        TimmAttentionPoolLatent(16, num_heads=2, pos_embed="abs", feat_size=7)(torch.randn(1, 5, 16))
