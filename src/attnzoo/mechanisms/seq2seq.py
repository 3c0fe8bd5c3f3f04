"""Sequence (encoder-decoder) attention: the seed's scoring rules, batched, with key padding masks.

Scoring rules, each scoring a query ``q_i`` against every key ``k_j`` and averaging the values with
``softmax_j`` of the scores:

- :class:`ConcatAttention`, the seed's rule 1: one linear layer on ``[q_i; k_j]``. Being affine, its
  query term is the same for every key and cancels in the softmax: the weights depend on the keys only.
- :class:`AdditiveAttention`, the seed's rule 2 (Bahdanau et al., 2014, arXiv:1409.0473):
  ``v^T tanh(W [q_i; k_j] + b)``; the seed's "sum" is ``v`` of ones.
- :class:`DotProductAttention`, the seed's rule 3 (Vaswani et al., 2017, arXiv:1706.03762):
  ``q_i . k_j / sqrt(d)``, through :func:`attnzoo.functional.attend`.
- :class:`GeneralAttention`, Luong et al.'s "general" score (2015, arXiv:1508.04025): ``q_i^T W k_j``,
  through :func:`attend`.

:class:`LocationAttention` is the canonical, batched form of the seed's ``Attn``, and
:class:`Attn` (re-exported from :mod:`attnzoo.compat`) is the seed's class itself.

No rule builds the ``(B, Lq, Lk, dq + dk)`` concatenation: ``W [q; k] = W_q q + W_k k`` with
``W = [W_q, W_k]``, so each side is projected once and the two are broadcast-added.

Mask convention (the one of :func:`attend`): a **bool mask is True where a query may attend**, the
inverse of ``nn.MultiheadAttention``. A query that may attend to no key gets zero weights and a zero
context, never NaN.

Shape letters: B batch, Lq queries, Lk keys, dq/dk/dv query/key/value features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int, check_shape, format_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.functional import attend

__all__ = [
    "ConcatAttention",
    "AdditiveAttention",
    "DotProductAttention",
    "GeneralAttention",
    "LocationAttention",
    "Attn",
]

_LUONG = "Effective Approaches to Attention-based Neural Machine Translation"


def _check_inputs(
    who: str, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None,
    query_dim: int | None = None, key_dim: int | None = None,
) -> tuple[int, int, int]:
    """Validate ``(B, Lq, dq)``, ``(B, Lk, dk)``, ``(B, Lk, dv)`` and the mask; return ``(B, Lq, Lk)``."""
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
    """Softmax over the last dim of ``(B, Lq, Lk)`` scores; masked keys get 0, dead rows all 0."""
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
    """A ``(B, Lk)`` or ``(B, Lq, Lk)`` mask as ``attend`` takes it, ``(B, 1, 1 or Lq, Lk)``."""
    if mask is None:
        return None
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


def _finish(context: Tensor, weights: Tensor, return_weights: bool) -> Tensor | tuple[Tensor, Tensor]:
    return (context, weights) if return_weights else context


class _ConcatScore(nn.Module):
    """Shared constructor of the rules that apply one linear layer ``attn`` to ``[q; k]``."""

    def __init__(self, query_dim: int, key_dim: int, out_features: int) -> None:
        super().__init__()
        who = type(self).__name__
        self.query_dim = check_int(query_dim, "query_dim", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.attn = nn.Linear(query_dim + key_dim, out_features)

    def _split(self, query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """``W_q q + b`` ``(B, Lq, F)`` and ``W_k k`` ``(B, Lk, F)``: ``W [q; k] + b`` without the concat."""
        w_q, w_k = self.attn.weight.split([self.query_dim, self.key_dim], dim=1)
        return F.linear(query, w_q, self.attn.bias), F.linear(keys, w_k)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}"


@register("concat", family="seq2seq", paper=_LUONG, year=2015, layout="SEQ2SEQ",
          example=Example(kwargs={"query_dim": 6, "key_dim": 4}, inputs=((2, 3, 6), (2, 5, 4), (2, 5, 7)),
                          output=(2, 3, 7), channel_dim=-1))
class ConcatAttention(_ConcatScore):
    r"""The seed's rule 1: ``score(q_i, k_j) = w^T [q_i; k_j] + b``, softmax over keys, times values.

    The score is affine in ``[q; k]``, so the query's part ``w_q . q_i + b`` is the same for every
    key and **cancels in the softmax: the weights depend on the keys (and the mask) only**, not on
    the query. That is what the rule computes when it is applied key by key; it is kept as written
    (and documented) rather than silently changed. Use :class:`AdditiveAttention` (the same
    concatenation followed by ``tanh``), :class:`GeneralAttention` or :class:`DotProductAttention`
    for query-dependent weights, or :class:`LocationAttention`, the seed's own use of rule 1, where
    the linear layer gives one score per value *position* instead of one per key.

    Args:
        query_dim: Query features dq.
        key_dim: Key features dk.

    Shape:
        - query: ``(B, Lq, dq)``; keys: ``(B, Lk, dk)``; values: ``(B, Lk, dv)``.
        - mask: optional bool ``(B, Lk)`` (key padding) or ``(B, Lq, Lk)``, True = may attend.
        - Output: the context ``(B, Lq, dv)``; with ``return_weights=True`` also the weights
          ``(B, Lq, Lk)`` (rows sum to 1; 0 at masked keys; all 0 when every key is masked).

    Parameters: ``attn``, ``nn.Linear(dq + dk, 1)`` on ``[q; k]``.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__(query_dim, key_dim, 1)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.key_dim)
        from_q, from_k = self._split(query, keys)  # (B, Lq, 1), (B, Lk, 1)
        scores = from_q + from_k.transpose(1, 2)  # (B, Lq, 1) + (B, 1, Lk) -> (B, Lq, Lk)
        weights = _masked_softmax(scores, mask)
        return _finish(weights @ values, weights, return_weights)


@register("additive", family="seq2seq", paper="Neural Machine Translation by Jointly Learning to Align and "
          "Translate", year=2014, layout="SEQ2SEQ", aliases=("bahdanau",),
          example=Example(kwargs={"query_dim": 6, "key_dim": 4, "hidden_dim": 8},
                          inputs=((2, 3, 6), (2, 5, 4), (2, 5, 7)), output=(2, 3, 7), channel_dim=-1))
class AdditiveAttention(_ConcatScore):
    r"""The seed's rule 2, Bahdanau's additive score: ``v^T tanh(W_q q_i + W_k k_j + b)``.

    ``W = [W_q, W_k]`` is one linear layer on the concatenation ``[q; k]`` (as the seed describes),
    applied to each side separately; the seed's "sum over features" is ``v`` of ones. The
    ``(B, Lq, Lk, hidden_dim)`` activation is inherent to the rule (``tanh`` does not factor); it
    is built once and ``tanh`` runs in place on it.

    Args:
        query_dim: Query features dq.
        key_dim: Key features dk.
        hidden_dim: Width of the ``tanh`` layer. Default: ``key_dim``.

    Shape:
        - query: ``(B, Lq, dq)``; keys: ``(B, Lk, dk)``; values: ``(B, Lk, dv)``.
        - mask: optional bool ``(B, Lk)`` (key padding) or ``(B, Lq, Lk)``, True = may attend.
        - Output: the context ``(B, Lq, dv)``; with ``return_weights=True`` also the weights
          ``(B, Lq, Lk)`` (rows sum to 1; 0 at masked keys; all 0 when every key is masked).

    Parameters: ``attn``, ``nn.Linear(dq + dk, hidden_dim)``; ``v``, ``nn.Linear(hidden_dim, 1, bias=False)``.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int | None = None) -> None:
        hidden = key_dim if hidden_dim is None else check_int(hidden_dim, "hidden_dim", type(self).__name__)
        super().__init__(query_dim, key_dim, hidden)
        self.hidden_dim = hidden
        self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.key_dim)
        from_q, from_k = self._split(query, keys)  # (B, Lq, H), (B, Lk, H)
        hidden = (from_q[:, :, None, :] + from_k[:, None, :, :]).tanh_()  # (B, Lq, Lk, H)
        scores = (hidden @ self.v.weight[0])  # (B, Lq, Lk)
        weights = _masked_softmax(scores, mask)
        return _finish(weights @ values, weights, return_weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}"


@register("dot", family="seq2seq", paper="Attention Is All You Need", year=2017, layout="SEQ2SEQ",
          aliases=("scaled_dot_product",), uses_attend=True,
          example=Example(kwargs={"scaled": True}, inputs=((2, 3, 4), (2, 5, 4), (2, 5, 7)), output=(2, 3, 7),
                          channel_dim=-1))
class DotProductAttention(nn.Module):
    r"""The seed's rule 3: ``softmax(q k^T / sqrt(d)) v``, through :func:`attnzoo.functional.attend`.

    With ``scaled=False`` it is Luong's "dot" score ``q . k``. No parameters; queries and keys must
    have the same feature size. Runs the fused kernel unless ``return_weights=True``.

    Args:
        scaled: Divide the scores by ``sqrt(d)``. Default: True.

    Shape:
        - query: ``(B, Lq, d)``; keys: ``(B, Lk, d)``; values: ``(B, Lk, dv)``.
        - mask: optional bool ``(B, Lk)`` (key padding) or ``(B, Lq, Lk)``, True = may attend.
        - Output: the context ``(B, Lq, dv)``; with ``return_weights=True`` also the weights
          ``(B, Lq, Lk)`` (rows sum to 1; 0 at masked keys; all 0 when every key is masked).
    """

    def __init__(self, scaled: bool = True) -> None:
        super().__init__()
        self.scaled = check_choice(scaled, (True, False), "scaled", type(self).__name__)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        _check_inputs(type(self).__name__, query, keys, values, mask)
        scale = query.shape[-1] ** -0.5 if self.scaled else 1.0
        return _attend_3d(query, keys, values, mask, scale, return_weights)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}"


def _attend_3d(
    query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float, return_weights: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """``attend`` on one head: ``(B, L, d)`` inputs as ``(B, 1, L, d)``, and back."""
    q, k, v = query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1)  # (B, 1, L, d) each
    if not return_weights:
        return attend(q, k, v, mask=_mask_4d(mask), scale=scale).squeeze(1)  # (B, Lq, dv)
    out, weights = attend(q, k, v, mask=_mask_4d(mask), scale=scale, return_weights=True)
    return out.squeeze(1), weights.squeeze(1)  # (B, Lq, dv), (B, Lq, Lk)


@register("general", family="seq2seq", paper=_LUONG, year=2015, layout="SEQ2SEQ", aliases=("luong",),
          uses_attend=True,
          example=Example(kwargs={"query_dim": 6, "key_dim": 4}, inputs=((2, 3, 6), (2, 5, 4), (2, 5, 7)),
                          output=(2, 3, 7), channel_dim=-1))
class GeneralAttention(nn.Module):
    r"""Luong's "general" score ``q_i^T W k_j``, through :func:`attnzoo.functional.attend`.

    The query is projected once, ``q' = W^T q`` (``attn``, a bias-free ``nn.Linear(dq, dk)``), and
    the rest is unscaled dot-product attention of ``q'`` against the keys (fused unless
    ``return_weights=True``).

    Args:
        query_dim: Query features dq.
        key_dim: Key features dk.

    Shape:
        - query: ``(B, Lq, dq)``; keys: ``(B, Lk, dk)``; values: ``(B, Lk, dv)``.
        - mask: optional bool ``(B, Lk)`` (key padding) or ``(B, Lq, Lk)``, True = may attend.
        - Output: the context ``(B, Lq, dv)``; with ``return_weights=True`` also the weights
          ``(B, Lq, Lk)`` (rows sum to 1; 0 at masked keys; all 0 when every key is masked).
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        who = type(self).__name__
        self.query_dim = check_int(query_dim, "query_dim", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.attn = nn.Linear(query_dim, key_dim, bias=False)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        _check_inputs(type(self).__name__, query, keys, values, mask, self.query_dim, self.key_dim)
        return _attend_3d(self.attn(query), keys, values, mask, 1.0, return_weights)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}"


@register("location", family="seq2seq", paper=_LUONG, year=2015, layout="SEQ2SEQ", seed_name="Attn",
          example=Example(kwargs={"query_dim": 6, "key_dim": 4, "num_positions": 5, "value_dim": 7,
                                  "output_dim": 8},
                          inputs=((2, 3, 6), (2, 3, 4), (2, 5, 7)), output=(2, 3, 8), channel_dim=-1),
          for_input=lambda geo: {"num_positions": geo.tokens, "output_dim": geo.channels})
class LocationAttention(nn.Module):
    r"""The seed's ``Attn``, batched: rule 1 scoring value *positions*, then ``[q; context]`` projected.

    For each query ``q_i`` with its own key ``k_i`` (in the seed's decoder: the decoder input and
    hidden state), one linear layer on ``[q_i; k_i]`` gives a score for each of the
    ``num_positions`` value positions (location-based attention, as Luong's ``softmax(W_a h_t)``,
    conditioned on the concatenation); softmax over the positions, weighted sum of the values, then
    ``attn_combine([q_i; context_i])``. The keys are not compared with anything: positions are
    scored by where they are, so ``values`` must have exactly ``num_positions`` rows (pad shorter
    sequences and mask the padding).

    Relation to the seed: the seed's ``Attn(Q, K, V)`` takes ``Q (1, n, dq)``, ``K (1, n, dk)``,
    ``V (1, num_positions, dv)`` and returns ``(output (1, n, output_dim), weights (n, num_positions))``;
    this class takes a batch ``B`` in the leading dimension of all three and returns the output
    ``(B, n, output_dim)`` (and weights ``(B, n, num_positions)``). With ``B = 1`` the numbers are the
    seed's. The parameters have the seed's names, so the seed's state_dicts load here unchanged.

    Args:
        query_dim: Query features dq (the seed's ``query_size``).
        key_dim: Key features dk (``key_size``).
        num_positions: Value positions L, the number of scores (``value_size1``).
        value_dim: Value features dv (``value_size2``).
        output_dim: Output features (``output_size``).

    Shape:
        - query: ``(B, Lq, dq)``; key: ``(B, Lq, dk)``, one per query; values: ``(B, L, dv)``.
        - mask: optional bool ``(B, L)`` or ``(B, Lq, L)``, True = may attend.
        - Output: ``(B, Lq, output_dim)``; with ``return_weights=True`` also the weights ``(B, Lq, L)``.

    Parameters: ``attn``, ``nn.Linear(dq + dk, L)``; ``attn_combine``, ``nn.Linear(dq + dv, output_dim)``.
    """

    def __init__(
        self, query_dim: int, key_dim: int, num_positions: int, value_dim: int, output_dim: int
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.query_dim = check_int(query_dim, "query_dim", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.num_positions = check_int(num_positions, "num_positions", who)
        self.value_dim = check_int(value_dim, "value_dim", who)
        self.output_dim = check_int(output_dim, "output_dim", who)
        self.attn = nn.Linear(query_dim + key_dim, num_positions)
        self.attn_combine = nn.Linear(query_dim + value_dim, output_dim)

    def forward(self, query: Tensor, key: Tensor, values: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        who = type(self).__name__
        b, lq, _ = check_shape(query, who, "B Lq dq", "query", dq=self.query_dim).values()
        check_shape(key, who, "B Lq dk", "key", B=b, Lq=lq, dk=self.key_dim)
        check_shape(values, who, "B L dv", "values", B=b, L=self.num_positions, dv=self.value_dim)
        if not query.dtype == key.dtype == values.dtype:
            raise TypeError(f"{who} expects query, key and values of one dtype, got "
                            f"{query.dtype}, {key.dtype}, {values.dtype}")
        if mask is not None:
            _check_mask(who, mask, b, lq, self.num_positions)
        scores = self.attn(torch.cat([query, key], dim=-1))  # (B, Lq, dq + dk) -> (B, Lq, L)
        weights = _masked_softmax(scores, mask)
        context = weights @ values  # (B, Lq, dv)
        out = self.attn_combine(torch.cat([query, context], dim=-1))  # (B, Lq, dq + dv) -> (B, Lq, out)
        return _finish(out, weights, return_weights)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, num_positions={self.num_positions}, "
                f"value_dim={self.value_dim}, output_dim={self.output_dim}")


@register_seed("location")
class Attn(LocationAttention):
    """The seed's ``Attn`` (seed 002): its arguments, parameter names and ``(output, attn_weights)``.

    ``forward(Q, K, V)`` with ``Q (1, n, query_size)``, ``K (1, n, key_size)`` and
    ``V (1, value_size1, value_size2)`` returns ``output (1, n, output_size)`` and
    ``attn_weights (n, value_size1)``, as the seed does. The seed reads ``Q[0]``/``K[0]`` and
    multiplies with ``bmm(attn_weights.unsqueeze(0), V)``, so it only works with a leading dimension
    of 1 (it silently drops ``Q[1:]`` and fails in ``bmm`` for a larger ``V``); this class raises a
    ``ValueError`` instead. For batches use :class:`attnzoo.LocationAttention` (same state_dict).

    Args:
        query_size: Last dim of Q.
        key_size: Last dim of K.
        value_size1: Second-to-last dim of V: the number of scores.
        value_size2: Last dim of V.
        output_size: Last dim of the output.

    Shape:
        - Q: ``(1, n, query_size)``; K: ``(1, n, key_size)``; V: ``(1, value_size1, value_size2)``.
        - Output: ``((1, n, output_size), (n, value_size1))``.
    """

    def __init__(
        self, query_size: int, key_size: int, value_size1: int, value_size2: int, output_size: int
    ) -> None:
        super().__init__(query_size, key_size, value_size1, value_size2, output_size)
        self.query_size, self.key_size, self.output_size = query_size, key_size, output_size
        self.value_size1, self.value_size2 = value_size1, value_size2

    def forward(self, Q: Tensor, K: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]  # noqa: N803
        for name, t in (("Q", Q), ("K", K), ("V", V)):
            if isinstance(t, Tensor) and t.ndim == 3 and t.shape[0] != 1:
                raise ValueError(
                    f"Attn expects {name} with a leading dimension of 1 (the seed's Q[0]/bmm), "
                    f"got {tuple(t.shape)}; use attnzoo.LocationAttention for batches"
                )
        output, weights = super().forward(Q, K, V, return_weights=True)
        return output, weights[0]  # (1, n, output_size), (n, value_size1)
