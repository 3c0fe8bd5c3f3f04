"""MobileNetV4's 2-D attention against timm's modules: `MultiQueryAttention2d` (float64 outputs and every
gradient, dropout under one seed, BatchNorm statistics, masks, keys both ways, padding layers) and
`layers.attention2d.Attention2d`, and a whole hybrid MobileNetV4 after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmAttention2d, TimmMultiQueryAttention2d
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.layers.attention2d import Attention2d, MultiQueryAttention2d  # noqa: E402

D = torch.float64

MQA_CASES = [
    ({"dim": 16, "num_heads": 2}, (2, 16, 5, 3)),
    ({"dim": 16, "num_heads": 4, "key_dim": 6, "value_dim": 5, "kv_stride": 2, "dim_out": 12}, (2, 16, 7, 6)),
    ({"dim": 12, "num_heads": 3, "query_strides": 2, "kv_stride": 2, "dw_kernel_size": 5, "use_bias": True,
      "attn_drop": 0.3, "proj_drop": 0.2}, (2, 12, 8, 6)),
    ({"dim": 8, "num_heads": 2, "query_strides": (2, 1), "kv_stride": 3, "dilation": 2}, (1, 8, 6, 7)),
    ({"dim": 8, "num_heads": 2, "kv_stride": 2, "padding": "same"}, (2, 8, 7, 5)),  # timm's Conv2dSame
    ({"dim": 8, "num_heads": 2, "kv_stride": 2, "padding": "valid"}, (2, 8, 7, 5)),
    ({"dim": 8, "num_heads": 1, "proj_drop": 0.3, "attn_drop": 0.2}, (2, 8, 4, 3)),  # one head: output layout
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("kwargs", "shape"), MQA_CASES)
def test_multi_query_matches_timm(kwargs, shape, train):
    theirs = randomize(MultiQueryAttention2d(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmMultiQueryAttention2d and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    for key, value in theirs.state_dict().items():  # BatchNorm's running statistics moved alike
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-12, rtol=1e-12)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if kwargs.get("padding") != "same":  # timm's dynamic padding is copied by from_timm, not built here
        TimmMultiQueryAttention2d(**kwargs).load_state_dict(theirs.state_dict(), strict=True)
        built = TimmMultiQueryAttention2d(**kwargs).double().train(train)
        built.load_state_dict(theirs.state_dict())
        _same(theirs, built, torch.randn(*shape, dtype=D))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_multi_query_masks_match_timm(kind):
    theirs = randomize(MultiQueryAttention2d(8, num_heads=2, kv_stride=2).double()).eval()
    ours = from_timm(theirs)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 2, 12, 4, generator=gen) > 0.4 if kind == "bool" else torch.randn(2, 1, 12, 4,
                                                                                             dtype=D)
    if kind == "bool":
        mask[..., 0] = True  # no fully masked query: timm gives NaN there, attnzoo zeros
    x = torch.randn(2, 8, 4, 3, dtype=D)
    torch.testing.assert_close(ours(x, attn_mask=mask), theirs(x, attn_mask=mask), atol=1e-12, rtol=1e-12)


def test_multi_query_errors():
    with pytest.raises(ValueError, match="attn_mask"):
        TimmMultiQueryAttention2d(8, num_heads=2)(torch.randn(1, 8, 4, 4), attn_mask=torch.ones(5, 16))
    with pytest.raises(ValueError, match="C=8"):
        TimmMultiQueryAttention2d(8, num_heads=2)(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="dynamic padding"):
        TimmMultiQueryAttention2d(8, num_heads=2, kv_stride=2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        TimmMultiQueryAttention2d(8, num_heads=2, padding="full")
    with pytest.raises(ValueError, match="an int padding above 0 also pads timm's 1x1 key.proj"):
        TimmMultiQueryAttention2d(8, num_heads=2, padding=1)  # timm builds it; every call fails in SDPA
    with pytest.raises(ValueError, match="key_dim"):
        TimmMultiQueryAttention2d(4, num_heads=8)
    with pytest.raises(ValueError, match="x.H=1"):  # the 2 x 2 query pooling: torch fails inside it
        TimmMultiQueryAttention2d(8, num_heads=2, query_strides=2)(torch.randn(1, 8, 1, 4))
    with pytest.raises(ValueError, match="x.W=2"):  # the 5 x 5 unpadded key convolution
        TimmMultiQueryAttention2d(8, num_heads=2, kv_stride=2, dw_kernel_size=5, padding="valid")(
            torch.randn(1, 8, 6, 2))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs", [
    {"dim": 16, "num_heads": 2},
    {"dim": 16, "dim_out": 24, "num_heads": 4, "expand_first": True, "head_first": True, "bias": False},
    {"dim": 24, "dim_out": 16, "num_heads": 3, "attn_drop": 0.3, "proj_drop": 0.1},
])
def test_layers_attention2d_matches_timm(kwargs, train):
    theirs = randomize(Attention2d(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmAttention2d and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(2, kwargs["dim"], 5, 3, dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmAttention2d(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_layers_attention2d_takes_timms_attn_mask(kind):
    theirs = randomize(Attention2d(16, num_heads=2).double()).eval()
    ours = from_timm(theirs)
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 15, 15, generator=gen) > 0.3) if kind == "bool" else torch.randn(15, 15, dtype=D)
    if kind == "bool":
        mask[..., 0] = True
    x = torch.randn(2, 16, 5, 3, dtype=D)
    torch.testing.assert_close(ours(x, attn_mask=mask), theirs(x, attn_mask=mask), atol=1e-12, rtol=1e-12)


def test_hybrid_mobilenetv4_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False, num_classes=3).double()
    check_swap(model, [MultiQueryAttention2d], torch.randn(2, 3, 96, 96, dtype=D), 8)
    assert not any(isinstance(m, MultiQueryAttention2d) for m in model.modules())
    assert sum(isinstance(m, TimmMultiQueryAttention2d) for m in model.modules()) == 8
    assert attnzoo.replace(model, MultiQueryAttention2d) == []
