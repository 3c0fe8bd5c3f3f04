"""Attention-map capture: what each attention module attended to, recorded only when asked.

Usage:

```python
with attnzoo.capture_maps(model, queries=[(0.5, 0.5), (0.2, 0.8)]) as maps:
    model(x)
for name, records in maps.items():       # qualified module name -> list of AttentionMap
    for m in records:
        print(name, m.kind, tuple(m.data.shape))
```

Mechanisms call two cheap helpers in their forward: `capturing` (a global counter read,
free when nothing captures) and `record` / `record_rows`. The fused path stays fused
when nothing captures; while capturing, dot-product modules compute weights for the chosen query
rows only (`attend(q[:, :, idx], k, ..., need_weights=True)`), never the full N x N matrix.
The pattern in a `forward` (`torch.compile` and `torch.jit.trace` see `capturing()` return
False; TorchScript is not supported, see the support matrix):

```python
if capturing():
    record(self, "channel", weights)            # (B, C)
    record_rows(self, q, k, grid=(H, W))        # q, k: (B, h, N, d)
```

Window, routed and local attention use the helpers of `attnzoo.maps.records`, which place their
rows on the whole map.

Kinds of map and the shape of `AttentionMap.data`:

- `"channel"`: `(B, C)` channel weights (SE, CBAM's channel gate).
- `"spatial"`: `(B, *grid)` one weight per position (CBAM's spatial gate, dual gated).
- `"rows"`: `(B, h, Q, S)` attention weights of Q query positions over S keys, S =
  prod(`grid`); `queries` holds the flat indices of the queries in `query_grid`.
- `"routing"`: `(B, R, k)` int64, the k regions each of the R query regions routes to
  (BiFormer), regions numbered row-major in `grid`.
- `"branch"`: `(B, M, C)` or `(B, M)` weights over M branches (SK convolution).
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
    "row_weights",
    "query_indices",
    "iter_maps",
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
    """One recorded map (see the module docstring for the shape of `data` per `kind`).

    Attributes:
        kind: One of `KINDS`.
        data: The weights, detached from the graph.
        grid: Spatial size of the positions `data` runs over (keys for `"rows"`, regions for
            `"routing"`), or None when there is no grid.
        queries: `"rows"`: flat indices of the query positions in `query_grid`; `"routing"`: their regions.
        query_grid: `"rows"` only: spatial size of the query positions.
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
_saved_fastpath = [True]  # torch.backends.mha fast-path setting before the first open session
_local = threading.local()
_count_lock = threading.Lock()


def _session() -> _Session | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def capturing() -> bool:
    """Whether a `capture_maps` block is open in this thread (cheap; call it in `forward`); False in a
    backward pass (checkpoint recomputation), a check skipped while torch.compile traces (untraceable)."""
    open_here = _active > 0 and _session() is not None
    return open_here and (torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1)


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
            (`"layer1.0.attn"`); modules outside it are named by their class name. Default: None.
        queries: Query points for attention rows. Each point is a tuple of fractions of the grid
            size (floats in [0, 1], `(0.5, 0.5)` = the centre) or of indices (ints). A point with
            fewer coordinates than the grid is centred on the leading axes (a (y, x) point on a
            (T, H, W) grid takes the middle frame); with more, the leading ones are dropped (a
            (y, x) point on a 1-D sequence uses x). Default: `DEFAULT_QUERIES`.
        token_grid: How a token sequence lies on a map, `(H, W)` row-major: a module that
            only sees `H*W` tokens (multi-head attention on a flattened map) then gets its query
            points placed on that map. Default: None (sequences are 1-D).

    Returns:
        A dict, filled while the block runs, from module name to the list of its
        `AttentionMap` records (one per call).

    While a block is open, torch's transformer fast path (``torch.backends.mha``) is switched off:
    its fused ``nn.TransformerEncoderLayer`` kernel would run the layer without calling the attention
    module's ``forward`` (so ``attnzoo.compat.MultiheadAttention`` in a torch encoder records its maps).
    Outputs are the same, except that an ``nn.TransformerEncoder`` in eval mode no longer zeroes the
    outputs at padded positions (it does so only on the fast path, through nested tensors).

    Example:
        ```python
        >>> import torch, attnzoo
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), attnzoo.create("se", channels=16))
        >>> with attnzoo.capture_maps(model) as maps:
        ...     y = model(torch.randn(1, 3, 12, 12))
        >>> [(m.kind, tuple(m.data.shape)) for m in maps["1"]]  # SE's 16 channel weights
        [('channel', (1, 16))]
        ```
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
        with _count_lock:  # blocks opening in two threads at once save and restore the flag once
            if _active == 0:  # torch's fused encoder kernels would skip the modules' forward: off
                _saved_fastpath[0] = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            _active += 1
        return self._session.maps

    def __exit__(self, *exc: object) -> None:
        global _active
        _local.stack.remove(self._session)
        with _count_lock:
            _active -= 1
            if _active == 0:
                torch.backends.mha.set_fastpath_enabled(_saved_fastpath[0])


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
    """Flat indices (row-major in `grid`) of this capture's query points, without repeats.

    Outside a capture block the default points are used.

    Shape:
        - Output: `(Q,)` int64.
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
    """Record one map for `module` in the open capture (nothing happens when none is open).

    Args:
        module: The attention module that computed the map (names it in the result).
        kind: One of `KINDS`.
        data: The map (shape per kind, see the module docstring); stored detached.
        **meta: `grid`, `queries`, `query_grid` fill the `AttentionMap` fields of
            the same names; anything else goes to `meta`.
    """
    session = _session() if capturing() else None
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

    Runs `attnzoo.functional.attend` with `need_weights=True` on the selected rows of
    `q` (no gradient), so the cost is Q x S, not L x S. Call it under `if capturing():`.

    Args:
        module: The attention module (names the record).
        q: Queries, `(B, h, L, d)` with L = prod(`grid`).
        k: Keys, `(B, h, S, d)`.
        grid: Spatial size of the query positions.
        key_grid: Spatial size of the key positions (S = its product). Default: `grid`.
        bias: Additive term as passed to `attend` (rows are selected here). Default: None.
        mask: Mask as passed to `attend` (True = may attend). Default: None.
        causal: As `attend`'s (applied to the original query positions). Default: False.
        scale: As `attend`'s. Default: `1 / sqrt(d)`.
        **meta: Stored in `AttentionMap.meta`.
    """
    if not capturing():
        return
    weights, idx = row_weights(q, k, grid=grid, bias=bias, mask=mask, causal=causal, scale=scale)
    key_grid = grid if key_grid is None else key_grid
    record(module, "rows", weights, grid=key_grid, queries=idx, query_grid=tuple(grid), **meta)


def row_weights(
    q: Tensor,
    k: Tensor,
    *,
    grid: Sequence[int],
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention weights of the capture's query points, for a module that records a map it
    derives from them (`record_rows` records them as they are).

    Args: as `record_rows`'s.

    Returns:
        `(weights, queries)`: weights `(B, h, Q, S)` (no gradient) and the query indices `(Q,)`.
    """
    from attnzoo.functional import attend

    grid = tuple(int(g) for g in grid)
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
            need_weights=True,
        )
    return weights, idx


def iter_maps(maps: dict[str, list[AttentionMap]]) -> Iterator[tuple[str, AttentionMap]]:
    """`(name, map)` for every record, in recording order per module."""
    for name, records in maps.items():
        for m in records:
            yield name, m
