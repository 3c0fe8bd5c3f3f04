"""timm -> attnzoo for timm's cross-covariance attentions: XCiT's `XCA` and EdgeNeXt's
`CrossCovarianceAttn` -> the `attnzoo.compat` classes that keep timm's constructors, calls and keys
(`TimmXCA`, `TimmCrossCovarianceAttention`). XCiT's class attention is CaiT's `ClassAttn`, which
`timm_vit` converts.

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.timm_xca import TimmCrossCovarianceAttention, TimmXCA

__all__ = ["CONVERTERS"]


def _convert(module: Any, cls: type[TimmXCA] | type[TimmCrossCovarianceAttention]) -> nn.Module:
    qkv: nn.Linear = module.qkv
    dim, heads = qkv.in_features, module.num_heads
    if dim % heads:  # timm builds it, and its forward fails to reshape the heads
        raise refuse(module, f"its {heads} heads do not divide dim {dim}")
    new = cls(dim, heads, qkv_bias=qkv.bias is not None, attn_drop=float(module.attn_drop.p),
              proj_drop=float(module.proj_drop.p), **factory(module))
    return finish(new, module, module.state_dict())


def xca_from_timm(module: Any) -> nn.Module:
    """XCiT's `timm.models.xcit.XCA` -> `attnzoo.compat.TimmXCA` (timm's call and keys)."""
    return _convert(module, TimmXCA)


def cross_covariance_from_timm(module: Any) -> nn.Module:
    """EdgeNeXt's `timm.models.edgenext.CrossCovarianceAttn` -> `attnzoo.compat.TimmCrossCovarianceAttention`
    (timm's call and keys)."""
    return _convert(module, TimmCrossCovarianceAttention)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.xcit.XCA": xca_from_timm,
    "timm.models.edgenext.CrossCovarianceAttn": cross_covariance_from_timm,
}
