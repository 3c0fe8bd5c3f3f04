"""Parallel multi-scale attention, "MUSE: Parallel Multi-Scale Attention for Sequence to Sequence
Learning" (Zhao et al., 2019), arXiv:1911.09483.

Multi-head self-attention (global context) plus, in parallel, depth-wise separable 1-D convolutions of
several kernel sizes over the *same* projected values (local context), mixed by softmax-normalised
learnable weights; both parts are summed.

Deviations from fightingcv's `MUSEAttention`: its forward replaces the mixing parameter by a new
`nn.Parameter(softmax(dy_paras))` on every call, so successive calls give different outputs and an
optimizer holding the old parameter never updates the one in use. Here the raw parameter
`branch_weights` is kept and softmax-ed in every forward, as in the paper;
`from_fightingcv` copies `dy_paras` as it is, so the converted module equals fightingcv's *next* call.
Masks (SDPA convention, True = may attend) act on the attention part only; fightingcv's
`attention_mask` is the inverse (True = masked), and its multiplicative `attention_weights` is not
offered. A query with every key masked gets zero attention output here (fightingcv: NaN).

Shape letters: B batch, L query length, S key length (= L: the convolution branch adds its output per
position), C channels (`dim`), h heads, d query/key head width, dv value head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import (
    check_dropout,
    check_head_widths,
    check_int,
    check_mask,
    check_shape,
    check_tensor,
)
from attnzoo._registry import Example, FreeSize, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record, record_rows

__all__ = ["MUSEAttention"]


class _DepthPoint(nn.Module):
    """Depth-wise 1-D convolution of kernel k (none for k = 1), then a pointwise one to `out_channels`."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.depth = (
            nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, **factory)
            if kernel_size > 1 else None
        )
        self.point = nn.Conv1d(channels, out_channels, 1, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.point(x if self.depth is None else self.depth(x))


@register(
    "muse",
    family="muse",
    paper="MUSE: Parallel Multi-Scale Attention for Sequence to Sequence Learning",
    year=2019,
    layout="SEQ2SEQ",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2},
        inputs=((2, 7, 8), (2, 7, 8), (2, 7, 8)),
        output=(2, 7, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 0), (1, 0), (2, 0)), 0), FreeSize(((0, 1), (1, 1), (2, 1)), 1)),
    ),
    aliases=("muse_attention", "parallel_multi_scale_attention"),
    uses_attend=True,
    input_rule="self",
)
class MUSEAttention(nn.Module):
    r"""Multi-head attention plus parallel multi-scale depth-wise separable convolutions of the values.

    $$
    Y = Y_{\mathrm{att}} + Y_{\mathrm{conv}},\qquad
    Y_{\mathrm{att}} = W_o\,\mathrm{concat}_h\,\mathrm{softmax}(Q_hK_h^\top/\sqrt d + M)\,V_h,\qquad
    Y_{\mathrm{conv}} = \sum_i \mathrm{softmax}(\alpha)_i\,\mathrm{PW}_i(\mathrm{DW}_{k_i}(V))
    $$

    with $V$ the projected values `(B, h dv, S)` (all heads), $\mathrm{DW}_k$ a depth-wise convolution
    of kernel k (none for k = 1) and $\mathrm{PW}_i$ a pointwise one to C channels, $\alpha$ the learnable
    `branch_weights`. Time $O(B L S h (d + d_v) + B L C h (d + d_v) + B S h d_v \sum_i k_i)$, memory
    $O(B h L S + B L C)$ (the $L \times S$ weights only on the math path; the fused kernel needs
    $O(B L C)$).

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h. Default: 8.
        head_dim: Query/key head width d (fightingcv's `d_k`). Default: None (`dim // num_heads`).
        value_head_dim: Value head width dv (fightingcv's `d_v`). Default: None (`head_dim`).
        kernel_sizes: Odd kernel sizes of the convolution branches. Default: (1, 3, 5).
        qkv_bias: Biases on the query/key/value projections. Default: True.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - query: `(B, L, C)`; key, value: `(B, L, C)` (default: query; the same length).
        - mask: bool (True = may attend) or additive float, broadcastable to `(B, h, L, L)`.
        - Output: `(B, L, C)`; with `need_weights=True` also the attention weights `(B, h, L, L)`.

    Example:
        ```python
        >>> muse = MUSEAttention(64, num_heads=4)
        >>> x = torch.randn(2, 10, 64)
        >>> muse(x).shape
        torch.Size([2, 10, 64])
        >>> muse(x, need_weights=True)[1].shape
        torch.Size([2, 4, 10, 10])

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        kernel_sizes: tuple[int, ...] = (1, 3, 5),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
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
        if not isinstance(kernel_sizes, (tuple, list)) or not kernel_sizes or not all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2 == 1 for k in kernel_sizes
        ):
            raise ValueError(f"{who} expects kernel_sizes to be odd positive ints, got {kernel_sizes!r}")
        self.kernel_sizes = tuple(kernel_sizes)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        qk, vw = num_heads * self.head_dim, num_heads * self.value_head_dim
        self.q = nn.Linear(dim, qk, bias=qkv_bias, **factory)
        self.k = nn.Linear(dim, qk, bias=qkv_bias, **factory)
        self.v = nn.Linear(dim, vw, bias=qkv_bias, **factory)
        self.proj = nn.Linear(vw, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.branches = nn.ModuleList(_DepthPoint(vw, dim, k, factory) for k in self.kernel_sizes)
        self.branch_weights = nn.Parameter(torch.ones(len(self.kernel_sizes), **factory))

    def reset_parameters(self) -> None:
        """Equal `branch_weights` (an even softmax over the branches); the branches reset themselves."""
        nn.init.ones_(self.branch_weights)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"value_head_dim={self.value_head_dim}, kernel_sizes={self.kernel_sizes}")

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attention plus the multi-scale convolutions of the values.

        Args:
            query: Queries `(B, L, C)`.
            key: Keys `(B, L, C)`. Default: `query`.
            value: Values `(B, L, C)`. Default: `key`.
            mask: Bool (True = may attend) or additive float mask on the attention. Default: None.
            need_weights: Also return the `(B, h, L, L)` attention weights. Default: False.
        """
        who = type(self).__name__
        key = query if key is None else key
        value = key if value is None else value
        dims = check_shape(query, who, "B L C", "query", C=self.dim)
        batch, length = dims["B"], dims["L"]
        check_shape(key, who, "B L C", "key", B=batch, L=length, C=self.dim)
        check_shape(value, who, "B L C", "value", B=batch, L=length, C=self.dim)
        if mask is not None:
            check_tensor(mask, who, "mask", floating=False)
            mask = check_mask(mask, (batch, self.num_heads, length, length), who, "mask")
            if mask.ndim < 4:  # (.., L, S) -> (1.., L, S): SDPA wants rank 4
                mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        h = self.num_heads
        q = self.q(query).unflatten(-1, (h, self.head_dim)).transpose(1, 2)  # (B, h, L, d)
        k = self.k(key).unflatten(-1, (h, self.head_dim)).transpose(1, 2)  # (B, h, L, d)
        v_flat = self.v(value)  # (B, L, h dv)
        v = v_flat.unflatten(-1, (h, self.value_head_dim)).transpose(1, 2)  # (B, h, L, dv)
        is_bool = mask is not None and mask.dtype == torch.bool
        result = attend(
            q, k, v, mask=mask if is_bool else None, bias=None if is_bool else mask,
            dropout_p=self.attn_drop.p if self.training else 0.0, need_weights=need_weights,
        )
        out, weights = result if isinstance(result, tuple) else (result, None)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))  # (B, L, h dv) -> (B, L, C)
        # (B, h dv, L), head-major channels, copied once: each convolution would otherwise reorder the
        # strided view itself (and oneDNN runs a depth-wise convolution on it several times slower)
        channels = v_flat.transpose(1, 2).contiguous()
        mix = self.branch_weights.softmax(0)
        if capturing():
            record_rows(self, q, k, grid=(length,), mask=mask if is_bool else None,
                        bias=None if is_bool else mask)
            record(self, "branch", mix.expand(batch, -1))  # (B, M): the convolution branches' mix
        local = sum(w * branch(channels) for w, branch in zip(mix, self.branches, strict=True))  # (B, C, L)
        out = out + local.transpose(1, 2)  # (B, L, C)
        return (out, weights) if weights is not None else out
