"""Criss-cross attention, "CCNet: Criss-Cross Attention for Semantic Segmentation" (Huang et al., 2019),
arXiv:1811.11721.

Every position (i, j) attends to the H + W - 1 positions of its row and its column, with one softmax
over both: the column branch's logit of (i, j) itself is $-\\infty$ (CCNet's official code), so the
centre is counted once, by the row branch. Time $O(B N (H + W) C)$, memory $O(B N (H + W))$ for the
weights, N = H W: no N x N map is ever built.

Deviations from fightingcv's `CrissCrossAttention` (a copy of CCNet's pure-PyTorch port): the
reduction of the query/key width is an argument (`reduction=8` is theirs; `rd_channels` overrides it),
the diagonal mask is made on the input's device (theirs builds it on the CPU, so it fails on CUDA), and
widths below `reduction` keep one query/key channel (fightingcv builds zero-width convolutions there
and fails in the forward).
fightingcv's numbers are reproduced exactly where it runs.

Shape letters: B batch, C channels, H, W height and width, N = H W, c' query/key width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["CrissCrossAttention", "criss_cross_rows"]


def criss_cross_rows(weights: Tensor, idx: Tensor) -> Tensor:
    """Dense rows `(B, 1, Q, N)` of the criss-cross weights `(B, H, W, H + W)` for flat queries `idx`.

    Query (i, j) puts its first H weights on column j and its last W weights on row i; the doubly
    counted centre has weight 0 in the column part, so adding the two parts is exact.
    """
    batch, height, width, _ = weights.shape
    i, j = idx // width, idx % width  # (Q,) each
    picked = weights.flatten(1, 2).index_select(1, idx)  # (B, Q, H + W)
    rows = torch.arange(height, device=idx.device)
    cols = torch.arange(width, device=idx.device)
    col_keys = rows[None, :] * width + j[:, None]  # (Q, H): (k, j)
    row_keys = i[:, None] * width + cols[None, :]  # (Q, W): (i, l)
    keys = torch.cat([col_keys, row_keys], 1).expand(batch, -1, -1)  # (B, Q, H + W)
    dense = picked.new_zeros(batch, idx.numel(), height * width)  # (B, Q, N)
    return dense.scatter_add(2, keys, picked).unsqueeze(1)  # (B, 1, Q, N)


@register(
    "criss_cross",
    family="criss_cross",
    paper="CCNet: Criss-Cross Attention for Semantic Segmentation",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 16}, inputs=((2, 16, 5, 7),), output=(2, 16, 5, 7)),
    aliases=("ccnet", "cca"),
)
class CrissCrossAttention(nn.Module):
    r"""Criss-cross attention: each position attends to its row and column (CCNet).

    With $q = W_q x$, $k = W_k x$ (c' channels) and $v = W_v x$ (C channels), position $u = (i, j)$
    takes one softmax over its column $\{(k', j)\}_{k' \ne i}$ and its row $\{(i, l)\}$:

    $$
    y_u = \gamma \sum_{p \in \Phi(u)} \mathrm{softmax}_{p}\big(q_u^\top k_p\big)\, v_p + x_u
    $$

    with $\Phi(u)$ the H + W - 1 positions of the criss-cross through u and $\gamma$ a learned
    scalar that starts at 0 (the block is the identity at initialisation). Time $O(B N (H + W) C)$,
    memory $O(B N (H + W) + B C N)$ with N = H W; no N x N map is built. CCNet applies it twice
    (recurrently) to reach every position; stack two modules for that.

    Args:
        channels: Channels C of the input.
        reduction: Query/key width is `max(1, channels // reduction)`. Default: 8.
        rd_channels: Query/key width c', overriding `reduction`. Default: None.
        bias: Give the 1x1 query/key/value convolutions a bias. Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, C, H, W)`.
        - Output: `(B, C, H, W)`; with `need_weights=True` also the weights `(B, H, W, H + W)`:
          position (i, j)'s weights over column j (first H, its own entry 0) then row i (last W).

    Example:
        ```python
        >>> cca = CrissCrossAttention(64)
        >>> x = torch.randn(2, 64, 9, 11)
        >>> out, weights = cca(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 64, 9, 11]), torch.Size([2, 9, 11, 20]))
        >>> bool(torch.allclose(weights.sum(-1), torch.ones(2, 9, 11)))
        True

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 8,
        rd_channels: int | None = None,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels = check_int(channels, "channels", who)
        self.reduction = check_int(reduction, "reduction", who)
        if rd_channels is None:
            rd_channels = max(1, channels // reduction)
        self.rd_channels = check_int(rd_channels, "rd_channels", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_conv = nn.Conv2d(channels, rd_channels, 1, bias=bias, **factory)
        self.key_conv = nn.Conv2d(channels, rd_channels, 1, bias=bias, **factory)
        self.value_conv = nn.Conv2d(channels, channels, 1, bias=bias, **factory)
        self.gamma = nn.Parameter(torch.zeros(1, **factory))

    def reset_parameters(self) -> None:
        """`gamma` back to 0, so the block starts as the identity (the convolutions reset themselves)."""
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend along rows and columns; `(out, weights)` with `need_weights`.

        Args:
            x: Feature map `(B, C, H, W)`.
            need_weights: Also return the `(B, H, W, H + W)` weights. Default: False.
        """
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        height, width = dims["H"], dims["W"]
        q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)  # (B, c', H, W) x2, (B, C, H, W)
        energy_col = torch.einsum("bcij,bckj->bijk", q, k)  # (B, H, W, H): (i, j) over (k, j)
        centre = torch.eye(height, dtype=torch.bool, device=x.device)[:, None, :]  # (H, 1, H): k == i
        energy_col = energy_col.masked_fill(centre, float("-inf"))
        energy_row = torch.einsum("bcij,bcil->bijl", q, k)  # (B, H, W, W): (i, j) over (i, l)
        weights = torch.cat([energy_col, energy_row], -1).softmax(-1)  # (B, H, W, H + W)
        out_col = torch.einsum("bijk,bckj->bcij", weights[..., :height], v)  # (B, C, H, W)
        out_row = torch.einsum("bijl,bcil->bcij", weights[..., height:], v)  # (B, C, H, W)
        out = self.gamma * (out_col + out_row) + x
        if capturing():
            idx = query_indices((height, width), x.device)
            record(self, "rows", criss_cross_rows(weights.detach(), idx), grid=(height, width),
                   queries=idx, query_grid=(height, width))
        return (out, weights) if need_weights else out
