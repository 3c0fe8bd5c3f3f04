"""timm's PRR attention pool (`AttentionPoolPrr`, ViT's `global_pool='prr'`) against timm's module: float64
outputs and gradients (token and mean pooling, the norms), keys both ways, and a whole ViT after
`replace`."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmAttentionPoolPrr
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.layers.attention_pool import AttentionPoolPrr  # noqa: E402

D = torch.float64


@pytest.mark.parametrize("kwargs", [{"dim": 16, "num_heads": 2},
                                    {"dim": 12, "num_heads": 3, "pool_type": "avg", "pre_norm": True,
                                     "post_norm": True}])
def test_matches_timm(kwargs):
    theirs = randomize(AttentionPoolPrr(**kwargs).double())
    ours = from_timm(theirs)
    assert type(ours) is TimmAttentionPoolPrr and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(2, 7, kwargs["dim"], dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    TimmAttentionPoolPrr(**kwargs).load_state_dict(theirs.state_dict(), strict=True)


def test_errors():
    with pytest.raises(ValueError, match="pool_type"):
        TimmAttentionPoolPrr(8, 2, pool_type="max")
    with pytest.raises(ValueError, match="C=8"):
        TimmAttentionPoolPrr(8, 2)(torch.randn(1, 3, 6))


@pytest.mark.parametrize("class_token", [True, False])
def test_vit_with_prr_pool_keeps_logits_and_checkpoint(class_token):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                              global_pool="prr", class_token=class_token)
    model = randomize(model, seed=2).eval()
    reference = copy.deepcopy(model)
    assert attnzoo.replace(model, AttentionPoolPrr) == ["attn_pool"]
    x = torch.randn(2, 3, 32, 32, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)
