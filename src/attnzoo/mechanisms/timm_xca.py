"""timm's cross-covariance attentions (`timm.models.xcit.XCA` in XCiT and
`timm.models.edgenext.CrossCovarianceAttn` in EdgeNeXt): their constructors, calls and state_dict
keys, run by `attnzoo.attend`.

El-Nouby, Touvron, Caron, Bojanowski, Douze, Joulin, Laptev, Neverova, Synnaeve, Verbeek, Jégou,
"XCiT: Cross-Covariance Image Transformers", NeurIPS 2021, https://arxiv.org/abs/2106.09681;
Maaz et al., "EdgeNeXt", ECCVW 2022, https://arxiv.org/abs/2206.10589.

Cross-covariance attention attends over the channels of each head instead of over the tokens: the
queries and keys of a head are `(d, N)` (one row per channel), l2-normalised along the tokens
(`F.normalize`, eps 1e-12, as timm) and their `(d, d)` logits multiplied by a learnable per-head
`temperature`. That is a softmax attention with the d channels as its tokens and the N tokens as its
features, so `attend` runs it with `scale=1.0` on the temperature-scaled queries (timm scales the
logits: the same numbers up to rounding). The cost is linear in N.

`attnzoo.convert.from_timm` converts both (the same keys, so timm's checkpoint loads with
`strict=True`), and `attnzoo.replace` swaps a whole XCiT's or EdgeNeXt's attention with the same
logits; `attnzoo.capture_maps` then records channel-to-channel rows (`grid=(d,)`, meta
`unit="channel"`). XCiT's class attention is CaiT's `ClassAttn` (`attnzoo.compat.TimmCaitClassAttention`).
timm's experimental fused XCA path (`set_fused_attn(experimental=True)`) leaves `attn_drop` out;
this class applies it as timm's default path does.

Shape letters: B batch, N tokens, C = dim, h heads, d = C / h channels per head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmCrossCovarianceAttention", "TimmXCA"]

_NOTE = "channel-to-channel weights of each head (cross-covariance attention over the channels)"


class _CrossCovariance(nn.Module):
    """The module both timm classes are: `(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`,
    keys `temperature` `(h, 1, 1)`, `qkv`, `proj` (registered in timm's order). The subclasses define
    `__init__` and `forward` themselves: the shared option and input checks wrap a class's own ones."""

    def _build(
        self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
        device: torch.device | str | None, dtype: torch.dtype | None,
    ) -> None:
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1, **dd))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def reset_parameters(self) -> None:
        """`temperature` back to timm's 1 (the linear maps reset themselves)."""
        nn.init.ones_(self.temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def no_weight_decay(self) -> set[str]:
        """timm's: the temperature stays out of weight decay."""
        return {"temperature"}

    def _attention(self, x: Tensor) -> Tensor:
        """Cross-covariance attention over the channels of each head of `x` `(B, N, C)`: `(B, N, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # (B, h, d, N) each: the channels are the rows
        # the temperature scales the queries, which scales each head's (d, d) logits as timm's does
        q = nn.functional.normalize(q, dim=-1) * self.temperature  # (B, h, d, N) * (h, 1, 1)
        k = nn.functional.normalize(k, dim=-1)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=1.0)  # (B, h, d, N)
        if capturing():  # map capture: the rows of the query channels over the head's d channels
            record_rows(self, q, k, grid=(self.head_dim,), scale=1.0, unit="channel", note=_NOTE)
        out = out.permute(0, 3, 1, 2).reshape(batch, tokens, self.dim)  # (B, N, h, d) -> (B, N, C)
        return self.proj_drop(self.proj(out))


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmXCA(_CrossCovariance):
    """timm's `xcit.XCA(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmXCA`): XCiT's cross-covariance attention; keys `temperature`, `qkv`, `proj`
    as timm's.

    With $Q_h, K_h, V_h$ the `(N, d)` queries, keys and values of head h, $\\hat Q_h, \\hat K_h$ their
    columns divided by $\\max(\\lVert\\cdot\\rVert_2, 10^{-12})$ and $\\tau_h$ the head's temperature,

    $$
    A_h = \\mathrm{softmax}(\\tau_h\\, \\hat Q_h^\\top \\hat K_h) \\in \\mathbb{R}^{d \\times d},
    \\qquad Y_h = V_h A_h^\\top ,
    $$

    the softmax over each row, then `proj` on the concatenated heads. Time $O(B N C d)$, memory
    $O(B h d^2)$ besides the projections: linear in N.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`.
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
        self._build(dim, num_heads, qkv_bias, attn_drop, proj_drop, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Cross-covariance attention over the channels of each head of `x` `(B, N, C)`: `(B, N, C)`."""
        return self._attention(x)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmCrossCovarianceAttention(_CrossCovariance):
    """timm's `edgenext.CrossCovarianceAttn(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmCrossCovarianceAttention`): EdgeNeXt's cross-covariance attention, the same
    function as XCiT's `XCA` (`attnzoo.compat.TimmXCA` has the formula); keys `temperature`, `qkv`,
    `proj` as timm's.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`.
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
        self._build(dim, num_heads, qkv_bias, attn_drop, proj_drop, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Cross-covariance attention over the channels of each head of `x` `(B, N, C)`: `(B, N, C)`."""
        return self._attention(x)
