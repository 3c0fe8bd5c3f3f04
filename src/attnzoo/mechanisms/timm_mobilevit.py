"""timm's MobileViT v2 separable self-attention (`timm.models.mobilevit.LinearSelfAttention`): its
constructor, call `(x, x_prev=None)` on unfolded patches and state_dict keys.

Mehta and Rastegari, "Separable Self-attention for Mobile Vision Transformers", 2022,
https://arxiv.org/abs/2206.02680 (`attnzoo.SeparableSelfAttention` is the canonical class, on token
sequences). timm, like the authors' ml-cvnets, works on unfolded patches `(B, C, P, N)` with 1x1
convolutions, one softmax over the N patches for each of the P pixel positions. As in the canonical
class, the keys are only ever summed with the context scores, so the tokens are pooled first and the
keys' rows of `qkv_proj` project one pooled vector per pixel position: one of the three C x C
projections over all tokens disappears. A hooked or wrapped `qkv_proj` is called as a module.

With `x_prev` (cross-attention: queries and keys from `x_prev`, values from `x`), timm slices one row
of the projection for the values and its convolution fails; this class uses the values' C rows.

Shape letters: B batch, C channels, P pixels per patch, N patches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.kernels.route import plain_module
from attnzoo.maps.capture import capturing, record

__all__ = ["TimmLinearSelfAttention"]



@register_compat(example=Example({"embed_dim": 8}, ((2, 8, 4, 5),), (2, 8, 4, 5)))
class TimmLinearSelfAttention(nn.Module):
    """timm's `mobilevit.LinearSelfAttention(embed_dim, attn_drop=0., proj_drop=0., bias=True)`
    (`attnzoo.compat.TimmLinearSelfAttention`): the module docstring says what it is.

    $c = \\mathrm{softmax}_N(W_I x)$, $k_{ctx} = \\sum_n c_n (W_K x)_n$,
    $y = W_O\\,(\\mathrm{ReLU}(W_V x) \\odot k_{ctx})$, per pixel position of the patches.

    Shape:
        - x: `(B, C, P, N)`; x_prev: `(B, C, P, N')` or None.
        - Output: `(B, C, P, N)`.
    """

    def __init__(
        self,
        embed_dim: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = check_int(embed_dim, "embed_dim", who)
        self.qkv_proj = nn.Conv2d(embed_dim, 1 + 2 * embed_dim, 1, bias=bias, **dd)  # logit, keys, values
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.out_proj = nn.Conv2d(embed_dim, embed_dim, 1, bias=bias, **dd)
        self.out_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}"

    def _rows(self, part: slice) -> tuple[Tensor, Tensor | None]:
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[part]
        return self.qkv_proj.weight[part], bias

    def _context(self, x: Tensor, scores: Tensor) -> Tensor:
        """`sum_n s_n k_n` `(B, C, P, 1)` for scores `(B, 1, P, N)` and keys `k = W_K x + b_K` of `x`:
        `W_K (sum_n s_n x_n) + (sum_n s_n) b_K`, the projection applied once per pixel position."""
        weight, bias = self._rows(slice(1, 1 + self.embed_dim))  # (C, C, 1, 1), (C,)
        pooled = (x * scores).sum(-1, keepdim=True)  # (B, C, P, 1)
        context = F.conv2d(pooled, weight)
        # sum_n s_n is 1 up to rounding without dropout; with it, the kept scores' sum
        return context if bias is None else context + scores.sum(-1, keepdim=True) * bias[:, None, None]

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> Tensor:
        """Separable attention over the patches of `x` `(B, C, P, N)` (queries and keys from `x_prev`
        when given): `(B, C, P, N)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B C P N", C=self.embed_dim)
        source = x if x_prev is None else x_prev
        if x_prev is not None:
            check_shape(x_prev, who, "B C P N", "x_prev", B=dims["B"], C=self.embed_dim, P=dims["P"])
        c = self.embed_dim
        if plain_module(self.qkv_proj, nn.Conv2d):
            w_logit, b_logit = self._rows(slice(0, 1))
            w_values, b_values = self._rows(slice(1 + c, None))
            if x_prev is None:  # logit and values in one product
                bias = None if b_logit is None or b_values is None else torch.cat([b_logit, b_values])
                logit, v = F.conv2d(x, torch.cat([w_logit, w_values]), bias).split((1, c), 1)
            else:
                logit, v = F.conv2d(x_prev, w_logit, b_logit), F.conv2d(x, w_values, b_values)
            scores = F.softmax(logit, dim=-1)  # (B, 1, P, N'): over the patches
            context = self._context(source, self.attn_drop(scores))  # (B, C, P, 1)
        else:  # qkv_proj wrapped or hooked: called as a module, every key projected
            logit, k, v = self.qkv_proj(source).split((1, c, c), 1)
            if x_prev is not None:  # the values come from x
                v = self.qkv_proj(x)[:, 1 + c:]
            scores = F.softmax(logit, dim=-1)
            context = (k * self.attn_drop(scores)).sum(-1, keepdim=True)
        if capturing():  # map capture: each pixel position's scores over the patches
            record(self, "spatial", scores[:, 0], grid=tuple(scores.shape[2:]))
        return self.out_drop(self.out_proj(F.relu(v) * context))
