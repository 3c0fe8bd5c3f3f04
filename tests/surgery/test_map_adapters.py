"""Tiles and Clip: mechanisms that cannot take a whole feature map placed on one (`build_nchw`)."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.surgery.build import build_nchw
from attnzoo.surgery.map_adapters import Clip, Tiles


def _records(module, x, grid):
    with torch.no_grad(), attnzoo.capture_maps(module, token_grid=grid) as maps:
        y = module(x)
    return y, [r for records in maps.values() for r in records]


def test_window_runs_on_the_map_cut_into_windows_and_records_rows_over_the_map():
    module = build_nchw(attnzoo.get_spec("window"), 16, (12, 12)).eval()
    assert isinstance(module, Tiles) and module.size == 6 and module.tokens
    x = torch.randn(2, 16, 12, 12)
    windows = x.reshape(2, 16, 2, 6, 2, 6).permute(0, 2, 4, 3, 5, 1).reshape(8, 36, 16)  # (B nW, N, C)
    with torch.no_grad():
        expected = module.module(windows).reshape(2, 2, 2, 6, 6, 16).permute(0, 5, 1, 3, 2, 4)
    y, (entry,) = _records(module, x, (12, 12))
    torch.testing.assert_close(y, expected.reshape(2, 16, 12, 12))
    assert entry.kind == "rows" and entry.grid == (12, 12)
    assert entry.data.shape[:2] == (2, module.module.num_heads)
    torch.testing.assert_close(entry.data.sum(-1), torch.ones(entry.data.shape[:3]))
    q = int(entry.queries[0])  # the centre (6, 6): its window is the bottom-right one
    row = entry.data[0, 0, 0].reshape(12, 12)
    assert q == 6 * 12 + 6 and row[:6].abs().sum() == 0 and row[:, :6].abs().sum() == 0


def test_vip_runs_on_tiles_whose_side_divides_the_channels():
    module = build_nchw(attnzoo.get_spec("vip"), 32, (28, 28)).eval()
    assert isinstance(module, Tiles) and module.size == 4 and not module.tokens
    y, (entry,) = _records(module, torch.randn(2, 32, 28, 28), (28, 28))
    assert y.shape == (2, 32, 28, 28)
    assert entry.kind == "branch" and tuple(entry.data.shape) == (2, 3, 32) and "tiles" in entry.meta["note"]
    torch.testing.assert_close(entry.data.sum(1), torch.ones(2, 32))


def test_temporal_attends_along_a_pan_made_of_the_map():
    module = build_nchw(attnzoo.get_spec("temporal"), 16, (6, 6)).eval()
    assert isinstance(module, Clip) and module.frames == 3 and module.along_time
    y, (entry,) = _records(module, torch.randn(2, 16, 6, 6), (6, 6))
    assert y.shape == (2, 16, 6, 6)
    assert entry.kind == "rows" and entry.grid == (3,) and entry.meta["unit"] == "frame"
    assert tuple(entry.data.shape) == (2, module.module.num_heads, len(entry.queries), 3)
    torch.testing.assert_close(entry.data.sum(-1), torch.ones(entry.data.shape[:3]))


def test_neighborhood_3d_runs_on_a_three_frame_clip():
    module = build_nchw(attnzoo.get_spec("neighborhood_3d"), 16, (10, 10)).eval()
    assert isinstance(module, Clip) and not module.along_time
    y, (entry,) = _records(module, torch.randn(2, 16, 10, 10), (10, 10))
    assert y.shape == (2, 16, 10, 10)
    assert entry.kind == "rows" and entry.grid == (3, 10, 10)
    torch.testing.assert_close(entry.data.sum(-1), torch.ones(entry.data.shape[:3]))
