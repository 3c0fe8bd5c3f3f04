"""Attention-map capture: what each attention module attended to, recorded only when asked.

Usage::

    with attnzoo.capture_maps(model, queries=[(0.5, 0.5), (0.2, 0.8)]) as maps:
        model(x)
    for name, records in maps.items():       # qualified module name -> list of AttentionMap
        for m in records:
            print(name, m.kind, tuple(m.data.shape))

Mechanisms call two cheap helpers in their forward: :func:`capturing` (a global counter read,
free when nothing captures) and :func:`record` / :func:`record_rows`. The fused path stays fused
when nothing captures; while capturing, dot-product modules compute weights for the chosen query
rows only (``attend(q[:, :, idx], k, ..., return_weights=True)``), never the full N x N matrix.
The pattern in a ``forward`` (the outer ``if`` keeps ``torch.jit.script`` working: TorchScript
skips the branch; ``torch.compile`` and ``torch.jit.trace`` see ``capturing()`` return False)::

    if not torch.jit.is_scripting():
        if capturing():
            record(self, "channel", weights)            # (B, C)
            record_rows(self, q, k, grid=(H, W))        # q, k: (B, h, N, d)

Kinds of map and the shape of :attr:`AttentionMap.data`:

- ``"channel"``: ``(B, C)`` channel weights (SE, CBAM's channel gate).
- ``"spatial"``: ``(B, *grid)`` one weight per position (CBAM's spatial gate, dual gated).
- ``"rows"``: ``(B, h, Q, S)`` attention weights of Q query positions over S keys, S =
  prod(``grid``); ``queries`` holds the flat indices of the queries in ``query_grid``.
- ``"routing"``: ``(B, R, k)`` int64, the k regions each of the R query regions routes to
  (BiFormer), regions numbered row-major in ``grid``.
- ``"branch"``: ``(B, M, C)`` or ``(B, M)`` weights over M branches (SK convolution).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "DEFAULT_QUERIES",
    "AttentionMap",
    "capture_maps",
    "capturing",
    "record",
    "record_rows",
    "query_indices",
    "iter_maps",
    "record_packed_rows",
    "windows_to_image",
    "record_routed_rows",
    "record_local_rows",
]

KINDS = ("channel", "spatial", "rows", "routing", "branch")

# Query points as fractions of (H, W): the centre, then the centres of the four quadrants.
DEFAULT_QUERIES: tuple[tuple[float, ...], ...] = (
    (0.5, 0.5),
    (0.25, 0.25),
    (0.25, 0.75),
    (0.75, 0.25),
    (0.75, 0.75),
)

Point = Union[float, int, Sequence[Union[float, int]]]  # noqa: UP007 (a runtime alias on Python 3.10)


@dataclass
class AttentionMap:
    """One recorded map (see the module docstring for the shape of ``data`` per ``kind``).

    Attributes:
        kind: One of :data:`KINDS`.
        data: The weights, detached from the graph.
        grid: Spatial size of the positions ``data`` runs over (keys for ``"rows"``, regions for
            ``"routing"``), or None when there is no grid.
        queries: ``"rows"`` only: flat indices of the query positions in ``query_grid``.
        query_grid: ``"rows"`` only: spatial size of the query positions.
        meta: Anything else the module recorded (window counts, routing weights, ...).
    """

    kind: str
    data: Tensor
    grid: tuple[int, ...] | None = None
    queries: Tensor | None = None
    query_grid: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class _Session:
    def __init__(
        self,
        model: nn.Module | None,
        queries: tuple[tuple[float | int, ...], ...],
        token_grid: tuple[int, ...] | None,
    ) -> None:
        self.names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self.queries = queries
        self.token_grid = token_grid
        self.maps: dict[str, list[AttentionMap]] = {}


_active = 0  # sessions open in any thread: the fast check torch.compile can guard on
_local = threading.local()


def _session() -> _Session | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def capturing() -> bool:
    """Whether a :func:`capture_maps` block is open in this thread (cheap; call it in ``forward``)."""
    return _active > 0 and _session() is not None


def _normalise_point(point: Point) -> tuple[float | int, ...]:
    coords = tuple(point) if isinstance(point, Sequence) and not isinstance(point, str) else (point,)
    if not coords:
        raise ValueError("capture_maps expects each query point to have at least one coordinate, got ()")
    for c in coords:
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"capture_maps expects query coordinates to be int or float, got {point!r}")
        if isinstance(c, float) and not 0.0 <= c <= 1.0:
            raise ValueError(f"capture_maps expects fractional query coordinates in [0, 1], got {point!r}")
        if isinstance(c, int) and c < 0:
            raise ValueError(f"capture_maps expects integer query coordinates >= 0, got {point!r}")
    return coords


class capture_maps:  # noqa: N801 (used as a function: ``with capture_maps(model) as maps``)
    """Record the attention maps of every attention module that runs inside the block.

    Args:
        model: The model whose sub-modules are named in the result by their qualified names
            (``"layer1.0.attn"``); modules outside it are named by their class name. Default: None.
        queries: Query points for attention rows. Each point is a tuple of fractions of the grid
            size (floats in [0, 1], ``(0.5, 0.5)`` = the centre) or of indices (ints). A point with
            fewer coordinates than the grid is centred on the leading axes (a (y, x) point on a
            (T, H, W) grid takes the middle frame); with more, the leading ones are dropped (a
            (y, x) point on a 1-D sequence uses x). Default: :data:`DEFAULT_QUERIES`.
        token_grid: How a token sequence lies on a map, ``(H, W)`` row-major: a module that
            only sees ``H*W`` tokens (multi-head attention on a flattened map) then gets its query
            points placed on that map. Default: None (sequences are 1-D).

    Returns:
        A dict, filled while the block runs, from module name to the list of its
        :class:`AttentionMap` records (one per call).

    Example:
        >>> with attnzoo.capture_maps(model) as maps:
        ...     model(x)
        >>> maps["layer2.attn"][0].kind
        'rows'
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        queries: Sequence[Point] | None = None,
        token_grid: Sequence[int] | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"capture_maps expects model to be an nn.Module or None, got {type(model).__name__}"
            )
        points = DEFAULT_QUERIES if queries is None else tuple(_normalise_point(p) for p in queries)
        if not points:
            raise ValueError("capture_maps expects at least one query point, got an empty list")
        grid = None if token_grid is None else tuple(int(g) for g in token_grid)
        if grid is not None and (not grid or any(g < 1 for g in grid)):
            raise ValueError(
                f"capture_maps expects token_grid of positive sizes such as (H, W), got {token_grid}"
            )
        self._session = _Session(model, points, grid)

    def __enter__(self) -> dict[str, list[AttentionMap]]:
        global _active
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self._session)
        _active += 1
        return self._session.maps

    def __exit__(self, *exc: object) -> None:
        global _active
        _local.stack.remove(self._session)
        _active -= 1


def _resolve_point(point: tuple[float | int, ...], grid: tuple[int, ...]) -> int:
    n = len(grid)
    coords: tuple[float | int, ...] = point[-n:] if len(point) >= n else (0.5,) * (n - len(point)) + point
    flat = 0
    for c, size in zip(coords, grid, strict=False):
        if isinstance(c, float):
            i = min(int(c * size), size - 1)
        elif c >= size:
            raise ValueError(
                f"capture_maps: query index {c} is outside a grid of size {grid} (point {point})"
            )
        else:
            i = c
        flat = flat * size + i
    return flat


def query_indices(grid: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Flat indices (row-major in ``grid``) of this capture's query points, without repeats.

    Outside a capture block the default points are used.

    Shape:
        - Output: ``(Q,)`` int64.
    """
    grid = tuple(int(g) for g in grid)
    if not grid or any(g < 1 for g in grid):
        raise ValueError(f"query_indices expects a grid of positive sizes, got {grid}")
    session = _session()
    points = session.queries if session is not None else DEFAULT_QUERIES
    if session is not None and session.token_grid is not None and len(grid) == 1:
        size = 1
        for g in session.token_grid:
            size *= g
        if size == grid[0]:
            grid = session.token_grid  # row-major, so flat indices on it are token indices
    flat = list(dict.fromkeys(_resolve_point(p, grid) for p in points))
    return torch.tensor(flat, dtype=torch.long, device=device)


def record(module: nn.Module, kind: str, data: Tensor, **meta: Any) -> None:
    """Record one map for ``module`` in the open capture (nothing happens when none is open).

    Args:
        module: The attention module that computed the map (names it in the result).
        kind: One of :data:`KINDS`.
        data: The map (shape per kind, see the module docstring); stored detached.
        **meta: ``grid``, ``queries``, ``query_grid`` fill the :class:`AttentionMap` fields of
            the same names; anything else goes to ``meta``.
    """
    session = _session()
    if session is None:
        return
    if kind not in KINDS:
        raise ValueError(f"record expects kind to be one of {KINDS}, got {kind!r}")
    if not isinstance(data, Tensor):
        raise TypeError(f"record expects data to be a torch.Tensor, got {type(data).__name__}")
    grid = meta.pop("grid", None)
    query_grid = meta.pop("query_grid", None)
    queries = meta.pop("queries", None)
    entry = AttentionMap(
        kind=kind,
        data=data.detach().clone(),
        grid=tuple(int(g) for g in grid) if grid is not None else None,
        queries=queries.detach().clone() if isinstance(queries, Tensor) else queries,
        query_grid=tuple(int(g) for g in query_grid) if query_grid is not None else None,
        meta={k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in meta.items()},
    )
    session.maps.setdefault(_name(session, module), []).append(entry)


def _name(session: _Session, module: nn.Module) -> str:
    return session.names.get(id(module)) or type(module).__name__


def _rows(t: Tensor | None, idx: Tensor, length: int) -> Tensor | None:
    # Keep the query rows of a mask/bias broadcastable to (B, h, L, S); a size-1 query dim broadcasts.
    if t is None or t.ndim < 2 or t.shape[-2] != length:
        return t
    return t.index_select(-2, idx.to(t.device))


def record_rows(
    module: nn.Module,
    q: Tensor,
    k: Tensor,
    *,
    grid: Sequence[int],
    key_grid: Sequence[int] | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    **meta: Any,
) -> None:
    """Record attention rows for the capture's query points: weights of those queries only.

    Runs :func:`attnzoo.functional.attend` with ``return_weights=True`` on the selected rows of
    ``q`` (no gradient), so the cost is Q x S, not L x S. Call it under ``if capturing():``.

    Args:
        module: The attention module (names the record).
        q: Queries, ``(B, h, L, d)`` with L = prod(``grid``).
        k: Keys, ``(B, h, S, d)``.
        grid: Spatial size of the query positions.
        key_grid: Spatial size of the key positions (S = its product). Default: ``grid``.
        bias: Additive term as passed to ``attend`` (rows are selected here). Default: None.
        mask: Mask as passed to ``attend`` (True = may attend). Default: None.
        causal: As ``attend``'s (applied to the original query positions). Default: False.
        scale: As ``attend``'s. Default: ``1 / sqrt(d)``.
        **meta: Stored in :attr:`AttentionMap.meta`.
    """
    if not capturing():
        return
    from attnzoo.functional import attend

    grid = tuple(int(g) for g in grid)
    key_grid = grid if key_grid is None else tuple(int(g) for g in key_grid)
    length = q.shape[-2]
    size = 1
    for g in grid:
        size *= g
    if size != length:
        raise ValueError(
            f"record_rows expects grid {grid} to cover the {length} queries of q {tuple(q.shape)}"
        )
    idx = query_indices(grid, q.device)
    with torch.no_grad():
        q_rows = q.index_select(-2, idx)  # (B, h, Q, d)
        mask_rows = _rows(mask, idx, length)
        if causal:
            keep = torch.arange(k.shape[-2], device=q.device)[None, :] <= idx[:, None]  # (Q, S)
            if mask_rows is None:
                mask_rows = keep
            elif mask_rows.dtype == torch.bool:
                mask_rows = mask_rows & keep
            else:
                mask_rows = mask_rows.masked_fill(~keep, float("-inf"))
        _, weights = attend(
            q_rows,
            k,
            k[..., :1],
            bias=_rows(bias, idx, length),
            mask=mask_rows,
            scale=scale,
            return_weights=True,
        )
    record(module, "rows", weights, grid=key_grid, queries=idx, query_grid=grid, **meta)


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
    """:func:`record_rows` for packed q/k/v, as :func:`attnzoo._biased_attention.biased_attention` takes.

    Args:
        module: The attention module (names the record).
        qkv: ``(B, N, 3, h, d)``.
        bias: ``(h, N, N)``, or ``(G, h, N, N)`` with batch element i using group ``i % G``; or None.
        scale: Multiplies the logits.
        grid: Spatial size of the N positions.
        all_queries: Record every query's row (``(B, h, N, N)``: windows are small) instead of the
            capture's query points. Default: False.
        **meta: Stored in :attr:`AttentionMap.meta`.
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
        _, weights = attend(q, k, k[..., :1], bias=bias, scale=scale, return_weights=True)  # (B, h, N, N)
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
    """Turn the window attention ``inner`` just recorded into rows over the whole image.

    ``inner`` must have recorded every query's row per window (:func:`record_packed_rows` with
    ``all_queries=True``, ``(B*nW, h, N, N)``, windows in image-major, row-major order). That record
    is replaced by one for ``module``: for each capture query point of the ``(H, W)`` image, its
    row scattered over the image (zero outside its window), ``(B, h, Q, H*W)``.

    Args:
        module: The module that owns the image (names the new record).
        inner: The window attention module that recorded the window rows.
        size: ``(H, W)`` of the image.
        padded: ``(Hp, Wp)``, the size after padding to window multiples.
        window: ``(Wh, Ww)``.
        shift: The cyclic shift applied before partitioning (``roll`` by ``-shift``). Default: (0, 0).
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
    record(
        module,
        "rows",
        out[..., : height * width],
        grid=(height, width),
        queries=idx,
        query_grid=(height, width),
        window=(wh, ww),
        shift=(sh, sw),
    )


def _scatter_rows(weights: Tensor, target: Tensor, positions: int) -> Tensor:
    """Sum ``weights`` ``(B, h, Q, K)`` into ``(B, h, Q, positions)`` at ``target`` ``(B or 1, Q, K)``;
    a target equal to ``positions`` (padding) is dropped."""
    b, h, q, k = weights.shape
    out = weights.new_zeros(b, h, q, positions + 1)
    out.scatter_add_(3, target[:, None].expand(b, h, q, k), weights)
    return out[..., :positions]


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

    Each query attends the tokens of the ``topk`` regions its region routes to; its row is placed on
    those tokens' pixels (zero elsewhere). Keys must be one per token (no key pooling).

    Args:
        module: The attention module (names the record).
        q: Queries per region, ``(N*R, rh*rw, c)``, regions row-major over the (padded) map.
        k: Keys per region, ``(N*R, rh*rw, c)``.
        r_idx: Routed regions ``(N, R, topk)``.
        regions: ``(n_h, n_w)`` regions.
        region: ``(rh, rw)`` tokens per region.
        size: ``(H, W)`` of the map before padding.
        num_heads: Heads; ``c`` splits as ``(h, c/h)``.
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

    Query ``(y, x)`` of the output grid attends ``k_pad[..., stride*y + dilation*i, stride*x + dilation*j]``
    for ``i, j < kernel``, unscaled logits (scale folded into q), softmax over the neighbours; ``k_pad``
    is the key map reflection-padded by ``padding``, so neighbours outside the image fold back in.

    Args:
        module: The attention module (names the record).
        q: ``(B*h, d, Ho, Wo)``.
        k_pad: ``(B*h, d, H + 2 padding, W + 2 padding)``.
        kernel: Neighbourhood size.
        dilation: Neighbour spacing.
        stride: Query spacing.
        padding: Reflection padding of the keys.
        size: ``(H, W)`` of the input map.
        heads: Heads h (the batch of ``q`` is ``B*h``).
    """
    if not capturing():
        return
    height, width = (int(v) for v in size)
    batch = q.shape[0] // heads
    out_h, out_w = q.shape[-2:]
    idx = query_indices((out_h, out_w), q.device)
    qy, qx = idx // out_w, idx % out_w
    offsets = torch.arange(kernel, device=q.device) * dilation
    py = (stride * qy)[:, None, None] + offsets[None, :, None] - padding  # (Q, k, 1), then reflect
    px = (stride * qx)[:, None, None] + offsets[None, None, :] - padding  # (Q, 1, k)
    py, px = py.abs(), px.abs()
    py = torch.where(py >= height, 2 * (height - 1) - py, py)
    px = torch.where(px >= width, 2 * (width - 1) - px, px)
    with torch.no_grad():
        qs = q[:, :, qy, qx]  # (B*h, d, Q)
        ky = (stride * qy)[:, None, None] + offsets[None, :, None]
        kx = (stride * qx)[:, None, None] + offsets[None, None, :]
        keys = k_pad[:, :, ky, kx]  # (B*h, d, Q, k, k)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = torch.einsum("ndq,ndqij->nqij", qs.to(dtype), keys.to(dtype)).flatten(2)  # (B*h, Q, k*k)
        weights = logits.softmax(-1).view(batch, heads, len(idx), kernel * kernel)
    target = (py * width + px).reshape(1, len(idx), kernel * kernel)
    rows = _scatter_rows(weights, target, height * width)
    record(module, "rows", rows, grid=(height, width), queries=idx, query_grid=(out_h, out_w), kernel=kernel)


def iter_maps(maps: dict[str, list[AttentionMap]]) -> Iterator[tuple[str, AttentionMap]]:
    """``(name, map)`` for every record, in recording order per module."""
    for name, records in maps.items():
        for m in records:
            yield name, m
