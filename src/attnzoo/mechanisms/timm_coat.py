"""timm's CoaT factorized attention (`timm.models.coat.FactorAttnConvRelPosEnc`): its constructor, call
`(x, size)` and state_dict keys.

Xu, Xu, Chang, Tu, "Co-Scale Conv-Attentional Image Transformers", ICCV 2021,
https://arxiv.org/abs/2104.06399.

Factorized attention normalises the keys over the tokens instead of normalising each query's
weights: $\\mathrm{softmax}_N(K)^\\top V$ is one `(d, d)` matrix per head, which every query multiplies,
so time and memory are $O(N d^2)$, never $N \\times N$. The convolutional relative position encoding
(`crpe`, a depth-wise convolution of the values with one window per group of heads, times the
queries, the class token left out) is CoaT's `ConvRelPosEnc`, which a CoaT shares between the blocks
of a stage: `attnzoo.convert.from_timm` keeps that module (the same object, so the sharing and the
stage's keys stay as they are) and this class calls it; built directly, `crpe` is given the same way
(`shared_crpe`). `attnzoo.replace(model, timm.models.coat.FactorAttnConvRelPosEnc)` swaps a whole
CoaT's attention with the same logits; `attnzoo.capture_maps` records the rows of the implicit
token-mixing matrix $s\\,Q\\,\\mathrm{softmax}_N(K)^\\top$ (the position encoding aside). timm's
`attn_drop` is never applied (its own note); it is kept as an attribute.

Shape letters: B batch, N = 1 + H W tokens (the class token first), C = dim, h heads, d head width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["TimmFactorAttention"]


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmFactorAttention(nn.Module):
    """timm's `coat.FactorAttnConvRelPosEnc(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.,
    shared_crpe=None)` (`attnzoo.compat.TimmFactorAttention`): the module docstring says what it is.

    $y_h = s\\,Q_h\\,\\big(\\mathrm{softmax}_N(K_h)^\\top V_h\\big) + \\mathrm{crpe}(Q, V)_h$, $s = d^{-1/2}$,
    then `proj`. Without a `crpe` (timm's default `shared_crpe=None` fails in forward) the encoding
    term is left out.

    Shape:
        - x: `(B, N, C)` with N = 1 + H W; size: `(H, W)` (default: square).
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        shared_crpe: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        # never applied, as in timm
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        if shared_crpe is not None and not isinstance(shared_crpe, nn.Module):
            raise TypeError(f"{who} expects shared_crpe to be an nn.Module or None, "
                            f"got {type(shared_crpe).__name__}")
        self.crpe = shared_crpe

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Factorized attention over the tokens `x` `(B, N, C)` of an `(H, W)` map plus the class
        token: `(B, N, C)`. `size` defaults to the square map of the N - 1 tokens."""
        who = type(self).__name__
        if size is None:
            tokens = check_shape(x, who, "B N C", C=self.dim)["N"]
            side = math.isqrt(max(tokens - 1, 0))
            if side * side != tokens - 1:
                raise ValueError(f"{who} expects size=(H, W) for {tokens} tokens: {tokens - 1} after "
                                 "the class token do not make a square map")
            size = (side, side)
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in size
        ):
            raise TypeError(f"{who} expects size to be a pair of ints (H, W), got {size!r}")
        if min(size) < 1:  # (-1, -4) matched 1 + 4 tokens, and the relative encoding's map has no such sides
            raise ValueError(f"{who} expects size to be a pair of positive ints (H, W), got {tuple(size)}")
        dims = check_shape(x, who, "B N C", C=self.dim, N=1 + size[0] * size[1])
        batch, tokens = dims["B"], dims["N"]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        keys = k.softmax(dim=2)  # over the tokens
        out = q @ (keys.transpose(-1, -2) @ v)  # (B, h, N, d): a (d, d) matrix per head
        if capturing():  # map capture: rows of the implicit mixing matrix s Q softmax_N(K)^T
            idx = query_indices((tokens,), x.device)
            rows = self.scale * q.index_select(2, idx) @ keys.transpose(-1, -2)  # (B, h, Q, N)
            record(self, "rows", rows, grid=(tokens,), queries=idx, query_grid=(tokens,),
                   note="no softmax over keys: the signed mixing weights s q softmax_N(k)^T")
        out = self.scale * out
        if self.crpe is not None:
            out = out + self.crpe(q, v, size=tuple(size))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))
