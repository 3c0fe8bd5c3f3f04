"""timm's spatial-reduction attentions as `attnzoo.compat.TimmPvtV2Attention`,
`TimmTwinsGlobalAttention` and `TimmTwinsLocalAttention`: float64 parity with timm on odd and
non-square maps (strided reduction, the linear mode, window padding, dropout), a whole PVT v2 and a
whole Twins swapped by `attnzoo.replace` with their logits, checkpoints and maps, the recorded rows
against a plain definition, windows of one token (timm asserts), and errors."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from torch import nn

import attnzoo
from attnzoo.compat import TimmPvtV2Attention, TimmTwinsGlobalAttention, TimmTwinsLocalAttention
from attnzoo.convert import from_timm

pvt_v2 = pytest.importorskip("timm.models.pvt_v2", reason="timm missing")
twins = pytest.importorskip("timm.models.twins", reason="timm missing")
D = torch.float64

CASES = [  # (timm class, constructor arguments)
    ("pvt", {"dim": 16, "num_heads": 2}),
    ("pvt", {"dim": 16, "num_heads": 2, "sr_ratio": 2, "qkv_bias": False}),
    ("pvt", {"dim": 12, "num_heads": 3, "sr_ratio": 3}),  # the odd maps' last rows/columns are dropped
    ("pvt", {"dim": 16, "num_heads": 4, "linear_attn": True}),  # pooled to 7 x 7 (upsampled from 5 x 7)
    ("pvt", {"dim": 16, "num_heads": 2, "sr_ratio": 2, "attn_drop": 0.3, "proj_drop": 0.2}),
    ("gsa", {"dim": 16, "num_heads": 2}),
    ("gsa", {"dim": 12, "num_heads": 3, "sr_ratio": 2}),
    ("gsa", {"dim": 16, "num_heads": 4, "sr_ratio": 3, "attn_drop": 0.5}),
    ("lsa", {"dim": 16, "num_heads": 2, "ws": 2}),  # pads 5 x 7 to 6 x 8
    ("lsa", {"dim": 12, "num_heads": 3, "ws": 3}),  # pads 5 x 7 to 6 x 9
    ("lsa", {"dim": 16, "num_heads": 4, "ws": 4, "attn_drop": 0.3, "proj_drop": 0.2}),
    ("lsa", {"dim": 8, "num_heads": 1, "ws": 7}),  # one window, 5 x 7 -> 7 x 7
]
TIMM = {"pvt": lambda: pvt_v2.Attention, "gsa": lambda: twins.GlobalSubSampleAttn,
        "lsa": lambda: twins.LocallyGroupedAttn}
OURS = {"pvt": TimmPvtV2Attention, "gsa": TimmTwinsGlobalAttention, "lsa": TimmTwinsLocalAttention}


@pytest.mark.parametrize(("kind", "kwargs"), CASES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (6, 4)])
def test_matches_timm_float64(kind: str, kwargs: dict, train: bool, size: tuple[int, int]) -> None:
    theirs = randomize(TIMM[kind]()(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is OURS[kind] and ours.training == train
    x = torch.randn(2, size[0] * size[1], kwargs["dim"], dtype=D, requires_grad=True)
    torch.manual_seed(1)
    want = theirs(x, size)
    torch.manual_seed(1)  # the same dropout draws
    got = ours(x, size)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)



@pytest.mark.parametrize("linear", [False, True])
def test_replace_in_a_timm_pvt_v2_keeps_logits_checkpoint_and_maps(linear: bool) -> None:
    model = pvt_v2.PyramidVisionTransformerV2(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32),
                                              num_heads=(1, 1, 2, 2), mlp_ratios=2, num_classes=3,
                                              linear=linear).double()
    x = torch.randn(2, 3, 60, 44, dtype=D)  # maps 15 x 11, 8 x 6, 4 x 3, 2 x 2
    check_swap(model, [pvt_v2.Attention], x, 4)


def test_replace_in_a_timm_twins_keeps_logits_checkpoint_and_maps() -> None:
    model = twins.Twins(img_size=64, embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2),
                        mlp_ratios=(2, 2, 2, 2), depths=(2, 2, 2, 2), wss=(3, 3, 3, 3),
                        sr_ratios=(8, 4, 2, 1), num_classes=3).double()
    x = torch.randn(2, 3, 60, 44, dtype=D)  # maps 15 x 11, 7 x 5, 3 x 2, 1 x 1: windows of 3 pad all but one
    check_swap(model, [twins.LocallyGroupedAttn, twins.GlobalSubSampleAttn], x, 8)


def test_local_rows_follow_the_definition() -> None:
    attn = randomize(TimmTwinsLocalAttention(8, 2, ws=3).double()).eval()
    x = torch.randn(1, 20, 8, dtype=D)  # a 4 x 5 map, padded to 6 x 6
    with attnzoo.capture_maps(attn, queries=[(3, 4)]) as maps:
        attn(x, (4, 5))
    (rec,) = maps[next(iter(maps))]
    assert rec.grid == (4, 5) and rec.queries.tolist() == [19] and rec.data.shape == (1, 2, 1, 20)
    padded = nn.functional.pad(x.view(1, 4, 5, 8), (0, 0, 0, 1, 0, 2))[:, 3:6, 3:6].reshape(1, 9, 8)
    q, k, _ = attn.qkv(padded).reshape(1, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)  # the last window's
    weights = (q[:, :, 1:2] @ k.transpose(-2, -1) / 2.0).softmax(-1)  # query (3, 4) is the window's 2nd
    want = torch.zeros(1, 2, 1, 4, 5, dtype=D)
    want[..., 3, 3:5] = weights[..., :2]  # the other 7 keys are padding: their share is left out
    torch.testing.assert_close(rec.data, want.flatten(3), atol=1e-12, rtol=1e-12)


def test_reduced_rows_lie_on_the_reduced_map() -> None:
    attn = randomize(TimmTwinsGlobalAttention(8, 2, sr_ratio=2).double()).eval()
    x = torch.randn(2, 35, 8, dtype=D)
    with attnzoo.capture_maps(attn) as maps:
        attn(x, (5, 7))
    (rec,) = maps[next(iter(maps))]
    assert rec.grid == (2, 3) and rec.query_grid == (5, 7) and rec.data.shape[-1] == 6
    torch.testing.assert_close(rec.data.sum(-1), torch.ones(rec.data.shape[:-1], dtype=D))


def test_windows_of_one_token_run() -> None:
    with pytest.raises(AssertionError):
        twins.LocallyGroupedAttn(8, 2, ws=1)  # timm asserts ws != 1
    single = randomize(TimmTwinsLocalAttention(8, 2, ws=1).double())
    x = torch.randn(2, 12, 8, dtype=D)
    v = single.qkv(x)[..., 16:]  # a window of one token: the output is its value
    torch.testing.assert_close(single(x, (3, 4)), single.proj(v), atol=1e-12, rtol=1e-12)


def test_size_defaults_to_a_square_map() -> None:
    for attn in (TimmPvtV2Attention(8, 2, sr_ratio=2), TimmTwinsGlobalAttention(8, 2),
                 TimmTwinsLocalAttention(8, 2, ws=3)):
        x = torch.randn(2, 16, 8)
        torch.testing.assert_close(attn(x), attn(x, (4, 4)))


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        TimmPvtV2Attention(8, 2)(torch.randn(1, 4, 6), (2, 2))
    with pytest.raises(ValueError, match=r"feat_size \(H, W\) with H \* W = 12"):
        TimmPvtV2Attention(8, 2)(torch.randn(1, 12, 8), (3, 5))
    with pytest.raises(ValueError, match="square map; pass size"):
        TimmTwinsLocalAttention(8, 2, ws=2)(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match=r"at least sr_ratio = 4"):
        TimmTwinsGlobalAttention(8, 2, sr_ratio=4)(torch.randn(1, 12, 8), (3, 4))
    with pytest.raises(ValueError, match="size must be an int or a pair"):
        TimmTwinsGlobalAttention(8, 2)(torch.randn(1, 12, 8), (3, 4, 1))
    with pytest.raises(ValueError, match="divisible"):
        TimmTwinsLocalAttention(10, 3, ws=2)
    with pytest.raises(ValueError, match="ws must be >= 1"):
        TimmTwinsLocalAttention(8, 2, ws=0)
    with pytest.raises(ValueError, match="sr_ratio must be >= 1"):
        TimmPvtV2Attention(8, 2, sr_ratio=0)
    theirs = twins.GlobalSubSampleAttn(8, 2, sr_ratio=2)
    theirs.sr.padding = (1, 1)
    with pytest.raises(TypeError, match="cannot convert GlobalSubSampleAttn: its sr"):
        from_timm(theirs)
    other = pvt_v2.Attention(8, 2)
    other.scale = 0.1
    with pytest.raises(TypeError, match="cannot convert Attention: its scale"):
        from_timm(other)
