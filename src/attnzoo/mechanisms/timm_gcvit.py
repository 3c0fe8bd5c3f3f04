"""timm's GC ViT window attention (`timm.models.gcvit.WindowAttentionGlobal`): its constructor, call
`(x, q_global=None)` and state_dict keys, run by `attnzoo.attend`.

Hatamizadeh et al., "Global Context Vision Transformers", https://arxiv.org/abs/2206.09959.

Attention within windows with Swin's relative position bias (`rel_pos.relative_position_bias_table`,
looked up in Swin's order). Local blocks (`use_global=False`) project queries, keys and values from
the window; global blocks (`use_global=True`) project keys and values only and take the queries from
`q_global`, one global query map per image shared by all its windows (windows image-major, as
timm's). timm's global module called without `q_global` fails on a reshape; here that is a
`ValueError`. `attnzoo.convert.from_timm` converts timm's module with its weights (the same keys),
and `attnzoo.replace(model, WindowAttentionGlobal)` keeps a GC ViT's logits.

Shape letters: B windows, Bi images, N = Wh*Ww tokens per window, C = dim, h heads, d head width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import (
    check_dropout,
    check_head_widths,
    check_int,
    check_shape,
    check_tensor,
)
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_2d
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmGcVitWindowAttention"]


class _RelPosBias(nn.Module):
    """Swin's relative position bias table of a `(Wh, Ww)` window (timm's `gcvit.RelPosBias` keys)."""

    def __init__(self, window_size: tuple[int, int], num_heads: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.window_size = window_size
        rows, cols = window_size
        offsets = (2 * rows - 1) * (2 * cols - 1)
        self.relative_position_bias_table = nn.Parameter(torch.empty(offsets, num_heads, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def get_bias(self) -> Tensor:
        """The bias `(h, N, N)`."""
        table = self.relative_position_bias_table
        return gather_relative_bias(table, relative_position_index_2d(self.window_size, table.device))


@register_compat(example=Example({"dim": 8, "num_heads": 2, "window_size": 3, "use_global": False},
                                 ((2, 9, 8),), (2, 9, 8), channel_dim=-1))
class TimmGcVitWindowAttention(nn.Module):
    """timm's `gcvit.WindowAttentionGlobal(dim, num_heads, window_size, use_global=True, qkv_bias=True,
    attn_drop=0., proj_drop=0.)` (`attnzoo.compat.TimmGcVitWindowAttention`): the module docstring says
    what it is.

    Shape:
        - x: `(B, N, C)` windows; q_global: `(Bi, N, C)` or `(Bi, Wh, Ww, C)` with Bi dividing B,
          needed with `use_global`.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int],
        use_global: bool = True,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(dim, num_heads, None, None, who, None)
        self.scale = self.head_dim**-0.5
        self.window_size = int_pair(window_size, "window_size", who)
        self.use_global = bool(use_global)
        self.rel_pos = _RelPosBias(self.window_size, self.num_heads, dd)
        self.qkv = nn.Linear(dim, (2 if self.use_global else 3) * dim, bias=qkv_bias, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"use_global={self.use_global}")

    def _global_queries(self, q_global: Tensor | None, windows: int, tokens: int) -> Tensor:
        """Each image's global queries for its windows, `(B, h, N, d)`."""
        who = type(self).__name__
        if q_global is None:
            raise ValueError(f"{who} with use_global=True needs q_global (timm's reshape fails without it), "
                             f"got None")
        check_tensor(q_global, who, "q_global")
        shape = tuple(q_global.shape)
        if len(shape) < 3 or shape[-1] != self.dim or math.prod(shape[1:-1]) != tokens:
            raise ValueError(f"{who} expects q_global of shape (Bi, N, C) or (Bi, Wh, Ww, C) with "
                             f"N = {tokens} and C = {self.dim}, got {shape}")
        images = shape[0]
        if images == 0 or windows % images:
            raise ValueError(f"{who} expects q_global's images ({images}) to divide the windows ({windows})")
        q = q_global.repeat_interleave(windows // images, dim=0)  # image-major windows
        return q.reshape(windows, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, q_global: Tensor | None = None) -> Tensor:
        """Attention within each window `x` `(B, N, C)`: `(B, N, C)`."""
        who = type(self).__name__
        rows, cols = self.window_size
        dims = check_shape(x, who, "B N C", N=rows * cols, C=self.dim)
        windows, tokens = dims["B"], dims["N"]
        heads = (self.num_heads, self.head_dim)
        if self.use_global:
            k, v = self.qkv(x).reshape(windows, tokens, 2, *heads).permute(2, 0, 3, 1, 4).unbind(0)
            q = self._global_queries(q_global, windows, tokens)
        else:
            q, k, v = self.qkv(x).reshape(windows, tokens, 3, *heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_pos.get_bias()  # (h, N, N)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, bias=bias, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points over the window
            record_rows(self, q, k, grid=(rows, cols), bias=bias, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(windows, tokens, self.dim)))
