"""MViT v2's pooling attention (timm's `MultiScaleAttention`) against timm's module: float64 outputs, the
pooled query size and every gradient (conv/avg/max pooling, strides, class token, position logits,
residual pooling), keys both ways, and a whole MViT v2 after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

from attnzoo.compat import TimmMultiScaleAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.mvitv2 import MultiScaleAttention  # noqa: E402

D = torch.float64

CASES = [
    ({"dim": 8, "dim_out": 8, "feat_size": (4, 4), "num_heads": 2}, (4, 4)),
    ({"dim": 8, "dim_out": 16, "feat_size": (6, 6), "num_heads": 2, "kernel_q": (3, 3), "kernel_kv": (3, 3),
      "stride_q": (2, 2), "stride_kv": (2, 2)}, (6, 6)),
    ({"dim": 8, "dim_out": 8, "feat_size": (8, 8), "num_heads": 4, "kernel_kv": (3, 3), "stride_kv": (4, 4),
      "has_cls_token": False}, (8, 8)),
    ({"dim": 12, "dim_out": 12, "feat_size": (4, 4), "num_heads": 3, "mode": "avg", "kernel_q": (3, 3),
      "stride_q": (2, 2), "kernel_kv": (3, 3), "stride_kv": (2, 2), "residual_pooling": False}, (4, 3)),
    ({"dim": 8, "dim_out": 8, "feat_size": (4, 4), "num_heads": 2, "mode": "max", "kernel_kv": (3, 3),
      "stride_kv": (2, 2), "rel_pos_type": "none", "qkv_bias": False}, (4, 4)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("kwargs", "size"), CASES)
def test_matches_timm(kwargs, size, train):
    theirs = randomize(MultiScaleAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmMultiScaleAttention and set(ours.state_dict()) == set(theirs.state_dict())
    tokens = size[0] * size[1] + int(kwargs.get("has_cls_token", True))
    x = torch.randn(2, tokens, kwargs["dim"], dtype=D, requires_grad=True)
    want, want_size = theirs(x, list(size))
    got, got_size = ours(x, list(size))
    assert got_size == want_size
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad),
                    torch.autograd.grad(want, [x, *theirs.parameters()], grad), strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmMultiScaleAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_errors():
    module = TimmMultiScaleAttention(8, 8, (4, 4), num_heads=2)
    with pytest.raises(ValueError, match="expects 17 tokens for feat_size \\(4, 4\\)"):
        module(torch.randn(1, 16, 8), [4, 4])  # timm pools scrambled tokens or fails
    with pytest.raises(ValueError, match="square feat_size"):
        TimmMultiScaleAttention(8, 8, (4, 6), num_heads=2)
    with pytest.raises(ValueError, match="position tables \\(7 offsets\\) are made for a smaller map"):
        module(torch.randn(1, 26, 8), [5, 5])  # timm: an IndexError past its tables
    with pytest.raises(ValueError, match="mode"):
        TimmMultiScaleAttention(8, 8, (4, 4), num_heads=2, mode="conv_unshared")


def test_mvitv2_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("mvitv2_tiny", pretrained=False, num_classes=3, img_size=64).double()
    check_swap(model, [MultiScaleAttention], torch.randn(2, 3, 64, 64, dtype=D), 10)
