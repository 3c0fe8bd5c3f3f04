"""Halo attention (HaloNet): blocked local self-attention, each block of queries attending to its
block grown by a halo, with 2-D relative position logits.

Vaswani, Ramachandran, Srinivas, Parmar, Hechtman, Shlens, "Scaling Local Self-Attention for
Parameter Efficient Visual Backbones", CVPR 2021, https://arxiv.org/abs/2103.12731.

The numbers and state_dict keys are timm's ``HaloAttn`` (``timm.layers.halo_attn``,
``create_attn("halo")``); ``attnzoo.convert.from_timm`` converts it exactly. As timm (and the
paper, which found masks unnecessary) the zero padding around the map takes part in the softmax
as zero keys and values. timm's stride 2 (kept): with ``block_size`` even the queries are
subsampled by a strided 1x1 convolution and keep the relative offsets of the subsampled grid
(timm marks this FIXME); otherwise (or ``avg_down=True``) the output is average-pooled by 2.
Deviations: the relative logits are gathered by index (timm pads and reshapes, the same numbers);
the softmax runs in ``attnzoo.functional.attend``; H and W that are no multiple of
``block_size``, and ``stride`` other than 1 or 2, raise ``ValueError`` (timm asserts).
``mask_padding=True`` leaves the padding out of the softmax instead (border queries attend to the
real keys only), which is what fightingcv's mask means to do.

fightingcv's ``HaloAttention`` converts (``attnzoo.convert.from_fightingcv``) to
``attnzoo.mechanisms.halo_fightingcv.FightingcvHaloAttention``, this class with fightingcv's numbers:
its padding mask is inverted (it overwrites the logits of the real keys and keeps the zero padding),
so interior blocks average their window uniformly and border blocks return only the output
projection's bias; it adds that projection (``to_out``, with bias), its values are ``dim_head`` wide
per head and its relative logits use the scaled queries (``scale_pos_embed=True``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._registry import Example, FreeSize, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, query_indices, record
from attnzoo.mechanisms._relpos import check_stride, qk_head_width
from attnzoo.mechanisms.bottleneck import RelPosTables

__all__ = ["HaloAttention"]

_PAPER = "Scaling Local Self-Attention for Parameter Efficient Visual Backbones"


def _block_for(spatial: tuple[int, ...]) -> dict[str, int]:
    """`block_size` for an input: the largest divisor of both H and W up to timm's default 8."""
    common = math.gcd(*spatial)
    return {"block_size": max(b for b in range(1, 9) if common % b == 0)}


@register(
    "halo",
    family="local",
    paper=_PAPER,
    year=2021,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "num_heads": 2, "block_size": 2, "halo_size": 1},
        inputs=((2, 8, 4, 6),),
        output=(2, 8, 4, 6),
        # H and W must be multiples of block_size
        free_sizes=(FreeSize(((0, 2),), 2, step=2, low=2), FreeSize(((0, 3),), 3, step=2, low=2)),
    ),
    aliases=("halo_attn", "halonet"),
    uses_attend=True,
    for_input=lambda g: _block_for(tuple(g.spatial)),
)
class HaloAttention(nn.Module):
    """HaloNet's blocked local self-attention (Vaswani et al., 2021).

    The map is cut into $b \\times b$ blocks; the queries of a block attend to the keys and values of
    the $w \\times w$ window around it, $w = b + 2\\,\\mathrm{halo}$ (zero-padded at the border). For
    query $i$ and window key $j$ of one head,

    $$
    \\ell_{ij} = s\\, q_i^\\top k_j + q_i^\\top\\big(r^h_{y_j - y_i} + r^w_{x_j - x_i}\\big),
    \\qquad y_i = \\sum_{j \\in \\mathcal{W}(i)} \\mathrm{softmax}_j(\\ell_{ij})\\, v_j
    $$

    with $s = d^{-1/2}$ (`scale_pos_embed=True` scales the relative term too); heads are
    concatenated. The window's keys beyond the map are zero keys and values (the paper's and timm's
    zero padding); `mask_padding=True` leaves them out of the softmax. Time $O(B h N w^2 d)$ and
    memory $O(B h N w^2)$ for $N = HW$, i.e. $O(N (b + 2\\,\\mathrm{halo})^2)$: never an
    $N \\times N$ map. The softmax attention runs in
    `attnzoo.functional.attend` per block, with the relative logits as its bias.

    Args:
        channels: Number of input channels C.
        out_channels: Output width (`num_heads` times the value head width). Default: `channels`.
        stride: 1, or 2: strided queries when `block_size` is even, else (or with `avg_down`) an
            average pool of the output. Default: 1.
        num_heads: Number of heads h. Default: 8.
        head_dim: Query/key width d per head. Default: None, timm's
            `make_divisible(out_channels * qk_ratio, 8) // num_heads`.
        block_size: Side b of the query blocks; H and W must be multiples of it. Default: 8.
        halo_size: Rows and columns each window adds around its block. Default: 3.
        qk_ratio: Query/key to output width ratio used when `head_dim` is None. Default: 1.0.
        qkv_bias: Bias in the q and k, v convolutions. Default: False.
        avg_down: With `stride=2`, always average-pool the output instead of striding the queries.
            Default: False.
        scale_pos_embed: Scale the relative logits by $s$ as well. Default: False.
        mask_padding: Leave the zero padding beyond the map out of the softmax (border queries
            attend only to real keys; what fightingcv's mask means to do). Default: False, the
            paper's and timm's zero keys and values.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, H and W multiples of `block_size`.
        - Output: `(B, out_channels, H / stride, W / stride)`.
        - Weights (`need_weights=True`): `(B, h, n_blocks, q^2, w^2)`, blocks row-major, q the
          query block side (`block_size`, or `block_size / 2` with strided queries).

    Example:
        ```python
        >>> attn = HaloAttention(64, block_size=4, halo_size=1)
        >>> attn(torch.randn(2, 64, 8, 12)).shape
        torch.Size([2, 64, 8, 12])

        ```
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        num_heads: int = 8,
        head_dim: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        mask_padding: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        out = channels if out_channels is None else check_int(out_channels, "out_channels", who)
        check_int(num_heads, "num_heads", who)
        check_divisible(out, num_heads, "out_channels", "num_heads", who)
        self.stride = check_stride(stride, who)
        self.block_size = check_int(block_size, "block_size", who)
        self.halo_size = check_int(halo_size, "halo_size", who, minimum=0)
        self.channels, self.out_channels, self.num_heads = channels, out, num_heads
        self.head_dim = qk_head_width(out, num_heads, head_dim, qk_ratio, who)
        self.v_head_dim = out // num_heads
        self.scale = self.head_dim**-0.5
        self.scale_pos_embed = scale_pos_embed
        self.mask_padding = mask_padding
        self.win_size = block_size + 2 * halo_size
        pool = self.stride == 2 and (avg_down or block_size % 2 != 0)
        self.block_stride = 2 if self.stride == 2 and not pool else 1
        self.avg_down = avg_down
        self.query_block = block_size // self.block_stride
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        qk = num_heads * self.head_dim
        self.q = nn.Conv2d(channels, qk, 1, stride=self.block_stride, bias=qkv_bias, **factory)
        self.kv = nn.Conv2d(channels, qk + out, 1, bias=qkv_bias, **factory)
        self.pos_embed = RelPosTables((self.win_size, self.win_size), self.head_dim, self.scale, factory)
        self.pool = pool
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, out_channels={self.out_channels}, num_heads={self.num_heads}, "
                f"block_size={self.block_size}, halo_size={self.halo_size}, stride={self.stride}")

    def reset_parameters(self) -> None:
        """timm's initialisation: fan-in truncated normals for the projections, std $s$ for the tables."""
        std = self.q.weight.shape[1] ** -0.5
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)
        self.pos_embed.reset_parameters()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within the haloed blocks of `x` `(B, C, H, W)`; with `need_weights`, also return the
        weights `(B, h, n_blocks, q^2, w^2)`."""
        who = type(self).__name__
        sizes = check_shape(x, who, "B C H W", C=self.channels)
        batch, height, width = sizes["B"], sizes["H"], sizes["W"]
        check_divisible(height, self.block_size, "H", "block_size", who)
        check_divisible(width, self.block_size, "W", "block_size", who)
        heads, d, e = self.num_heads, self.head_dim, self.v_head_dim
        bh, bw = height // self.block_size, width // self.block_size
        nb, qb, win = bh * bw, self.query_block, self.win_size
        q = self.q(x).reshape(batch, heads, d, bh, qb, bw, qb)  # (B, h, d, bh, qb, bw, qb)
        q = q.permute(0, 1, 3, 5, 4, 6, 2)  # (B, h, bh, bw, qb, qb, d)
        k, v = self._key_values(x)  # (B, h*nb, S, d), (B, h*nb, S, e)
        bias = self.pos_embed(q, (win, win)).reshape(batch, heads * nb, qb * qb, win * win)  # (B, h*nb, L, S)
        if self.scale_pos_embed:
            bias = bias * self.scale
        q = q.reshape(batch, heads * nb, qb * qb, d)  # (B, h*nb, L, d)
        result = self._attend(q, k, v, bias, (height, width), need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():
            self._record(q, k, bias, weights, (height, width))
        out = out.reshape(batch, heads, bh, bw, qb, qb, e)  # (B, h, bh, bw, qb, qb, e)
        y = out.permute(0, 1, 6, 2, 4, 3, 5)  # (B, h, e, bh, qb, bw, qb)
        y = y.reshape(batch, self.out_channels, bh * qb, bw * qb)  # (B, h*e, H / stride, W / stride)
        if self.pool:
            y = F.avg_pool2d(y, 2)
        if weights is not None:
            return y, weights.reshape(batch, heads, nb, qb * qb, win * win)  # (B, h, nb, L, S)
        return y

    def _key_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys `(B, h*nb, w^2, d)` and values `(B, h*nb, w^2, e)` of the haloed windows. The
        `(d + e)`-wide window copy is freed on return, before the attention (the split copies backward
        faster than slicing the padded map or the window view)."""
        halo, win, block, heads = self.halo_size, self.win_size, self.block_size, self.num_heads
        d, e = self.head_dim, self.v_head_dim
        kv = F.pad(self.kv(x), [halo, halo, halo, halo])  # (B, h*(d+e), H + 2 halo, W + 2 halo)
        kv = kv.unfold(2, win, block).unfold(3, win, block)  # (B, h*(d+e), bh, bw, w, w)
        batch, nb = kv.shape[0], kv.shape[2] * kv.shape[3]
        kv = kv.reshape(batch, heads, d + e, nb, win * win).permute(0, 1, 3, 4, 2)  # (B, h, nb, S, d+e)
        k, v = kv.split([d, e], dim=-1)  # (B, h, nb, S, d), (B, h, nb, S, e)
        return k.reshape(batch, heads * nb, win * win, d), v.reshape(batch, heads * nb, win * win, e)

    def _real_keys(self, height: int, width: int, device: torch.device) -> Tensor:
        """Which window keys lie on the map (not on the zero padding), `(n_blocks, w^2)` bool."""
        block, win = self.block_size, self.win_size
        offsets = torch.arange(win, device=device) - self.halo_size
        rows = torch.arange(0, height, block, device=device)[:, None] + offsets  # (bh, w)
        cols = torch.arange(0, width, block, device=device)[:, None] + offsets  # (bw, w)
        rows_in, cols_in = (rows >= 0) & (rows < height), (cols >= 0) & (cols < width)
        real = rows_in[:, None, :, None] & cols_in[None, :, None, :]  # (bh, bw, w, w)
        return real.reshape(-1, win * win)  # (nb, S)

    def _real_keys_per_head(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """`_real_keys` for every head, `(h * n_blocks, 1, w^2)`: broadcasts over a block's queries."""
        real = self._real_keys(*size, device)  # (nb, S)
        return real.expand(self.num_heads, *real.shape).reshape(-1, 1, real.shape[1])  # (h*nb, 1, S)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, size: tuple[int, int], need_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Softmax attention of the blocks `(B, h*nb, L, .)`, the padding keys masked with
        `mask_padding`."""
        mask = self._real_keys_per_head(size, q.device) if self.mask_padding and self.halo_size > 0 else None
        return attend(q, k, v, bias=bias, mask=mask, scale=self.scale, need_weights=need_weights)

    def _record(
        self, q: Tensor, k: Tensor, bias: Tensor, weights: Tensor | None, size: tuple[int, int]
    ) -> None:
        """Rows of the capture's query points over the whole map (zero outside their window)."""
        height, width = size
        heads, qb, win, halo = self.num_heads, self.query_block, self.win_size, self.halo_size
        block = self.block_size
        bw = width // block
        grid = (height // block * qb, bw * qb)  # the query grid
        with torch.no_grad():
            if weights is None:
                weights = self._attend(q, k, k[..., :1], bias, size, True)[1]
            idx = query_indices(grid, q.device)
            qy, qx = idx // grid[1], idx % grid[1]  # (Q,) each
            by, bx, iy, ix = qy // qb, qx // qb, qy % qb, qx % qb
            w = weights.reshape(q.shape[0], heads, -1, qb * qb, win * win)  # (B, h, nb, L, S)
            picked = w[:, :, by * bw + bx, iy * qb + ix]  # (B, h, Q, S)
            offsets = torch.arange(win, device=q.device) - halo
            ky, kx = by[:, None] * block + offsets, bx[:, None] * block + offsets  # (Q, w) each
            inside = ((ky >= 0) & (ky < height))[:, :, None] & ((kx >= 0) & (kx < width))[:, None, :]
            target = (ky.clamp(0, height - 1)[:, :, None] * width + kx.clamp(0, width - 1)[:, None, :])
            kept = picked * inside.reshape(1, 1, -1, win * win)  # padding keys dropped
            rows = picked.new_zeros(*picked.shape[:3], height * width)  # (B, h, Q, H*W)
            index = target.reshape(1, 1, -1, win * win).expand_as(kept)  # (Q, w, w) -> (B, h, Q, S)
            rows.scatter_add_(3, index, kept)
        record(self, "rows", rows, grid=size, queries=idx, query_grid=grid,
               note="keys in the zero padding around the map left out: border rows sum to less than 1")
