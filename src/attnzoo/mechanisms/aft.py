"""Attention Free Transformer, AFT-full (and AFT-simple), "An Attention Free Transformer" (Zhai et al.,
2021), arXiv:2105.14103.

Each channel of each key is combined with a learned pair-wise position bias instead of a dot product:
$y_t = \\sigma(q_t) \\odot \\sum_{t'} \\exp(k_{t'} + w_{t,t'}) \\odot v_{t'} /
\\sum_{t'} \\exp(k_{t'} + w_{t,t'})$.
As the paper notes, $\\exp(k + w) = \\exp(w)\\exp(k)$ turns both sums into matrix products
$\\exp(W)\\,(\\exp(K) \\odot V)$ and $\\exp(W)\\exp(K)$, so no $T \\times T \\times d$ tensor is built:
memory $O(T^2 + B T d)$. The exponentials are stabilised by subtracting the per-channel maximum of K
and the per-row maximum of W (which cancel in the ratio).

Deviations from fightingcv's `AFT_FULL`: fightingcv needs exactly `n` tokens; here any $T \\le$
`max_len` uses the top-left $T \\times T$ block of W. fightingcv exponentiates without stabilisation
(overflow to inf/NaN for large logits); the factorised form here only underflows when one channel's keys
*and* one row's biases both span more than the dtype's exponent range (about 87 in float32), which
gives a 0 output for that entry. fightingcv's `simple=True` keeps its zero biases in a plain tensor
attribute (not moved by `.to()`); here `simple=True` has no bias at all. Causal masking and key padding
masks (both in the paper's autoregressive use) are additions.

Shape letters: B batch, T tokens, d channels (`dim`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_mask, check_shape, check_tensor
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["AFTFull"]


@register(
    "aft_full",
    family="aft",
    paper="An Attention Free Transformer",
    year=2021,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "max_len": 16},
        inputs=((2, 7, 8),),
        output=(2, 7, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 0),), 0), FreeSize(((0, 1),), 1)),  # T <= 2 * 7 + 1 <= max_len
    ),
    aliases=("aft", "attention_free_transformer"),
    for_input=lambda geo: {"max_len": geo.tokens},  # the position table covers the map's tokens
)
class AFTFull(nn.Module):
    r"""AFT-full: gated, position-biased, per-channel softmax pooling of the values.

    $$
    y_t = \sigma(q_t) \odot
    \frac{\sum_{t'} \exp(k_{t'} + w_{t,t'}) \odot v_{t'}}{\sum_{t'} \exp(k_{t'} + w_{t,t'})}
    $$

    with $q, k, v$ linear projections of the tokens and $W \in \mathbb{R}^{T_{max} \times T_{max}}$
    learned (`position_bias`); $t'$ runs over all unmasked tokens, or $t' \le t$ when `causal`;
    `simple=True` drops W (AFT-simple: one global context). Time $O(B T^2 d + B T d^2)$ ($O(B T d^2)$
    for AFT-simple without `causal`), memory $O(T^2 + B T d)$ ($O(B T d)$ for AFT-simple): the sums
    are the products $\exp(W)(\exp(K) \odot V)$ and $\exp(W)\exp(K)$.

    Args:
        dim: Width d of the tokens.
        max_len: Largest number of tokens $T_{max}$ (fightingcv's `n`); W is `(max_len, max_len)`.
            Default: 64.
        simple: AFT-simple: no position biases (fightingcv's `simple`). Default: False.
        causal: Token t pools tokens `0..t` only. Default: False.
        qkv_bias: Biases on the query/key/value projections. Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, T, d)` with $T \le$ `max_len` (any T for AFT-simple); key_mask: `(B, T)` bool, True
          for real tokens.
        - Output: `(B, T, d)`; with `need_weights=True` also the per-channel weights `(B, T, T, d)`
          (built explicitly, $O(B T^2 d)$ memory: only then).

    Example:
        ```python
        >>> aft = AFTFull(64, max_len=49)
        >>> x = torch.randn(2, 49, 64)
        >>> aft(x).shape
        torch.Size([2, 49, 64])
        >>> aft(x[:, :10], need_weights=True)[1].shape
        torch.Size([2, 10, 10, 64])

        ```
    """

    def __init__(
        self,
        dim: int,
        max_len: int = 64,
        simple: bool = False,
        causal: bool = False,
        qkv_bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.max_len = check_int(max_len, "max_len", who)
        self.simple = simple
        self.causal = causal
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.position_bias = None if simple else nn.Parameter(torch.zeros(max_len, max_len, **factory))

    def reset_parameters(self) -> None:
        """`position_bias` back to 0 (AFT-simple's start; the linear maps reset themselves)."""
        if self.position_bias is not None:
            nn.init.zeros_(self.position_bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_len={self.max_len}, simple={self.simple}, causal={self.causal}"

    def _biases(self, length: int, like: Tensor) -> Tensor | None:
        """`exp(W - rowmax)` for T tokens `(T, T)`, causal entries zeroed; None for global AFT-simple."""
        if self.position_bias is None:
            if not self.causal:
                return None
            return torch.ones(length, length, dtype=like.dtype, device=like.device).tril()  # (T, T)
        w = self.position_bias[:length, :length]  # (T, T)
        if self.causal:
            future = ~torch.ones(length, length, dtype=torch.bool, device=w.device).tril()  # (T, T)
            w = w.masked_fill(future, -torch.inf)
        return (w - w.amax(dim=1, keepdim=True)).exp()  # (T, T), row t: weights of t'

    def _record(self, ew: Tensor | None, ek: Tensor, length: int) -> None:
        """Record the capture's query rows of the pooling weights, averaged over the d channels."""
        idx = query_indices((length,), ek.device)
        with torch.no_grad():
            rows = torch.ones(len(idx), length, dtype=ek.dtype, device=ek.device) if ew is None else ew[idx]
            weights = rows[None, :, :, None] * ek[:, None]  # (B, Q, T', d): exp(k + w), rescaled
            weights = weights / weights.sum(2, keepdim=True).clamp_min(torch.finfo(ek.dtype).tiny)
        record(self, "rows", weights.mean(-1)[:, None], grid=(length,), queries=idx, query_grid=(length,),
               note="weights exp(k + w) normalised over positions, mean over channels")

    def forward(
        self, x: Tensor, need_weights: bool = False, *, key_mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Pool the values per channel; `(out, weights)` with `need_weights`.

        Args:
            x: Tokens `(B, T, d)`.
            need_weights: Also return the `(B, T, T, d)` weights. Default: False.
            key_mask: `(B, T)` bool, False for padding tokens nobody pools. Default: None.
        """
        who = type(self).__name__
        dims = check_shape(x, who, "B T C", "x", C=self.dim)
        batch, length = dims["B"], dims["T"]
        if self.position_bias is not None and length > self.max_len:
            raise ValueError(f"{who} expects at most max_len={self.max_len} tokens, got x with T={length}")
        k = self.k(x)  # (B, T, d)
        if key_mask is not None:
            check_tensor(key_mask, who, "key_mask", floating=False)
            if key_mask.dtype != torch.bool:
                raise TypeError(
                    f"{who} expects key_mask of dtype torch.bool (True = keep), got {key_mask.dtype}"
                )
            keep = check_mask(key_mask, (batch, length), who, "key_mask").expand(batch, length)
            k = k.masked_fill(~keep[..., None], -torch.inf)  # (B, T, d): padding weighs exp(-inf) = 0
        k_max = k.amax(dim=1, keepdim=True)  # (B, 1, d)
        k_max = torch.where(torch.isfinite(k_max), k_max, torch.zeros_like(k_max))  # all-padding: 0
        ek = (k - k_max).exp()  # (B, T, d)
        v = self.v(x)  # (B, T, d)
        ew = self._biases(length, x)
        if ew is None:  # AFT-simple: one context for every token
            num, den = (ek * v).sum(1, keepdim=True), ek.sum(1, keepdim=True)  # (B, 1, d) each
        else:
            num, den = ew @ (ek * v), ew @ ek  # (T, T) @ (B, T, d) -> (B, T, d) each
        # den is 0 only where every pooled token is padding (then num is 0 too): output 0, not NaN
        out = self.q(x).sigmoid() * (num / den.clamp_min(torch.finfo(den.dtype).tiny))  # (B, T, d)
        if capturing():
            self._record(ew, ek, length)
        if not need_weights:
            return out
        ew_full = torch.ones(length, length, dtype=x.dtype, device=x.device) if ew is None else ew
        weights = ew_full[None, :, :, None] * ek[:, None]  # (B, T, T', d)
        weights = weights / weights.sum(2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return out, weights
