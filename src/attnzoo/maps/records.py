"""Attention rows for mechanisms whose keys are not one shared set: windows, routed regions,
local neighbourhoods. The families call these under `capturing()` (see `attnzoo.maps.capture`);
each turns what the module computed into rows over the whole map, for the capture's query points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.kernels.neighbourhood import _reflect_index
from attnzoo.maps.capture import (
    DEFAULT_QUERIES,
    _name,
    _resolve_point,
    _session,
    capturing,
    query_indices,
    record,
    record_rows,
)

__all__ = [
    "record_packed_rows", "windows_to_image", "query_cells", "record_routing", "record_routed_rows",
    "record_local_rows",
]


def record_packed_rows(
    module: nn.Module,
    qkv: Tensor,
    bias: Tensor | None,
    *,
    scale: float,
    grid: Sequence[int],
    all_queries: bool = False,
    **meta: Any,
) -> None:
    """`record_rows` for packed q/k/v, as `attnzoo.kernels.biased.biased_attention` takes.

    Args:
        module: The attention module (names the record).
        qkv: `(B, N, 3, h, d)`.
        bias: `(h, N, N)`, or `(G, h, N, N)` with batch element i using group `i % G`; or None.
        scale: Multiplies the logits.
        grid: Spatial size of the N positions.
        all_queries: Record every query's row (`(B, h, N, N)`: windows are small) instead of the
            capture's query points. Default: False.
        **meta: Stored in `AttentionMap.meta`.
    """
    if not capturing():
        return
    from attnzoo.functional import attend

    b, n = qkv.shape[:2]
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, h, N, d) each
    if bias is not None and bias.ndim == 4:
        bias = bias.repeat(b // bias.shape[0], 1, 1, 1)  # (B, h, N, N): element i uses group i % G
    if not all_queries:
        record_rows(module, q, k, grid=grid, bias=bias, scale=scale, **meta)
        return
    with torch.no_grad():
        _, weights = attend(q, k, k[..., :1], bias=bias, scale=scale, need_weights=True)  # (B, h, N, N)
    record(
        module, "rows", weights, grid=grid, queries=torch.arange(n, device=q.device), query_grid=grid, **meta
    )


def windows_to_image(
    module: nn.Module,
    inner: nn.Module,
    *,
    size: Sequence[int],
    padded: Sequence[int],
    window: Sequence[int],
    shift: Sequence[int] = (0, 0),
) -> None:
    """Turn the window attention `inner` just recorded into rows over the whole image.

    `inner` must have recorded every query's row per window (`record_packed_rows` with
    `all_queries=True`, `(B*nW, h, N, N)`, windows in image-major, row-major order). That record
    is replaced by one for `module`: for each capture query point of the `(H, W)` image, its
    row scattered over the image (zero outside its window), `(B, h, Q, H*W)`.

    Args:
        module: The module that owns the image (names the new record).
        inner: The window attention module that recorded the window rows.
        size: `(H, W)` of the image.
        padded: `(Hp, Wp)`, the size after padding to window multiples.
        window: `(Wh, Ww)`.
        shift: The cyclic shift applied before partitioning (`roll` by `-shift`). Default: (0, 0).
    """
    session = _session()
    if session is None:
        return
    records = session.maps.get(_name(session, inner))
    if not records or records[-1].kind != "rows":
        return
    weights = records.pop().data  # (B*nW, h, N, N)
    if not records:
        del session.maps[_name(session, inner)]
    (height, width), (hp, wp), (wh, ww), (sh, sw) = (
        tuple(int(v) for v in t) for t in (size, padded, window, shift)
    )
    across, n = wp // ww, wh * ww
    per_image = (hp // wh) * across
    batch, heads = weights.shape[0] // per_image, weights.shape[1]
    idx = query_indices((height, width), weights.device)
    yp, xp = (idx // width - sh) % hp, (idx % width - sw) % wp  # where each query sits after the roll
    win, local = (yp // wh) * across + xp // ww, (yp % wh) * ww + xp % ww  # (Q,) each
    by_window = weights.reshape(batch, per_image, heads, n, n).permute(1, 3, 0, 2, 4)  # (nW, N, B, h, N)
    rows = by_window[win, local].permute(1, 2, 0, 3)  # (Q, B, h, N) -> (B, h, Q, N)
    m = torch.arange(n, device=weights.device)
    ky = (win // across)[:, None] * wh + m // ww  # (Q, N) key rows in the rolled, padded map
    kx = (win % across)[:, None] * ww + m % ww
    oy, ox = (ky + sh) % hp, (kx + sw) % wp  # back through the roll
    target = torch.where(
        (oy < height) & (ox < width), oy * width + ox, height * width
    )  # padding -> a spare column
    out = weights.new_zeros(batch, heads, len(idx), height * width + 1)
    out.scatter_(3, target.expand(batch, heads, -1, -1), rows)
    # the zero padding's keys take weight too; the image's rows leave them out
    padded_map = (hp, wp) != (height, width)
    padding_note = {"note": "edge windows: the padding keys' weights left out"} if padded_map else {}
    record(
        module,
        "rows",
        out[..., : height * width],
        grid=(height, width),
        queries=idx,
        query_grid=(height, width),
        window=(wh, ww),
        shift=(sh, sw),
        **padding_note,
    )


def _scatter_rows(weights: Tensor, target: Tensor, positions: int) -> Tensor:
    """Sum `weights` `(B, h, Q, K)` into `(B, h, Q, positions)` at `target` `(B or 1, Q, K)`;
    a target equal to `positions` (padding) is dropped."""
    b, h, q, k = weights.shape
    out = weights.new_zeros(b, h, q, positions + 1)
    out.scatter_add_(3, target[:, None].expand(b, h, q, k), weights)
    return out[..., :positions]


def query_cells(size: Sequence[int], cell: Sequence[int], per_row: int, device: Any = None) -> Tensor:
    """The cells that hold the capture's query points, row-major, without repeats, `(Q,)` int64.

    The points are placed on the `(H, W)` map `size` (as `query_indices` places them) and each goes to
    the cell of `cell` `(ch, cw)` pixels it lies in; `per_row` cells make a row. Plain Python, so a
    compiled forward (`torch.compile(fullgraph=True)`) records the same cells as eager mode.
    """
    session = _session()
    points = session.queries if session is not None else DEFAULT_QUERIES
    (height, width), (ch, cw) = (tuple(int(v) for v in t) for t in (size, cell))
    flat = (_resolve_point(point, (height, width)) for point in points)
    cells = dict.fromkeys((i // width) // ch * per_row + (i % width) // cw for i in flat)
    return torch.tensor(list(cells), dtype=torch.long, device=device)


def record_routing(
    module: nn.Module, r_idx: Tensor, *, regions: Sequence[int], region: Sequence[int], size: Sequence[int],
    **meta: Any,
) -> None:
    """Record bi-level routing (BiFormer) with the regions that hold the capture's query points.

    The regions are resolved here, while the capture is open: a picture drawn later would otherwise
    show the routing of the default points, whatever points were asked for.

    Args:
        module: The attention module (names the record).
        r_idx: Routed regions `(N, R, topk)`, regions row-major in `regions`.
        regions: `(n_h, n_w)` regions.
        region: `(rh, rw)` pixels per region (of the map padded to region multiples).
        size: `(H, W)` of the map before padding; the query points are placed on it.
        **meta: Stored in `AttentionMap.meta`.
    """
    if not capturing():
        return
    n_h, n_w = (int(v) for v in regions)
    queries = query_cells(size, region, n_w, r_idx.device)
    record(module, "routing", r_idx, grid=(n_h, n_w), queries=queries, **meta)


def record_routed_rows(
    module: nn.Module,
    q: Tensor,
    k: Tensor,
    r_idx: Tensor,
    *,
    regions: Sequence[int],
    region: Sequence[int],
    size: Sequence[int],
    num_heads: int,
    scale: float,
    r_weight: Tensor | None = None,
) -> None:
    """Rows of bi-level routing attention (BiFormer) over the image, for the capture's query points.

    Each query attends the tokens of the `topk` regions its region routes to; its row is placed on
    those tokens' pixels (zero elsewhere). Keys must be one per token (no key pooling).

    Args:
        module: The attention module (names the record).
        q: Queries per region, `(N*R, rh*rw, c)`, regions row-major over the (padded) map.
        k: Keys per region, `(N*R, rh*rw, c)`.
        r_idx: Routed regions `(N, R, topk)`.
        regions: `(n_h, n_w)` regions.
        region: `(rh, rw)` tokens per region.
        size: `(H, W)` of the map before padding.
        num_heads: Heads; `c` splits as `(h, c/h)`.
        scale: Multiplies the logits.
        r_weight: Scales the gathered keys (soft routing). Default: None.
    """
    if not capturing():
        return
    (n_h, n_w), (rh, rw), (height, width) = (tuple(int(v) for v in t) for t in (regions, region, size))
    n, count, topk = r_idx.shape
    length = rh * rw
    idx = query_indices((height, width), q.device)
    ys, xs = idx // width, idx % width
    home, local = (ys // rh) * n_w + xs // rw, (ys % rh) * rw + xs % rw  # (Q,) each
    routed = r_idx[:, home]  # (N, Q, topk)
    with torch.no_grad():
        qh = q.reshape(n, count, length, num_heads, -1)[:, home, local]  # (N, Q, h, d)
        keys = k.reshape(n, count, length, -1)[torch.arange(n, device=q.device)[:, None, None], routed]
        if r_weight is not None:
            keys = keys * r_weight[:, home, :, None, None].to(keys.dtype)  # (N, Q, topk, L, c)
        keys = keys.reshape(n, len(idx), topk * length, num_heads, -1)  # (N, Q, topk*L, h, d)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = torch.einsum("nqhd,nqkhd->nhqk", qh.to(dtype), keys.to(dtype)) * scale
        weights = logits.softmax(-1)  # (N, h, Q, topk*L)
    m = torch.arange(length, device=q.device)
    py = (routed // n_w)[..., None] * rh + m // rw  # (N, Q, topk, L) pixel rows of the routed tokens
    px = (routed % n_w)[..., None] * rw + m % rw
    target = torch.where((py < height) & (px < width), py * width + px, height * width).flatten(2)
    rows = _scatter_rows(weights, target, height * width)
    record(module, "rows", rows, grid=(height, width), queries=idx, query_grid=(height, width), topk=topk)


def record_local_rows(
    module: nn.Module,
    q: Tensor,
    k_pad: Tensor,
    *,
    kernel: int,
    dilation: int,
    stride: int,
    padding: int,
    size: Sequence[int],
    heads: int,
) -> None:
    """Rows of neighbourhood attention (ACmix's attention branch) over the image.

    Query `(y, x)` of the output grid attends `k_pad[..., stride*y + dilation*i, stride*x + dilation*j]`
    for `i, j < kernel`, unscaled logits (scale folded into q), softmax over the neighbours; `k_pad`
    is the key map reflection-padded by `padding` (`attnzoo.kernels.neighbourhood.reflect_pad`), so
    neighbours outside the image fold back in, repeatedly where `padding` reaches past the far side.

    Args:
        module: The attention module (names the record).
        q: `(B*h, d, Ho, Wo)`.
        k_pad: `(B*h, d, H + 2 padding, W + 2 padding)`.
        kernel: Neighbourhood size.
        dilation: Neighbour spacing.
        stride: Query spacing.
        padding: Reflection padding of the keys.
        size: `(H, W)` of the input map.
        heads: Heads h (the batch of `q` is `B*h`).
    """
    if not capturing():
        return
    height, width = (int(v) for v in size)
    batch = q.shape[0] // heads
    out_h, out_w = q.shape[-2:]
    idx = query_indices((out_h, out_w), q.device)
    qy, qx = idx // out_w, idx % out_w
    offsets = torch.arange(kernel, device=q.device) * dilation
    ky = (stride * qy)[:, None, None] + offsets[None, :, None]  # (Q, k, 1) rows of k_pad
    kx = (stride * qx)[:, None, None] + offsets[None, None, :]  # (Q, 1, k)
    # The pixel each padded position copies (repeated reflection, as `reflect_pad` for pad >= H or W).
    py = _reflect_index(height, padding, q.device)[ky]
    px = _reflect_index(width, padding, q.device)[kx]
    with torch.no_grad():
        qs = q[:, :, qy, qx]  # (B*h, d, Q)
        keys = k_pad[:, :, ky, kx]  # (B*h, d, Q, k, k)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = torch.einsum("ndq,ndqij->nqij", qs.to(dtype), keys.to(dtype)).flatten(2)  # (B*h, Q, k*k)
        weights = logits.softmax(-1).view(batch, heads, len(idx), kernel * kernel)
    target = (py * width + px).reshape(1, len(idx), kernel * kernel)
    rows = _scatter_rows(weights, target, height * width)
    record(module, "rows", rows, grid=(height, width), queries=idx, query_grid=(out_h, out_w), kernel=kernel)
