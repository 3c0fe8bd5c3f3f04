"""EMSA (ResT): the attention rows it records while capturing."""

from __future__ import annotations

import pytest
import torch
from _token_mixing import D, randomised

import attnzoo
from attnzoo import EMSA


@pytest.mark.parametrize(
    "sr_ratio, transform, key_grid", [(1, False, (6, 8)), (2, False, (3, 4)), (2, True, (3, 4))]
)
def test_captured_rows_are_the_query_rows_over_the_reduced_keys(sr_ratio, transform, key_grid):
    m = randomised(EMSA(8, num_heads=2, sr_ratio=sr_ratio, apply_transform=transform)).eval()
    x = torch.randn(2, 48, 8, dtype=D)
    expected, attn = m(x, need_weights=True, size=(6, 8))  # (B, h, N, N')
    with attnzoo.capture_maps(m) as maps:
        y = m(x, size=(6, 8))
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == key_grid and entry.query_grid == (6, 8)
    assert tuple(entry.data.shape) == (2, 2, len(entry.queries), key_grid[0] * key_grid[1])
    torch.testing.assert_close(entry.data, attn[:, :, entry.queries])
    if not transform:  # softmax rows; with the transform they are instance-normalised (and say so)
        torch.testing.assert_close(entry.data.sum(-1), torch.ones(2, 2, len(entry.queries), dtype=D))
    else:
        assert "instance norm" in entry.meta["note"]
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
