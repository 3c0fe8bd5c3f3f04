"""timm's VOLO attentions besides the outlooker (`timm.models.volo.Attention` on maps and
`timm.models.volo.ClassAttention` for the class token): their constructors, calls and state_dict
keys, run by `attnzoo.attend`.

With `OutlookAttention` (the canonical class, converted by `from_timm` too), a whole VOLO's
attention is attnzoo's after `attnzoo.replace` for the three classes, with the same logits, timm's
checkpoint loading with `strict=True`, and `attnzoo.capture_maps` recording the rows.

Shape letters: B batch, H, W the map, N tokens (the class token first), C = dim, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_head_widths, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_attention import TimmAttention

__all__ = ["TimmClassAttention", "TimmVoloAttention"]


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 3, 4, 8),), (2, 3, 4, 8), channel_dim=-1))
class TimmVoloAttention(TimmAttention):
    """timm's `volo.Attention(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmVoloAttention`): ViT's self-attention over the positions of a channels-last
    map, keys `qkv` and `proj` as timm's.

    Shape:
        - x: `(B, H, W, C)`.
        - Output: `(B, H, W, C)`.
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
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Self-attention over the positions of `x` `(B, H, W, C)`: `(B, H, W, C)`."""
        dims = check_shape(x, type(self).__name__, "B H W C", C=self.dim)
        tokens = x.reshape(dims["B"], dims["H"] * dims["W"], dims["C"])  # (B, H W, C)
        return super().forward(tokens).view(x.shape)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 1, 8), channel_dim=-1))
class TimmClassAttention(nn.Module):
    """timm's `volo.ClassAttention(dim, num_heads=8, head_dim=None, qkv_bias=False, attn_drop=0.,
    proj_drop=0.)` (`attnzoo.compat.TimmClassAttention`): the class token (the first) attends to every
    token; keys `kv`, `q`, `proj` as timm's.

    $\\mathrm{softmax}(q_{cls} K^\\top / \\sqrt d)\\,V$ per head, then `proj`.

    Shape:
        - x: `(B, N, C)`, the class token first.
        - Output: the class token's `(B, 1, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = False,
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
        self.head_dim, _ = check_head_widths(dim, num_heads, head_dim, None, who)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.kv = nn.Linear(dim, 2 * self.attn_dim, bias=qkv_bias, **dd)
        self.q = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(self.attn_dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor) -> Tensor:
        """The class token `x[:, :1]` attending to all of `x` `(B, N, C)`: `(B, 1, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        kv = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim)  # (B, N, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        q = self.q(x[:, :1]).reshape(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, 1, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, 1, d)
        if capturing():  # map capture: the class token's row
            record_rows(self, q, k, grid=(1,), key_grid=(tokens,), scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, 1, self.attn_dim)))
