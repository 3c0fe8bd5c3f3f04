"""timm's DaViT attention as `attnzoo.compat.TimmDavitWindowAttention`, `TimmDavitChannelAttention`
and `TimmDavitChannelAttentionV2`: float64 parity with timm (both of timm's window paths, the dynamic
and fixed channel scales), whole DaViTs (V1 and V2 channel attention, padded windows on odd maps)
swapped by `attnzoo.replace` with their logits, checkpoints and maps, the channel rows against the
definition, and errors."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from torch import nn

import attnzoo
from attnzoo.compat import TimmDavitChannelAttention, TimmDavitChannelAttentionV2, TimmDavitWindowAttention
from attnzoo.convert import from_timm

davit = pytest.importorskip("timm.models.davit", reason="timm missing")
D = torch.float64
ALL = [0, 1, 2, 3]  # every channel of a head of 4 as a query

CASES = [  # (timm class, constructor arguments, ours)
    ("WindowAttention", {"dim": 16, "window_size": (3, 4), "num_heads": 2}, TimmDavitWindowAttention),
    ("WindowAttention", {"dim": 12, "window_size": (2, 2), "num_heads": 3, "qkv_bias": False},
     TimmDavitWindowAttention),
    ("ChannelAttention", {"dim": 16, "num_heads": 2}, TimmDavitChannelAttention),
    ("ChannelAttention", {"dim": 12, "num_heads": 3, "qkv_bias": True}, TimmDavitChannelAttention),
    ("ChannelAttentionV2", {"dim": 16, "num_heads": 4}, TimmDavitChannelAttentionV2),
    ("ChannelAttentionV2", {"dim": 12, "num_heads": 2, "qkv_bias": False, "dynamic_scale": False},
     TimmDavitChannelAttentionV2),
]


@pytest.mark.parametrize(("name", "kwargs", "cls"), CASES)
@pytest.mark.parametrize("tokens", [12, 7])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_timm_float64(name: str, kwargs: dict, cls: type, tokens: int, fused: bool) -> None:
    theirs = randomize(getattr(davit, name)(**kwargs).double()).train()
    if hasattr(theirs, "fused_attn"):
        theirs.fused_attn = fused  # WindowAttention's two paths
    ours = from_timm(theirs)
    assert type(ours) is cls and ours.training
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, tokens, kwargs["dim"], dtype=D, requires_grad=True)
    want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_dynamic_scale_follows_the_tokens() -> None:
    """V2's scale is N^-1/2: the recorded channel rows are softmax(q^T k / sqrt(N)), and x repeated
    twice (N = 10) doubles q^T k while the scale becomes 10^-1/2."""
    ours = randomize(TimmDavitChannelAttentionV2(8, 2).double())
    x = torch.randn(2, 5, 8, dtype=D)
    q, k, _ = ours.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = (q.transpose(-1, -2) @ k * 5**-0.5).softmax(-1)  # (B, h, d, d)
    with attnzoo.capture_maps(ours, queries=ALL) as maps:
        ours(x)
    (rec,) = maps[next(iter(maps))]
    assert rec.grid == (4,) and rec.data.shape == (2, 2, 4, 4)
    torch.testing.assert_close(rec.data, weights, atol=1e-12, rtol=1e-12)
    with attnzoo.capture_maps(ours, queries=ALL) as maps:
        ours(torch.cat([x, x], 1))
    (rec,) = maps[next(iter(maps))]
    torch.testing.assert_close(rec.data, (q.transpose(-1, -2) @ k * 2 * 10**-0.5).softmax(-1), atol=1e-12,
                               rtol=1e-12)


def test_v2_traces_with_jit_trace_and_keeps_the_dynamic_scale() -> None:
    # jit.trace hands the token count over as a tensor, and attend refused the tensor scale it gave.
    ours = randomize(TimmDavitChannelAttentionV2(8, 2).double()).eval()
    x, longer = torch.randn(2, 5, 8, dtype=D), torch.randn(2, 10, 8, dtype=D)
    with torch.no_grad():
        traced = torch.jit.trace(ours, (x,))
        for t in (x, longer):
            torch.testing.assert_close(traced(t), ours(t), atol=1e-12, rtol=1e-12)


def test_channel_rows_follow_the_definition() -> None:
    ours = randomize(TimmDavitChannelAttention(8, 2).double())
    x = torch.randn(2, 5, 8, dtype=D)
    q, k, v = ours.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = (k.transpose(-1, -2) @ v / 2.0).softmax(-1)  # k's channels over v's
    with attnzoo.capture_maps(ours, queries=ALL) as maps:
        out = ours(x)
    (rec,) = maps[next(iter(maps))]
    torch.testing.assert_close(rec.data, weights, atol=1e-12, rtol=1e-12)
    mixed = (weights @ q.transpose(-1, -2)).permute(0, 3, 1, 2).reshape(2, 5, 8)  # q's channels mixed
    torch.testing.assert_close(out, ours.proj(mixed), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("v2", [False, True])
def test_replace_in_a_timm_davit_keeps_logits_checkpoint_and_maps(v2: bool) -> None:
    model = davit.DaVit(depths=(1, 1), embed_dims=(16, 32), num_heads=(2, 4), window_size=3, num_classes=3,
                        channel_attn_v2=v2, drop_rate=0.2).double()
    x = torch.randn(2, 3, 44, 36, dtype=D)  # maps 11 x 9 (windows of 3 pad to 12 x 9), 5 x 4 (6 x 6)
    channel = davit.ChannelAttentionV2 if v2 else davit.ChannelAttention
    names = ["stages.0.blocks.0.0.attn", "stages.1.blocks.0.0.attn", "stages.0.blocks.0.1.attn",
             "stages.1.blocks.0.1.attn"]
    model = check_swap(model, [davit.WindowAttention, channel], x, names)
    ours_channel = TimmDavitChannelAttentionV2 if v2 else TimmDavitChannelAttention
    ours = [TimmDavitWindowAttention] * 2 + [ours_channel] * 2
    assert [type(model.get_submodule(n)) for n in names] == ours
    with torch.no_grad(), attnzoo.capture_maps(model) as maps:
        model.eval()(x)
    assert maps[names[0]][0].grid == (3, 3)  # a window's rows
    assert maps[names[2]][0].grid == (8,)  # a head's channels


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        TimmDavitWindowAttention(8, (2, 2), 2)(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        TimmDavitChannelAttention(8, 2)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        TimmDavitChannelAttentionV2(10, 3)
    with pytest.raises(RuntimeError):
        davit.ChannelAttention(10, 3)(torch.randn(1, 4, 10))  # timm builds it and fails in forward
    with pytest.raises(TypeError, match="window_size must be a pair"):
        TimmDavitWindowAttention(8, 3, 2)  # type: ignore[arg-type]
    theirs = davit.ChannelAttention(10, 3)
    with pytest.raises(TypeError, match="cannot convert ChannelAttention: its 3 heads do not divide dim 10"):
        from_timm(theirs)
    other = davit.WindowAttention(8, (2, 2), 2)
    other.scale = 0.1
    with pytest.raises(TypeError, match="cannot convert WindowAttention: its scale"):
        from_timm(other)
    other = davit.ChannelAttentionV2(8, 2)
    other.proj = nn.Linear(8, 8, bias=False)
    with pytest.raises(TypeError, match="its proj has no bias"):
        from_timm(other)
    odd = davit.ChannelAttention(8, 2)
    odd.scale = 0.3  # timm's one path uses it: copied
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(from_timm(odd)(x), odd(x))
