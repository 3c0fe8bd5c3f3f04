"""UFO attention, "UFO-ViT: High Performance Linear Vision Transformer without Softmax" (Song, 2021),
arXiv:2109.14382.

No softmax: the keys and values are first multiplied into one $d \\times d_v$ matrix per head,
$K^\\top V$, and both it and the queries are L2-normalised ("XNorm", a learnable per-head scale
$\\gamma$ times the unit vector), so the cost is linear in the number of tokens.

Normalisation axes follow fightingcv's `UFOAttention` (the authors' code is not public): each query over
its d channels, each row of $K^\\top V$ over its $d_v$ channels, one $\\gamma$ per head shared by both.
Deviations: `eps` is added to the norms (default 1e-6; fightingcv has none, so an all-zero query or row
gives NaN there; `from_fightingcv` sets `eps=0`); $\\gamma$ starts at 1 (fightingcv: `randn`); fightingcv
builds a dropout it never applies, so there is none; `key_mask` (padding keys left out of $K^\\top V$) is
an addition.

Shape letters: B batch, L query length, S key length, C channels (`dim`), h heads, d query/key head
width, dv value head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import (
    check_dropout,
    check_float,
    check_head_widths,
    check_int,
    check_mask,
    check_shape,
    check_tensor,
)
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["UFOAttention"]


@register(
    "ufo",
    family="ufo",
    paper="UFO-ViT: High Performance Linear Vision Transformer without Softmax",
    year=2021,
    layout="SEQ2SEQ",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2},
        inputs=((2, 5, 8), (2, 7, 8), (2, 7, 8)),
        output=(2, 5, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1), FreeSize(((1, 1), (2, 1)))),
    ),
    aliases=("ufo_attention", "xnorm_attention"),
    input_rule="self",
)
class UFOAttention(nn.Module):
    r"""Multi-head UFO attention: cross-normalised $Q (K^\top V)$ without softmax.

    $$
    \mathrm{XN}(x) = \gamma_h \frac{x}{\lVert x \rVert_2 + \varepsilon}, \qquad
    Y = W_o\,\mathrm{concat}_h\,\mathrm{XN}(Q_h)\,\mathrm{XN}(K_h^\top V_h)
    $$

    with XN over the last axis (each query's d channels, each row of the $d \times d_v$ matrix
    $K_h^\top V_h$). Time $O(B (L + S) C h (d + d_v) + B (L + S) h d d_v)$, linear in L and S;
    memory $O(B (L + S) h (d + d_v) + B h d d_v)$: no $L \times S$ matrix.

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h. Default: 8.
        head_dim: Query/key head width d (fightingcv's `d_k`). Default: None (`dim // num_heads`).
        value_head_dim: Value head width dv (fightingcv's `d_v`). Default: None (`head_dim`).
        qkv_bias: Biases on the query/key/value projections. Default: True.
        eps: Added to the L2 norms. Default: 1e-6.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - query: `(B, L, C)`; key, value: `(B, S, C)` (default: query).
        - key_mask: `(B, S)` bool, True for real keys.
        - Output: `(B, L, C)`; with `need_weights=True` also the normalised key-value matrix
          $\mathrm{XN}(K^\top V)$ `(B, h, d, dv)` (there is no L x S attention matrix).

    Example:
        ```python
        >>> ufo = UFOAttention(64, num_heads=4)
        >>> x = torch.randn(2, 49, 64)
        >>> ufo(x).shape
        torch.Size([2, 49, 64])
        >>> ufo(x, need_weights=True)[1].shape
        torch.Size([2, 4, 16, 16])

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, self.value_head_dim = check_head_widths(dim, num_heads, head_dim, value_head_dim, who)
        self.eps = check_float(eps, "eps", who, minimum=0.0)
        if eps == float("inf"):
            raise ValueError(f"{who}: eps must be finite, got {eps}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        qk, vw = num_heads * self.head_dim, num_heads * self.value_head_dim
        self.q = nn.Linear(dim, qk, bias=qkv_bias, **factory)
        self.k = nn.Linear(dim, qk, bias=qkv_bias, **factory)
        self.v = nn.Linear(dim, vw, bias=qkv_bias, **factory)
        self.proj = nn.Linear(vw, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.gamma = nn.Parameter(torch.ones(1, num_heads, 1, 1, **factory))

    def reset_parameters(self) -> None:
        """`gamma` back to 1 (the projections reset themselves)."""
        nn.init.ones_(self.gamma)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"value_head_dim={self.value_head_dim}, eps={self.eps}")

    def _xnorm(self, x: Tensor) -> Tensor:
        """$\\gamma x / (\\lVert x \\rVert + \\varepsilon)$ over the last axis, per head."""
        return x * self.gamma / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + self.eps)

    def _record(self, q: Tensor, k: Tensor, raw: Tensor, grid: tuple[int], key_grid: tuple[int]) -> None:
        """Rows of the capture's queries: with no softmax, the output is still linear in the values,
        out_l = sum_s a_ls v_s with a_ls = XN(q_l) diag(gamma / |row_i of K^T V|) k_s (signed)."""
        idx = query_indices(grid, q.device)
        with torch.no_grad():
            norms = torch.linalg.vector_norm(raw, dim=-1) + self.eps  # (B, h, d): rows of K^T V
            scale = self.gamma / norms[..., None, :]  # (B, h, 1, d)
            rows = (self._xnorm(q[:, :, idx]) * scale) @ k.transpose(-2, -1)  # (B, h, Q, S)
        record(self, "rows", rows, grid=key_grid, queries=idx, query_grid=grid,
               note="no softmax: the signed weights of the values in the output, per query")

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        need_weights: bool = False,
        *,
        key_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from `query` to `key`/`value`; `(out, XN(K^T V))` with `need_weights`.

        Args:
            query: Queries `(B, L, C)`.
            key: Keys `(B, S, C)`. Default: `query`.
            value: Values `(B, S, C)`. Default: `key`.
            need_weights: Also return the normalised `(B, h, d, dv)` key-value matrix. Default: False.
            key_mask: `(B, S)` bool, False for padding keys. Default: None.
        """
        who = type(self).__name__
        key = query if key is None else key
        value = key if value is None else value
        dims = check_shape(query, who, "B L C", "query", C=self.dim)
        kdims = check_shape(key, who, "B S C", "key", B=dims["B"], C=self.dim)
        check_shape(value, who, "B S C", "value", B=dims["B"], S=kdims["S"], C=self.dim)
        h = self.num_heads
        k = self.k(key)  # (B, S, h d)
        if key_mask is not None:
            check_tensor(key_mask, who, "key_mask", floating=False)
            if key_mask.dtype != torch.bool:
                raise TypeError(
                    f"{who} expects key_mask of dtype torch.bool (True = keep), got {key_mask.dtype}"
                )
            keep = check_mask(key_mask, (dims["B"], kdims["S"]), who, "key_mask")
            k = k * keep[..., None].to(k.dtype)  # (B, S, h d): padding keys add nothing to K^T V
        q = self.q(query).unflatten(-1, (h, self.head_dim)).transpose(1, 2)  # (B, h, L, d)
        k = k.unflatten(-1, (h, self.head_dim)).transpose(1, 2)  # (B, h, S, d)
        v = self.v(value).unflatten(-1, (h, self.value_head_dim)).transpose(1, 2)  # (B, h, S, dv)
        raw = k.transpose(-2, -1) @ v  # (B, h, d, dv)
        kv = self._xnorm(raw)
        out = self._xnorm(q) @ kv  # (B, h, L, dv)
        if capturing():
            self._record(q, k, raw, (dims["L"],), (kdims["S"],))
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))  # (B, L, h dv) -> (B, L, C)
        return (out, kv) if need_weights else out
