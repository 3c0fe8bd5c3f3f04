"""Axial attention, "Axial Attention in Multidimensional Transformers" (Ho et al., 2019),
arXiv:1912.12180.

Multi-head self-attention along one axis of an image at a time: every column attends within itself
(the H axis), then every row (the W axis). Time $O(B N (H + W) C)$, memory $O(B h N \\max(H, W))$ for
one axis's weights, N = H W: no N x N map is ever built.

fightingcv's `AxialAttention` (lucidrains' axial-attention package) runs the two axes on the same
input and sums the results by default (`sum_axial_out=True`); the paper stacks them, H then W
(`sum_axial_out=False`). The canonical class follows the paper by default (`sum_axes=False`) and
offers the sum (`sum_axes=True`); neither adds a residual or a positional embedding (the paper's
blocks do both around it). Its `dim_index` (where the channels are) is fixed to the last axis here:
the input is channels-last `(B, H, W, C)`.

Shape letters: B batch, H, W height and width, N = H W, C channels (`dim`), h heads, e head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["AxialAttention"]


class _AxisAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of `(..., L, C)` tokens."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool, attn_drop: float,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias, **factory)  # keys, then values
        self.proj = nn.Linear(inner, dim, **factory)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        lead, length = x.shape[:-2], x.shape[-2]
        tokens = x.reshape(-1, length, x.shape[-1])  # (M, L, C): M = all other positions
        heads = (-1, length, self.num_heads, self.head_dim)
        q = self.q(tokens).reshape(heads).transpose(1, 2)  # (M, h, L, e)
        k, v = (t.reshape(heads).transpose(1, 2) for t in self.kv(tokens).chunk(2, -1))  # (M, h, L, e) each
        drop = self.attn_drop.p if self.training else 0.0
        result = attend(q, k, v, dropout_p=drop, need_weights=need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        out = self.proj(out.transpose(1, 2).flatten(2))  # (M, h, L, e) -> (M, L, h e) -> (M, L, C)
        out = out.reshape(*lead, length, -1)  # (..., L, C)
        if weights is not None:
            weights = weights.reshape(*lead, self.num_heads, length, length)  # (..., h, L, L)
        return out, weights

    def weights(self, x: Tensor) -> Tensor:
        """The attention weights along the axis, `(..., L, C) -> (..., h, L, L)` (no gradient)."""
        lead, length = x.shape[:-2], x.shape[-2]
        with torch.no_grad():
            tokens = x.reshape(-1, length, x.shape[-1])  # (M, L, C)
            heads = (-1, length, self.num_heads, self.head_dim)
            q = self.q(tokens).reshape(heads).transpose(1, 2)  # (M, h, L, e)
            k = self.kv(tokens)[..., : q.shape[1] * self.head_dim].reshape(heads).transpose(1, 2)
            attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)  # (M, h, L, L)
        return attn.reshape(*lead, self.num_heads, length, length)


def _influence(col: Tensor, row: Tensor, idx: Tensor, width: int, summed: bool) -> Tensor:
    """Rows over the map of the query positions `idx` from head-averaged column weights `col`
    `(B, W, H, H)` and row weights `row` `(B, H, W, W)`: stacked, the column pass's weights at each
    row key composed with the row pass's weight on it; summed, half of each pass's weights."""
    qi, qj = idx // width, idx % width  # (Q,) each
    r = row[:, qi, qj]  # (B, Q, W): the query's weights over its row
    if not summed:
        c = col[:, :, qi].permute(0, 2, 3, 1)  # (B, W, Q, H) -> (B, Q, H, W): column j' of row key j'
        return (c * r[:, :, None, :]).flatten(2)  # (B, Q, H W): sums to 1 per query
    out = col.new_zeros(col.shape[0], len(idx), col.shape[2], width)  # (B, Q, H, W)
    q = torch.arange(len(idx), device=idx.device)
    out[:, q, :, qj] += 0.5 * col[:, qj, qi].transpose(0, 1)  # the query's column weights
    out[:, q, qi, :] += 0.5 * r  # its row weights
    return out.flatten(2)


@register(
    "axial",
    family="axial",
    paper="Axial Attention in Multidimensional Transformers",
    year=2019,
    layout="NHWC",
    example=Example(kwargs={"dim": 16, "num_heads": 2}, inputs=((2, 5, 7, 16),), output=(2, 5, 7, 16),
                    channel_dim=-1),
    aliases=("axial_attention",),
    uses_attend=True,
)
class AxialAttention(nn.Module):
    r"""Axial multi-head self-attention on a channels-last feature map: along H, then along W.

    With $\mathrm{MSA}_H$ multi-head self-attention within each column (over i for fixed j) and
    $\mathrm{MSA}_W$ within each row, each with its own projections
    $W_q$, $W_{kv}$ (no bias by default) and $W_o$ (with bias):

    $$
    y = \mathrm{MSA}_W\big(\mathrm{MSA}_H(x)\big) \quad\text{or, with sum_axes,}\quad
    y = \mathrm{MSA}_H(x) + \mathrm{MSA}_W(x)
    $$

    and $\mathrm{MSA}(z)_u = W_o\,\mathrm{concat}_h\,\sum_p \mathrm{softmax}_p(q_u^\top k_p / \sqrt{e})\, v_p$
    over the H (or W) positions p of u's column (or row). Time $O(B N (H + W) h e + B N C h e)$,
    memory $O(B h N \max(H, W))$ for one axis's weights (less with the fused kernel), N = H W; no
    N x N map is built.

    Args:
        dim: Channels C of the input (last axis).
        num_heads: Heads h. Default: 8.
        head_dim: Head width e. Default: None (`dim // num_heads`, which must then divide evenly).
        sum_axes: Sum the two axes' outputs on the same input instead of stacking them. Default: False.
        qkv_bias: Give the query and key/value projections a bias. Default: False.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, H, W, C)`.
        - Output: `(B, H, W, C)`; with `need_weights=True` also the weights `(B, h, H, W, H + W)`:
          position (i, j)'s weights over column j (first H, from the H pass) then over row i (last W,
          from the W pass); each part sums to 1.

    Example:
        ```python
        >>> axial = AxialAttention(64, num_heads=4)
        >>> x = torch.randn(2, 9, 11, 64)
        >>> out, weights = axial(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 9, 11, 64]), torch.Size([2, 4, 9, 11, 20]))

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        sum_axes: bool = False,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads} "
                                 "(or give head_dim)")
            head_dim = dim // num_heads
        self.head_dim = check_int(head_dim, "head_dim", who)
        self.sum_axes = sum_axes
        drop = check_float(attn_drop, "attn_drop", who, minimum=0.0, maximum=1.0)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.attn_h = _AxisAttention(dim, num_heads, head_dim, qkv_bias, drop, factory)
        self.attn_w = _AxisAttention(dim, num_heads, head_dim, qkv_bias, drop, factory)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"sum_axes={self.sum_axes}")

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend along H, then W (or both on x, summed); `(out, weights)` with `need_weights`.

        Args:
            x: Feature map `(B, H, W, C)`.
            need_weights: Also return the `(B, h, H, W, H + W)` weights. Default: False.
        """
        check_shape(x, type(self).__name__, "B H W C", C=self.dim)
        out_h, w_h = self.attn_h(x.transpose(1, 2), need_weights)  # columns: (B, W, H, C), (B, W, h, H, H)
        out_h = out_h.transpose(1, 2)  # (B, H, W, C)
        out_w, w_w = self.attn_w(x if self.sum_axes else out_h, need_weights)  # (B, H, W, C), (B, H, h, W, W)
        out = out_h + out_w if self.sum_axes else out_w
        if capturing():
            idx = query_indices(x.shape[1:3], x.device)
            col = self.attn_h.weights(x.transpose(1, 2)).mean(2)  # (B, W, H, H): heads averaged
            row = self.attn_w.weights(x if self.sum_axes else out_h).mean(2)  # (B, H, W, W)
            rows = _influence(col, row, idx, x.shape[2], self.sum_axes)[:, None]  # (B, 1, Q, H W)
            record(self, "rows", rows, grid=x.shape[1:3], queries=idx, query_grid=x.shape[1:3],
                   note="half the column pass + half the row pass" if self.sum_axes
                   else "column pass then row pass, composed (heads averaged)")
        if w_h is None or w_w is None:
            return out
        col = w_h.permute(0, 2, 3, 1, 4)  # (B, W, h, H, H) -> (B, h, H, W, H)
        row = w_w.transpose(1, 2)  # (B, H, h, W, W) -> (B, h, H, W, W)
        return out, torch.cat([col, row], -1)  # (B, h, H, W, H + W)
