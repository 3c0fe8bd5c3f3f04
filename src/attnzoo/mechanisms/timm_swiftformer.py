"""timm's SwiftFormer attention (`timm.models.swiftformer.EfficientAdditiveAttention`, `swiftformer_xs` ...
`swiftformer_l3`): its constructor, call and state_dict keys.

SwiftFormer (Shaker et al., 2023, "SwiftFormer: Efficient Additive Attention for Transformer-based
Real-time Mobile Vision Applications") replaces the N x N map by one global query: each token's
l2-normalised query gets a learnt score, the scores (l2-normalised over the tokens) pool the queries into
one vector, and every key is multiplied by it elementwise:

$$\\alpha = \\frac{\\hat Q w_g / \\sqrt d}{\\lVert \\hat Q w_g / \\sqrt d \\rVert_N}, \\quad
g = \\textstyle\\sum_i \\alpha_i \\hat q_i, \\quad
\\mathrm{out} = W_f\\big(W_p (g \\odot \\hat K) + \\hat Q\\big)$$

(hats: l2-normalised per token). Time and memory O(B N d).

Shape letters: B batch, C = in_dims, H, W map, N = H W, d = token_dim (times num_heads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.maps.capture import capturing, record

__all__ = ["TimmEfficientAdditiveAttention"]


@register_compat(example=Example({"in_dims": 8, "token_dim": 4, "num_heads": 2}, ((2, 8, 3, 5),),
                                 (2, 4, 3, 5)))
class TimmEfficientAdditiveAttention(nn.Module):
    """timm's `swiftformer.EfficientAdditiveAttention(in_dims=512, token_dim=256, num_heads=1)`
    (`attnzoo.compat.TimmEfficientAdditiveAttention`): the module docstring gives the formula.

    Shape:
        - x: `(B, in_dims, H, W)`.
        - Output: `(B, token_dim, H, W)`.
    """

    def __init__(
        self,
        in_dims: int = 512,
        token_dim: int = 256,
        num_heads: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_dims = check_int(in_dims, "in_dims", who)
        self.token_dim = check_int(token_dim, "token_dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        width = token_dim * num_heads
        self.scale_factor = token_dim**-0.5
        self.to_query = nn.Linear(in_dims, width, **dd)
        self.to_key = nn.Linear(in_dims, width, **dd)
        self.w_g = nn.Parameter(torch.randn(width, 1, **dd))
        self.proj = nn.Linear(width, width, **dd)
        self.final = nn.Linear(width, token_dim, **dd)

    def reset_parameters(self) -> None:
        """`w_g` a standard normal, as timm's `torch.randn` (the linear maps reset themselves)."""
        nn.init.normal_(self.w_g)

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, token_dim={self.token_dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor) -> Tensor:
        """Additive attention over the positions of `x` `(B, C, H, W)`: `(B, token_dim, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.in_dims)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        query = F.normalize(self.to_query(tokens), dim=-1)  # (B, N, d)
        key = F.normalize(self.to_key(tokens), dim=-1)
        scores = F.normalize(query @ self.w_g * self.scale_factor, dim=1)  # (B, N, 1), over the tokens
        if capturing():  # map capture: the global query's weights over the map
            record(self, "rows", scores.detach().transpose(1, 2)[:, None], grid=(height, width),
                   queries=torch.zeros(1, dtype=torch.long), query_grid=(1,),
                   note="one global query: its L2-normalised scores over the map (signed, no softmax)")
        pooled = torch.sum(scores * query, dim=1, keepdim=True)  # (B, 1, d)
        out = self.final(self.proj(pooled * key) + query)  # (B, N, token_dim)
        return out.transpose(1, 2).reshape(batch, -1, height, width)
