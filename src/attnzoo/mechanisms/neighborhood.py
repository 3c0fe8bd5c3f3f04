"""Neighbourhood attention, "Neighborhood Attention Transformer" (Hassani et al., 2022, arXiv:2204.07143),
with the dilation of "Dilated Neighborhood Attention Transformer" (Hassani and Shi, 2022,
arXiv:2209.15001), in 1-D, 2-D and 3-D.

Every query attends to its `kernel_size**N` nearest keys. The border rule is NATTEN's (SHI-Labs/NATTEN),
not zero padding: near a border the window shifts inward, so every query still sees exactly
`kernel_size**N` keys; with dilation the neighbourhood is taken among the positions of the query's
dilation group (the same residue modulo `dilation`); with `causal` a query sees the keys at or before
it along that axis, inside the same kind of window. The index rules are in
`attnzoo.kernels.neighbourhood_nd`. Parameters are named as NATTEN's legacy modules
(`NeighborhoodAttention1D/2D/3D`): `qkv`, `rpb` (a learnable table of `(2k - 1)**N` entries per head),
`proj`, so their state_dicts load here.

Deviations from NATTEN: no fused kernel (keys and values are gathered by index, a block of queries at a
time, memory $O(N (d + K))$ per head); `kernel_size`
may be even (the window then reaches `k // 2` back and `k // 2 - 1` forward) or 1; the bias table may be
combined with `causal` (NATTEN's legacy modules refuse the pair). The causal flag is called `causal` as
everywhere in attnzoo (NATTEN's `is_causal`).

Shape letters: B batch, N = prod(spatial) tokens, C channels (`dim`), h heads, d = C / h head width,
k kernel size per axis, K = prod(k) keys per query.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_float, check_int, check_shape
from attnzoo._geometry import grid2d
from attnzoo._registry import Example, FreeSize, register
from attnzoo.kernels.neighbourhood_nd import neighbourhood_attend, neighbourhood_index
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d"]

_AXES = {1: "L", 2: "H W", 3: "T H W"}


def _per_axis(value: object, dims: int, name: str, who: str, *, kind: type) -> tuple[Any, ...]:
    """An int (or bool) for every axis, or a tuple of `dims` of them."""
    values = value if isinstance(value, tuple) else (value,) * dims
    if len(values) != dims:
        raise ValueError(f"{who}: {name} must be one value or a tuple of {dims}, got {value!r}")
    for v in values:
        if kind is bool and not isinstance(v, bool):
            raise TypeError(f"{who}: {name} must be a bool or a tuple of {dims} bools, got {value!r}")
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{who}: {name} must be an int or a tuple of {dims} ints, got {value!r}")
            check_int(v, name, who)
    return values


class _NeighbourhoodAttention(nn.Module):
    """Shared body of the 1-, 2- and 3-D classes (see their docstrings)."""

    spatial_dims = 0

    def _setup(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | tuple[int, ...],
        dilation: int | tuple[int, ...],
        causal: bool | tuple[bool, ...],
        rel_pos_bias: bool,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_drop: float,
        proj_drop: float,
        factory: dict[str, Any],
    ) -> None:
        who, n = type(self).__name__, self.spatial_dims
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads != 0:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        self.head_dim = dim // num_heads
        self.kernel_size: tuple[int, ...] = _per_axis(kernel_size, n, "kernel_size", who, kind=int)
        self.dilation: tuple[int, ...] = _per_axis(dilation, n, "dilation", who, kind=int)
        self.causal: tuple[bool, ...] = _per_axis(causal, n, "causal", who, kind=bool)
        scale = self.head_dim**-0.5 if qk_scale is None else check_float(qk_scale, "qk_scale", who)
        if not math.isfinite(scale):
            raise ValueError(f"{who}: qk_scale must be finite, got {qk_scale}")
        self.scale = scale
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        if rel_pos_bias:
            table = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb: nn.Parameter | None = nn.Parameter(torch.empty(table, **factory))
            if self.rpb.device.type != "meta":
                nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def reset_parameters(self) -> None:
        """NATTEN's `rpb` initialisation: truncated normal, std 0.02 (the linear maps reset themselves)."""
        if self.rpb is not None:
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, causal={self.causal}, rel_pos_bias={self.rpb is not None}"
        )

    def _attend(self, x: Tensor, need_weights: bool) -> Tensor | tuple[Tensor, Tensor]:
        who, n = type(self).__name__, self.spatial_dims
        dims = check_shape(x, who, f"B {_AXES[n]} C", "x", C=self.dim)
        sizes = tuple(x.shape[1:-1])
        reach = tuple(k * d for k, d in zip(self.kernel_size, self.dilation, strict=True))
        if any(s < r for s, r in zip(sizes, reach, strict=True)):
            raise ValueError(
                f"{who} expects x with every spatial size >= kernel_size * dilation = {reach} "
                f"(NATTEN's rule), got spatial size {sizes} in shape {tuple(x.shape)}"
            )
        batch, tokens = dims["B"], math.prod(sizes)
        keys, rel, valid = neighbourhood_index(sizes, self.kernel_size, self.dilation, self.causal, x.device)
        qkv = self.qkv(x.reshape(batch, tokens, self.dim))  # (B, N, 3C)
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, h, d)
        # Token-major views (the kernel's layout): at B = 1 the kernel then copies nothing.
        q = (qkv[:, :, 0] * self.scale).transpose(1, 2)  # (B, N, h, d) -> (B, h, N, d)
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)  # (B, h, N, d) each
        bias = None
        if self.rpb is not None:
            bias = self.rpb.flatten(1)[:, rel]  # (h, (2k-1)^n) -> (h, N, K)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out, weights = neighbourhood_attend(q, k, v, keys, bias=bias, valid=valid, dropout_p=dropout_p)
        if capturing():
            self._record(weights, keys, sizes)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, h, N, d) -> (B, N, C) -> (B, *spatial, C)
        out = self.proj_drop(self.proj(out))
        return (out, weights) if need_weights else out

    def _record(self, weights: Tensor, keys: Tensor, sizes: tuple[int, ...]) -> None:
        """Rows of the capture's query points over the whole map (zero outside the neighbourhood)."""
        idx = query_indices(sizes, weights.device)
        with torch.no_grad():
            picked = weights.index_select(2, idx)  # (B, h, Q, K)
            b, h, q, kk = picked.shape
            rows = picked.new_zeros(b, h, q, math.prod(sizes))  # (B, h, Q, N)
            rows.scatter_add_(3, keys[idx][None, None].expand(b, h, q, kk), picked)
        record(self, "rows", rows, grid=sizes, queries=idx, query_grid=sizes, kernel=self.kernel_size)


def _fit(sizes: tuple[int, ...]) -> dict[str, Any]:
    """The default kernel 7 where the input allows, a smaller one on small inputs."""
    return {"kernel_size": max(1, min(7, *sizes))}




def _init(
    self: _NeighbourhoodAttention, dim: int, num_heads: int, kernel_size: int | tuple[int, ...],
    dilation: int | tuple[int, ...], causal: bool | tuple[bool, ...], rel_pos_bias: bool, qkv_bias: bool,
    qk_scale: float | None, attn_drop: float, proj_drop: float, device: Any, dtype: Any,
) -> None:
    nn.Module.__init__(self)
    self._setup(dim, num_heads, kernel_size, dilation, causal, rel_pos_bias, qkv_bias, qk_scale, attn_drop,
                proj_drop, {"device": device, "dtype": dtype})


@register(
    "neighborhood_1d",
    family="local",
    paper="Neighborhood Attention Transformer",
    year=2022,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "kernel_size": 3, "dilation": 2},
        inputs=((2, 9, 8),),
        output=(2, 9, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1, low=6),),
    ),
    aliases=("neighbourhood_1d", "na1d", "NeighborhoodAttention1D"),
    for_input=lambda geo: _fit((geo.tokens,)),
)
class NeighborhoodAttention1d(_NeighbourhoodAttention):
    r"""1-D neighbourhood attention on token sequences `(B, L, C)`.

    $$
    \mathrm{NA}(x)_i = \mathrm{softmax}_{j \in \rho(i)}\big(s\, q_i^\top k_j + B_{h}(j - i)\big)\, v_j
    $$

    with $\rho(i)$ the k keys of query i's window (NATTEN's rule, see the module docstring), $s$ the
    scale and $B_h$ the relative position bias of head h. Time $O(B L k C)$, memory $O(B L (C + h k))$:
    the keys and values of each window are gathered a block of queries at a time, there is no L x L
    matrix.

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h; must divide `dim`. Default: 8.
        kernel_size: Keys per axis k (an int, or one per axis). Default: 7.
        dilation: Spacing of the neighbours per axis (an int, or one per axis). Default: 1.
        causal: A query attends only to keys at or before it along the axis (a bool, or one per
            axis). Default: False.
        rel_pos_bias: Add a learnable relative position bias, `(2k - 1)**N` entries per head
            (`rpb`). Default: True.
        qkv_bias: Give the query/key/value projection a bias. Default: True.
        qk_scale: Scale of the logits. Default: None ($1/\sqrt{d}$).
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, L, C)` with `L >= kernel_size * dilation`.
        - Output: `(B, L, C)`; with `need_weights=True` also the weights `(B, h, L, k)`, key j of
          query i being the j-th key of its window in order (zero outside a causal window).

    Example:
        ```python
        >>> na = NeighborhoodAttention1d(32, num_heads=4, kernel_size=5, dilation=2)
        >>> out, weights = na(torch.randn(2, 20, 32), need_weights=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 20, 32), (2, 4, 20, 5))

        ```
    """

    spatial_dims = 1

    def __init__(
        self, dim: int, num_heads: int = 8, kernel_size: int | tuple[int, ...] = 7,
        dilation: int | tuple[int, ...] = 1, causal: bool | tuple[bool, ...] = False,
        rel_pos_bias: bool = True, qkv_bias: bool = True, qk_scale: float | None = None,
        attn_drop: float = 0.0, proj_drop: float = 0.0, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        _init(self, dim, num_heads, kernel_size, dilation, causal, rel_pos_bias, qkv_bias, qk_scale,
              attn_drop, proj_drop, device, dtype)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within each token's neighbourhood; `(out, weights)` with `need_weights`."""
        return self._attend(x, need_weights)


@register(
    "neighborhood_2d",
    family="local",
    paper="Neighborhood Attention Transformer",
    year=2022,
    layout="NHWC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "kernel_size": 3},
        inputs=((2, 5, 6, 8),),
        output=(2, 5, 6, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1, low=3), FreeSize(((0, 2),), 2, low=3)),
    ),
    aliases=("neighbourhood_2d", "na2d", "NeighborhoodAttention2D", "nat", "dinat"),
    for_input=lambda geo: _fit(grid2d(geo)),
)
class NeighborhoodAttention2d(_NeighbourhoodAttention):
    r"""2-D neighbourhood attention (NAT; DiNAT with `dilation > 1`) on channels-last maps `(B, H, W, C)`.

    $$
    \mathrm{NA}(x)_{p} = \mathrm{softmax}_{r \in \rho(p)}\big(s\, q_p^\top k_r + B_{h}(r - p)\big)\, v_r
    $$

    with $\rho(p)$ the $k \times k$ keys of pixel p's window (per axis NATTEN's rule, see the module
    docstring), $s$ the scale and $B_h$ the relative position bias of head h, a $(2k-1) \times (2k-1)$
    table. Time $O(B\,HW\,k^2 C)$, memory $O(B\,HW\,(C + h k^2))$; no HW x HW matrix.

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h; must divide `dim`. Default: 8.
        kernel_size: Keys per axis k (an int, or one per axis). Default: 7.
        dilation: Spacing of the neighbours per axis (an int, or one per axis). Default: 1.
        causal: A query attends only to keys at or before it along the axis (a bool, or one per
            axis). Default: False.
        rel_pos_bias: Add a learnable relative position bias, `(2k - 1)**N` entries per head
            (`rpb`). Default: True.
        qkv_bias: Give the query/key/value projection a bias. Default: True.
        qk_scale: Scale of the logits. Default: None ($1/\sqrt{d}$).
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, H, W, C)` with `H, W >= kernel_size * dilation`.
        - Output: `(B, H, W, C)`; with `need_weights=True` also `(B, h, H*W, k*k)` weights, the keys
          of each window row-major.

    Example:
        ```python
        >>> na = NeighborhoodAttention2d(32, num_heads=4, kernel_size=3, dilation=2)
        >>> out, weights = na(torch.randn(2, 9, 7, 32), need_weights=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 9, 7, 32), (2, 4, 63, 9))

        ```
    """

    spatial_dims = 2

    def __init__(
        self, dim: int, num_heads: int = 8, kernel_size: int | tuple[int, ...] = 7,
        dilation: int | tuple[int, ...] = 1, causal: bool | tuple[bool, ...] = False,
        rel_pos_bias: bool = True, qkv_bias: bool = True, qk_scale: float | None = None,
        attn_drop: float = 0.0, proj_drop: float = 0.0, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        _init(self, dim, num_heads, kernel_size, dilation, causal, rel_pos_bias, qkv_bias, qk_scale,
              attn_drop, proj_drop, device, dtype)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within each pixel's neighbourhood; `(out, weights)` with `need_weights`."""
        return self._attend(x, need_weights)


@register(
    "neighborhood_3d",
    family="local",
    paper="Neighborhood Attention Transformer",
    year=2022,
    layout="NTHWC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "kernel_size": 3},
        inputs=((2, 3, 4, 5, 8),),
        output=(2, 3, 4, 5, 8),
        channel_dim=-1,
        free_sizes=tuple(FreeSize(((0, i),), i, low=3) for i in (1, 2, 3)),
    ),
    aliases=("neighbourhood_3d", "na3d", "NeighborhoodAttention3D"),
    for_input=lambda geo: _fit(geo.spatial),
)
class NeighborhoodAttention3d(_NeighbourhoodAttention):
    r"""3-D neighbourhood attention on channels-last clips `(B, T, H, W, C)`.

    $$
    \mathrm{NA}(x)_{p} = \mathrm{softmax}_{r \in \rho(p)}\big(s\, q_p^\top k_r + B_{h}(r - p)\big)\, v_r
    $$

    with $\rho(p)$ the $k^3$ keys of voxel p's window (per axis NATTEN's rule, see the module
    docstring); `causal=(True, False, False)` makes it causal in time only. Time $O(B\,THW\,k^3 C)$,
    memory $O(B\,THW\,(C + h k^3))$; no THW x THW matrix.

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h; must divide `dim`. Default: 8.
        kernel_size: Keys per axis k (an int, or one per axis). Default: 7.
        dilation: Spacing of the neighbours per axis (an int, or one per axis). Default: 1.
        causal: A query attends only to keys at or before it along the axis (a bool, or one per
            axis). Default: False.
        rel_pos_bias: Add a learnable relative position bias, `(2k - 1)**N` entries per head
            (`rpb`). Default: True.
        qkv_bias: Give the query/key/value projection a bias. Default: True.
        qk_scale: Scale of the logits. Default: None ($1/\sqrt{d}$).
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, T, H, W, C)` with `T, H, W >= kernel_size * dilation`.
        - Output: `(B, T, H, W, C)`; with `need_weights=True` also `(B, h, T*H*W, k**3)` weights.

    Example:
        ```python
        >>> na = NeighborhoodAttention3d(16, num_heads=2, kernel_size=3, causal=(True, False, False))
        >>> out, weights = na(torch.randn(1, 4, 5, 6, 16), need_weights=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((1, 4, 5, 6, 16), (1, 2, 120, 27))

        ```
    """

    spatial_dims = 3

    def __init__(
        self, dim: int, num_heads: int = 8, kernel_size: int | tuple[int, ...] = 7,
        dilation: int | tuple[int, ...] = 1, causal: bool | tuple[bool, ...] = False,
        rel_pos_bias: bool = True, qkv_bias: bool = True, qk_scale: float | None = None,
        attn_drop: float = 0.0, proj_drop: float = 0.0, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        _init(self, dim, num_heads, kernel_size, dilation, causal, rel_pos_bias, qkv_bias, qk_scale,
              attn_drop, proj_drop, device, dtype)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within each voxel's neighbourhood; `(out, weights)` with `need_weights`."""
        return self._attend(x, need_weights)

