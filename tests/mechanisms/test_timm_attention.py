"""compat.TimmAttention (timm's `Attention`): its options, as timm reads them."""

from __future__ import annotations

import pytest
import torch

from attnzoo.compat import TimmAttention


def test_dim_out_as_timm_reads_it_and_negative_refused():
    x = torch.randn(2, 5, 8)
    assert TimmAttention(8, num_heads=2, dim_out=6)(x).shape == (2, 5, 6)
    assert TimmAttention(8, num_heads=2, dim_out=0)(x).shape == (2, 5, 8)  # timm's `dim_out or dim`
    with pytest.raises(ValueError, match="TimmAttention: dim_out must be >= 1, got -1"):
        TimmAttention(8, num_heads=2, dim_out=-1)  # was torch's "negative dimension" RuntimeError
