"""Separable self-attention, "Separable Self-attention for Mobile Vision Transformers" (MobileViTv2,
Mehta and Rastegari, 2022), arXiv:2206.02680.

One latent token scores every token (a linear layer to one logit, softmax over the sequence); the
score-weighted sum of the keys is a single context vector that gates every value. Time $O(B L C^2)$,
memory $O(B L C)$: linear in the length L, no L x L map.

Deviations: the paper's code (ml-cvnets `LinearSelfAttention`) works on unfolded patches
`(B, C, P, N)` with one softmax per patch pixel; here the input is a token sequence `(B, L, C)` and the
softmax runs over L (reshape patches to `(B P, N, C)` for the paper's grouping). Query, key and value
come from one fused projection (its parameters); the keys are only ever summed with the scores, so
the tokens are pooled first and the keys' rows project the one pooled vector. fightingcv's
`MobileViTv2Attention(d_model)` leaves out the ReLU on the values (`act_layer=None` reproduces it)
and has no dropout.

Shape letters: B batch, L tokens, C channels (`dim`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_shape
from attnzoo._registry import Example, FreeSize, register
from attnzoo.kernels.route import plain_module
from attnzoo.maps.capture import capturing, record

__all__ = ["SeparableSelfAttention"]


@register(
    "mobilevit_v2",
    family="mobilevit",
    paper="Separable Self-attention for Mobile Vision Transformers",
    year=2022,
    layout="NLC",
    example=Example(kwargs={"dim": 16}, inputs=((2, 7, 16),), output=(2, 7, 16), channel_dim=-1,
                    free_sizes=(FreeSize(((0, 1),), 1),)),
    aliases=("separable_self_attention", "mobilevitv2"),
)
class SeparableSelfAttention(nn.Module):
    r"""Separable self-attention (MobileViTv2): a context vector from softmax-scored keys gates the values.

    $$
    c = \mathrm{softmax}_L(x W_I), \qquad
    k_{ctx} = \sum_{i=1}^{L} c_i\,(x W_K)_i, \qquad
    y = \big(\mathrm{act}(x W_V) \odot k_{ctx}\big) W_O
    $$

    with $W_I \in \mathbb{R}^{C \times 1}$ (the latent token) and act the ReLU. Time $O(B L C^2)$ for
    the projections plus $O(B L C)$ for the context, memory $O(B L C)$: linear in L.

    Args:
        dim: Channels C of the tokens.
        bias: Give the projections a bias. Default: True.
        attn_drop: Dropout on the context scores (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        act_layer: Activation on the values, or None for none (fightingcv's). Default: `nn.ReLU`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, L, C)`.
        - Output: `(B, L, C)`; with `need_weights=True` also the context scores `(B, L)` (sum to 1).

    Example:
        ```python
        >>> attn = SeparableSelfAttention(64)
        >>> x = torch.randn(2, 49, 64)
        >>> out, scores = attn(x, need_weights=True)
        >>> out.shape, scores.shape
        (torch.Size([2, 49, 64]), torch.Size([2, 49]))

        ```
    """

    def __init__(
        self,
        dim: int,
        bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        act_layer: type[nn.Module] | None = nn.ReLU,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 1 + 2 * dim, bias=bias, **factory)  # query logit, keys, values
        self.proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def _pooled_keys(self) -> bool:
        """Whether `qkv` is a plain `nn.Linear` without hooks, whose weight the pooled path may read
        directly (a LoRA or quantized wrapper, or a forward hook, must see the call)."""
        return plain_module(self.qkv, nn.Linear)

    def _rows(self, part: slice) -> tuple[Tensor, Tensor | None]:
        bias = None if self.qkv.bias is None else self.qkv.bias[part]
        return self.qkv.weight[part], bias

    def _logit_and_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The query logit and the values, `(B, L, 1)` and `(B, L, C)`: one product without the keys'
        rows of the fused projection (the keys are only ever pooled, see `_context`)."""
        w_logit, b_logit = self._rows(slice(0, 1))
        w_values, b_values = self._rows(slice(1 + self.dim, None))
        bias = None if b_logit is None or b_values is None else torch.cat([b_logit, b_values])
        return F.linear(x, torch.cat([w_logit, w_values]), bias).split((1, self.dim), -1)  # (1 + C, C) weight

    def _context(self, x: Tensor, scores: Tensor) -> Tensor:
        """`sum_i s_i k_i` `(B, 1, C)` for scores `(B, L, 1)`, keys `k = x W_K^T + b_K`: the projection
        is linear, so the tokens are pooled first and projected once, `(s^T x) W_K^T + (sum_i s_i) b_K`,
        instead of projecting all L tokens (a third fewer products in the layer)."""
        weight, bias = self._rows(slice(1, 1 + self.dim))  # (C, C), (C,)
        pooled = torch.matmul(scores.transpose(1, 2), x)  # (B, 1, L) @ (B, L, C) -> (B, 1, C)
        context = torch.matmul(pooled, weight.t())  # (B, 1, C)
        # sum_i s_i is 1 up to rounding without dropout; with it, the kept scores' sum
        return context if bias is None else context + scores.sum(1, keepdim=True) * bias

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gate the values with the scored context; `(out, scores)` with `need_weights`.

        Args:
            x: Tokens `(B, L, C)`.
            need_weights: Also return the `(B, L)` context scores. Default: False.
        """
        check_shape(x, type(self).__name__, "B L C", C=self.dim)
        if self._pooled_keys():
            logit, v = self._logit_and_values(x)  # (B, L, 1), (B, L, C)
            scores = logit.softmax(1)  # (B, L, 1): over the tokens
            context = self._context(x, self.attn_drop(scores))  # (B, 1, C)
        else:  # qkv wrapped or hooked: called as a module, every key projected
            logit, k, v = self.qkv(x).split((1, self.dim, self.dim), -1)  # (B, L, 1), (B, L, C) x 2
            scores = logit.softmax(1)
            context = (self.attn_drop(scores) * k).sum(1, keepdim=True)  # (B, 1, C)
        out = self.proj_drop(self.proj(self.act(v) * context))  # (B, L, C)
        if capturing():
            record(self, "spatial", scores[..., 0], grid=(x.shape[1],))
        return (out, scores[..., 0]) if need_weights else out
