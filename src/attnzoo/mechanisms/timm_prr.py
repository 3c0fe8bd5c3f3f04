"""timm's patch representation refinement pool (`timm.layers.attention_pool.AttentionPoolPrr`, the head of a
ViT built with `global_pool='prr'`): its constructor, call and state_dict keys, run by `attnzoo.attend`.

"Locality-Attending Vision Transformer" (ICLR 2026): before pooling, the tokens attend to each other once
with no projections at all: each head's slice of a token is its query, key and value at once,

$$\\mathrm{out} = \\mathrm{pool}\\big(\\mathrm{norm}_2(\\mathrm{softmax}(t\\, t^\\top / \\sqrt d)\\, t)\\big),
\\quad t = \\mathrm{norm}_1(x)$$

pooled by the first token (`'token'`) or the mean (`'avg'`). Time O(B N^2 C), memory O(B h N^2) (the
SDPA kernels keep the map out of memory).

Shape letters: B batch, N tokens, C = dim, h heads, d = C / h.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_head_widths, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmAttentionPoolPrr"]


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 8), channel_dim=-1))
class TimmAttentionPoolPrr(nn.Module):
    """timm's `AttentionPoolPrr(dim, num_heads=8, pool_type='token', pre_norm=False, post_norm=False,
    norm_layer=None)` (`attnzoo.compat.TimmAttentionPoolPrr`): the module docstring gives the formula.
    `norm_layer` defaults to `nn.LayerNorm` where a norm is asked for, as timm's.

    Shape:
        - x: `(B, N, dim)`.
        - Output: `(B, dim)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        pool_type: str = "token",
        pre_norm: bool = False,
        post_norm: bool = False,
        norm_layer: type[nn.Module] | None = None,
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
        self.pool = check_choice(pool_type, ("token", "avg"), "pool_type", who)
        self.out_features = dim
        norm = norm_layer if norm_layer is not None else nn.LayerNorm
        self.pre_norm = norm(dim, **dd) if pre_norm else nn.Identity()
        self.post_norm = norm(dim, **dd) if post_norm else nn.Identity()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, pool_type={self.pool!r}"

    def forward(self, x: Tensor) -> Tensor:
        """Refine the tokens `x` `(B, N, C)` by one projection-free attention, then pool: `(B, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        x = self.pre_norm(x)
        heads = x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        out = attend(heads, heads, heads, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points over the tokens
            record_rows(self, heads, heads, grid=(tokens,), scale=self.scale)
        out = self.post_norm(out.transpose(1, 2).reshape(batch, tokens, self.dim))
        return out[:, 0] if self.pool == "token" else out.mean(1)
