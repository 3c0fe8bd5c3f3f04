"""Two of timm's model files' own ViT-style attentions, with timm's constructors, calls and state_dict
keys, run by `attnzoo.attend`:

- FastViT's `timm.models.fastvit.Attention` (`TimmFastVitAttention`): ViT's multi-head self-attention
  (`TimmAttention`) over the positions of an NCHW map, heads of `head_dim` channels;
- CrossViT's `timm.models.crossvit.CrossAttention` (`TimmCrossAttention`): the class token attends to
  every token of its sequence (the other branch's class token swapped in by the model), separate `wq`,
  `wk`, `wv` projections.

`attnzoo.convert.from_timm` converts timm's modules (the same keys: timm's checkpoints load with
`strict=True`), and `attnzoo.replace(model, timm.models.fastvit.Attention)` (or `CrossAttention`) swaps
them in a whole model with the same logits; `attnzoo.capture_maps` then records what each head attends
to. Where timm asserts (`head_dim` not dividing `dim`), these raise `ValueError`.

Shape letters: B batch, C channels, H, W map, N tokens, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_head_widths, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_attention import TimmAttention

__all__ = ["TimmFastVitAttention", "TimmCrossAttention"]


@register_compat(example=Example({"dim": 8, "head_dim": 4}, ((2, 8, 3, 5),), (2, 8, 3, 5)))
class TimmFastVitAttention(TimmAttention):
    """timm's `fastvit.Attention(dim, head_dim=32, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmFastVitAttention`): `TimmAttention` with `dim / head_dim` heads over the H*W
    positions of a map.

    Shape:
        - x: `(B, C, H, W)`, C = dim.
        - Output: `(B, C, H, W)`.
    """

    def __init__(
        self,
        dim: int,
        head_dim: int = 32,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        check_int(dim, "dim", who)
        check_int(head_dim, "head_dim", who)
        if dim % head_dim:
            raise ValueError(f"{who}: head_dim ({head_dim}) must divide dim ({dim}), as in timm")
        super().__init__(dim, dim // head_dim, attn_head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Self-attention over the positions of `x` `(B, C, H, W)`: `(B, C, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.dim)
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = TimmAttention.forward(self, tokens)  # (B, H*W, C)
        return out.transpose(1, 2).reshape(dims["B"], self.dim, dims["H"], dims["W"])


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 1, 8), channel_dim=-1))
class TimmCrossAttention(nn.Module):
    """timm's `crossvit.CrossAttention(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmCrossAttention`): the module docstring says what it is.

    $\\mathrm{softmax}(q_0 K^\\top \\cdot \\mathrm{scale})\\,V$ per head, $q_0$ the first (class)
    token's query, then `proj`. `scale` is `head_dim ** -0.5` (timm's attribute; its converter copies
    timm's, which its comment says may be set by hand for older weights).

    Shape:
        - x: `(B, N, C)`, the class token first.
        - Output: `(B, 1, C)`: the class token's new value.
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
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(dim, num_heads, None, None, who, "head_dim")
        self.scale = self.head_dim**-0.5
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=qkv_bias, **dd) for _ in range(3))
        self.attn_drop = nn.Dropout(check_float(attn_drop, "attn_drop", who, minimum=0.0, maximum=1.0))
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor) -> Tensor:
        """The first token of `x` `(B, N, C)` attending to every token: `(B, 1, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        heads = (self.num_heads, self.head_dim)
        q = self.wq(x[:, :1]).reshape(batch, 1, *heads).transpose(1, 2)  # (B, h, 1, d)
        k, v = (w(x).reshape(batch, tokens, *heads).transpose(1, 2) for w in (self.wk, self.wv))  # (B,h,N,d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, 1, d)
        if capturing():  # map capture: the class token's row over the tokens
            record_rows(self, q, k, grid=(1,), key_grid=(tokens,), scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, 1, self.dim)))
