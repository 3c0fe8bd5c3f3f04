"""EfficientFormer V2's attention against timm's modules: `Attention2d` (talking heads, local values, the
strided variant) and `Attention2dDownsample` (float64 outputs and every gradient, BatchNorm statistics,
keys both ways), and a whole `efficientformerv2_s0` after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

from attnzoo.compat import TimmEfficientFormerV2Attention, TimmEfficientFormerV2AttentionDownsample
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample  # noqa: E402

D = torch.float64

CASES = [
    (Attention2d, TimmEfficientFormerV2Attention, {"dim": 16, "key_dim": 4, "num_heads": 2, "resolution": 3},
     (2, 16, 3, 3)),
    (Attention2d, TimmEfficientFormerV2Attention, {"dim": 12, "key_dim": 2, "num_heads": 3, "attn_ratio": 2,
                                                   "resolution": (4, 6), "stride": 2}, (2, 12, 4, 6)),
    (Attention2d, TimmEfficientFormerV2Attention, {"dim": 8, "key_dim": 2, "num_heads": 2, "attn_ratio": 3,
                                                   "resolution": (3, 2), "act_layer": torch.nn.ReLU},
     (1, 8, 3, 2)),
    (Attention2dDownsample, TimmEfficientFormerV2AttentionDownsample,
     {"dim": 16, "key_dim": 4, "num_heads": 2, "resolution": 4}, (2, 16, 4, 4)),
    (Attention2dDownsample, TimmEfficientFormerV2AttentionDownsample,
     {"dim": 8, "key_dim": 2, "num_heads": 3, "attn_ratio": 2, "resolution": (5, 3), "out_dim": 12},
     (2, 8, 5, 3)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("foreign", "ours_cls", "kwargs", "shape"), CASES)
def test_matches_timm(foreign, ours_cls, kwargs, shape, train):
    theirs = randomize(foreign(**kwargs).double())
    theirs.train(train)  # (timm's `train` returns None)
    ours = from_timm(theirs)
    assert type(ours) is ours_cls and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    for key, value in theirs.state_dict().items():  # BatchNorm's running statistics moved alike
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-12, rtol=1e-12)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours_cls(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_errors():
    with pytest.raises(ValueError, match="3 x 3 map"):  # timm: its reshape fails (or fits wrongly)
        TimmEfficientFormerV2Attention(8, 2, 2, resolution=3)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="after the stride"):
        TimmEfficientFormerV2Attention(8, 2, 2, resolution=4, stride=2)(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match="C=8"):
        TimmEfficientFormerV2AttentionDownsample(8, 2, 2, resolution=4)(torch.randn(1, 6, 4, 4))


def test_efficientformerv2_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=3).double()
    check_swap(model, [Attention2d, Attention2dDownsample], torch.randn(2, 3, 224, 224, dtype=D), 5)
