"""Deformable attention (DAT): multi-head attention whose keys and values are sampled from the map at
learned, query-dependent offsets of a uniform reference grid.

Xia, Pan, Song, Li, Huang, "Vision Transformer with Deformable Attention", CVPR 2022,
https://arxiv.org/abs/2201.00520 (DAT++: https://arxiv.org/abs/2309.01430).

The state_dict keys are the official ones (LeapLabTHU/DAT `DAttentionBaseline`: `conv_offset`, `proj_q`,
`proj_k`, `proj_v`, `proj_out`, `rpe_table`). The coordinates follow the paper and the official DAT++
code: grid_sample with `align_corners=True`, reference points spaced from $-1$ to $+1$ (the first and
last pixel centres, so `stride=1` without offsets samples the pixels exactly), offsets bounded by
`offset_range_factor` / (grid side - 1), points clamped to the map when the factor is negative.
Deviations: the reference points start at $-1$ (DAT++ uses $(j + 0.5) / (H_k - 1)$, half a pixel off and
partly outside the map); `no_off=True` keeps the positional encoding (DAT++ drops it) and samples the
reference points (DAT++ average-pools by `stride`); the bias table is read in normalised coordinates,
so inputs of another size than `feat_size` read it resized (`fixed_pe` needs `feat_size`); the softmax
attention runs in `attnzoo.functional.attend`.

fightingcv's `DAttentionBaseline` (the first DAT release) differs in its coordinates, see
`attnzoo.mechanisms.deformable_fightingcv`; `attnzoo.convert.from_fightingcv` converts it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_float, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, query_indices, record
from attnzoo.mechanisms._deformable import (
    ChannelLayerNorm,
    bilinear_sample,
    grid_points,
    line,
    sample_bias,
    spread_rows,
)

__all__ = ["DeformableAttention"]

_PAPER = "Vision Transformer with Deformable Attention"


@register(
    "deformable",
    family="deformable",
    paper=_PAPER,
    year=2022,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "num_heads": 4, "groups": 2, "feat_size": (5, 6), "kernel_size": 3},
        inputs=((2, 8, 5, 6),),
        output=(2, 8, 5, 6),
    ),
    aliases=("dat", "deformable_attention"),
    uses_attend=True,
    for_input=lambda g: {"feat_size": tuple(g.spatial)} if len(g.spatial) == 2 else {},
)
class DeformableAttention(nn.Module):
    """DAT's deformable multi-head attention (Xia et al., 2022).

    The queries $q = W_q x$ of every pixel feed a small offset network $\\theta$ (per offset group: a
    depth-wise `kernel_size` convolution with `stride`, LayerNorm, GELU, a 1x1 convolution to 2
    channels) that moves each point $p$ of a uniform $H_k \\times W_k$ reference grid; the map is
    sampled bilinearly ($\\phi$) at the moved points, and every query attends to the sampled keys:

    $$
    \\Delta p = s \\tanh(\\theta(q)) / (H_k - 1), \\quad \\tilde x = \\phi(x;\\, p + \\Delta p), \\quad
    k = W_k \\tilde x,\\; v = W_v \\tilde x,
    $$

    $$
    z^{(m)} = \\mathrm{softmax}\\big(q^{(m)} k^{(m)\\top} / \\sqrt{d} + \\phi(\\hat B; R)\\big)\\, v^{(m)},
    \\qquad
    y = W_o \\big[z^{(1)}, \\dots, z^{(h)}\\big]
    $$

    with $s$ = `offset_range_factor` (a negative value leaves $\\Delta p$ unbounded and clamps the
    points to the map) and $\\hat B$ a learned table of relative position biases, read at the
    query-to-key displacements $R$. The `groups` offset groups each move their own points and sample
    their own `channels / groups` channels for their `num_heads / groups` heads.

    Time $O(B h N N_k d)$ and memory $O(B h N N_k)$ for $N = HW$ queries and $N_k = H_k W_k \\approx
    N / \\mathrm{stride}^2$ keys, plus $O(B C N k^2)$ for the offset network.

    Args:
        channels: Number of input channels C (split over the heads).
        num_heads: Number of heads h. Default: 8.
        groups: Offset groups g (divides `num_heads`). Default: 1.
        feat_size: Input size `(H, W)` (or one int) the position tables are made for. Default: 14.
        stride: Stride r of the reference grid (and of the offset convolution). Default: 1.
        kernel_size: Kernel of the offset network's depth-wise convolution. Default: 5.
        offset_range_factor: $s$, the largest offset in units of half a grid step; negative for
            unbounded offsets. Default: 2.0.
        use_pe: Add a positional term. Default: True.
        dwc_pe: The positional term is a depth-wise 3x3 convolution of the queries added to the output
            (instead of the relative bias). Default: False.
        fixed_pe: The positional term is a free bias `(h, H*W, H_k*W_k)` (needs inputs of `feat_size`).
            Default: False.
        no_off: No offsets: the keys are sampled at the reference points. Default: False.
        attn_drop: Dropout on the attention weights. Default: 0.0.
        proj_drop: Dropout after the output projection. Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): `(B, h, H*W, H_k*W_k)`, $H_k = \\lfloor (H + 2 \\lfloor k/2
          \\rfloor - k) / r \\rfloor + 1$.

    Example:
        ```python
        >>> attn = DeformableAttention(64, num_heads=4, groups=2, feat_size=(8, 8), stride=2)
        >>> y, w = attn(torch.randn(2, 64, 8, 8), need_weights=True)
        >>> y.shape, w.shape
        (torch.Size([2, 64, 8, 8]), torch.Size([2, 4, 64, 16]))

        ```
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        groups: int = 1,
        feat_size: int | tuple[int, int] = 14,
        stride: int = 1,
        kernel_size: int = 5,
        offset_range_factor: float = 2.0,
        use_pe: bool = True,
        dwc_pe: bool = False,
        fixed_pe: bool = False,
        no_off: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        check_int(num_heads, "num_heads", who)
        check_divisible(channels, num_heads, "channels", "num_heads", who)
        check_int(groups, "groups", who)
        check_divisible(num_heads, groups, "num_heads", "groups", who)
        self.feat_size = int_pair(feat_size, "feat_size", who)
        self.stride = check_int(stride, "stride", who)
        self.kernel_size = check_int(kernel_size, "kernel_size", who)
        factor = check_float(offset_range_factor, "offset_range_factor", who)
        if not math.isfinite(factor):
            raise ValueError(f"{who}: offset_range_factor must be finite, got {offset_range_factor}")
        if (dwc_pe or fixed_pe) and not use_pe:
            raise ValueError(f"{who}: dwc_pe=True and fixed_pe=True need use_pe=True, got use_pe=False")
        if dwc_pe and fixed_pe:
            raise ValueError(f"{who}: dwc_pe and fixed_pe are two kinds of position term: set one, got both")
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0)
        self.channels, self.num_heads, self.groups = channels, num_heads, groups
        self.head_dim = channels // num_heads
        self.scale = self.head_dim**-0.5
        self.offset_range_factor = factor
        self.use_pe, self.dwc_pe, self.fixed_pe, self.no_off = use_pe, dwc_pe, fixed_pe, no_off
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        cg, k = channels // groups, kernel_size
        self.conv_offset = None if no_off else nn.Sequential(
            nn.Conv2d(cg, cg, k, stride, k // 2, groups=cg, **factory),
            ChannelLayerNorm(cg, factory),
            nn.GELU(),
            nn.Conv2d(cg, 2, 1, bias=False, **factory),
        )
        self.proj_q = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_k = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_v = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_out = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_table: nn.Module | nn.Parameter | None = None
        fh, fw = self.feat_size
        if use_pe and dwc_pe:
            self.rpe_table = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, **factory)
        elif use_pe and fixed_pe:
            hk, wk = self.key_size(fh, fw)
            self.rpe_table = nn.Parameter(torch.empty(num_heads, fh * fw, hk * wk, **factory))
        elif use_pe:
            self.rpe_table = nn.Parameter(torch.empty(num_heads, 2 * fh - 1, 2 * fw - 1, **factory))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_heads={self.num_heads}, groups={self.groups}, "
                f"feat_size={self.feat_size}, kernel_size={self.kernel_size}, stride={self.stride}")

    def reset_parameters(self) -> None:
        """The official initialisation: torch's for the convolutions, a truncated normal of std 0.01
        for a bias table."""
        if isinstance(self.rpe_table, nn.Parameter):
            nn.init.trunc_normal_(self.rpe_table, std=0.01)

    def key_size(self, height: int, width: int) -> tuple[int, int]:
        """`(H_k, W_k)`: the reference grid of an `H x W` input (the offset convolution's output)."""
        k, r = self.kernel_size, self.stride
        return (height + 2 * (k // 2) - k) // r + 1, (width + 2 * (k // 2) - k) // r + 1

    # The coordinates, overridden by the fightingcv-compatible subclass.

    def _reference(self, hk: int, wk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Reference points `(H_k, W_k, 2)` as `(x, y)`: evenly spaced from -1 to +1."""
        return grid_points(line(hk, dtype, device), line(wk, dtype, device))

    def _query_points(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Query points `(H*W, 2)`: the pixel centres."""
        return grid_points(line(height, dtype, device), line(width, dtype, device)).reshape(height * width, 2)

    def _move(self, reference: Tensor, offset: Tensor) -> Tensor:
        """Reference points `(H_k, W_k, 2)` and raw offsets `(B*g, H_k, W_k, 2)` -> sampling points."""
        hk, wk = reference.shape[:2]
        factor = self.offset_range_factor
        if factor >= 0:
            bound = offset.new_tensor([factor / max(wk - 1, 1), factor / max(hk - 1, 1)])
            return reference + offset.tanh() * bound
        return (reference + offset).clamp(-1.0, 1.0)

    def _check_size(self, height: int, width: int) -> None:
        if self.use_pe and self.fixed_pe and (height, width) != self.feat_size:
            raise ValueError(
                f"{type(self).__name__} with fixed_pe=True expects x of shape (B, {self.channels}, "
                f"{self.feat_size[0]}, {self.feat_size[1]}) (feat_size), got H={height}, W={width}"
            )

    def points(self, q: Tensor, dtype: torch.dtype) -> Tensor:
        """Sampling points `(B*g, H_k, W_k, 2)` (`(x, y)`, grid_sample's coordinates, in `dtype`) of
        queries `(B, C, H, W)`."""
        batch, _, height, width = q.shape
        g = self.groups
        if self.conv_offset is None:
            hk, wk = self.key_size(height, width)
            return self._reference(hk, wk, dtype, q.device).expand(batch * g, -1, -1, -1)
        offset = self.conv_offset(q.reshape(batch * g, self.channels // g, height, width))  # (B*g, 2, Hk, Wk)
        hk, wk = offset.shape[-2:]
        offset = offset.to(dtype).permute(0, 2, 3, 1).flip(-1)  # (B*g, Hk, Wk, 2): (dy, dx) -> (dx, dy)
        return self._move(self._reference(hk, wk, dtype, q.device), offset)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Deformable attention over `x` `(B, C, H, W)`; with `need_weights`, also return the weights
        `(B, h, H*W, H_k*W_k)`."""
        who = type(self).__name__
        sizes = check_shape(x, who, "B C H W", C=self.channels)
        batch, height, width = sizes["B"], sizes["H"], sizes["W"]
        self._check_size(height, width)
        g, heads, d, n = self.groups, self.num_heads, self.head_dim, height * width
        q_map = self.proj_q(x)  # (B, C, H, W)
        pos = self.points(q_map, x.dtype)  # (B*g, Hk, Wk, 2)
        hk, wk = pos.shape[1:3]
        per_group = x.reshape(batch * g, self.channels // g, height, width)
        sampled = bilinear_sample(per_group, pos)  # (B*g, C/g, Hk, Wk)
        sampled = sampled.reshape(batch, self.channels, hk, wk)  # (B, C, Hk, Wk)
        ns = hk * wk
        q = q_map.reshape(batch, heads, d, n).transpose(-1, -2)  # (B, h, N, d)
        k = self.proj_k(sampled).reshape(batch, heads, d, ns).transpose(-1, -2)  # (B, h, Ns, d)
        v = self.proj_v(sampled).reshape(batch, heads, d, ns).transpose(-1, -2)  # (B, h, Ns, d)
        pos = pos.reshape(batch * g, ns, 2)  # (B*g, Ns, 2)
        bias = self._bias(pos, batch, height, width, q)
        p = self.attn_drop.p if self.training else 0.0
        result = attend(q, k, v, bias=bias, scale=self.scale, dropout_p=p, need_weights=need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():
            self._record(q, k, bias, weights, pos, (height, width))
        out = out.transpose(-1, -2).reshape(batch, self.channels, height, width)  # (B, h, d, N) -> map
        if isinstance(self.rpe_table, nn.Conv2d):
            out = out + self.rpe_table(q_map)
        y = self.proj_drop(self.proj_out(out))
        return (y, weights) if weights is not None else y

    def _bias(self, pos: Tensor, batch: int, height: int, width: int, q: Tensor) -> Tensor | None:
        """The relative or fixed position bias `(B or 1, h, N, Ns)`, or None."""
        table = self.rpe_table  # a plain tensor under torch.func.functional_call: decide by the flags
        if not self.use_pe or self.dwc_pe or not isinstance(table, Tensor):
            return None
        if self.fixed_pe:
            return table[None]  # (1, h, N, Ns)
        queries = self._query_points(height, width, pos.dtype, pos.device)  # (N, 2)
        return sample_bias(table, queries, pos, batch, self.groups)

    def _record(
        self, q: Tensor, k: Tensor, bias: Tensor | None, weights: Tensor | None, pos: Tensor,
        size: tuple[int, int],
    ) -> None:
        """Rows over the input map: each sampled key's weight shared among its bilinear pixels."""
        with torch.no_grad():
            idx = query_indices(size, q.device)
            if weights is None:
                rows_bias = None if bias is None else bias.index_select(-2, idx)
                weights = attend(q.index_select(-2, idx), k, k[..., :1], bias=rows_bias, scale=self.scale,
                                 need_weights=True)[1]  # (B, h, Q, Ns)
            else:
                weights = weights.index_select(-2, idx)  # (B, h, Q, Ns)
            rows = spread_rows(weights, pos.to(weights.dtype), size, self.groups)  # (B, h, Q, H*W)
        record(self, "rows", rows, grid=size, queries=idx, query_grid=size,
               points=pos.reshape(q.shape[0], self.groups, -1, 2),
               note="each sampled key's weight spread over its bilinear pixels; points off the map left out")
