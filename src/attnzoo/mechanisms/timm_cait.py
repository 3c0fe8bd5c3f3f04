"""timm's CaiT attentions (`timm.models.cait.TalkingHeadAttn` for the patch tokens and
`timm.models.cait.ClassAttn` for the class token): their constructors, calls and state_dict keys.

Touvron, Cord, Sablayrolles, Synnaeve, Jégou, "Going deeper with Image Transformers", ICCV 2021,
https://arxiv.org/abs/2103.17239; talking heads from Shazeer et al., https://arxiv.org/abs/2003.02436.

Class attention runs through `attnzoo.attend`. Talking-heads attention mixes the heads of the logits
before the softmax (`proj_l`) and of the weights after it (`proj_w`), so each row of one head depends
on every head's row: the `(B, h, N, N)` maps are computed, as in timm. The head mixes run as one
`(h, h)` product over the maps in their `(B, h, N N)` layout, where timm permutes the maps to
`(B, N, N, h)` for an `nn.Linear` and back (four strided copies of each map).

`attnzoo.convert.from_timm` converts both (the same keys, so timm's checkpoint loads with
`strict=True`), and `attnzoo.replace` swaps a whole CaiT's attention with the same logits;
`attnzoo.capture_maps` then records the mixed weights' rows and the class token's row.

Shape letters: B batch, N tokens, C = dim, h heads, d = C / h head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.kernels.dropout import dropout_product
from attnzoo.maps.capture import capturing, query_indices, record, record_rows

# what a capture's rows are after talking heads (also used by EfficientFormerV2's attention)
TALKING_HEADS_NOTE = "talking heads: softmax rows mixed across the heads, not positive rows summing to 1"

__all__ = ["TimmCaitClassAttention", "TimmTalkingHeadAttention"]


class _CaitBase(nn.Module):
    """The arguments both CaiT attentions share: `(dim, num_heads=8, qkv_bias=False, attn_drop=0.,
    proj_drop=0.)`, head width `dim // num_heads` (which must divide `dim`)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def _heads(self, t: Tensor) -> Tensor:
        """`(B, N, C)` -> `(B, h, N, d)` (a view)."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 1, 8), channel_dim=-1))
class TimmCaitClassAttention(_CaitBase):
    """timm's `cait.ClassAttn(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmCaitClassAttention`): the class token (the first) attends to every token;
    keys `q`, `k`, `v`, `proj` as timm's.

    $\\mathrm{softmax}(q_{cls} K^\\top / \\sqrt d)\\,V$ per head, then `proj`.

    Shape:
        - x: `(B, N, C)`, the class token first.
        - Output: the class token's `(B, 1, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """The class token `x[:, :1]` attending to all of `x` `(B, N, C)`: `(B, 1, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        q = self._heads(self.q(x[:, :1]))  # (B, h, 1, d)
        k, v = self._heads(self.k(x)), self._heads(self.v(x))  # (B, h, N, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, 1, d)
        if capturing():  # map capture: the class token's row
            record_rows(self, q, k, grid=(1,), key_grid=(dims["N"],), scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(dims["B"], 1, self.dim)))


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmTalkingHeadAttention(_CaitBase):
    """timm's `cait.TalkingHeadAttn(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmTalkingHeadAttention`); keys `qkv`, `proj`, `proj_l`, `proj_w` as timm's.

    With $L_h = q_h k_h^\\top / \\sqrt d$ per head and $W_l, W_w$ the `(h, h)` head mixes,

    $$
    P = \\mathrm{softmax}\\Big(\\sum_{h'} W_l[h, h'] L_{h'} + b_l[h]\\Big),\\qquad
    y_h = \\Big(\\sum_{h'} W_w[h, h'] P_{h'} + b_w[h]\\Big) V_h ,
    $$

    then `proj` on the concatenated heads. Time $O(B h N^2 (d + h))$, memory $O(B h N^2)$.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_l = nn.Linear(num_heads, num_heads, **dd)
        self.proj_w = nn.Linear(num_heads, num_heads, **dd)

    @staticmethod
    def _mix(maps: Tensor, linear: nn.Linear) -> Tensor:
        """`linear` over the head axis of `maps` `(B, h, N, N)`, as one `(h, h)` product on `(B, h, N N)`."""
        flat = maps.flatten(2)  # (B, h, N N)
        mixed = torch.matmul(linear.weight, flat)  # (h, h) @ (B, h, N N)
        if linear.bias is not None:
            mixed = mixed + linear.bias[:, None]
        return mixed.view(maps.shape)

    def forward(self, x: Tensor) -> Tensor:
        """Talking-heads self-attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        logits = torch.matmul(q * self.scale, k.transpose(-2, -1))  # (B, h, N, N)
        weights = self._mix(self._mix(logits, self.proj_l).softmax(-1), self.proj_w)  # (B, h, N, N)
        if capturing():  # map capture: the mixed weights' rows of the capture's query points
            idx = query_indices((tokens,), x.device)
            rows = weights.index_select(2, idx)  # (B, h, Q, N)
            record(self, "rows", rows, grid=(tokens,), queries=idx, query_grid=(tokens,),
                   note=TALKING_HEADS_NOTE)
        if self.training and self.attn_drop.p > 0:
            # timm's dropout sees the weights in its (B, N, N, h) memory order and draws in that order
            weights = weights.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            out = dropout_product(weights, v, self.attn_drop.p)  # (B, h, N, d)
        else:
            out = torch.matmul(weights, v)  # (B, h, N, d)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))
