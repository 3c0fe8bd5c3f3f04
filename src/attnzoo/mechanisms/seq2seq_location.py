r"""Location-based attention: the seed's `Attn` (seed 002), batched as `LocationAttention`.

Luong, Pham and Manning, "Effective Approaches to Attention-based Neural Machine Translation", 2015,
https://arxiv.org/abs/1508.04025 (location-based scores $\mathrm{softmax}(W_a h_t)$), in the form of
the PyTorch seq2seq tutorial's attention decoder, which the seed's `Attn` follows: one linear layer on
$[q_i; k_i]$ scores each of a fixed number of value *positions*; the weighted values are then combined
with the query by a second linear layer. Masks are bool, True = may attend (as `attnzoo.attend`).

Shape letters: B batch, Lq queries, L value positions, dq/dk/dv query/key/value features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.mechanisms.seq2seq import _LUONG, _check_mask, _Device, _finish, _key_dim, _masked_softmax

__all__ = ["LocationAttention", "Attn"]


@register("location", family="seq2seq", paper=_LUONG, year=2015, layout="SEQ2SEQ", seed_name="Attn",
          example=Example(kwargs={"query_dim": 6, "key_dim": 4, "num_positions": 5, "value_dim": 7,
                                  "output_dim": 8},
                          inputs=((2, 3, 6), (2, 3, 4), (2, 5, 7)), output=(2, 3, 8), channel_dim=-1,
                          free_sizes=()),
          for_input=lambda geo: {"num_positions": geo.tokens})
class LocationAttention(nn.Module):
    r"""The seed's `Attn`, batched: rule 1 scoring value *positions*, then `[q; context]` projected.

    For each query $q_i$ with its own key $k_i$ (in the seed's decoder: the decoder input and
    hidden state), one linear layer on $[q_i; k_i]$ gives a score for each of the `num_positions`
    value positions (location-based attention, as Luong's $\mathrm{softmax}(W_a h_t)$, conditioned on
    the concatenation); softmax over the positions, weighted sum of the values, then
    `attn_combine([q_i; context_i])`. The keys are not compared with anything: positions are
    scored by where they are, so `values` must have exactly `num_positions` rows (pad shorter
    sequences and mask the padding).

    Relation to the seed: the seed's `Attn(Q, K, V)` takes `Q (1, n, dq)`, `K (1, n, dk)`,
    `V (1, num_positions, dv)` and returns `(output (1, n, output_dim), weights (n, num_positions))`;
    this class takes a batch B in the leading dimension of all three and returns the output
    `(B, n, output_dim)` (and, with `need_weights=True`, the weights `(B, n, num_positions)`). With
    B = 1 the numbers are the seed's. The parameters have the seed's names, so the seed's
    state_dicts load here unchanged.

    Args:
        query_dim: Query features dq (the seed's `query_size`).
        key_dim: Key features dk (`key_size`). Default: None, dq.
        num_positions: Value positions L, the number of scores (`value_size1`). Default: 10 (the
            `MAX_LENGTH` of the PyTorch seq2seq tutorial the seed comes from).
        value_dim: Value features dv (`value_size2`). Default: None, dq.
        output_dim: Output features (`output_size`). Default: None, dq.
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - query: `(B, Lq, dq)`; key: `(B, Lq, dk)`, one per query; values: `(B, L, dv)`.
        - mask: optional bool `(B, L)` or `(B, Lq, L)`, True = may attend.
        - Output: `(B, Lq, output_dim)`; with `need_weights=True` also the weights `(B, Lq, L)`.

    Parameters: `attn`, `nn.Linear(dq + dk, L)`; `attn_combine`, `nn.Linear(dq + dv, output_dim)`.

    Example:
        ```python
        >>> m = LocationAttention(6, num_positions=5)
        >>> m(torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.randn(2, 5, 6)).shape
        torch.Size([2, 3, 6])

        ```
    """

    def __init__(
        self, query_dim: int, key_dim: int | None = None, num_positions: int = 10,
        value_dim: int | None = None, output_dim: int | None = None, *, device: _Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.query_dim = dq = check_int(query_dim, "query_dim", who)
        self.key_dim = _key_dim(key_dim, dq, who)
        self.num_positions = check_int(num_positions, "num_positions", who)
        self.value_dim = dq if value_dim is None else check_int(value_dim, "value_dim", who)
        self.output_dim = dq if output_dim is None else check_int(output_dim, "output_dim", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.attn = nn.Linear(dq + self.key_dim, self.num_positions, **factory)
        self.attn_combine = nn.Linear(dq + self.value_dim, self.output_dim, **factory)

    def forward(self, query: Tensor, key: Tensor, values: Tensor, mask: Tensor | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The output `(B, Lq, output_dim)` (and the weights with `need_weights`); see the class docstring."""
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
        return _finish(out, weights, need_weights)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, num_positions={self.num_positions}, "
                f"value_dim={self.value_dim}, output_dim={self.output_dim}")


@register_seed("location", example=Example(
    {"query_size": 6, "key_size": 4, "value_size1": 5, "value_size2": 7, "output_size": 8},
    ((1, 3, 6), (1, 3, 4), (1, 5, 7)), (1, 3, 8), channel_dim=-1))
class Attn(LocationAttention):
    """The seed's `Attn` (seed 002): its arguments, parameter names and `(output, attn_weights)`.

    `forward(Q, K, V)` with `Q (1, n, query_size)`, `K (1, n, key_size)` and
    `V (1, value_size1, value_size2)` returns `output (1, n, output_size)` and
    `attn_weights (n, value_size1)`, as the seed does. The seed reads `Q[0]`/`K[0]` and
    multiplies with `bmm(attn_weights.unsqueeze(0), V)`, so it only works with a leading dimension
    of 1 (it silently drops `Q[1:]` and fails in `bmm` for a larger `V`); this class raises a
    `ValueError` instead. For batches use `attnzoo.LocationAttention` (same state_dict; its
    `query_dim`, `key_dim`, `num_positions`, `value_dim`, `output_dim` are these five in order).

    Args:
        query_size: Last dim of Q.
        key_size: Last dim of K.
        value_size1: Second-to-last dim of V: the number of scores.
        value_size2: Last dim of V.
        output_size: Last dim of the output.

    Shape:
        - Q: `(1, n, query_size)`; K: `(1, n, key_size)`; V: `(1, value_size1, value_size2)`.
        - Output: `((1, n, output_size), (n, value_size1))`.
    """

    def __init__(
        self, query_size: int, key_size: int, value_size1: int, value_size2: int, output_size: int
    ) -> None:
        sizes = {"query_size": query_size, "key_size": key_size, "value_size1": value_size1,
                 "value_size2": value_size2, "output_size": output_size}
        for name, value in sizes.items():  # the seed's names in the messages
            check_int(value, name, type(self).__name__)
        super().__init__(query_size, key_size, value_size1, value_size2, output_size)
        self.query_size, self.key_size, self.output_size = query_size, key_size, output_size
        self.value_size1, self.value_size2 = value_size1, value_size2

    def forward(self, Q: Tensor, K: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]  # noqa: N803
        """`(output (1, n, output_size), attn_weights (n, value_size1))`, as the seed returns them."""
        who = type(self).__name__  # the seed's argument names in the messages
        n = check_shape(Q, who, "1 n query_size", "Q", query_size=self.query_size)["n"]
        check_shape(K, who, "1 n key_size", "K", n=n, key_size=self.key_size)
        check_shape(V, who, "1 value_size1 value_size2", "V", value_size1=self.value_size1,
                    value_size2=self.value_size2)
        if not Q.dtype == K.dtype == V.dtype:
            raise TypeError(f"{who} expects Q, K and V of one dtype, got {Q.dtype}, {K.dtype}, {V.dtype}")
        for name, t in (("Q", Q), ("K", K), ("V", V)):
            if t.shape[0] != 1:
                raise ValueError(
                    f"Attn expects {name} with a leading dimension of 1 (the seed's Q[0]/bmm), "
                    f"got {tuple(t.shape)}; use attnzoo.LocationAttention for batches"
                )
        output, weights = super().forward(Q, K, V, need_weights=True)
        return output, weights[0]  # (1, n, output_size), (n, value_size1)
