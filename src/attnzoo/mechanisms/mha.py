"""Multi-head attention, "Attention Is All You Need" (Vaswani et al., 2017), arXiv:1706.03762.

Two classes share one parameter layout (`Wq`, `Wk`, `Wv`, `fc`, each an `nn.Linear`), so a
checkpoint of either loads into the other:

- `MultiHeadAttention`, the canonical module (registered `mha`): `MultiHeadAttention(dim,
  num_heads=8)`, batch-first `(B, L, E)` inputs, key-padding / causal / arbitrary masks in the SDPA
  convention, dropout, and one output tensor unless `need_weights=True`. Self-attention runs one fused
  input projection (the three weights concatenated into one GEMM) and the fused attention kernel.
- `SeedMultiHeadAttention`, exported as `attnzoo.compat.MultiHeadAttention`: the seed's
  `MultiHeadAttention(d_model, num_heads)`, its call convention `forward(Q, K, V, mask=None) ->
  (output, attention)`, its `mask == 0` rule and its float32-rounded scale.

Naming: the seed class has the canonical class's name, so it is *not* registered as a seed name
(`create("MultiHeadAttention")` would be ambiguous); `create("mha")` and
`create("MultiHeadAttention")` both build the canonical class, and the seed class is reached as
`attnzoo.compat.MultiHeadAttention`.

Shape letters: B batch, L query length, S key length, E model width (`dim`, the seed's `d_model`),
h heads, d head width `E / h`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import (
    check_divisible,
    check_dropout,
    check_head_widths,
    check_int,
    check_mask,
    check_shape,
    check_tensor,
)
from attnzoo._registry import Example, FreeSize, register, register_compat
from attnzoo.functional import attend
from attnzoo.kernels.route import host_readable
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["MultiHeadAttention", "SeedMultiHeadAttention"]


@register(
    "mha",
    family="transformer",
    paper="Attention Is All You Need",
    year=2017,
    layout="SEQ2SEQ",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2},
        inputs=((2, 5, 8), (2, 7, 8), (2, 7, 8)),
        output=(2, 5, 8),
        channel_dim=-1,free_sizes=(FreeSize(((0, 1),), 1), FreeSize(((1, 1), (2, 1))))),
    aliases=("multi_head_attention", "multihead"),
    uses_attend=True,
    input_rule="self",
)
class MultiHeadAttention(nn.Module):
    r"""Multi-head scaled dot-product attention with input and output projections.

    $\mathrm{fc}(\mathrm{concat}_i\,\mathrm{softmax}(Q_iK_i^\top/\sqrt{d} + M)\,V_i)$ with
    $Q = \mathrm{query}\,W_q^\top + b_q$ (likewise K, V) split into h heads of width d.

    Masks follow the SDPA convention (the inverse of `nn.MultiheadAttention`): a **boolean mask
    is True where a query may attend**, a floating mask is added to the logits. A query that may
    attend to no key gets a zero output and zero weights (never NaN).

    Args:
        dim: Model width E (the seed's `d_model`).
        num_heads: Number of heads h; must divide `dim`. Default: 8.
        qkv_bias: Give the query/key/value projections a bias. Default: True.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        head_dim: Width d of each query/key head (fightingcv's `d_k`); when given, `num_heads` need
            not divide `dim` and the projections are `E -> h d`. Default: None (`dim // num_heads`).
        value_head_dim: Width of each value head (fightingcv's `d_v`); the output projection is
            `h d_v -> E`. Default: None (`head_dim`).
        in_proj: Project queries, keys and values. False splits the inputs into heads as they are
            (fightingcv's `SimplifiedScaledDotProductAttention`: only the output projection is
            learned; `qkv_bias` is then unused). Default: True.
        device: Device of the parameters. Default: None (the default device).
        dtype: dtype of the parameters. Default: None (the default dtype).

    Shape:
        - query: `(B, L, E)`; key: `(B, S, E)` (default: query); value: `(B, S, E)`
          (default: key).
        - mask: `(L, S)`, `(B, L, S)` (every head alike) or broadcastable to `(B, h, L, S)`;
          bool (True = may attend) or float (additive).
        - key_mask: `(B, S)` bool, True for real keys, False for padding.
        - Output: `(B, L, E)`; with `need_weights=True`, `(output, weights)` with per-head
          weights `(B, h, L, S)` (not averaged over heads, unlike `nn.MultiheadAttention`).

    Example:
        ```python
        >>> mha = MultiHeadAttention(256, 8)
        >>> x = torch.randn(2, 10, 256)
        >>> mha(x, causal=True).shape
        torch.Size([2, 10, 256])
        >>> out, weights = mha(x, need_weights=True)
        >>> weights.shape
        torch.Size([2, 8, 10, 10])

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        in_proj: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, self.value_head_dim = check_head_widths(dim, num_heads, head_dim, value_head_dim, who)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        qk_width, v_width = num_heads * self.head_dim, num_heads * self.value_head_dim
        self.in_proj = in_proj
        self.Wq: nn.Linear | None = None
        self.Wk: nn.Linear | None = None
        self.Wv: nn.Linear | None = None
        if in_proj:
            self.Wq = nn.Linear(dim, qk_width, bias=qkv_bias, **factory)
            self.Wk = nn.Linear(dim, qk_width, bias=qkv_bias, **factory)
            self.Wv = nn.Linear(dim, v_width, bias=qkv_bias, **factory)
        elif qk_width != dim or v_width != dim:
            raise ValueError(
                f"{who} with in_proj=False splits the inputs into heads as they are, so num_heads * head_dim "
                f"and num_heads * value_head_dim must equal dim={dim}, got {qk_width} and {v_width}"
            )
        self.fc = nn.Linear(v_width, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"value_head_dim={self.value_head_dim}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project and split into heads: three `(B, h, *, d)` views, one GEMM where inputs coincide."""
        if self.Wq is None or self.Wk is None or self.Wv is None:  # in_proj=False: heads of the inputs
            split = [t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (query, key, value)]
            return split[0], split[1], split[2]  # (B, h, n, d) views
        lins = (self.Wq, self.Wk, self.Wv)
        groups: list[tuple[Tensor, tuple[nn.Linear, ...]]]
        if query is key and key is value:
            groups = [(query, lins)]
        elif key is value:
            groups = [(query, lins[:1]), (key, lins[1:])]
        else:
            groups = [(query, lins[:1]), (key, lins[1:2]), (value, lins[2:])]
        heads: list[Tensor] = []
        for x, group in groups:
            weight = group[0].weight if len(group) == 1 else torch.cat([m.weight for m in group])
            bias = None
            if group[0].bias is not None:
                bias = group[0].bias if len(group) == 1 else torch.cat([m.bias for m in group])  # type: ignore[misc]
            y = F.linear(x, weight, bias)  # (B, n, sum of the group's widths)
            for part in y.split([m.out_features for m in group], dim=-1):  # (B, n, h*d) each
                part = part.unflatten(-1, (self.num_heads, -1))  # (B, n, h, d)
                heads.append(part.transpose(1, 2))  # (B, h, n, d)
        return heads[0], heads[1], heads[2]

    def _check_inputs(
        self, query: Tensor, key: Tensor, value: Tensor, names: tuple[str, ...] = ("query", "key", "value")
    ) -> tuple[int, int, int]:
        who = type(self).__name__
        q, k, v = names  # the caller's argument names (the seed class: Q, K, V)
        dims = check_shape(query, who, "B L E", q, E=self.dim)
        kdims = check_shape(key, who, "B S E", k, B=dims["B"], E=self.dim)
        check_shape(value, who, "B S E", v, B=dims["B"], S=kdims["S"], E=self.dim)
        if not query.dtype == key.dtype == value.dtype:
            raise TypeError(
                f"{who} expects {q}, {k} and {v} of one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
            )
        return dims["B"], dims["L"], kdims["S"]

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        mask: Tensor | None = None,
        need_weights: bool = False,
        *,
        key_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from `query` to `key`/`value`.

        Args:
            query: Queries `(B, L, E)`.
            key: Keys `(B, S, E)`. Default: `query` (self-attention).
            value: Values `(B, S, E)`. Default: `key`.
            mask: Bool (True = may attend) or additive float mask, see Shape. Default: None.
            need_weights: Also return the per-head attention weights (runs the math path).
                Default: False.
            key_mask: `(B, S)` bool, False marks padding keys no query may attend. Default: None.
            causal: Query i attends keys `0..i` only (top-left aligned when L != S).
                Default: False.

        Returns:
            The output `(B, L, E)`, or `(output, weights)` with `need_weights`.
        """
        key = query if key is None else key
        value = key if value is None else value
        batch, length_q, length_k = self._check_inputs(query, key, value)
        who = type(self).__name__
        target = (batch, self.num_heads, length_q, length_k)
        if mask is not None:
            check_tensor(mask, who, "mask", floating=False)
            if mask.ndim == 3:
                check_mask(mask, (batch, length_q, length_k), who, "mask")
                mask = mask.unsqueeze(1)  # (B, 1, L, S): every head alike
            check_mask(mask, target, who, "mask")
        bias = None
        if key_mask is not None:
            check_tensor(key_mask, who, "key_mask", floating=False)
            if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, length_k):
                raise ValueError(
                    f"{who} expects key_mask of shape ({batch}, {length_k}) and dtype torch.bool, "
                    f"got {tuple(key_mask.shape)} {key_mask.dtype}"
                )
            keys = key_mask[:, None, None, :]  # (B, 1, 1, S)
            if mask is None or mask.dtype == torch.bool:
                mask = keys if mask is None else mask & keys
            else:
                mask, bias = keys, mask  # attend takes the float part as bias
        if mask is not None and mask.ndim < 4:  # SDPA rejects 1-D masks: left-pad to (B, h, L, S) rank
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        q, k, v = self._project(query, key, value)
        dropout_p = self.attn_drop.p if self.training else 0.0
        result = attend(
            q, k, v, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p, need_weights=need_weights
        )
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(length_q,), key_grid=(length_k,), mask=mask, bias=bias,
                        causal=causal)
        out = self.proj_drop(self.fc(out.transpose(1, 2).flatten(2)))  # (B, h, L, dv) -> (B, L, E)
        return (out, weights) if weights is not None else out


@register_compat(example=Example({"d_model": 8, "num_heads": 2}, ((2, 5, 8), (2, 7, 8), (2, 7, 8)), (2, 5, 8),
                                 channel_dim=-1))
class SeedMultiHeadAttention(MultiHeadAttention):
    """The seed's `MultiHeadAttention(d_model, num_heads)` (`attnzoo.compat.MultiHeadAttention`).

    Same parameters as the seed (`Wq`, `Wk`, `Wv`, `fc`, all with bias), so the seed's
    state_dicts load with `strict=True`, and the seed's numbers:

    - `forward(Q, K, V, mask=None)` returns `(output, attention)`, attention `(B, h, L, S)`;
    - entries of `mask` equal to 0 are masked out (`mask` broadcasts to `(B, h, L, S)`);
    - the logits are divided by `sqrt(d)` computed in float32 (the seed builds
      `torch.tensor(d, dtype=torch.float32)`), also for float64 inputs;
    - a query whose every key is masked gets uniform weights over all keys (the seed fills masked
      logits with -1e9, so such a row is a plain average of V), where the canonical class gives 0;
    - the seed's helper methods `split_heads(x, batch_size)` and
      `scaled_dot_product_attention(Q, K, V, mask=None)` exist with the seed's behaviour.

    Differences from the seed: a `d_model` not divisible by `num_heads` raises `ValueError`
    (the seed asserts), and bad shapes raise `ValueError` before any work.

    Args:
        d_model: Model width E (the canonical class's `dim`).
        num_heads: Number of heads h; must divide `d_model`.

    Shape:
        - Q: `(B, L, E)`; K, V: `(B, S, E)`; mask: broadcastable to `(B, h, L, S)`.
        - Output: `((B, L, E), (B, h, L, S))`.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        who = type(self).__name__
        check_int(d_model, "d_model", who)  # the seed's names in the messages
        check_int(num_heads, "num_heads", who)
        check_divisible(d_model, num_heads, "d_model", "num_heads", who)
        super().__init__(d_model, num_heads)
        self.d_model = d_model  # the seed's attribute names
        self.depth = self.head_dim
        # 1 / float32(sqrt(d)), as the seed divides by torch.sqrt(torch.tensor(d, dtype=float32)); on the
        # CPU whatever the default device (built under `torch.device("meta")`, .item() would fail)
        self.scale = 1.0 / float(torch.sqrt(torch.tensor(self.depth, dtype=torch.float32, device="cpu")))

    def _project_seed(self, *inputs: Tensor) -> list[Tensor]:
        """The seed projects Q, K and V one by one (its class always has the three projections)."""
        return [w(t) for w, t in zip((self.Wq, self.Wk, self.Wv), inputs, strict=True)]  # type: ignore[misc]

    def split_heads(self, x: Tensor, batch_size: int) -> Tensor:
        """The seed's helper: `(B, L, E)` -> `(B, h, L, d)`."""
        return x.view(batch_size, -1, self.num_heads, self.depth).permute(0, 2, 1, 3)  # (B, h, L, d)

    def scaled_dot_product_attention(
        self, Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The seed's helper on `(B, h, L, d)` heads: returns `(output, attention)`."""
        keep = None
        if mask is not None:
            check_tensor(mask, type(self).__name__, "mask", floating=False)
            if mask.is_complex():
                raise TypeError(f"{type(self).__name__} expects mask of a real dtype, got {mask.dtype}")
            keep = mask != 0  # the seed: masked_fill(mask == 0, -1e9); any dtype
            target = (Q.shape[0], Q.shape[1], Q.shape[2], K.shape[2])
            check_mask(keep, target, type(self).__name__, "mask")
        out, weights = attend(Q, K, V, mask=keep, scale=self.scale, need_weights=True)
        if keep is not None:
            dead = ~keep.any(dim=-1, keepdim=True)  # (..., L, 1): rows the seed averages uniformly
            if not host_readable(dead) or bool(dead.any()):  # meta, compiling, vmap: always fill
                out = torch.where(dead, V.mean(dim=-2, keepdim=True), out)
                weights = torch.where(dead, torch.full_like(weights, 1.0 / K.shape[2]), weights)
        return out, weights

    def forward(  # type: ignore[override]
        self, Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attend from `Q` to `K`/`V`; returns `(output, attention)` as the seed does."""
        batch, _, _ = self._check_inputs(Q, K, V, names=("Q", "K", "V"))
        q, k, v = (self.split_heads(t, batch) for t in self._project_seed(Q, K, V))
        out, attention = self.scaled_dot_product_attention(q, k, v, mask)
        out = out.permute(0, 2, 1, 3).reshape(batch, -1, self.d_model)  # (B, h, L, d) -> (B, L, E)
        return self.fc(out), attention
