"""timm -> attnzoo for DaViT's attention (`timm.models.davit.WindowAttention`, `ChannelAttention` and
`ChannelAttentionV2`) -> the `attnzoo.compat` classes that keep timm's constructors, calls and keys
(`TimmDavitWindowAttention`, `TimmDavitChannelAttention`, `TimmDavitChannelAttentionV2`).

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import default_scale
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.timm_davit import (
    TimmDavitChannelAttention,
    TimmDavitChannelAttentionV2,
    TimmDavitWindowAttention,
)

__all__ = ["CONVERTERS"]


def _linears(module: Any, heads: int) -> tuple[int, bool]:
    """`(dim, qkv_bias)`; refused where the heads do not divide `dim` (timm's forward fails) or `proj`
    has no bias (timm's always has)."""
    qkv: nn.Linear = module.qkv
    dim = qkv.in_features
    if dim % heads:
        raise refuse(module, f"its {heads} heads do not divide dim {dim} (timm's forward fails)")
    if module.proj.bias is None:
        raise refuse(module, "its proj has no bias (timm's always has)")
    return dim, qkv.bias is not None


def window_attention_from_timm(module: Any) -> TimmDavitWindowAttention:
    """DaViT's `timm.models.davit.WindowAttention` -> `attnzoo.compat.TimmDavitWindowAttention`."""
    dim, qkv_bias = _linears(module, module.num_heads)
    # timm's fused path ignores scale, its other path uses it: only the default is the same in both
    if not default_scale(module, dim // module.num_heads):
        raise refuse(module, f"its scale {module.scale} is not (dim // num_heads) ** -0.5")
    new = TimmDavitWindowAttention(dim, tuple(module.window_size), module.num_heads, qkv_bias=qkv_bias,
                                   **factory(module))
    return finish(new, module, module.state_dict())


def channel_attention_from_timm(module: Any) -> TimmDavitChannelAttention:
    """DaViT's `timm.models.davit.ChannelAttention` -> `attnzoo.compat.TimmDavitChannelAttention` (its
    scale copied: timm's one path uses it)."""
    dim, qkv_bias = _linears(module, module.num_heads)
    new = TimmDavitChannelAttention(dim, module.num_heads, qkv_bias=qkv_bias, **factory(module))
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


def channel_attention_v2_from_timm(module: Any) -> TimmDavitChannelAttentionV2:
    """`timm.models.davit.ChannelAttentionV2` -> `attnzoo.compat.TimmDavitChannelAttentionV2`."""
    dim, qkv_bias = _linears(module, module.groups)
    if module.head_dim != dim // module.groups:
        raise refuse(module, f"its head_dim {module.head_dim} is not dim // num_heads")
    new = TimmDavitChannelAttentionV2(dim, module.groups, qkv_bias=qkv_bias,
                                      dynamic_scale=bool(module.dynamic_scale), **factory(module))
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.davit.WindowAttention": window_attention_from_timm,
    "timm.models.davit.ChannelAttention": channel_attention_from_timm,
    "timm.models.davit.ChannelAttentionV2": channel_attention_v2_from_timm,
}
