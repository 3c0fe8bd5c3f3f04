"""fightingcv -> attnzoo for token mixers (group A): fightingcv-attention's `ExternalAttention`,
`ScaledDotProductAttention`, `SimplifiedScaledDotProductAttention`, `EMSA`, `MUSEAttention`, `AFT_FULL`
and `UFOAttention`.

`CONVERTERS` maps fightingcv's dotted class names to converters; `attnzoo.convert.fightingcv` adds
them to `FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. Each result holds a copy of the
module's weights (same device, dtype and training flag), loaded with `strict=True`. Where fightingcv's
forward differs from the canonical class (argument conventions, bugs) the converter's docstring says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.external import ExternalAttention
from attnzoo.mechanisms.mha import MultiHeadAttention

__all__ = ["CONVERTERS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def external_from_fightingcv(module: Any) -> ExternalAttention:
    """`ExternalAttention(d_model, S)` -> `ExternalAttention(d_model, memory_size=S, eps=0.0)` (fightingcv
    adds no epsilon to the $\\ell_1$ denominator); same keys `mk.weight`, `mv.weight`."""
    mk: nn.Linear = module.mk
    new = ExternalAttention(mk.in_features, memory_size=mk.out_features, eps=0.0, **factory(module))
    return finish(new, module, module.state_dict())



def _dropout_p(module: Any) -> float:
    drop = module.dropout
    if not isinstance(drop, nn.Dropout):
        raise refuse(module, f"its dropout is a {type(drop).__qualname__}, not an nn.Dropout", WHO)
    return float(drop.p)


def sdpa_from_fightingcv(module: Any) -> MultiHeadAttention:
    """`ScaledDotProductAttention(d_model, d_k, d_v, h, dropout)` -> `MultiHeadAttention(d_model, h,
    head_dim=d_k, value_head_dim=d_v, attn_drop=dropout)`; `fc_q/fc_k/fc_v/fc_o` -> `Wq/Wk/Wv/fc`.

    Calls: fightingcv's `forward(queries, keys, values, attention_mask)` is `forward(queries, keys,
    values, mask=~attention_mask)` here (fightingcv's True masks a logit, attnzoo's True keeps it); a
    query with every key masked gives NaN in fightingcv and 0 here. fightingcv's multiplicative
    `attention_weights` on the logits has no canonical counterpart (pass an additive float `mask`
    where a bias is meant)."""
    state = {
        f"{new}.{kind}": value
        for old, new in (("fc_q", "Wq"), ("fc_k", "Wk"), ("fc_v", "Wv"), ("fc_o", "fc"))
        for kind, value in getattr(module, old).state_dict().items()
    }
    new = MultiHeadAttention(
        module.d_model, module.h, qkv_bias=module.fc_q.bias is not None, attn_drop=_dropout_p(module),
        head_dim=module.d_k, value_head_dim=module.d_v, **factory(module),
    )
    return finish(new, module, state)


def simplified_sdpa_from_fightingcv(module: Any) -> MultiHeadAttention:
    """`SimplifiedScaledDotProductAttention(d_model, h, dropout)` (no query/key/value projections) ->
    `MultiHeadAttention(d_model, h, qkv_bias=False)` with identity `Wq`, `Wk`, `Wv` (exact: each output
    is one input times 1 plus zeros) and `fc_o` -> `fc`. Masks as for `ScaledDotProductAttention`.
    fightingcv's forward fails unless `h` divides `d_model`: such a module is refused."""
    if module.d_model != module.h * module.d_k:
        raise refuse(module, f"d_model={module.d_model} is not divisible by h={module.h} "
                             "(fightingcv's forward fails for it)", WHO)
    new = MultiHeadAttention(
        module.d_model, module.h, qkv_bias=False, attn_drop=_dropout_p(module), **factory(module)
    )
    eye = torch.eye(module.d_model, **factory(module))
    state = {"Wq.weight": eye, "Wk.weight": eye, "Wv.weight": eye}
    state.update({f"fc.{kind}": value for kind, value in module.fc_o.state_dict().items()})
    return finish(new, module, state)


CONVERTERS: dict[str, Callable[[Any], nn.Module]] = {
    f"{_PACKAGE}.ExternalAttention.ExternalAttention": external_from_fightingcv,
    f"{_PACKAGE}.SelfAttention.ScaledDotProductAttention": sdpa_from_fightingcv,
    f"{_PACKAGE}.SimplifiedSelfAttention.SimplifiedScaledDotProductAttention": (
        simplified_sdpa_from_fightingcv
    ),
}
