r"""Sequence (encoder-decoder) attention: the seed's scoring rules, batched, with key padding masks.

Scoring rules, each scoring a query $q_i$ against every key $k_j$ and averaging the values with
$\mathrm{softmax}_j$ of the scores:

- `ConcatAttention`, the seed's rule 1: one linear layer on $[q_i; k_j]$. Being affine, its
  query term is the same for every key and cancels in the softmax: the weights depend on the keys only.
- `AdditiveAttention`, the seed's rule 2 (Bahdanau et al., 2014, arXiv:1409.0473):
  $v^\top \tanh(W [q_i; k_j] + b)$; the seed's "sum" is $v$ of ones.
- `DotProductAttention`, the seed's rule 3 (Vaswani et al., 2017, arXiv:1706.03762):
  $q_i \cdot k_j / \sqrt{d}$, through `attnzoo.functional.attend`.
- `GeneralAttention`, Luong et al.'s "general" score (2015, arXiv:1508.04025): $q_i^\top W k_j$,
  through `attend`.

`LocationAttention`, the canonical, batched form of the seed's `Attn`, and `Attn` itself (re-exported
from `attnzoo.compat`) are in `attnzoo.mechanisms.seq2seq_location`.

No rule builds the `(B, Lq, Lk, dq + dk)` concatenation: $W [q; k] = W_q q + W_k k$ with
$W = [W_q, W_k]$, so each side is projected once and the two are broadcast-added.

Mask convention (the one of `attend`): a **bool mask is True where a query may attend**, the
inverse of `nn.MultiheadAttention`. A query that may attend to no key gets zero weights and a zero
context, never NaN.

Widths: every class takes the query width `query_dim` first; `key_dim` defaults to it (and
`value_dim`, where a class needs it, too). Weights: `forward(..., need_weights=True)` returns
`(context, weights)`.

Shape letters: B batch, Lq queries, Lk keys, dq/dk/dv query/key/value features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape, format_shape
from attnzoo._registry import Example, FreeSize, register
from attnzoo.functional import attend

__all__ = [
    "ConcatAttention",
    "AdditiveAttention",
    "DotProductAttention",
    "GeneralAttention",
]

_LUONG = "Effective Approaches to Attention-based Neural Machine Translation"


def _check_inputs(
    who: str, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None,
    query_dim: int | None = None, key_dim: int | None = None,
) -> tuple[int, int, int]:
    """Validate `(B, Lq, dq)`, `(B, Lk, dk)`, `(B, Lk, dv)` and the mask; return `(B, Lq, Lk)`."""
    if query_dim is None:
        b, lq, found_dq = check_shape(query, who, "B Lq dq", "query").values()
    else:
        b, lq, found_dq = check_shape(query, who, "B Lq dq", "query", dq=query_dim).values()
    if key_dim is None:
        key_dim = found_dq  # dot product: keys have the queries' features
    lk = check_shape(keys, who, "B Lk dk", "keys", B=b, dk=key_dim)["Lk"]
    check_shape(values, who, "B Lk dv", "values", B=b, Lk=lk)
    if not query.dtype == keys.dtype == values.dtype:
        raise TypeError(
            f"{who} expects query, keys and values of one dtype, "
            f"got {query.dtype}, {keys.dtype}, {values.dtype}"
        )
    if mask is not None:
        _check_mask(who, mask, b, lq, lk)
    return b, lq, lk


def _check_mask(who: str, mask: Tensor, b: int, lq: int, lk: int) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{who} expects mask to be a bool tensor (True = may attend), got {got}")
    if tuple(mask.shape) not in ((b, lk), (b, lq, lk)):
        raise ValueError(
            f"{who} expects mask of shape {format_shape(['B', 'Lk'])} = {(b, lk)} or "
            f"{format_shape(['B', 'Lq', 'Lk'])} = {(b, lq, lk)}, got {tuple(mask.shape)}"
        )


def _masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dim of `(B, Lq, Lk)` scores; masked keys get 0, dead rows all 0."""
    dtype = scores.dtype
    if dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if mask is None:
        return scores.softmax(dim=-1).to(dtype)
    keep = mask if mask.ndim == 3 else mask[:, None, :]  # (B, Lq or 1, Lk)
    dead = ~keep.any(dim=-1, keepdim=True)  # (B, Lq or 1, 1): queries that may attend to nothing
    scores = scores.masked_fill(~(keep | dead), float("-inf"))  # dead rows stay finite, zeroed below
    return scores.softmax(dim=-1).masked_fill(dead, 0.0).to(dtype)


def _mask_4d(mask: Tensor | None) -> Tensor | None:
    """A `(B, Lk)` or `(B, Lq, Lk)` mask as `attend` takes it, `(B, 1, 1 or Lq, Lk)`."""
    if mask is None:
        return None
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


def _finish(context: Tensor, weights: Tensor, need_weights: bool) -> Tensor | tuple[Tensor, Tensor]:
    return (context, weights) if need_weights else context


_Device = torch.device | str | None


def _key_dim(key_dim: int | None, query_dim: int, who: str) -> int:
    """`key_dim`, checked, or the query width when None."""
    return query_dim if key_dim is None else check_int(key_dim, "key_dim", who)


class _ConcatScore(nn.Module):
    """Shared constructor of the rules that apply one linear layer `attn` to `[q; k]`."""

    def __init__(
        self, query_dim: int, key_dim: int, out_features: int, device: _Device, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.query_dim, self.key_dim = query_dim, key_dim
        self.attn = nn.Linear(query_dim + key_dim, out_features, device=device, dtype=dtype)

    def _split(self, query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """`W_q q + b` `(B, Lq, F)` and `W_k k` `(B, Lk, F)`: `W [q; k] + b` without the concat."""
        w_q, w_k = self.attn.weight.split([self.query_dim, self.key_dim], dim=1)
        return F.linear(query, w_q, self.attn.bias), F.linear(keys, w_k)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}"


# The query length L, the key/value length S and the value width are free in every scorer.
_SCORER_FREE_SIZES = (FreeSize(((0, 1),), 1), FreeSize(((1, 1), (2, 1))), FreeSize(((2, 2),), 2))


@register("concat", family="seq2seq", paper=_LUONG, year=2015, layout="SEQ2SEQ",
          example=Example(kwargs={"query_dim": 6, "key_dim": 4}, inputs=((2, 3, 6), (2, 5, 4), (2, 5, 7)),
                          output=(2, 3, 7), channel_dim=-1,
                          free_sizes=_SCORER_FREE_SIZES))
class ConcatAttention(_ConcatScore):
    r"""The seed's rule 1: score $w^\top [q_i; k_j] + b$, softmax over the keys, times the values.

    The score is affine in $[q; k]$, so the query's part $w_q \cdot q_i + b$ is the same for every
    key and **cancels in the softmax: the weights depend on the keys (and the mask) only**, not on
    the query. That is what the rule computes when it is applied key by key; it is kept as written
    (and documented) rather than silently changed. Use `AdditiveAttention` (the same concatenation
    followed by tanh), `GeneralAttention` or `DotProductAttention` for query-dependent weights, or
    `LocationAttention`, the seed's own use of rule 1, where the linear layer gives one score per
    value *position* instead of one per key.

    Args:
        query_dim: Query features dq.
        key_dim: Key features dk. Default: None, dq.
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - query: `(B, Lq, dq)`; keys: `(B, Lk, dk)`; values: `(B, Lk, dv)`.
        - mask: optional bool `(B, Lk)` (key padding) or `(B, Lq, Lk)`, True = may attend.
        - Output: the context `(B, Lq, dv)`; with `need_weights=True` also the weights `(B, Lq, Lk)`
          (rows sum to 1; 0 at masked keys; all 0 when every key is masked).

    Parameters: `attn`, `nn.Linear(dq + dk, 1)` on `[q; k]`.

    Example:
        ```python
        >>> m = ConcatAttention(6, 4)
        >>> out, w = m(torch.randn(2, 3, 6), torch.randn(2, 5, 4), torch.randn(2, 5, 7), need_weights=True)
        >>> out.shape, w.shape
        (torch.Size([2, 3, 7]), torch.Size([2, 3, 5]))

        ```
    """

    def __init__(
        self, query_dim: int, key_dim: int | None = None, *, device: _Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        query_dim = check_int(query_dim, "query_dim", who)
        super().__init__(query_dim, _key_dim(key_dim, query_dim, who), 1, device, dtype)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The context `(B, Lq, dv)`, and the weights with `need_weights`; shapes as the class says."""
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.key_dim)
        from_q, from_k = self._split(query, keys)  # (B, Lq, 1), (B, Lk, 1)
        scores = from_q + from_k.transpose(1, 2)  # (B, Lq, 1) + (B, 1, Lk) -> (B, Lq, Lk)
        weights = _masked_softmax(scores, mask)
        return _finish(weights @ values, weights, need_weights)


@register("additive", family="seq2seq", paper="Neural Machine Translation by Jointly Learning to Align and "
          "Translate", year=2014, layout="SEQ2SEQ", aliases=("bahdanau",),
          example=Example(kwargs={"query_dim": 6, "key_dim": 4, "hidden_dim": 8},
                          inputs=((2, 3, 6), (2, 5, 4), (2, 5, 7)), output=(2, 3, 7), channel_dim=-1,
                          free_sizes=_SCORER_FREE_SIZES))
class AdditiveAttention(_ConcatScore):
    r"""The seed's rule 2, Bahdanau's additive score: $v^\top \tanh(W_q q_i + W_k k_j + b)$.

    $W = [W_q, W_k]$ is one linear layer on the concatenation $[q; k]$ (as the seed describes),
    applied to each side separately; the seed's "sum over features" is $v$ of ones. The
    `(B, Lq, Lk, hidden_dim)` activation is inherent to the rule (tanh does not factor); it is
    built once and tanh runs in place on it.

    Args:
        query_dim: Query features dq.
        key_dim: Key features dk. Default: None, dq.
        hidden_dim: Width of the tanh layer (Bahdanau's alignment-model width). Default: None, dk.
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - query: `(B, Lq, dq)`; keys: `(B, Lk, dk)`; values: `(B, Lk, dv)`.
        - mask: optional bool `(B, Lk)` (key padding) or `(B, Lq, Lk)`, True = may attend.
        - Output: the context `(B, Lq, dv)`; with `need_weights=True` also the weights `(B, Lq, Lk)`
          (rows sum to 1; 0 at masked keys; all 0 when every key is masked).

    Parameters: `attn`, `nn.Linear(dq + dk, hidden_dim)`; `v`, `nn.Linear(hidden_dim, 1, bias=False)`.

    Example:
        ```python
        >>> m = AdditiveAttention(6, 4, hidden_dim=8)
        >>> m(torch.randn(2, 3, 6), torch.randn(2, 5, 4), torch.randn(2, 5, 7)).shape
        torch.Size([2, 3, 7])

        ```
    """

    def __init__(
        self, query_dim: int, key_dim: int | None = None, hidden_dim: int | None = None, *,
        device: _Device = None, dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        query_dim = check_int(query_dim, "query_dim", who)
        key_dim = _key_dim(key_dim, query_dim, who)
        hidden = key_dim if hidden_dim is None else check_int(hidden_dim, "hidden_dim", who)
        super().__init__(query_dim, key_dim, hidden, device, dtype)
        self.hidden_dim = hidden
        self.v = nn.Linear(hidden, 1, bias=False, device=device, dtype=dtype)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The context `(B, Lq, dv)`, and the weights with `need_weights`; shapes as the class says."""
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.key_dim)
        from_q, from_k = self._split(query, keys)  # (B, Lq, H), (B, Lk, H)
        hidden = (from_q[:, :, None, :] + from_k[:, None, :, :]).tanh_()  # (B, Lq, Lk, H)
        scores = (hidden @ self.v.weight[0])  # (B, Lq, Lk)
        weights = _masked_softmax(scores, mask)
        return _finish(weights @ values, weights, need_weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}"


@register("dot", family="seq2seq", paper="Attention Is All You Need", year=2017, layout="SEQ2SEQ",
          aliases=("scaled_dot_product",), uses_attend=True,
          example=Example(kwargs={"query_dim": 4}, inputs=((2, 3, 4), (2, 5, 4), (2, 5, 7)), output=(2, 3, 7),
                          channel_dim=-1,
                          free_sizes=_SCORER_FREE_SIZES))
class DotProductAttention(nn.Module):
    r"""The seed's rule 3: $\mathrm{softmax}(q k^\top / \sqrt{d})\, v$, through `attnzoo.functional.attend`.

    No parameters: the width `query_dim` is the feature size d that queries and keys share. The module
    checks its inputs against it and takes its default scale $1/\sqrt{d}$ from it, so the scale is
    fixed at construction, as in every other class (the seed's rule read d from the input).
    `qk_scale=1.0` gives Luong's "dot" score $q \cdot k$ (the former `scaled=False`). Runs the fused
    kernel unless `need_weights=True`.

    Args:
        query_dim: Features d of the queries and of the keys.
        qk_scale: Scale of the scores. Default: None, $1/\sqrt{d}$.
        device: Accepted for the common constructor signature; there is nothing to allocate.
        dtype: Accepted for the common constructor signature; the computation runs in the inputs' dtype.

    Shape:
        - query: `(B, Lq, d)`; keys: `(B, Lk, d)`; values: `(B, Lk, dv)`.
        - mask: optional bool `(B, Lk)` (key padding) or `(B, Lq, Lk)`, True = may attend.
        - Output: the context `(B, Lq, dv)`; with `need_weights=True` also the weights `(B, Lq, Lk)`
          (rows sum to 1; 0 at masked keys; all 0 when every key is masked).

    Example:
        ```python
        >>> m = DotProductAttention(4)  # scores q . k / 2
        >>> m(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 7)).shape
        torch.Size([2, 3, 7])

        ```
    """

    def __init__(
        self, query_dim: int, qk_scale: float | None = None, *, device: _Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.query_dim = check_int(query_dim, "query_dim", who)
        if qk_scale is None:
            self.qk_scale = query_dim**-0.5
        else:
            self.qk_scale = check_float(qk_scale, "qk_scale", who)
            if not math.isfinite(self.qk_scale) or self.qk_scale <= 0:
                raise ValueError(f"{who}: qk_scale must be a finite number > 0, got {qk_scale!r}")

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The context `(B, Lq, dv)`, and the weights with `need_weights`; shapes as the class says."""
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.query_dim)
        return _attend_3d(query, keys, values, mask, self.qk_scale, need_weights)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, qk_scale={self.qk_scale:g}"


def _attend_3d(
    query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float, need_weights: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """`attend` on one head: `(B, L, d)` inputs as `(B, 1, L, d)`, and back."""
    q, k, v = query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1)  # (B, 1, L, d) each
    if not need_weights:
        return attend(q, k, v, mask=_mask_4d(mask), scale=scale).squeeze(1)  # (B, Lq, dv)
    out, weights = attend(q, k, v, mask=_mask_4d(mask), scale=scale, need_weights=True)
    return out.squeeze(1), weights.squeeze(1)  # (B, Lq, dv), (B, Lq, Lk)


@register("general", family="seq2seq", paper=_LUONG, year=2015, layout="SEQ2SEQ", aliases=("luong",),
          uses_attend=True,
          example=Example(kwargs={"query_dim": 6, "key_dim": 4}, inputs=((2, 3, 6), (2, 5, 4), (2, 5, 7)),
                          output=(2, 3, 7), channel_dim=-1,
                          free_sizes=_SCORER_FREE_SIZES))
class GeneralAttention(nn.Module):
    r"""Luong's "general" score $q_i^\top W k_j$, through `attnzoo.functional.attend`.

    The query is projected once, $q' = W^\top q$ (`attn`, a bias-free `nn.Linear(dq, dk)`), and
    the rest is unscaled dot-product attention of $q'$ against the keys (fused unless
    `need_weights=True`).

    Args:
        query_dim: Query features dq.
        key_dim: Key features dk. Default: None, dq.
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - query: `(B, Lq, dq)`; keys: `(B, Lk, dk)`; values: `(B, Lk, dv)`.
        - mask: optional bool `(B, Lk)` (key padding) or `(B, Lq, Lk)`, True = may attend.
        - Output: the context `(B, Lq, dv)`; with `need_weights=True` also the weights `(B, Lq, Lk)`
          (rows sum to 1; 0 at masked keys; all 0 when every key is masked).

    Example:
        ```python
        >>> m = GeneralAttention(6, 4)
        >>> m(torch.randn(2, 3, 6), torch.randn(2, 5, 4), torch.randn(2, 5, 7)).shape
        torch.Size([2, 3, 7])

        ```
    """

    def __init__(
        self, query_dim: int, key_dim: int | None = None, *, device: _Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.query_dim = check_int(query_dim, "query_dim", who)
        self.key_dim = _key_dim(key_dim, self.query_dim, who)
        self.attn = nn.Linear(self.query_dim, self.key_dim, bias=False, device=device, dtype=dtype)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The context `(B, Lq, dv)`, and the weights with `need_weights`; shapes as the class says."""
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.key_dim)
        return _attend_3d(self.attn(query), keys, values, mask, 1.0, need_weights)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}"
