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

from torch import nn

from attnzoo.convert.timm_existing import factory, finish
from attnzoo.mechanisms.external import ExternalAttention

__all__ = ["CONVERTERS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def external_from_fightingcv(module: Any) -> ExternalAttention:
    """`ExternalAttention(d_model, S)` -> `ExternalAttention(d_model, memory_size=S, eps=0.0)` (fightingcv
    adds no epsilon to the $\\ell_1$ denominator); same keys `mk.weight`, `mv.weight`."""
    mk: nn.Linear = module.mk
    new = ExternalAttention(mk.in_features, memory_size=mk.out_features, eps=0.0, **factory(module))
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[Any], nn.Module]] = {
    f"{_PACKAGE}.ExternalAttention.ExternalAttention": external_from_fightingcv,
}
