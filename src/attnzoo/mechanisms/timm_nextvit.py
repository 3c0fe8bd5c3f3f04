"""timm's Next-ViT attention (`timm.models.nextvit.EfficientAttention`, the transformer blocks of
`nextvit_small`, `nextvit_base`, `nextvit_large`): its constructor, call and state_dict keys, run by
`attnzoo.attend`.

Next-ViT (Li et al., 2022, "Next-ViT: Next Generation Vision Transformer for Efficient Deployment") uses
multi-head self-attention whose keys and values come from the token sequence average-pooled by
`sr_ratio ** 2` (and normalised), so the map is N x N / sr^2:

$$s = \\mathrm{norm}(\\mathrm{pool}(x)), \\quad
\\mathrm{out} = W_o\\,\\mathrm{softmax}\\big(q\\,(W_k s)^\\top / \\sqrt d\\big)\\,W_v s$$

Time O(B N^2 C / sr^2) and memory O(B h N^2 / sr^2) (the SDPA kernels keep the map out of memory).

Shape letters: B batch, N tokens, C = dim, h heads, d = head_dim, M = N / sr^2 pooled tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmNextVitAttention"]


@register_compat(example=Example({"dim": 8, "head_dim": 4, "sr_ratio": 2}, ((2, 16, 8),), (2, 16, 8),
                                 channel_dim=-1))
class TimmNextVitAttention(nn.Module):
    """timm's `nextvit.EfficientAttention(dim, out_dim=None, head_dim=32, qkv_bias=True, attn_drop=0.,
    proj_drop=0., sr_ratio=1, norm_layer=nn.BatchNorm1d)` (`attnzoo.compat.TimmNextVitAttention`): the
    module docstring gives the formula.

    Shape:
        - x: `(B, N, C)` (with `sr_ratio > 1`: N at least `sr_ratio ** 2`; a remainder is pooled away).
        - Output: `(B, N, out_dim)`.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.out_dim = check_int(out_dim if out_dim is not None else dim, "out_dim", who)
        self.head_dim = check_int(head_dim, "head_dim", who)
        check_divisible(dim, head_dim, "dim", "head_dim", who)  # timm's reshape fails otherwise
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=qkv_bias, **dd) for _ in range(3))
        self.proj = nn.Linear(dim, self.out_dim, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.sr_ratio = check_int(sr_ratio, "sr_ratio", who)
        self.N_ratio = self.sr_ratio**2
        self.sr: nn.Module | None = None
        self.norm: nn.Module | None = None
        if self.sr_ratio > 1:
            self.sr = nn.AvgPool1d(kernel_size=self.N_ratio, stride=self.N_ratio)
            self.norm = norm_layer(dim, **dd)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"sr_ratio={self.sr_ratio}")

    def forward(self, x: Tensor) -> Tensor:
        """Attention of the tokens `x` `(B, N, C)` over the pooled tokens: `(B, N, out_dim)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        if tokens < self.N_ratio:  # the pooling would leave no key (torch fails inside it)
            raise ValueError(f"{who} expects at least sr_ratio ** 2 = {self.N_ratio} tokens, got N={tokens}")
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        source = x
        if self.sr is not None and self.norm is not None:
            # the pooled map made contiguous (M = N / sr^2 tokens, a small copy): BatchNorm's meta
            # function keeps its input's strides while the CPU kernel returns a contiguous tensor, so
            # under aot_autograd the traced strides disagreed with the real ones (torch 2.14)
            source = self.norm(self.sr(x.transpose(1, 2)).contiguous()).transpose(1, 2)  # (B, M, C)
        k, v = (proj(source).reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
                for proj in (self.k, self.v))  # (B, h, M, d) each
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points over the pooled tokens
            record_rows(self, q, k, grid=(tokens,), key_grid=(k.shape[-2],), scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))
