"""timm's CaiT attentions as `attnzoo.compat.TimmTalkingHeadAttention` and `TimmCaitClassAttention`:
float64 parity with timm (dropout masks included), a whole CaiT swapped by `attnzoo.replace` with its
logits, checkpoint and maps, the talking-heads rows against a plain definition, and errors."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

import attnzoo
from attnzoo.compat import TimmCaitClassAttention, TimmTalkingHeadAttention
from attnzoo.convert import from_timm

cait = pytest.importorskip("timm.models.cait", reason="timm missing")
D = torch.float64

CONFIGS = [
    {"dim": 16, "num_heads": 2},
    {"dim": 12, "num_heads": 3, "qkv_bias": True},
    {"dim": 16, "num_heads": 4, "qkv_bias": True, "attn_drop": 0.3, "proj_drop": 0.2},
    {"dim": 6, "num_heads": 1, "attn_drop": 0.5},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("timm_cls", "ours_cls"), [
    ("TalkingHeadAttn", TimmTalkingHeadAttention), ("ClassAttn", TimmCaitClassAttention),
])
def test_matches_timm_float64(kwargs: dict, train: bool, timm_cls: str, ours_cls: type) -> None:
    theirs = randomize(getattr(cait, timm_cls)(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is ours_cls and ours.training == train
    x = torch.randn(2, 7, kwargs["dim"], dtype=D, requires_grad=True)
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)  # the same dropout draws: timm's masks, in timm's memory order
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_talking_heads_weights_follow_the_definition() -> None:
    attn = randomize(TimmTalkingHeadAttention(12, 3, qkv_bias=True).double()).eval()
    x = torch.randn(2, 5, 12, dtype=D)
    q, k, _ = attn.qkv(x).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / 2.0  # head width 4
    w_l, b_l, w_w, b_w = attn.proj_l.weight, attn.proj_l.bias, attn.proj_w.weight, attn.proj_w.bias
    probs = (torch.einsum("gh,bhij->bgij", w_l, logits) + b_l[:, None, None]).softmax(-1)
    mixed = torch.einsum("gh,bhij->bgij", w_w, probs) + b_w[:, None, None]  # (B, h, N, N)
    with attnzoo.capture_maps(attn, queries=[0, 3]) as maps:
        attn(x)
    (record,) = maps[next(iter(maps))]
    assert record.kind == "rows" and record.queries.tolist() == [0, 3]
    torch.testing.assert_close(record.data, mixed[:, :, [0, 3]], atol=1e-12, rtol=1e-12)


def test_replace_in_a_timm_cait_keeps_logits_checkpoint_and_maps() -> None:
    model = cait.Cait(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=3,
                      depth_token_only=1, attn_drop_rate=0.2).double()
    check_swap(model, [cait.TalkingHeadAttn, cait.ClassAttn], torch.randn(2, 3, 32, 32, dtype=D),
               ["blocks.0.attn", "blocks.1.attn", "blocks_token_only.0.attn"])


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        TimmTalkingHeadAttention(8, 2)(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        TimmCaitClassAttention(8, 2)(torch.randn(4, 6))
    with pytest.raises(ValueError, match="divisible"):
        TimmTalkingHeadAttention(10, 3)
    with pytest.raises(TypeError, match="cannot convert ClassAttn"):
        from_timm(cait.ClassAttn(10, 3))  # timm builds it, and its forward fails
