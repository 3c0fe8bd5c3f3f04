"""The CLIP ResNets' attention pooling head (timm's `AttentionPool2d`) against timm's module: float64
outputs and gradients (other map sizes, whose embedding is resampled, pre-logits, spatial pooling,
class token, dropout), keys both ways, `reset`, and whole CLIP ResNets after `replace`."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmAttentionPool2d
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.layers.attention_pool2d import AttentionPool2d  # noqa: E402

D = torch.float64

CASES = [
    ({"in_features": 16, "feat_size": 3, "head_dim": 4}, (2, 16, 3, 3)),
    ({"in_features": 16, "feat_size": 3, "head_dim": 4}, (2, 16, 5, 4)),  # resampled embedding
    ({"in_features": 12, "feat_size": (2, 3), "out_features": 5, "embed_dim": 8, "num_heads": 2,
      "qkv_separate": True, "drop_rate": 0.3}, (2, 12, 2, 3)),
    ({"in_features": 8, "feat_size": 4, "out_features": 0, "head_dim": 2, "qkv_bias": False,
      "class_token": True}, (3, 8, 4, 4)),
    ({"in_features": 8, "feat_size": 2, "head_dim": 4, "pool_type": ""}, (2, 8, 2, 3)),
]


def _timm_pool(kwargs):
    """timm's module in float64 with random weights; without qkv bias timm's constructor fails (its init
    zeroes the missing bias), so that one is built with biases and then has them removed."""
    module = AttentionPool2d(**{**kwargs, "qkv_bias": True})
    if not kwargs.get("qkv_bias", True):
        for name in ("qkv", "q", "k", "v"):
            if getattr(module, name) is not None:
                getattr(module, name).bias = None
    return randomize(module.double())


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_matches_timm(kwargs, shape, train):
    theirs = _timm_pool(kwargs).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmAttentionPool2d and set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(*shape, dtype=D)
    _same(theirs, ours, x)
    with torch.no_grad():
        torch.manual_seed(2)
        want = theirs(x, pre_logits=True)
        torch.manual_seed(2)
        torch.testing.assert_close(ours(x, pre_logits=True), want, atol=1e-10, rtol=1e-10)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmAttentionPool2d(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_reset_as_timm():
    theirs = randomize(AttentionPool2d(16, feat_size=2, head_dim=4).double())
    ours = from_timm(theirs)
    for module in (theirs, ours):
        module.reset(num_classes=3, pool_type="")
    assert ours.proj.out_features == 3 and ours.out_features == 3 and ours.pool_type == ""
    ours.proj.load_state_dict(theirs.proj.state_dict())
    x = torch.randn(1, 16, 2, 2, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)
    assert ours.proj.weight.dtype == torch.float64
    ours.reset(num_classes=0)
    assert isinstance(ours.proj, torch.nn.Identity) and ours.out_features == 16
    with pytest.raises(ValueError, match="pool_type"):
        ours.reset(pool_type="avg")


def test_capture_records_the_pooled_token_over_the_map():
    module = randomize(TimmAttentionPool2d(8, feat_size=3, head_dim=4)).eval()
    with attnzoo.capture_maps(module) as maps:
        module(torch.randn(2, 8, 3, 5, dtype=D))
    (record,) = next(iter(maps.values()))
    assert record.data.shape == (2, 2, 1, 15) and record.grid == (3, 5)
    total = record.data.sum(-1, keepdim=True) + record.meta["token_share"]
    torch.testing.assert_close(total, torch.ones_like(total))  # with the token's own share, rows sum to 1


def test_no_qkv_bias_builds_where_timm_fails():
    with pytest.raises(AttributeError):
        AttentionPool2d(8, feat_size=2, head_dim=4, qkv_bias=False)
    module = TimmAttentionPool2d(8, feat_size=2, head_dim=4, qkv_bias=False)
    assert module.qkv.bias is None and module(torch.randn(1, 8, 2, 2)).shape == (1, 8)


def test_errors_where_timm_asserts_or_fails():
    with pytest.raises(ValueError, match="head_dim must divide"):
        TimmAttentionPool2d(12, head_dim=5)
    with pytest.raises(ValueError, match="num_heads must divide"):
        TimmAttentionPool2d(12, num_heads=5)
    with pytest.raises(ValueError, match="pool_type"):
        TimmAttentionPool2d(12, pool_type="avg")
    with pytest.raises(ValueError, match="class_token needs embed_dim == in_features"):
        TimmAttentionPool2d(12, embed_dim=8, head_dim=4, class_token=True)
    with pytest.raises(ValueError, match="C=8"):
        TimmAttentionPool2d(8, head_dim=4)(torch.randn(1, 6, 7, 7))


def test_clip_resnet_keeps_logits_checkpoint_and_classifier_reset():
    model = randomize(timm.create_model("resnet50_clip", pretrained=False, num_classes=3), seed=3).eval()
    reference = copy.deepcopy(model)
    assert attnzoo.replace(model, AttentionPool2d) == ["head"]
    x = torch.randn(1, 3, 96, 96, dtype=D)  # a 3 x 3 map: the 7 x 7 embedding is resampled
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True),
                                   atol=1e-9, rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert model.get_classifier() is model.head.proj
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
