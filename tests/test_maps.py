"""Map capture: recorded only inside the block, rows equal a float64 reference, the fused path stays fused."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import attnzoo
import attnzoo.functional as functional
from attnzoo.maps import DEFAULT_QUERIES, capture_maps, capturing, query_indices, record, record_rows


class ToySelfAttention(nn.Module):
    """Global single-head self-attention over a (B, C, H, W) map that records rows and a gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qk = nn.Conv2d(channels, 2 * channels, 1)
        self.gate = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k = self.qk(x).flatten(2).transpose(1, 2).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, N, C) each
        v = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        out = attnzoo.attend(q, k, v, causal=causal)
        gate = torch.sigmoid(self.gate(x.mean((2, 3))))  # (B, C)
        if capturing():
            record_rows(self, q, k, grid=(h, w), causal=causal)
            record(self, "channel", gate)
        return out.squeeze(1).transpose(1, 2).reshape(b, c, h, w) * gate[:, :, None, None]  # (B, C, H, W)


def _reference_rows(module: ToySelfAttention, x: torch.Tensor, idx: torch.Tensor, causal: bool) -> torch.Tensor:
    q, k = module.qk(x).flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, N, C)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # (B, N, N)
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)[:, idx]  # (B, Q, N)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_equal_reference_for_chosen_queries(causal):
    model = nn.Sequential(nn.Identity(), ToySelfAttention(4)).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    with capture_maps(model, queries=[(0.5, 0.5), (0, 0), (4, 5), (0.99, 0.0)]) as maps:
        model[1](model[0](x), causal)
    assert set(maps) == {"1"}
    rows, gate = maps["1"]
    assert rows.kind == "rows" and gate.kind == "channel"
    # (0.5, 0.5) -> (2, 3); (0, 0) -> 0; (4, 5) -> last; (0.99, 0.0) -> row 4, col 0.
    assert rows.queries.tolist() == [2 * 6 + 3, 0, 29, 24]
    assert rows.grid == (5, 6) and rows.query_grid == (5, 6)
    assert rows.data.shape == (2, 1, 4, 30)
    ref = _reference_rows(model[1], x, rows.queries, causal)
    torch.testing.assert_close(rows.data[:, 0], ref, atol=1e-12, rtol=1e-12)
    assert not rows.data.requires_grad
    assert gate.data.shape == (2, 4)


def test_nothing_recorded_and_no_weights_computed_outside_capture(monkeypatch):
    calls = []
    real = functional._attend_math

    def spy(*args, **kwargs):
        calls.append(args[-1])  # return_weights
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "_attend_math", spy)
    model = ToySelfAttention(4)
    x = torch.randn(1, 4, 3, 3)
    assert not capturing()
    model(x)
    assert calls == []  # the fused path only
    with capture_maps(model) as maps:
        assert capturing()
        model(x)
    assert not capturing()
    assert calls == [True]  # only the selected rows went through the math path
    model(x)  # calls after the block add nothing
    assert list(maps) == ["ToySelfAttention"]  # the root module is named by its class
    assert len(maps["ToySelfAttention"]) == 2


def test_default_queries_include_the_centre_and_are_unique():
    idx = query_indices((7, 7))
    assert idx[0].item() == 3 * 7 + 3
    assert len(idx) == len(DEFAULT_QUERIES)
    assert query_indices((1, 1)).tolist() == [0]  # every point falls on the one position
    # 1-D grids use the last coordinate; 3-D grids take the middle frame.
    assert query_indices((10,))[0].item() == 5
    assert query_indices((3, 4, 4))[0].item() == 1 * 16 + 2 * 4 + 2


def test_token_grid_places_queries_of_sequences_on_the_map():
    with capture_maps(token_grid=(4, 6)):
        assert query_indices((24,))[0].item() == 2 * 6 + 3  # the centre of the 4 x 6 map
        assert query_indices((10,))[0].item() == 5  # another length: a plain sequence
    with pytest.raises(ValueError, match="token_grid"):
        capture_maps(token_grid=(0, 3))


def test_nested_and_threads_are_isolated():
    model = ToySelfAttention(4)
    x = torch.randn(1, 4, 2, 2)
    seen_in_thread = []
    with capture_maps(model) as outer:
        with capture_maps(model) as inner:
            model(x)
        thread = threading.Thread(target=lambda: seen_in_thread.append(capturing()))
        thread.start()
        thread.join()
    assert seen_in_thread == [False]
    assert sum(len(v) for v in inner.values()) == 2
    assert outer == {}


def test_repeated_calls_are_listed_in_order():
    model = ToySelfAttention(4)
    with capture_maps(model) as maps:
        model(torch.randn(1, 4, 2, 2))
        model(torch.randn(3, 4, 2, 2))
    (records,) = maps.values()
    assert [r.data.shape[0] for r in records] == [1, 1, 3, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        capture_maps(queries=[(1.5, 0.5)])
    with pytest.raises(TypeError, match="int or float"):
        capture_maps(queries=[("a", 0)])
    with pytest.raises(ValueError, match="at least one"):
        capture_maps(queries=[])
    with pytest.raises(TypeError, match="nn.Module"):
        capture_maps("model")  # type: ignore[arg-type]
    with capture_maps(queries=[(9, 9)]):
        with pytest.raises(ValueError, match="outside a grid"):
            query_indices((3, 3))
        with pytest.raises(ValueError, match="kind"):
            record(nn.Identity(), "heat", torch.zeros(1))
        with pytest.raises(ValueError, match="cover"):
            record_rows(nn.Identity(), torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), grid=(2, 2))


def test_exported():
    assert attnzoo.capture_maps is capture_maps
