"""SAM 2's Hiera attention (timm's `hieradet_sam2.MultiScaleAttention`) against timm's module: float64
outputs and every gradient (pooled queries or none, odd maps), keys both ways, and a whole
`sam2_hiera_tiny` after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

from attnzoo.compat import TimmSam2MultiScaleAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.hieradet_sam2 import MultiScaleAttention  # noqa: E402

D = torch.float64

CASES = [
    ({"dim": 8, "dim_out": 8, "num_heads": 2}, (2, 3, 5, 8)),
    ({"dim": 8, "dim_out": 16, "num_heads": 4, "q_pool": torch.nn.MaxPool2d(2, 2, ceil_mode=True)},
     (2, 5, 4, 8)),
]


@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_matches_timm(kwargs, shape):
    theirs = randomize(MultiScaleAttention(**kwargs).double())
    ours = from_timm(theirs)
    assert type(ours) is TimmSam2MultiScaleAttention and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmSam2MultiScaleAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_errors():
    with pytest.raises(ValueError, match="C=8"):
        TimmSam2MultiScaleAttention(8, 8, 2)(torch.randn(1, 3, 3, 6))
    with pytest.raises(ValueError, match="x.H=1"):  # the 2 x 2 query pooling: torch fails inside it
        TimmSam2MultiScaleAttention(8, 8, 2, q_pool=torch.nn.MaxPool2d(2, 2))(torch.randn(1, 1, 4, 8))
    with pytest.raises(TypeError, match="q_pool must be an nn.Module"):
        TimmSam2MultiScaleAttention(8, 8, 2, q_pool="max")


def test_sam2_hiera_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("sam2_hiera_tiny", pretrained=False, num_classes=3).double()
    check_swap(model, [MultiScaleAttention], torch.randn(2, 3, 128, 128, dtype=D), 12)
