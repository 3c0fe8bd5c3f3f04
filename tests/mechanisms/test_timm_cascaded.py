"""Microsoft EfficientViT's cascaded group attention (timm's `CascadedGroupAttention`) against timm's
module: float64 outputs and every gradient, BatchNorm statistics, keys both ways, `set_resolution`, and
a whole `efficientvit_m0` (windowed and whole-map blocks) after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

from attnzoo.compat import TimmCascadedGroupAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.efficientvit_msra import CascadedGroupAttention  # noqa: E402

D = torch.float64

CASES = [
    {"dim": 16, "key_dim": 4, "num_heads": 4, "attn_ratio": 1, "resolution": 3},
    {"dim": 6, "key_dim": 3, "num_heads": 1, "attn_ratio": 3, "resolution": 2, "kernels": (3,)},
    {"dim": 12, "key_dim": 2, "num_heads": 3, "attn_ratio": 2, "resolution": 4, "kernels": (3, 5, 1)},
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs", CASES)
def test_matches_timm(kwargs, train):
    theirs = randomize(CascadedGroupAttention(**kwargs).double())
    theirs.train(train)  # (timm's `train` returns None)
    ours = from_timm(theirs)
    assert type(ours) is TimmCascadedGroupAttention and set(ours.state_dict()) == set(theirs.state_dict())
    side = kwargs["resolution"]
    _same(theirs, ours, torch.randn(2, kwargs["dim"], side, side, dtype=D))
    for key, value in theirs.state_dict().items():  # BatchNorm's running statistics moved alike
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-12, rtol=1e-12)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmCascadedGroupAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_set_resolution_as_timm():
    theirs = randomize(CascadedGroupAttention(8, 2, 2, attn_ratio=2, resolution=4, kernels=(3, 3)).double())
    theirs.eval()
    ours = from_timm(theirs)
    for module in (theirs, ours):
        module.set_resolution(3)
    torch.testing.assert_close(ours.attention_biases, theirs.attention_biases, atol=0, rtol=0)
    assert torch.equal(ours.attention_bias_idxs, theirs.attention_bias_idxs)
    x = torch.randn(2, 8, 3, 3, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_errors():
    module = TimmCascadedGroupAttention(8, 2, 2, attn_ratio=2, resolution=3, kernels=(3, 3))
    with pytest.raises(ValueError, match="windows of 3 x 3"):
        module(torch.randn(1, 8, 4, 4))  # timm: a broadcast error against its 9 x 9 bias
    with pytest.raises(ValueError, match="odd size for each of the 2 heads"):
        TimmCascadedGroupAttention(8, 2, 2, attn_ratio=2, kernels=(3,))
    with pytest.raises(ValueError, match="must equal dim // num_heads = 4"):
        TimmCascadedGroupAttention(8, 2, 2, attn_ratio=4, kernels=(3, 3))  # timm's forward fails
    with pytest.raises(ValueError, match="num_heads"):
        TimmCascadedGroupAttention(10, 2, 4)


def test_efficientvit_m0_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("efficientvit_m0", pretrained=False, num_classes=3, img_size=128).double()
    check_swap(model, [CascadedGroupAttention], torch.randn(2, 3, 128, 128, dtype=D), 6)


def test_converts_on_the_meta_device():
    """The index check reads values, which a module built on meta has none of: it is left out there."""
    from timm.models.efficientformer_v2 import Attention2d

    for theirs in (CascadedGroupAttention(16, 4, 4, attn_ratio=1, resolution=3, device="meta"),
                   Attention2d(16, 4, 2, resolution=3, device="meta")):
        ours = from_timm(theirs)
        assert all(p.device.type == "meta" for p in ours.parameters())
