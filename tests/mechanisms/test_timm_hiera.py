"""Hiera's attention (timm's `MaskUnitAttention`) against timm's module: float64 outputs and every gradient
(mask units or global, pooled queries), keys both ways, and a whole `hiera_tiny_224` after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

from attnzoo.compat import TimmMaskUnitAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.hiera import MaskUnitAttention  # noqa: E402

D = torch.float64

CASES = [
    ({"dim": 8, "dim_out": 8, "heads": 2}, (2, 12, 8)),
    ({"dim": 8, "dim_out": 16, "heads": 4, "q_stride": 4}, (2, 12, 8)),
    ({"dim": 8, "dim_out": 8, "heads": 2, "window_size": 3, "use_mask_unit_attn": True}, (2, 12, 8)),
    ({"dim": 12, "dim_out": 24, "heads": 3, "q_stride": 2, "window_size": 2, "use_mask_unit_attn": True},
     (2, 16, 12)),
]


@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_matches_timm(kwargs, shape):
    theirs = randomize(MaskUnitAttention(**kwargs).double())
    ours = from_timm(theirs)
    assert type(ours) is TimmMaskUnitAttention and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmMaskUnitAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_errors():
    with pytest.raises(ValueError, match="divisible by q_stride \\* window_size = 4"):
        module = TimmMaskUnitAttention(8, 8, 2, q_stride=2, window_size=2, use_mask_unit_attn=True)
        module(torch.randn(1, 10, 8))
    with pytest.raises(ValueError, match="divisible by q_stride = 4"):
        TimmMaskUnitAttention(8, 8, 2, q_stride=4)(torch.randn(1, 10, 8))
    with pytest.raises(ValueError, match="window_size"):
        TimmMaskUnitAttention(8, 8, 2, use_mask_unit_attn=True)  # mask units of no token


def test_hiera_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("hiera_tiny_224", pretrained=False, num_classes=3).double()
    check_swap(model, [MaskUnitAttention], torch.randn(2, 3, 224, 224, dtype=D), 12)
