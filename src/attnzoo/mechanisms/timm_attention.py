"""timm's ViT self-attention (`timm.layers.attention.Attention`, used by ViT, DeiT, BEiT-style and many
hybrid models in timm): its constructor, call and state_dict keys, run by `attnzoo.attend`.

`TimmAttention` holds timm's submodules under timm's names (`qkv`, `q_norm`, `k_norm`, `norm`,
`gate`, `proj`), so a timm checkpoint loads with `strict=True`, and `attnzoo.convert.from_timm`
converts timm's module to it (copying its norm layers, whatever their class).
`attnzoo.replace(model, timm.layers.Attention)` then swaps every ViT block's attention with the same
logits, and `attnzoo.capture_maps` shows what each head attends to.

One difference, where timm gives NaN: a query whose every key `attn_mask` masks gets zero output
here (`attend`'s rule), as everywhere in attnzoo.

Shape letters: B batch, N tokens, C = dim, h heads, d head width.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from attnzoo._checks import check_bool, check_dropout, check_head_widths, check_int, check_mask, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmAttention"]


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmAttention(nn.Module):
    """timm's `Attention(dim, num_heads=8, attn_head_dim=None, dim_out=None, qkv_bias=False,
    qk_norm=False, scale_norm=False, proj_bias=True, gated=False, attn_drop=0., proj_drop=0.,
    norm_layer=None)` (`attnzoo.compat.TimmAttention`): the module docstring says what it is.

    $\\mathrm{softmax}(\\mathrm{norm}_q(q)\\,\\mathrm{norm}_k(k)^\\top / \\sqrt d + M)\\,v$ per head,
    then the optional `norm` (scale norm) and sigmoid `gate`, then `proj`.

    Shape:
        - x: `(B, N, C)`; attn_mask: bool (True = may attend) or float (added), broadcastable to
          `(B, h, N, N)` (torch's `scaled_dot_product_attention` rule, as timm's), or None.
        - Output: `(B, N, dim_out)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        # no hint at attn_head_dim for a subclass that does not take it (volo's)
        takes = "attn_head_dim" in inspect.signature(type(self).__init__).parameters
        hint = "attn_head_dim" if takes else None
        self.head_dim, _ = check_head_widths(dim, num_heads, attn_head_dim, None, who, hint)
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError(f"{who}: norm_layer must be given with qk_norm or scale_norm, got None")
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        norm = norm_layer if norm_layer is not None else nn.Identity
        self.q_norm = norm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.norm = norm(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        dim_out = check_int(dim_out or dim, "dim_out", who)  # timm's `dim_out or dim`: 0 and None give dim
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention over the tokens `x` `(B, N, C)`: `(B, N, dim_out)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        if attn_mask is not None:  # SDPA's rule, checked here so that the message names attn_mask
            check_mask(attn_mask, (batch, self.num_heads, tokens, tokens), who, "attn_mask")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        causal = check_bool(is_causal, "is_causal", type(self).__name__)  # timm's SDPA call refuses others
        out = attend(q, k, v, mask=attn_mask, causal=causal, dropout_p=dropout_p, scale=self.scale)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(tokens,), mask=attn_mask, causal=causal, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)  # (B, h, N, d) -> (B, N, h d)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))
