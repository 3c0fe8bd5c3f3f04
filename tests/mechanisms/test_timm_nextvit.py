"""Next-ViT's attention (timm's `EfficientAttention`) against timm's module: float64 outputs and every
gradient (pooled keys with BatchNorm statistics, dropout under one seed), keys both ways, and a whole
`nextvit_small` after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

from attnzoo.compat import TimmNextVitAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.nextvit import EfficientAttention  # noqa: E402

D = torch.float64

CASES = [
    ({"dim": 16, "head_dim": 4}, (2, 9, 16)),
    ({"dim": 12, "out_dim": 8, "head_dim": 4, "qkv_bias": False, "sr_ratio": 2, "attn_drop": 0.3,
      "proj_drop": 0.2}, (2, 18, 12)),  # 18 tokens pool to 4 (a remainder of 2 is dropped, as in timm)
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_matches_timm(kwargs, shape, train):
    theirs = randomize(EfficientAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmNextVitAttention and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmNextVitAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_errors():
    with pytest.raises(ValueError, match="at least sr_ratio \\*\\* 2 = 4 tokens"):
        TimmNextVitAttention(8, head_dim=4, sr_ratio=2)(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="head_dim"):
        TimmNextVitAttention(10, head_dim=4)


def test_nextvit_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("nextvit_small", pretrained=False, num_classes=3).double()
    check_swap(model, [EfficientAttention], torch.randn(2, 3, 64, 64, dtype=D), 4)


def test_compiles_with_aot_autograd_with_pooled_keys():
    """aot_eager traced BatchNorm's output with its input's strides while the CPU kernel returns a
    contiguous tensor, and the keys' projection then failed at run time ('view size is not compatible')."""
    torch._dynamo.reset()  # this test's compiles alone, whatever ran before
    module = TimmNextVitAttention(dim=8, head_dim=4, sr_ratio=2).eval()
    x = torch.randn(2, 16, 8, requires_grad=True)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    grad, x.grad = x.grad, None
    module(x).sum().backward()
    torch.testing.assert_close(out, module(x))
    torch.testing.assert_close(grad, x.grad)
