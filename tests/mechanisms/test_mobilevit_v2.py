"""Separable self-attention (MobileViTv2): fightingcv parity in float64, the paper's ReLU, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import SeparableSelfAttention
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention.MobileViTv2Attention", reason="fightingcv missing")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("dim,length", [(16, 7), (24, 1), (8, 49), (5, 13)])
@pytest.mark.parametrize("train", [False, True])
def test_matches_fightingcv_float64(dim, length, train):
    theirs = fcv.MobileViTv2Attention(dim).double().train(train)
    randomize(theirs)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, SeparableSelfAttention) and ours.training == train
    x = torch.randn(3, length, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_paper_form_and_scores():
    torch.manual_seed(0)
    attn = SeparableSelfAttention(8).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    w = attn.qkv.weight
    b = attn.qkv.bias
    scores = (x @ w[:1].T + b[:1]).softmax(1)  # (B, L, 1)
    context = (scores * (x @ w[1:9].T + b[1:9])).sum(1, keepdim=True)
    expected = attn.proj(torch.relu(x @ w[9:].T + b[9:]) * context)
    out, got = attn(x, need_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(got, scores[..., 0])
    with attnzoo.capture_maps(attn) as maps:
        attn(x)
    (rec,) = next(iter(maps.values()))
    assert rec.kind == "spatial" and rec.grid == (6,)
    torch.testing.assert_close(rec.data, scores[..., 0])


@pytest.mark.parametrize("bias", [True, False])
def test_pooled_context_equals_projecting_every_key_with_dropout(bias):
    # the keys are pooled before their projection: exact also when dropout breaks sum(scores) = 1
    torch.manual_seed(0)
    attn = SeparableSelfAttention(8, bias=bias, attn_drop=0.5).double().train()
    x = torch.randn(3, 11, 8, dtype=torch.float64, requires_grad=True)
    w, b = attn.qkv.weight, attn.qkv.bias
    torch.manual_seed(1)
    out = attn(x)
    torch.manual_seed(1)
    proj = torch.nn.functional.linear(x, w, b)  # (B, L, 1 + 2C): every key projected
    scores = torch.nn.functional.dropout(proj[..., :1].softmax(1), 0.5)
    expected = attn.proj(torch.relu(proj[..., 9:]) * (scores * proj[..., 1:9]).sum(1, keepdim=True))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (x, w))
    want = torch.autograd.grad(expected.square().sum(), (x, w))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_a_hooked_projection_is_called_with_the_same_numbers():
    torch.manual_seed(0)
    attn = SeparableSelfAttention(8).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pooled = attn(x)  # the keys' rows read directly
    seen = []
    attn.qkv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    torch.testing.assert_close(attn(x), pooled, atol=1e-12, rtol=1e-12)
    assert seen == [torch.Size([2, 5, 17])]  # the hook sees the whole projection


def test_options_and_errors():
    assert isinstance(SeparableSelfAttention(8, act_layer=None).act, torch.nn.Identity)
    assert SeparableSelfAttention(8, bias=False).qkv.bias is None
    meta = SeparableSelfAttention(16, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in meta.parameters())
    with pytest.raises(ValueError, match=r"\(B, L, 8\)"):
        SeparableSelfAttention(8)(torch.randn(1, 3, 4))
