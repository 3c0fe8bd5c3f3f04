"""External attention: the memory slots' maps it records while capturing."""

from __future__ import annotations

import torch
from _token_mixing import D, randomised

import attnzoo
from attnzoo import ExternalAttention


def test_captured_rows_are_the_most_used_slots_weights_over_the_tokens():
    m = randomised(ExternalAttention(8, memory_size=6)).eval()
    x = torch.randn(2, 20, 8, dtype=D)
    expected, attn = m(x, need_weights=True)  # (B, N, S)
    with attnzoo.capture_maps(m, token_grid=(4, 5)) as maps:
        y = m(x)
    (entry,) = [r for records in maps.values() for r in records]
    slots = attn.sum(dim=(0, 1)).topk(4).indices
    assert entry.kind == "rows" and entry.grid == (20,) and entry.query_grid == (6,)
    assert tuple(entry.data.shape) == (2, 1, 4, 20)
    assert entry.queries.tolist() == slots.tolist()
    assert entry.meta["labels"] == [f"memory slot {i} of 6" for i in slots.tolist()]
    torch.testing.assert_close(entry.data[:, 0], attn[:, :, slots].transpose(1, 2))
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
