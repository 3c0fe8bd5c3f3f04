"""Residual attention (CSRA): parity with fightingcv's ResidualAttention in float64, the official head
(normalised scores, softmax temperature) against a plain reference, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _fightingcv import D, check_parity

from attnzoo import ResidualAttention

ra = pytest.importorskip("fightingcv_attention.attention.ResidualAttention", reason="fightingcv is needed")

CASES = [
    ({"channel": 64, "num_class": 20, "la": 0.2}, (3, 64, 7, 7)),
    ({"channel": 12, "num_class": 3, "la": 1.5}, (2, 12, 5, 9)),
    ({"channel": 3, "num_class": 7, "la": 0.0}, (2, 3, 1, 6)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_residual_attention(case):
    kwargs, shape = CASES[case]
    ours = check_parity(ra.ResidualAttention(**kwargs), shape, ResidualAttention)
    assert math.isinf(ours.temperature) and not ours.normalize


def official(x, weight, lam, temperature):
    """The official CSRA forward step by step."""
    score = F.conv2d(x, weight) / torch.norm(weight, dim=1, keepdim=True).transpose(0, 1)
    score = score.flatten(2)
    base = score.mean(2)
    if temperature == 99:
        return base + lam * score.max(2)[0]
    return base + lam * (score * torch.softmax(score * temperature, dim=2)).sum(2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, math.inf])
def test_official_head(temperature):
    ours = ResidualAttention(16, 6, 0.3, temperature, dtype=D)
    x = torch.randn(2, 16, 5, 3, dtype=D)
    out, weights = ours(x, need_weights=True)
    expected = official(x, ours.head.weight, 0.3, 99 if math.isinf(temperature) else temperature)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert weights.shape == (2, 6, 5, 3)
    torch.testing.assert_close(weights.sum((2, 3)), torch.ones(2, 6, dtype=D))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ResidualAttention(8, 4, temperature=0.0)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        ResidualAttention(8, 4)(torch.randn(2, 4, 3, 3))


def test_two_temperatures_compile_in_one_graph_each():
    """A second instance with another temperature recompiles the same forward with the float as a
    SymFloat, which math.isinf could not take (fullgraph failed with 'torch.* op returned non-Tensor')."""
    torch._dynamo.reset()  # this test's compiles alone, whatever ran before
    x = torch.randn(2, 8, 5, 6)
    for temperature in (1.0, 0.5, math.inf):
        module = ResidualAttention(8, num_classes=3, temperature=temperature).eval()
        with torch.no_grad():
            got = torch.compile(module, backend="eager", fullgraph=True)(x)
            torch.testing.assert_close(got, module(x))
