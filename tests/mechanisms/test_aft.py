"""AFT-full: the attention rows it records while capturing."""

from __future__ import annotations

import pytest
import torch
from _token_mixing import D, randomised

import attnzoo
from attnzoo import AFTFull


@pytest.mark.parametrize("simple", [False, True])
def test_captured_rows_are_the_channel_mean_of_the_weights(simple):
    m = randomised(AFTFull(8, max_len=12, simple=simple)).eval()
    x = torch.randn(2, 12, 8, dtype=D)
    expected, weights = m(x, need_weights=True)  # weights (B, T, T', d)
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (12,) and entry.query_grid == (12,)
    assert tuple(entry.data.shape) == (2, 1, len(entry.queries), 12)
    torch.testing.assert_close(entry.data[:, 0], weights[:, entry.queries].mean(-1))
    torch.testing.assert_close(entry.data.sum(-1), torch.ones(2, 1, len(entry.queries), dtype=D))
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
