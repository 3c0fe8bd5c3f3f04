"""Bottleneck attention (BoTNet): parity with timm's BottleneckAttn in float64, formula, errors."""

from __future__ import annotations

import pytest
import torch
from _token_mixing import D, check_parity, randomised

import attnzoo
from attnzoo import BottleneckAttention
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.bottleneck_attn import BottleneckAttn  # noqa: E402

CASES = [
    # (timm module, input shape)
    (lambda: timm_layers.create_attn("bottleneck", 32, feat_size=(5, 7)), (2, 32, 5, 7)),
    (lambda: BottleneckAttn(12, feat_size=(3, 6), num_heads=3, dim_head=5, qkv_bias=True), (2, 12, 3, 6)),
    (lambda: BottleneckAttn(16, dim_out=24, feat_size=4, num_heads=2, scale_pos_embed=True), (3, 16, 4, 4)),
    (lambda: BottleneckAttn(9, feat_size=(7, 5), stride=2, num_heads=1, qk_ratio=0.5), (2, 9, 7, 5)),
    (lambda: BottleneckAttn(20, feat_size=6, stride=2, num_heads=5, scale_pos_embed=True), (2, 20, 6, 6)),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_timm_matches_timm_in_float64(case, training):
    build, shape = CASES[case]
    theirs = randomised(build())
    ours = from_timm(theirs)
    assert type(ours) is BottleneckAttention
    check_parity(theirs, ours, shape, training)


def test_create_loads_timms_state_dict():
    theirs = randomised(timm_layers.create_attn("bottleneck", 16, feat_size=(4, 6))).eval()
    ours = attnzoo.create("bottleneck", 16, feat_size=(4, 6), dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 16, 4, 6, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    assert type(convert(theirs)) is BottleneckAttention


def test_formula_and_weights():
    """Logits s q.k + q.(r^h[dy] + r^w[dx]) by explicit loops, softmax, weighted values."""
    m = randomised(BottleneckAttention(4, feat_size=(2, 3), num_heads=2, head_dim=3)).eval()
    x = torch.randn(1, 4, 2, 3, dtype=D)
    q, k, v = m.qkv(x).flatten(2).split([6, 6, 4], dim=1)  # (1, *, 6)
    q, k, v = q.view(2, 3, 6), k.view(2, 3, 6), v.view(2, 2, 6)  # per head (h, width, N)
    pos = [(i, j) for i in range(2) for j in range(3)]
    logits = torch.zeros(2, 6, 6, dtype=D)
    for h in range(2):
        for a, (ya, xa) in enumerate(pos):
            for b, (yb, xb) in enumerate(pos):
                rel = m.pos_embed.height_rel[yb - ya + 1] + m.pos_embed.width_rel[xb - xa + 2]
                logits[h, a, b] = q[h, :, a] @ k[h, :, b] * 3**-0.5 + q[h, :, a] @ rel
    weights = logits.softmax(-1)  # (h, N, N)
    expected = torch.einsum("hab,heb->hea", weights, v).reshape(1, 4, 2, 3)
    out, got = m(x, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[0], weights, atol=1e-12, rtol=0)
    with attnzoo.fused_attn(False):
        torch.testing.assert_close(m(x), expected, atol=1e-12, rtol=0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        BottleneckAttention(10, num_heads=4)
    with pytest.raises(ValueError, match="stride"):
        BottleneckAttention(8, stride=3)
    with pytest.raises(ValueError, match="feat_size must be an int or a pair of ints, got \\(4, 5, 6\\)"):
        BottleneckAttention(8, feat_size=(4, 5, 6))
    with pytest.raises(TypeError, match="feat_size must be an int or a pair of ints, got str"):
        BottleneckAttention(8, feat_size="4")
    with pytest.raises(ValueError, match="qk_ratio"):
        BottleneckAttention(8, qk_ratio=float("inf"))
    m = BottleneckAttention(8, feat_size=(4, 5))
    with pytest.raises(ValueError, match=r"H=4"):
        m(torch.randn(1, 8, 5, 5))


def test_build_for_an_input_takes_its_size():
    from attnzoo.surgery.build import build

    built = build(attnzoo.get_spec("bottleneck"), (2, 16, 6, 3))
    assert built.module.feat_size == (6, 3)
    assert built.module(*built.inputs).shape == (2, 16, 6, 3)


def test_captured_rows_are_rows_of_the_weights():
    m = randomised(BottleneckAttention(8, feat_size=(4, 5), num_heads=2)).eval()
    x = torch.randn(2, 8, 4, 5, dtype=D)
    with attnzoo.capture_maps(m) as maps:
        _, weights = m(x, need_weights=True)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (4, 5)
    torch.testing.assert_close(entry.data, weights[:, :, entry.queries], atol=1e-12, rtol=0)
