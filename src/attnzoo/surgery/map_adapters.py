"""Adapters that run a mechanism which cannot take a whole feature map on one anyway.

`attnzoo.surgery.build.build_nchw` uses them so that `attnzoo maps` and `attnzoo demo` can place such
mechanisms after a CNN stage:

- `Tiles`: the map cut into t x t tiles, each run through the module (window attention, which
  takes windows already cut from a map; channels-last mechanisms that fit only a smaller square, such
  as ViP, whose map side must divide the channels), then put back in place.
- `Clip`: the map as a short clip of T frames, circularly shifted copies of it (a camera pan of
  one position per frame, centred on the map), run through a mechanism on clips or along time; the
  output is the mean over the frames.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnzoo.maps.capture import _name, _session, capturing, record
from attnzoo.maps.records import windows_to_image

__all__ = ["Tiles", "Clip"]


class Tiles(nn.Module):
    """Runs `module` on the `(B, C, H, W)` map cut into `size x size` tiles.

    Args:
        module: Takes `(B * tiles, size, size, C)` (`tokens=False`) or `(B * tiles, size * size, C)`.
        size: The tile side; it must divide H and W.
        tokens: Give the module flattened tiles. Default: False.

    While capturing, rows recorded for every query of every tile (window attention) become rows over
    the whole map; other records per tile (branch or channel weights) are averaged over the tiles.
    """

    def __init__(self, module: nn.Module, size: int, tokens: bool = False) -> None:
        super().__init__()
        self.module, self.size, self.tokens = module, size, tokens

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.size
        if h % s or w % s:
            raise ValueError(f"{type(self).__name__} expects H and W divisible by {s}, got {h}x{w}")
        tiles = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1)  # (B, h/s, w/s, s, s, C)
        tiles = tiles.reshape(-1, s * s, c) if self.tokens else tiles.reshape(-1, s, s, c)
        out = self.module(tiles)
        out = out[0] if isinstance(out, tuple) else out
        if capturing():
            self._recorded(b, (h, w))
        out = out.reshape(b, h // s, w // s, s, s, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h/s, s, w/s, s)
        return out.reshape(b, c, h, w)

    def _recorded(self, batch: int, size: tuple[int, int]) -> None:
        session = _session()
        records = session.maps.get(_name(session, self.module)) if session is not None else None
        if not records:
            return
        last = records[-1]
        if last.kind == "rows" and last.grid == (self.size, self.size) and last.query_grid == last.grid:
            windows_to_image(self.module, self.module, size=size, padded=size, window=(self.size,) * 2)
        elif last.kind in ("branch", "channel") and last.data.shape[0] % batch == 0:
            records.pop()
            data = last.data.reshape(batch, -1, *last.data.shape[1:]).mean(1)  # (B, ...): over tiles
            note = f"run on {self.size}x{self.size} tiles of the map, mean over the tiles"
            meta = {**last.meta, "note": note}
            record(self.module, last.kind, data, **meta)

    def extra_repr(self) -> str:
        return f"size={self.size}, tokens={self.tokens}"


class Clip(nn.Module):
    """Runs `module` on a clip made of the `(B, C, H, W)` map: `frames` copies shifted by
    `-(frames // 2) .. frames - 1 - frames // 2` positions along W.

    Args:
        module: Takes `(B, T, H, W, C)` clips (`along_time=False`) or `(B * H * W, T, C)` sequences of
            one position's frames (`along_time=True`).
        frames: T.
        along_time: See `module`. Default: False.

    While capturing, rows along time (one per position) are averaged over the positions.
    """

    def __init__(self, module: nn.Module, frames: int, along_time: bool = False) -> None:
        super().__init__()
        self.module, self.frames, self.along_time = module, frames, along_time

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        shifts = range(-(self.frames // 2), self.frames - self.frames // 2)
        clip = x.new_empty(b, self.frames, h, w, c)  # (B, T, H, W, C)
        for t, shift in enumerate(shifts):
            clip[:, t] = x.roll(shift, dims=3).permute(0, 2, 3, 1)
        if self.along_time:
            seq = clip.permute(0, 2, 3, 1, 4).reshape(b * h * w, self.frames, c)  # (B H W, T, C)
            out = self.module(seq)
            out = out[0] if isinstance(out, tuple) else out
            if capturing():
                self._along_time(b)
            return out.mean(1).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        out = self.module(clip)
        out = out[0] if isinstance(out, tuple) else out
        return out.mean(1).permute(0, 3, 1, 2)  # (B, T, H, W, C) -> (B, C, H, W)

    def _along_time(self, batch: int) -> None:
        session = _session()
        records = session.maps.get(_name(session, self.module)) if session is not None else None
        if not records or records[-1].kind != "rows":
            return
        last = records.pop()
        data = last.data.reshape(batch, -1, *last.data.shape[1:]).mean(1)  # (B, h, Q, T): over positions
        note = f"a {self.frames}-frame pan made of the map; weights mean over its positions"
        meta = {**last.meta, "unit": "frame", "note": note}
        record(self.module, "rows", data, grid=last.grid, queries=last.queries, query_grid=last.query_grid,
               **meta)

    def extra_repr(self) -> str:
        return f"frames={self.frames}, along_time={self.along_time}"
