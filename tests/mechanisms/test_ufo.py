"""UFO attention: the (signed, softmax-free) value weights it records while capturing."""

from __future__ import annotations

import torch
from _token_mixing import D, randomised

import attnzoo
from attnzoo import UFOAttention


def test_captured_rows_weigh_the_values_into_the_output():
    """No softmax, but the output is linear in the values: the recorded rows rebuild it."""
    m = randomised(UFOAttention(8, num_heads=2)).eval()
    q, kv = torch.randn(2, 6, 8, dtype=D), torch.randn(2, 9, 8, dtype=D)
    expected = m(q, kv, kv)
    with attnzoo.capture_maps(m) as maps:
        y = m(q, kv, kv)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (9,) and entry.query_grid == (6,)
    assert tuple(entry.data.shape) == (2, 2, len(entry.queries), 9)
    assert "no softmax" in entry.meta["note"]
    v = m.v(kv).unflatten(-1, (2, 4)).transpose(1, 2)  # (B, h, S, dv)
    mixed = (entry.data @ v).transpose(1, 2).flatten(2)  # (B, Q, h dv)
    torch.testing.assert_close(m.proj(mixed), y[:, entry.queries])
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
