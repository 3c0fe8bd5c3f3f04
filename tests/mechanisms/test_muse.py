"""MUSE: the attention rows and branch mix it records while capturing."""

from __future__ import annotations

import torch
from _token_mixing import D, randomised

import attnzoo
from attnzoo import MUSEAttention


def test_captured_rows_and_branch_weights():
    m = randomised(MUSEAttention(8, num_heads=2)).eval()
    x = torch.randn(2, 12, 8, dtype=D)
    mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    mask |= torch.eye(12, dtype=torch.bool)
    _, weights = m(x, x, x, mask=mask, need_weights=True)  # (B, h, L, L)
    expected = m(x, x, x, mask=mask)  # the fused path, which capturing keeps
    with attnzoo.capture_maps(m, token_grid=(3, 4)) as maps:
        y = m(x, x, x, mask=mask)
    rows, branch = [r for records in maps.values() for r in records]
    assert rows.kind == "rows" and rows.grid == (12,)
    assert tuple(rows.data.shape) == (2, 2, len(rows.queries), 12)
    torch.testing.assert_close(rows.data, weights[:, :, rows.queries])
    torch.testing.assert_close(rows.data.sum(-1), torch.ones(2, 2, len(rows.queries), dtype=D))
    assert branch.kind == "branch" and tuple(branch.data.shape) == (2, 3)
    torch.testing.assert_close(branch.data, m.branch_weights.softmax(0).expand(2, 3))
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
