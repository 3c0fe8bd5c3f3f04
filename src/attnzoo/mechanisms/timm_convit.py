"""timm's gated positional self-attention of ConViT (`timm.models.convit.GPSA`, the local blocks of
`convit_tiny`, `convit_small`, `convit_base`): its constructor, call and state_dict keys.

ConViT (d'Ascoli et al., 2021, "ConViT: Improving Vision Transformers with Soft Convolutional Inductive
Biases") mixes, per head, the content attention with a positional one that starts out local (a
convolution's inductive bias) and learns how much of each to keep:

$$A = (1 - \\sigma(g_h))\\,\\mathrm{softmax}(q k^\\top / \\sqrt d)
+ \\sigma(g_h)\\,\\mathrm{softmax}(W_{pos} r), \\quad \\mathrm{out} = W_o\\,(A / \\textstyle\\sum_j A)\\,v$$

where `r_ij = (dx, dy, dx^2 + dy^2)` are the relative offsets of the patches of a square map. ConViT's
later blocks use plain multi-head attention (`timm.models.convit.MHSA`), which converts to
`attnzoo.compat.TimmAttention`.

Time O(B h N^2 d) and memory O(B h N^2) (the two maps are mixed before the values, so they are held).

Shape letters: B batch, N = S^2 patches of an S x S map, C = dim, h heads, d head width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_float, check_head_widths, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["TimmGPSA", "relative_offsets"]


def relative_offsets(side: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """timm's `get_rel_indices` for a `side x side` map: `(1, N, N, 3)` offsets `(dx, dy, dx^2 + dy^2)` of
    patch j from patch i (row-major), made in float32 and cast, as timm's."""
    steps = torch.arange(side, dtype=torch.float32)
    ind = steps.view(1, -1) - steps.view(-1, 1)
    indx = ind.repeat(side, side)
    indy = ind.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    offsets = torch.stack([indx, indy, indx**2 + indy**2], dim=-1)  # (N, N, 3)
    return offsets.unsqueeze(0).to(device=device, dtype=dtype)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 9, 8),), (2, 9, 8), channel_dim=-1))
class TimmGPSA(nn.Module):
    """timm's `convit.GPSA(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.,
    locality_strength=1.)` (`attnzoo.compat.TimmGPSA`): the module docstring gives the formula.

    Where timm fails, this says why: tokens that do not form a square map are a `ValueError` (timm's
    offset table fails on a shape mismatch).

    Shape:
        - x: `(B, N, C)` with N a square.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
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
        self.locality_strength = check_float(locality_strength, "locality_strength", who)
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **dd)
        self.pos_proj = nn.Linear(3, num_heads, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.gating_param = nn.Parameter(torch.ones(num_heads, **dd))

    def reset_parameters(self) -> None:
        """`gating_param` back to timm's 1 (the linear maps reset themselves; `local_init` is separate)."""
        nn.init.ones_(self.gating_param)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, locality_strength={self.locality_strength}"

    @torch.no_grad()
    def local_init(self) -> None:
        """timm's `local_init`: `v` the identity and each head's positional logits peaked at one offset of a
        `sqrt(h) x sqrt(h)` neighbourhood (a convolution's receptive field), scaled by `locality_strength`."""
        self.v.weight.copy_(torch.eye(self.dim))
        kernel = int(self.num_heads**0.5)
        center = (kernel - 1) / 2 if kernel % 2 == 0 else kernel // 2
        weight = self.pos_proj.weight
        for h1 in range(kernel):
            for h2 in range(kernel):
                position = h1 + kernel * h2
                weight[position, 2] = -1
                weight[position, 1] = 2 * (h1 - center)
                weight[position, 0] = 2 * (h2 - center)
        weight *= self.locality_strength

    def attention(self, x: Tensor) -> Tensor:
        """The mixed, renormalised (and, in training, dropped) weights `(B, h, N, N)` of `x` `(B, N, C)`."""
        who = type(self).__name__
        batch, tokens = check_shape(x, who, "B N C", C=self.dim)["B"], x.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{who} expects the tokens of a square map (N = S^2), got N={tokens}")
        heads, width = self.num_heads, self.head_dim
        qk = self.qk(x).reshape(batch, tokens, 2, heads, width).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)  # (B, h, N, d) each
        offsets = relative_offsets(side, self.qk.weight.dtype, self.qk.weight.device)  # (1, N, N, 3)
        positional = self.pos_proj(offsets).permute(0, 3, 1, 2).softmax(dim=-1)  # (1, h, N, N)
        content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, h, N, N)
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        mixed = (1.0 - gate) * content + gate * positional
        mixed = mixed / mixed.sum(dim=-1).unsqueeze(-1)
        return self.attn_drop(mixed)

    def forward(self, x: Tensor) -> Tensor:
        """Gated positional self-attention over the patches `x` `(B, N, C)`: `(B, N, C)`."""
        weights = self.attention(x)  # (B, h, N, N), checks x
        batch, tokens, _ = x.shape
        v = self.v(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        if capturing():  # map capture: the mixed rows of the capture's query points over the map
            side = math.isqrt(tokens)
            idx = query_indices((side, side), x.device)
            record(self, "rows", weights.index_select(-2, idx), grid=(side, side), queries=idx,
                   query_grid=(side, side), gate=torch.sigmoid(self.gating_param.detach()))
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, self.dim)
        return self.proj_drop(self.proj(out))
