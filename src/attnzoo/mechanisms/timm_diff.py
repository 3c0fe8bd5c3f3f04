"""timm's differential attention (`timm.layers.diff_attention.DiffAttention`, the ViTs built with
`attn_layer='diff'`: `vit_dwee_*`, `vit_dlittle_*`): its constructor, call and state_dict keys, run by
`attnzoo.attend`.

Differential Transformer (Ye et al., 2024, arXiv:2410.05258): each head splits its queries and keys
into two halves of width d and attends with both, sharing its values of width 2d:

$$A_i = \\mathrm{softmax}(q_i k_i^\\top / \\sqrt d + M), \\quad
\\mathrm{out} = (1 - \\lambda_{init})\\,\\mathrm{RMSNorm}\\big((A_1 - \\lambda A_2)\\,v\\big)$$

with $\\lambda = e^{\\lambda_{q1} \\cdot \\lambda_{k1}} - e^{\\lambda_{q2} \\cdot \\lambda_{k2}}
+ \\lambda_{init}$ (or $e^{a} - e^{b} + \\lambda_{init}$ with `dual_lambda`) and
$\\lambda_{init} = 0.8 - 0.6 e^{-0.3\\,depth}$.
The difference cancels the attention both maps give to irrelevant tokens.

Kept from timm, where its numbers come from:
- the vector parameterisation's lambda is computed in float32 and then cast to the input dtype (timm's
  `.float()`), so a float64 model sees a float32-rounded lambda, as in timm;
- the two maps draw their dropout masks one after the other, as timm's default (fused) path does; with
  `fused_attn = False` (copied from timm's module) one mask is drawn over both, as timm's other path.

One difference, where timm gives NaN: a query whose every key `attn_mask` masks gets zero output here
(`attend`'s rule), as everywhere in attnzoo.

Shape letters: B batch, N tokens, C = dim, h heads, d = C / (2h) the width of each half.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_bool, check_dropout, check_int, check_mask, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record, row_weights

__all__ = ["TimmDiffAttention"]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmDiffAttention(nn.Module):
    """timm's `DiffAttention(dim, num_heads=8, qkv_bias=False, qk_norm=False, scale_norm=False,
    proj_bias=True, attn_drop=0., proj_drop=0., norm_layer=None, depth=0, dual_lambda=False)`
    (`attnzoo.compat.TimmDiffAttention`): the module docstring gives the formula.

    `norm_layer` (for `qk_norm` and `scale_norm`) defaults to an RMSNorm with timm's `eps=1e-6`;
    `sub_norm` is an RMSNorm over each head's 2d output channels with `eps=1e-5`, as timm's. As timm's, the
    lambdas are made in float32 whatever `dtype` says (`.to()` moves them with the rest).

    Shape:
        - x: `(B, N, C)`; attn_mask: bool (True = may attend) or float (added), broadcastable to
          `(B, h, N, N)` and applied to both maps of a head (timm's default path), or None.
        - Output: `(B, N, C)`.
    """

    # from_timm keeps timm's float32 lambdas in a half-precision module: inputs follow the other weights
    dtype_free_parameters = (*_LAMBDAS, "lambda_a", "lambda_b")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        depth: int = 0,
        dual_lambda: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % (2 * num_heads):
            raise ValueError(
                f"{who} expects dim divisible by 2 * num_heads (each head's queries and keys split in "
                f"two halves), got dim={dim} and num_heads={num_heads}"
            )
        self.head_dim = dim // num_heads // 2
        self.scale = self.head_dim**-0.5
        self.dual_lambda = bool(dual_lambda)
        self.set_lambda_init(depth)
        norm = norm_layer if norm_layer is not None else _rms_norm_1e6
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.norm = norm(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        shape = () if self.dual_lambda else (self.head_dim,)
        for name in ("lambda_a", "lambda_b") if self.dual_lambda else _LAMBDAS:  # float32 whatever dtype says
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32)))
        self.sub_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5, **dd)
        self.fused_attn = True  # timm's flag; False: one dropout mask over both maps, as timm's other path
        self.reset_parameters()

    def set_lambda_init(self, depth: int) -> None:
        """timm's: `lambda_init = 0.8 - 0.6 exp(-0.3 depth)` for a block at `depth`."""
        depth = check_int(depth, "depth", type(self).__name__, minimum=0)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)

    def reset_parameters(self) -> None:
        """timm's initialisation of the lambdas: zeros (`dual_lambda`) or normal with std 0.1."""
        for name in ("lambda_a", "lambda_b") if self.dual_lambda else _LAMBDAS:
            if self.dual_lambda:
                nn.init.zeros_(getattr(self, name))
            else:
                nn.init.normal_(getattr(self, name), mean=0.0, std=0.1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"dual_lambda={self.dual_lambda}")

    def lambda_full(self) -> Tensor:
        """The scalar lambda weighting the second map (timm's `_compute_lambda`)."""
        if self.dual_lambda:
            a, b = (getattr(self, name) for name in ("lambda_a", "lambda_b"))
            return torch.exp(a) - torch.exp(b) + self.lambda_init
        q1, k1, q2, k2 = (getattr(self, name) for name in _LAMBDAS)
        first = torch.exp(torch.sum(q1 * k1, dim=-1).float())  # timm's float32
        second = torch.exp(torch.sum(q2 * k2, dim=-1).float())
        return first - second + self.lambda_init

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Differential self-attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens, heads, width = dims["B"], dims["N"], self.num_heads, self.head_dim
        if attn_mask is not None:  # SDPA's rule, checked here so that the message names attn_mask
            check_mask(attn_mask, (batch, heads, tokens, tokens), who, "attn_mask")
        q, k, v = self.qkv(x).chunk(3, dim=2)  # (B, N, C) each
        q = self.q_norm(q.reshape(batch, tokens, 2 * heads, width).transpose(1, 2))  # (B, 2h, N, d)
        k = self.k_norm(k.reshape(batch, tokens, 2 * heads, width).transpose(1, 2))  # (B, 2h, N, d)
        v = v.reshape(batch, tokens, heads, 2 * width).transpose(1, 2)  # (B, h, N, 2d)
        lam = self.lambda_full().to(q.dtype)
        (q1, q2), (k1, k2) = (t.unflatten(1, (heads, 2)).unbind(2) for t in (q, k))  # (B, h, N, d) each
        dropout_p = self.attn_drop.p if self.training else 0.0
        causal = check_bool(is_causal, "is_causal", who)  # timm's SDPA call refuses others
        if dropout_p > 0.0 and not self.fused_attn:  # timm's other path: one dropout mask over all 2h maps
            pairs = attn_mask
            if pairs is not None and pairs.ndim >= 3 and pairs.shape[-3] > 1:
                pairs = pairs.repeat_interleave(2, dim=-3)  # each head's mask for both of its maps
            both = attend(q, k, v.repeat_interleave(2, dim=1), mask=pairs, causal=causal, dropout_p=dropout_p,
                          scale=self.scale)  # (B, 2h, N, 2d)
            first, second = both[:, 0::2], both[:, 1::2]
        else:
            first, second = (
                attend(qi, ki, v, mask=attn_mask, causal=causal, dropout_p=dropout_p, scale=self.scale)
                for qi, ki in ((q1, k1), (q2, k2))
            )  # (B, h, N, 2d) each, in the order of dropout draws of timm's default (fused) path
        if capturing():  # map capture: the differential weights of the capture's query points
            self._record(q1, k1, q2, k2, lam, attn_mask, causal)
        out = self.sub_norm(first - lam * second) * (1 - self.lambda_init)  # (B, h, N, 2d)
        out = self.norm(out.transpose(1, 2).reshape(batch, tokens, self.dim))  # (B, N, C)
        return self.proj_drop(self.proj(out))

    def _record(self, q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, lam: Tensor, mask: Tensor | None,
                causal: bool) -> None:
        """Record `softmax_1 - lambda softmax_2` for the capture's query points (rows may be negative)."""
        grid = (q1.shape[-2],)
        options: dict[str, Any] = {"grid": grid, "mask": mask, "causal": causal, "scale": self.scale}
        first, idx = row_weights(q1, k1, **options)
        second, _ = row_weights(q2, k2, **options)
        record(self, "rows", first - lam.detach() * second, grid=grid, queries=idx, query_grid=grid,
               differential=True, note="softmax_1 - lambda softmax_2: rows sum to 1 - lambda, can be < 0")


def _rms_norm_1e6(features: int, **dd: Any) -> nn.Module:
    """timm's default `norm_layer` here, `RmsNorm(features)` (eps 1e-6), as torch's `nn.RMSNorm`."""
    return nn.RMSNorm(features, eps=1e-6, **dd)
