"""More of timm's model files' own ViT-style attentions, with timm's constructors, calls and state_dict
keys, run by `attnzoo.attend`:

- NesT's `timm.models.nest.Attention` (`TimmNestAttention`): self-attention inside each of T blocks of
  tokens `(B, T, N, C)`; timm lays the heads' outputs out channel-major (channel `c * h + head`), kept;
- Visformer's `timm.models.visformer.Attention` (`TimmVisformerAttention`): 1x1-convolution `qkv` and
  `proj` without bias over the positions of an NCHW map, heads of `round(dim // h * head_dim_ratio)`;
- TNT's `timm.models.tnt.Attention` (`TimmTntAttention`): queries and keys of `hidden_dim` (`qk`),
  values of `dim` (`v`), so the heads' key width and value width differ. timm's drops the attention
  weights in place, so its backward fails in training with `attn_drop > 0` (autograd needs the
  softmax output it overwrote); this class trains there (the forward is timm's, masks included).

(MetaFormer's `timm.models.metaformer.Attention`, CAFormer's, is ViT's: it converts to `TimmAttention`.)
`attnzoo.convert.from_timm` converts timm's modules (the same keys: timm's checkpoints load with
`strict=True`), and `attnzoo.replace(model, ForeignClass)` swaps them in whole models with the same
logits. Where timm's reshapes fail (widths that heads do not divide), these raise `ValueError`.

Shape letters: B batch, T blocks, N tokens, C channels, H, W map, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_float, check_head_widths, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmNestAttention", "TimmVisformerAttention", "TimmTntAttention"]


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 3, 5, 8),), (2, 3, 5, 8), channel_dim=-1))
class TimmNestAttention(nn.Module):
    """timm's `nest.Attention(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmNestAttention`): self-attention within each block of tokens.

    Shape:
        - x: `(B, T, N, C)`.
        - Output: `(B, T, N, C)`.
        - Captured map (`attnzoo.capture_maps`): `"rows"` of each block, `(B*T, h, Q, N)`, sample `b`'s
          block `t` at `b*T + t` (`meta["blocks"]` = T).
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
        self.head_dim, _ = check_head_widths(dim, num_heads, None, None, who, None)
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention within each block of `x` `(B, T, N, C)`: `(B, T, N, C)`."""
        dims = check_shape(x, type(self).__name__, "B T N C", C=self.dim)
        batch, blocks, tokens = dims["B"], dims["T"], dims["N"]
        heads, width = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(batch, blocks, tokens, 3, heads, width).permute(3, 0, 4, 1, 2, 5)
        # (B, h, T, N, d) as timm's, heads and blocks merged: dropout draws timm's masks in its order
        q, k, v = qkv.reshape(3, batch, heads * blocks, tokens, width).unbind(0)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h*T, N, d)
        if capturing():  # map capture: rows of the capture's query points, per block
            shape = (batch, heads, blocks, tokens, width)
            per_block = [t.view(shape).transpose(1, 2).reshape(-1, heads, tokens, width) for t in (q, k)]
            record_rows(self, *per_block, grid=(tokens,), scale=self.scale, blocks=blocks,
                        note=f"first axis B*T: sample b's block t at b*{blocks} + t")
        out = out.view(batch, heads, blocks, tokens, width).permute(0, 2, 3, 4, 1)  # timm's (d, h) channels
        return self.proj_drop(self.proj(out.reshape(batch, blocks, tokens, self.dim)))


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 8, 3, 5),), (2, 8, 3, 5)))
class TimmVisformerAttention(nn.Module):
    """timm's `visformer.Attention(dim, num_heads=8, head_dim_ratio=1., attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmVisformerAttention`): multi-head self-attention over the positions of a map,
    projections by bias-free 1x1 convolutions.

    Shape:
        - x: `(B, C, H, W)`.
        - Output: `(B, C, H, W)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim_ratio: float = 1.0,
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
        ratio = check_float(head_dim_ratio, "head_dim_ratio", who, minimum=0.0)
        self.head_dim = check_int(round(dim // num_heads * ratio), "head_dim (round(dim // num_heads * "
                                  "head_dim_ratio))", who)
        self.scale = self.head_dim**-0.5
        width = self.head_dim * self.num_heads
        self.qkv = nn.Conv2d(dim, 3 * width, 1, bias=False, **dd)
        self.proj = nn.Conv2d(width, dim, 1, bias=False, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the positions of `x` `(B, C, H, W)`: `(B, C, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        qkv = self.qkv(x).reshape(batch, 3, self.num_heads, self.head_dim, height * width)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # (B, h, HW, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, HW, d)
        if capturing():  # map capture: rows of the capture's query points over the map
            record_rows(self, q, k, grid=(height, width), scale=self.scale)
        out = out.permute(0, 1, 3, 2).reshape(batch, -1, height, width)  # (B, h d, H, W)
        return self.proj_drop(self.proj(out))


@register_compat(example=Example({"dim": 8, "hidden_dim": 4, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8),
                                 channel_dim=-1))
class TimmTntAttention(nn.Module):
    """timm's `tnt.Attention(dim, hidden_dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmTntAttention`): heads whose queries and keys are `hidden_dim / h` wide and
    whose values are `dim / h` wide.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
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
        self.hidden_dim = check_int(hidden_dim, "hidden_dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(hidden_dim, num_heads, None, None, who, None,
                                             dim_name="hidden_dim")
        self.v_head_dim, _ = check_head_widths(dim, num_heads, None, None, who, None)
        self.scale = self.head_dim**-0.5
        self.qk = nn.Linear(dim, 2 * hidden_dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        qk = self.qk(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        v = self.v(x).reshape(batch, tokens, self.num_heads, self.v_head_dim).transpose(1, 2)  # (B, h, N, e)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, e)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(tokens,), scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))
