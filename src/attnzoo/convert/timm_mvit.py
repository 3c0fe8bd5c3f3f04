"""timm -> attnzoo for MViT v2's pooling attention (`timm.models.mvitv2.MultiScaleAttention`) ->
`attnzoo.compat.TimmMultiScaleAttention`, which keeps timm's constructor, call and keys.

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import default_scale
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.timm_mvit import TimmMultiScaleAttention

__all__ = ["CONVERTERS"]


def multiscale_attention_from_timm(module: Any) -> TimmMultiScaleAttention:
    """MViT v2's `timm.models.mvitv2.MultiScaleAttention` -> `attnzoo.compat.TimmMultiScaleAttention` (its
    pooling layers, norms and position tables copied as they are)."""
    if module.mode not in ("conv", "avg", "max"):
        raise refuse(module, f"its mode {module.mode!r} fails in timm's forward ('conv', 'avg', 'max' run)")
    if not default_scale(module, int(module.head_dim)):
        raise refuse(module, f"its scale {module.scale} is not head_dim ** -0.5")
    qkv: nn.Linear = module.qkv
    spatial = module.rel_pos_type == "spatial"
    new = TimmMultiScaleAttention(qkv.in_features, int(module.dim_out), (1, 1), int(module.num_heads),
                                  qkv_bias=qkv.bias is not None, mode=module.mode,
                                  has_cls_token=bool(module.has_cls_token), rel_pos_type="",
                                  residual_pooling=bool(module.residual_pooling), **factory(module))
    for name in ("pool_q", "norm_q", "pool_k", "norm_k", "pool_v", "norm_v"):  # timm's order of parameters
        setattr(new, name, copy.deepcopy(getattr(module, name)))
    if spatial:
        new.rel_pos_type = "spatial"
        new.rel_pos_h = copy.deepcopy(module.rel_pos_h)
        new.rel_pos_w = copy.deepcopy(module.rel_pos_w)
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.mvitv2.MultiScaleAttention": multiscale_attention_from_timm,
}
