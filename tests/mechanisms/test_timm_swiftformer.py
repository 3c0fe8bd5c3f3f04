"""SwiftFormer's additive attention (timm's `EfficientAdditiveAttention`) against timm's module: float64
outputs and every gradient, keys both ways, the global query's weights as a map, and a whole
`swiftformer_xs` after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmEfficientAdditiveAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.swiftformer import EfficientAdditiveAttention  # noqa: E402

D = torch.float64


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("kwargs", "shape"), [
    ({"in_dims": 16, "token_dim": 16}, (2, 16, 5, 3)),
    ({"in_dims": 12, "token_dim": 4, "num_heads": 3}, (2, 12, 4, 1)),
])
def test_matches_timm(kwargs, shape, train):
    theirs = randomize(EfficientAdditiveAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmEfficientAdditiveAttention and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmEfficientAdditiveAttention(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_capture_records_the_global_query_weights():
    module = randomize(TimmEfficientAdditiveAttention(8, 4)).eval()
    with attnzoo.capture_maps(module) as maps:
        module(torch.randn(2, 8, 3, 4, dtype=D))
    (record,) = next(iter(maps.values()))
    assert record.data.shape == (2, 1, 1, 12) and record.grid == (3, 4)
    torch.testing.assert_close(record.data.square().sum(-1), torch.ones(2, 1, 1, dtype=D))  # l2 over tokens


def test_swiftformer_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("swiftformer_xs", pretrained=False, num_classes=3).double()
    check_swap(model, [EfficientAdditiveAttention], torch.randn(2, 3, 64, 64, dtype=D), 4)
