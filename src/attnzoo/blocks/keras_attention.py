"""Multi-head attention with the arguments and weight layout of `keras.layers.MultiHeadAttention`.

"Attention Is All You Need" (Vaswani et al., 2017), https://arxiv.org/abs/1706.03762, as Keras 3
implements it: `num_heads`, `key_dim` per head for queries and keys, `value_dim` per head,
`dropout` on the attention weights, `use_bias`, `output_shape`, and EinsumDense kernels shaped
`(D, heads, key_dim)` (query), `(E, heads, key_dim)` (key), `(E, heads, value_dim)` (value) and
`(heads, value_dim, *output_shape)` (output), so Keras weights copy over without reshaping. The
building block of `attnzoo.blocks.transformer`; the attention itself runs through `attnzoo.attend`.

Masks follow Keras and `attnzoo.attend`: boolean, **True = may attend**. A query row whose
every key is masked gets a zero attention output here (as Keras's softmax path; Keras's fused path
returns whatever the backend's kernel gives for such rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_mask, check_shape
from attnzoo._fx import fx_leaf
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["EinsumDense", "KerasMultiHeadAttention"]


def _bool_mask(mask: Tensor | None, target: Sequence[int], who: str, name: str) -> Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, Tensor) and not mask.is_floating_point() and not mask.is_complex():
        mask = mask.bool()  # Keras casts integer masks: nonzero = may attend
    elif isinstance(mask, Tensor):
        raise TypeError(f"{who} expects {name} with a bool dtype (True = may attend), got {mask.dtype}")
    mask = check_mask(mask, target, who, name)
    return mask.reshape((1,) * (len(target) - mask.ndim) + tuple(mask.shape))  # the target's rank (0-D too)


class EinsumDense(nn.Module):
    """Keras's EinsumDense for multi-head projections: contract the trailing `in_dims` of the input.

    Args:
        in_dims: Trailing input dims contracted away, e.g. `(D,)` or `(heads, value_dim)`.
        out_dims: Output dims, e.g. `(heads, key_dim)` or `(D,)`.
        use_bias: Add a bias shaped `out_dims`. Default: True.
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - Input: `(*, *in_dims)`; output: `(*, *out_dims)`. `kernel` is `(*in_dims, *out_dims)`.
    """

    def __init__(
        self, in_dims: Sequence[int], out_dims: Sequence[int], use_bias: bool = True, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_dims, self.out_dims = tuple(in_dims), tuple(out_dims)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.kernel = nn.Parameter(torch.empty(*self.in_dims, *self.out_dims, **factory))
        self.bias = nn.Parameter(torch.empty(*self.out_dims, **factory)) if use_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Keras glorot_uniform, with Keras's fans for a kernel of rank > 2 (receptive field = leading dims).
        shape = self.kernel.shape
        field = math.prod(shape[:-2])
        limit = math.sqrt(6.0 / (shape[-2] * field + shape[-1] * field))
        nn.init.uniform_(self.kernel, -limit, limit)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Contract the trailing `in_dims` of `x` with the kernel, add the bias.

        Maps `(*, *in_dims)` to `(*, *out_dims)`.
        """
        n_in, n_out = math.prod(self.in_dims), math.prod(self.out_dims)
        flat = x.flatten(-len(self.in_dims)) if len(self.in_dims) > 1 else x  # (*, n_in)
        weight = self.kernel.reshape(n_in, n_out).t()  # (n_out, n_in) view, no copy
        bias = None if self.bias is None else self.bias.reshape(n_out)
        return F.linear(flat, weight, bias).unflatten(-1, self.out_dims)  # (*, *out_dims)

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, out_dims={self.out_dims}, bias={self.bias is not None}"


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class KerasMultiHeadAttention(nn.Module):
    """Multi-head attention with the arguments and weight layout of `keras.layers.MultiHeadAttention`.

    Sub-modules `query`, `key`, `value`, `attention_output` hold the Keras kernels
    (`(D, h, key_dim)`, `(E, h, key_dim)`, `(E, h, value_dim)`, `(h, value_dim, *output_shape)`);
    logits are scaled by `1/sqrt(key_dim)`; `dropout` drops attention weights in training.

    Args:
        dim: Query feature size D.
        num_heads: Number of heads h.
        key_dim: Query/key size per head.
        value_dim: Value size per head. Default: `key_dim`.
        dropout: Dropout on the attention weights. Default: 0.0.
        use_bias: Biases in the four projections. Default: True.
        output_shape: Output feature shape (int or tuple). Default: `(D,)`.
        context_dim: Key/value input feature size E. Default: D (self-attention).
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - query: `(B, L, D)`; context: `(B, S, E)` (None: the query itself).
        - attention_mask: bool broadcastable to `(B, L, S)`, True = may attend; padding_mask:
          `(B, S)`, True = real key. Output: `(B, L, *output_shape)`; with `need_weights=True`
          also the attention weights `(B, h, L, S)` (before dropout, as Keras's
          `return_attention_scores`).
    """

    def __init__(
        self, dim: int, num_heads: int, key_dim: int, value_dim: int | None = None, dropout: float = 0.0,
        use_bias: bool = True, output_shape: int | Sequence[int] | None = None,
        context_dim: int | None = None, *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim, self.num_heads = check_int(dim, "dim", who), check_int(num_heads, "num_heads", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.value_dim = key_dim if value_dim is None else check_int(value_dim, "value_dim", who)
        self.context_dim = dim if context_dim is None else check_int(context_dim, "context_dim", who)
        self.dropout = check_dropout(dropout, "dropout", who)
        if not isinstance(use_bias, bool):
            raise TypeError(f"{who}: use_bias must be a bool, got {type(use_bias).__name__} {use_bias!r}")
        if output_shape is None:
            output_shape = (dim,)
        elif isinstance(output_shape, int):
            output_shape = (output_shape,)
        self.output_shape = tuple(check_int(s, "output_shape", who) for s in output_shape)
        if not self.output_shape:
            raise ValueError(f"{who}: output_shape must be an int or a non-empty tuple of ints, got ()")
        h, factory = self.num_heads, cast(dict[str, Any], {"device": device, "dtype": dtype})
        self.query = EinsumDense((self.dim,), (h, self.key_dim), use_bias, **factory)
        self.key = EinsumDense((self.context_dim,), (h, self.key_dim), use_bias, **factory)
        self.value = EinsumDense((self.context_dim,), (h, self.value_dim), use_bias, **factory)
        self.attention_output = EinsumDense((h, self.value_dim), self.output_shape, use_bias, **factory)

    def forward(
        self, query: Tensor, context: Tensor | None = None, *, attention_mask: Tensor | None = None,
        padding_mask: Tensor | None = None, causal: bool = False, need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from `query` to `context` (default: `query`); masks as in the class docstring.

        Returns `(B, L, *output_shape)`, and the `(B, h, L, S)` weights with `need_weights`.
        """
        who = type(self).__name__
        dims = check_shape(query, who, "B L D", "query", D=self.dim)
        b, length = dims["B"], dims["L"]
        source = query if context is None else context
        if context is not None:
            check_shape(context, who, "B S E", "context", B=b, E=self.context_dim)
            if context.dtype != query.dtype:
                raise TypeError(f"{who} expects context of dtype {query.dtype}, got {context.dtype}")
        s = source.shape[1]
        mask = _bool_mask(attention_mask, (b, length, s), who, "attention_mask")
        if mask is not None and mask.ndim == 3:
            mask = mask.unsqueeze(-3)  # (B, 1, L, S): the same mask for every head
        pad = _bool_mask(padding_mask, (b, s), who, "padding_mask")
        if pad is not None:
            pad = pad.unsqueeze(-2).unsqueeze(-2)  # (B, S) -> (B, 1, 1, S), heads and queries alike
            mask = pad if mask is None else mask & pad
        q = self.query(query).transpose(1, 2)  # (B, L, h, k) -> (B, h, L, k)
        k = self.key(source).transpose(1, 2)  # (B, S, h, k) -> (B, h, S, k)
        v = self.value(source).transpose(1, 2)  # (B, S, h, e) -> (B, h, S, e)
        if mask is not None and mask.ndim < 4:  # SDPA rejects 1-D masks: left-pad to (B, h, L, S) rank
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        p = self.dropout.p if self.training else 0.0
        scale = self.key_dim**-0.5
        res = attend(q, k, v, mask=mask, causal=causal, dropout_p=p, scale=scale, need_weights=need_weights)
        out, weights = res if isinstance(res, tuple) else (res, None)  # (B, h, L, e), (B, h, L, S)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(length,), key_grid=(s,), mask=mask, causal=causal,
                        scale=self.key_dim**-0.5)
        y = self.attention_output(out.transpose(1, 2))  # (B, L, h, e) -> (B, L, *output_shape)
        return (y, weights) if weights is not None else y

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"dropout={self.dropout.p}, output_shape={self.output_shape}"
        )
