"""ConViT's attention against timm's modules: the gated positional self-attention (`GPSA`: float64 outputs
and every gradient, dropout under one seed, timm's local init, keys both ways, the mixed map's rows) and
the plain `MHSA` (-> `TimmAttention`), and a whole ConViT after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmAttention, TimmGPSA
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.convit import GPSA, MHSA  # noqa: E402

D = torch.float64

CASES = [
    (GPSA, TimmGPSA, {"dim": 16, "num_heads": 4}, (2, 9, 16)),
    (GPSA, TimmGPSA, {"dim": 12, "num_heads": 3, "qkv_bias": True, "attn_drop": 0.3, "proj_drop": 0.2,
                      "locality_strength": 2.0}, (2, 16, 12)),
    (MHSA, TimmAttention, {"dim": 16, "num_heads": 4}, (2, 10, 16)),
    (MHSA, TimmAttention, {"dim": 12, "num_heads": 2, "qkv_bias": True, "attn_drop": 0.3, "proj_drop": 0.2},
     (2, 5, 12)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("foreign", "ours_cls", "kwargs", "shape"), CASES)
def test_matches_timm(foreign, ours_cls, kwargs, shape, train):
    theirs = randomize(foreign(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is ours_cls and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_local_init_as_timm():
    torch.manual_seed(0)
    theirs = GPSA(16, num_heads=4, locality_strength=1.5)
    theirs.local_init()
    ours = TimmGPSA(16, num_heads=4, locality_strength=1.5)
    ours.local_init()
    torch.testing.assert_close(ours.pos_proj.weight, theirs.pos_proj.weight)
    torch.testing.assert_close(ours.v.weight, theirs.v.weight)


def test_capture_records_the_mixed_rows():
    module = randomize(TimmGPSA(8, num_heads=2)).eval()
    x = torch.randn(2, 16, 8, dtype=D)
    with attnzoo.capture_maps(module) as maps:
        module(x)
    (record,) = next(iter(maps.values()))
    full = module.attention(x)
    torch.testing.assert_close(record.data, full[:, :, record.queries])
    assert record.grid == (4, 4) and torch.allclose(record.data.sum(-1), torch.ones((), dtype=D))


def test_errors():
    with pytest.raises(ValueError, match="square map"):  # timm: a shape mismatch in its offset table
        TimmGPSA(8, num_heads=2)(torch.randn(1, 10, 8))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TimmGPSA(10, num_heads=4)


def test_convit_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("convit_tiny", pretrained=False, num_classes=3, img_size=64).double()
    check_swap(model, [GPSA, MHSA], torch.randn(2, 3, 64, 64, dtype=D), 12)
