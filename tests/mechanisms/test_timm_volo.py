"""VOLO's map attention and class attention as `attnzoo.compat.TimmVoloAttention` and
`TimmClassAttention`: float64 parity with timm (dropout included), and a whole VOLO swapped by
`attnzoo.replace` (its outlookers too) with its logits, its checkpoint and its maps."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize

import attnzoo
from attnzoo import OutlookAttention
from attnzoo.compat import TimmClassAttention, TimmVoloAttention
from attnzoo.convert import from_timm

volo = pytest.importorskip("timm.models.volo", reason="timm missing")
D = torch.float64


def check(theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kwargs", [{"num_heads": 2}, {"num_heads": 4, "qkv_bias": True, "attn_drop": 0.2,
                                                       "proj_drop": 0.1}])
@pytest.mark.parametrize("train", [False, True])
def test_map_attention_matches_timm(kwargs: dict, train: bool) -> None:
    theirs = randomize(volo.Attention(16, **kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmVoloAttention and ours.training == train
    check(theirs, ours, torch.randn(2, 3, 5, 16, dtype=D, requires_grad=True))


@pytest.mark.parametrize("kwargs", [{"num_heads": 2}, {"num_heads": 3, "head_dim": 5, "qkv_bias": True,
                                                       "attn_drop": 0.2, "proj_drop": 0.1}])
@pytest.mark.parametrize("train", [False, True])
def test_class_attention_matches_timm(kwargs: dict, train: bool) -> None:
    theirs = randomize(volo.ClassAttention(12, **kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmClassAttention and ours.training == train
    check(theirs, ours, torch.randn(2, 7, 12, dtype=D, requires_grad=True))


def test_replace_in_a_timm_volo_swaps_all_three_attentions() -> None:
    model = volo.VOLO(layers=(1, 1, 1, 1), img_size=64, embed_dims=(32, 64, 64, 64), num_heads=(2, 2, 2, 2),
                      stem_hidden_dim=16, num_classes=5, post_layers=("ca",)).double().eval()
    randomize(model, seed=3)
    checkpoint = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=D)
    with torch.no_grad():
        want = model(x)
    for cls in (volo.OutlookAttention, volo.Attention, volo.ClassAttention):
        assert attnzoo.replace(model, cls)
    kinds = {type(m) for m in model.modules()}
    assert {OutlookAttention, TimmVoloAttention, TimmClassAttention} <= kinds
    assert not kinds & {volo.OutlookAttention, volo.Attention, volo.ClassAttention}
    model.load_state_dict(checkpoint, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)
        with attnzoo.capture_maps(model) as maps:
            model(x)
    assert maps
    model.train()
    model(x).square().mean().backward()  # one training step's gradients are finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\)"):
        TimmVoloAttention(8, 2)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        TimmClassAttention(8, 2)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="head_dim"):
        TimmClassAttention(10, 3)
