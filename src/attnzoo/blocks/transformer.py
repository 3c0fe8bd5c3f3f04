"""Prefix-named transformer blocks (seed 001): self-attention, cross-attention, feed-forward.

"Attention Is All You Need" (Vaswani et al., 2017), https://arxiv.org/abs/1706.03762: post-norm
residual blocks, in the form of the widely copied Keras tutorial whose builder
`self_attention(input_shape, prefix="att", mask=False, **kwargs)` seed 001 asks about
("Building Transformer Models with Attention" crash course, Machine Learning Mastery).

`prefix` only names things: every sub-layer is called `f"{prefix}_<role><n>"` (`att_attn1`,
`att_norm1`, ...) so that several blocks sit in one model without name clashes (Keras requires
unique layer names) and weights can be matched by name (`attnzoo.blocks.convert`). The sub-modules
here carry the same names, so `named_modules()` and `state_dict` keys show the prefix. The
attention is `attnzoo.blocks.keras_attention.KerasMultiHeadAttention` (Keras's kernel layout);
LayerNorm epsilon is Keras's 1e-3. Masks are boolean, **True = may attend**.

Arguments: the block classes take the shared vocabulary (`dim`, `num_heads`, `head_dim`, `attn_drop`,
`bias`, `eps`, ...); the builders `self_attention` and `cross_attention` take Keras's
`MultiHeadAttention` arguments (`num_heads`, `key_dim`, `value_dim`, `dropout`, `use_bias`,
`output_shape`) and translate them with `keras_block_kwargs`:

| Keras (builders, `from_keras`) | block classes |
|---|---|
| `key_dim` (per head) | `head_dim` |
| `value_dim` (per head) | `value_head_dim` |
| `dropout` | `attn_drop` |
| `use_bias` | `bias` |
| `output_shape` | none: the residual needs D |
| `epsilon` (LayerNormalization) | `eps` |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, FreeSize, register, register_seed
from attnzoo.blocks._common import (
    Add,
    _check_bool,
    _check_mha_kwargs,
    _Device,
    _layer_norm,
    _PrefixedBlock,
    check_input_shape,
    check_prefix,
    keras_block_kwargs,
)
from attnzoo.blocks.keras_attention import KerasMultiHeadAttention, _bool_mask

__all__ = [
    "Add",
    "SelfAttentionBlock",
    "CrossAttentionBlock",
    "FeedForwardBlock",
    "self_attention",
    "cross_attention",
    "feed_forward",
    "check_prefix",
    "check_input_shape",
    "keras_block_kwargs",
]

def _attention(
    who: str, dim: int, num_heads: int, head_dim: int | None, value_head_dim: int | None, attn_drop: float,
    bias: bool, context_dim: int | None, device: _Device, dtype: torch.dtype | None,
) -> KerasMultiHeadAttention:
    """The block's attention layer, its arguments checked under the block's names."""
    num_heads = check_int(num_heads, "num_heads", who)
    head_dim = max(dim // num_heads, 1) if head_dim is None else check_int(head_dim, "head_dim", who)
    if value_head_dim is not None:
        check_int(value_head_dim, "value_head_dim", who)
    attn_drop = check_float(attn_drop, "attn_drop", who, minimum=0.0, maximum=1.0)
    bias = _check_bool(bias, "bias", who)
    return KerasMultiHeadAttention(
        dim, num_heads, head_dim, value_head_dim, attn_drop, bias, context_dim=context_dim, device=device,
        dtype=dtype,
    )


@register(
    "self_attention_block", family="blocks", paper="Attention Is All You Need", year=2017, layout="NLC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "head_dim": 4, "value_head_dim": 3, "causal": True},
        inputs=((2, 5, 8),), output=(2, 5, 8), channel_dim=-1,free_sizes=(FreeSize(((0, 1),), 1),)),
    seed_name="self_attention", uses_attend=True,
)
class SelfAttentionBlock(_PrefixedBlock):
    r"""Post-norm self-attention $\mathrm{LayerNorm}(x + \mathrm{MHA}(x, x, x))$, named by `prefix`.

    Sub-modules: `{prefix}_attn1` (`KerasMultiHeadAttention`), `{prefix}_add1`, `{prefix}_norm1`;
    the Keras model (`attnzoo.blocks.keras.self_attention`) adds the input `{prefix}_in1` and is
    named `{prefix}_att`. The seed's builder `self_attention(input_shape, prefix, mask, **kwargs)`
    (in `attnzoo.compat`) takes Keras's argument names and builds this class.

    Args:
        dim: Feature size D.
        num_heads: Number of attention heads h. Default: 8.
        head_dim: Width of each query/key head (Keras's `key_dim`); logits are scaled by
            $1/\sqrt{\text{head\_dim}}$. Default: None, `max(D // num_heads, 1)`.
        value_head_dim: Width of each value head (Keras's `value_dim`). Default: None, `head_dim`.
        attn_drop: Dropout on the attention weights, training only (Keras's `dropout`). Default: 0.0.
        bias: Biases in the four projections (Keras's `use_bias`). Default: True.
        causal: Causal mask, query i attends keys `0..i` (the builder's `mask`). Default: False.
        prefix: Name prefix, an identifier fragment. Default: `"att"`.
        seq_len: Fixed sequence length L as Keras's `Input`, or None for any. Default: None.
        eps: LayerNorm epsilon (Keras's `epsilon`), > 0. Default: 1e-3 (Keras).
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - x: `(B, L, D)`; attention_mask: bool broadcastable to `(B, L, L)`, True = may attend;
          padding_mask: `(B, L)`, True = real token (masks keys).
        - Output: `(B, L, D)`; with `need_weights=True` also the attention weights `(B, h, L, L)`
          (before dropout, as Keras's `return_attention_scores`).

    Example:
        ```python
        >>> block = SelfAttentionBlock(16, num_heads=2, causal=True, prefix="dec0")
        >>> [name for name, _ in block.named_children()]
        ['dec0_attn1', 'dec0_add1', 'dec0_norm1']
        >>> out, weights = block(torch.randn(2, 5, 16), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 2, 5, 5]))

        ```
    """

    def __init__(
        self, dim: int, num_heads: int = 8, head_dim: int | None = None, value_head_dim: int | None = None,
        attn_drop: float = 0.0, bias: bool = True, *, causal: bool = False, prefix: str = "att",
        seq_len: int | None = None, eps: float = 1e-3, device: _Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = self._setup(prefix, seq_len, "att", ("in1", "attn1", "add1", "norm1"))
        self.dim, self.causal = check_int(dim, "dim", who), _check_bool(causal, "causal", who)
        attn = _attention(who, dim, num_heads, head_dim, value_head_dim, attn_drop, bias, None, device, dtype)
        self.add_module(f"{self.prefix}_attn1", attn)
        self.add_module(f"{self.prefix}_add1", Add())
        self.add_module(f"{self.prefix}_norm1", _layer_norm(dim, eps, who, device, dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, causal={self.causal}"

    @property
    def attention(self) -> KerasMultiHeadAttention:
        return self._role("attn1")  # type: ignore[return-value]

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`LayerNorm(x + MHA(x, x, x))` `(B, L, D)`, and the `(B, h, L, L)` weights with `need_weights`."""
        self._check_x(x)
        who, (b, length) = type(self).__name__, x.shape[:2]  # masks checked here so messages name the block
        _bool_mask(attention_mask, (b, length, length), who, "attention_mask")
        _bool_mask(padding_mask, (b, length), who, "padding_mask")
        res = self.attention(
            x, attention_mask=attention_mask, padding_mask=padding_mask, causal=self.causal,
            need_weights=need_weights,
        )
        out, weights = res if isinstance(res, tuple) else (res, None)
        y = self._role("norm1")(self._role("add1")(x, out))
        return (y, weights) if weights is not None else y


@register(
    "cross_attention_block", family="blocks", paper="Attention Is All You Need", year=2017, layout="SEQ2SEQ",
    example=Example(
        kwargs={"dim": 8, "context_dim": 6, "num_heads": 2, "head_dim": 4},
        inputs=((2, 5, 8), (2, 7, 6)), output=(2, 5, 8), channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1), FreeSize(((1, 1),)))),
    seed_name="cross_attention", uses_attend=True,
)
class CrossAttentionBlock(_PrefixedBlock):
    r"""Post-norm cross-attention $\mathrm{LayerNorm}(\mathrm{MHA}(x, c, c) + x)$, named by `prefix`.

    Sub-modules: `{prefix}_attn2`, `{prefix}_add2`, `{prefix}_norm2`; the Keras model adds the
    inputs `{prefix}_ctx2` and `{prefix}_in2` and is named `{prefix}_cross`. The Keras model takes
    `[(context, x)]`; this module takes `(x, context)`, query first. The seed's builder
    `cross_attention(input_shape, context_shape, prefix, **kwargs)` takes Keras's argument names.

    Args:
        dim: Query feature size D.
        context_dim: Context feature size E. Default: None, D.
        num_heads: Number of attention heads h. Default: 8.
        head_dim: Width of each query/key head (Keras's `key_dim`). Default: None,
            `max(D // num_heads, 1)`.
        value_head_dim: Width of each value head (Keras's `value_dim`). Default: None, `head_dim`.
        attn_drop: Dropout on the attention weights, training only (Keras's `dropout`). Default: 0.0.
        bias: Biases in the four projections (Keras's `use_bias`). Default: True.
        prefix: Name prefix, an identifier fragment. Default: `"att"`.
        seq_len: Fixed query length L (a Keras `Input` shape), or None for any. Default: None.
        context_len: Fixed context length S, or None for any. Default: None.
        eps: LayerNorm epsilon (Keras's `epsilon`), > 0. Default: 1e-3 (Keras).
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - x: `(B, L, D)`; context: `(B, S, E)`; attention_mask: bool broadcastable to `(B, L, S)`;
          context_mask: `(B, S)`, True = real token.
        - Output: `(B, L, D)`; with `need_weights=True` also the weights `(B, h, L, S)`.

    Example:
        ```python
        >>> block = CrossAttentionBlock(16, context_dim=12, num_heads=4)
        >>> block(torch.randn(2, 5, 16), torch.randn(2, 7, 12)).shape
        torch.Size([2, 5, 16])

        ```
    """

    def __init__(
        self, dim: int, context_dim: int | None = None, num_heads: int = 8, head_dim: int | None = None,
        value_head_dim: int | None = None, attn_drop: float = 0.0, bias: bool = True, *, prefix: str = "att",
        seq_len: int | None = None, context_len: int | None = None, eps: float = 1e-3, device: _Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = self._setup(prefix, seq_len, "cross", ("ctx2", "in2", "attn2", "add2", "norm2"))
        self.dim = check_int(dim, "dim", who)
        context_dim = dim if context_dim is None else check_int(context_dim, "context_dim", who)
        self.context_len = None if context_len is None else check_int(context_len, "context_len", who)
        attn = _attention(
            who, dim, num_heads, head_dim, value_head_dim, attn_drop, bias, context_dim, device, dtype
        )
        self.add_module(f"{self.prefix}_attn2", attn)
        self.add_module(f"{self.prefix}_add2", Add())
        self.add_module(f"{self.prefix}_norm2", _layer_norm(dim, eps, who, device, dtype))

    @property
    def attention(self) -> KerasMultiHeadAttention:
        return self._role("attn2")  # type: ignore[return-value]

    def forward(
        self, x: Tensor, context: Tensor, attention_mask: Tensor | None = None,
        context_mask: Tensor | None = None, need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`LayerNorm(MHA(x, context, context) + x)` `(B, L, D)`, and `(B, h, L, S)` weights if asked."""
        self._check_x(x)
        who = type(self).__name__
        if self.context_len is None:
            dims = check_shape(context, who, "B S E", "context")
        else:
            dims = check_shape(context, who, "B S E", "context", S=self.context_len)
        # checked here so the messages name the block and context_mask (the attention calls it padding_mask)
        _bool_mask(attention_mask, (x.shape[0], x.shape[1], dims["S"]), who, "attention_mask")
        _bool_mask(context_mask, (x.shape[0], dims["S"]), who, "context_mask")
        res = self.attention(
            x, context, attention_mask=attention_mask, padding_mask=context_mask, need_weights=need_weights
        )
        out, weights = res if isinstance(res, tuple) else (res, None)
        y = self._role("norm2")(self._role("add2")(out, x))
        return (y, weights) if weights is not None else y


class FeedForwardBlock(_PrefixedBlock):
    r"""Post-norm feed-forward $\mathrm{LayerNorm}(x + \mathrm{Dropout}(W_2\,\mathrm{relu}(W_1 x)))$.

    Sub-modules, named by `prefix`: `{prefix}_ff1` (Linear D -> ff_dim, ReLU), `{prefix}_ff2`
    (Linear ff_dim -> D), `{prefix}_drop`, `{prefix}_add3`, `{prefix}_norm3`; the Keras model adds
    the input `{prefix}_in3` and is named `{prefix}_ff`. Not registered: it is not an attention.

    Args:
        dim: Feature size D (the tutorial's `model_dim`; the residual needs them equal).
        ff_dim: Hidden size.
        dropout: Dropout after the second Linear. Default: 0.1 (the tutorial's).
        prefix: Name prefix, an identifier fragment. Default: `"ff"`.
        seq_len: Fixed sequence length L, or None. Default: None.
        eps: LayerNorm epsilon (Keras's `epsilon`), > 0. Default: 1e-3 (Keras).
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - x: `(B, L, D)`. Output: `(B, L, D)`.
    """

    def __init__(
        self, dim: int, ff_dim: int, dropout: float = 0.1, *, prefix: str = "ff", seq_len: int | None = None,
        eps: float = 1e-3, device: _Device = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = self._setup(prefix, seq_len, "ff", ("in3", "ff1", "ff2", "drop", "add3", "norm3"))
        self.dim, self.ff_dim = check_int(dim, "dim", who), check_int(ff_dim, "ff_dim", who)
        p = check_float(dropout, "dropout", who, minimum=0.0, maximum=1.0)
        self.add_module(f"{self.prefix}_ff1", nn.Linear(dim, ff_dim, device=device, dtype=dtype))
        self.add_module(f"{self.prefix}_ff2", nn.Linear(ff_dim, dim, device=device, dtype=dtype))
        self.add_module(f"{self.prefix}_drop", nn.Dropout(p))
        self.add_module(f"{self.prefix}_add3", Add())
        self.add_module(f"{self.prefix}_norm3", _layer_norm(dim, eps, who, device, dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for role in ("ff1", "ff2"):  # Keras Dense: glorot_uniform kernel, zero bias
            linear = self._role(role)
            if isinstance(linear, nn.Linear) and linear.bias is not None:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """`LayerNorm(x + ff2(relu(ff1(x))))` on `(B, L, D)`; returns `(B, L, D)`."""
        self._check_x(x)
        hidden = F.relu(self._role("ff1")(x))  # (B, L, ff_dim)
        out = self._role("drop")(self._role("ff2")(hidden))
        return self._role("norm3")(self._role("add3")(x, out))


def self_attention(
    input_shape: Sequence[int | None], prefix: str = "att", mask: bool = False, **kwargs: Any
) -> SelfAttentionBlock:
    """The seed's builder: a `SelfAttentionBlock` with sub-modules `{prefix}_attn1`, ... .

    Args:
        input_shape: `(L, D)` without the batch, L may be None.
        prefix: Name prefix. Default: `"att"`.
        mask: Causal mask (the decoder's; the block's `causal`). Default: False.
        **kwargs: Keras's `num_heads` and `key_dim` (required), `value_dim`, `dropout`, `use_bias`,
            `output_shape` (None, D or `(D,)`); anything else raises `TypeError`. They become the
            block's `num_heads`, `head_dim`, `value_head_dim`, `attn_drop`, `bias`.

    Shape:
        - Input `(B, L, D)`, output `(B, L, D)`.
    """
    seq_len, dim = check_input_shape(input_shape, "self_attention")
    _check_mha_kwargs(kwargs, "self_attention")
    causal = _check_bool(mask, "mask", "self_attention")
    block_kwargs = keras_block_kwargs(kwargs, dim, "self_attention")
    return SelfAttentionBlock(dim, causal=causal, prefix=prefix, seq_len=seq_len, **block_kwargs)


def cross_attention(
    input_shape: Sequence[int | None], context_shape: Sequence[int | None], prefix: str = "att", **kwargs: Any
) -> CrossAttentionBlock:
    """The tutorial's builder: a `CrossAttentionBlock` with sub-modules `{prefix}_attn2`, ... .

    Args:
        input_shape: `(L, D)` of the queries.
        context_shape: `(S, E)` of the context.
        prefix: Name prefix. Default: `"att"`.
        **kwargs: Keras's MultiHeadAttention arguments, as `self_attention` takes them.

    Shape:
        - Input `(B, L, D)` and context `(B, S, E)`; output `(B, L, D)`.
    """
    seq_len, dim = check_input_shape(input_shape, "cross_attention")
    context_len, context_dim = check_input_shape(context_shape, "cross_attention", "context_shape")
    _check_mha_kwargs(kwargs, "cross_attention")
    block_kwargs = keras_block_kwargs(kwargs, dim, "cross_attention")
    return CrossAttentionBlock(
        dim, context_dim, prefix=prefix, seq_len=seq_len, context_len=context_len, **block_kwargs
    )


def feed_forward(
    input_shape: Sequence[int | None], model_dim: int, ff_dim: int, dropout: float = 0.1, prefix: str = "ff"
) -> FeedForwardBlock:
    """The tutorial's builder: a `FeedForwardBlock` with sub-modules `{prefix}_ff1`, ... .

    Args:
        input_shape: `(L, D)`.
        model_dim: Output size; must equal D for the residual Add.
        ff_dim: Hidden size.
        dropout: Dropout rate. Default: 0.1.
        prefix: Name prefix. Default: `"ff"`.

    Shape:
        - Input `(B, L, D)`, output `(B, L, D)`.
    """
    seq_len, dim = check_input_shape(input_shape, "feed_forward")
    if model_dim != dim:
        raise ValueError(
            f"feed_forward expects model_dim = input_shape[-1] = {dim} (residual Add), got {model_dim!r}"
        )
    return FeedForwardBlock(dim, ff_dim, dropout, prefix=prefix, seq_len=seq_len)


# `create("self_attention", input_shape=..., num_heads=..., key_dim=...)` runs the seed's builder.
register_seed("self_attention_block")(self_attention)
register_seed("cross_attention_block")(cross_attention)
