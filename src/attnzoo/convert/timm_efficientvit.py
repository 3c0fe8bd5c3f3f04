"""timm -> attnzoo for the two EfficientViTs' attention: MIT's multi-scale linear attention
(`timm.models.efficientvit_mit.LiteMLA`) -> `attnzoo.compat.TimmLiteMLA`, and Microsoft's cascaded group
attention (`timm.models.efficientvit_msra.CascadedGroupAttention`) -> `attnzoo.compat.
TimmCascadedGroupAttention`, which keep timm's constructors, calls and keys.

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.timm_cascaded import TimmCascadedGroupAttention
from attnzoo.mechanisms.timm_litemla import TimmLiteMLA

__all__ = ["CONVERTERS"]


def lite_mla_from_timm(module: Any) -> TimmLiteMLA:
    """`timm.models.efficientvit_mit.LiteMLA` -> `attnzoo.compat.TimmLiteMLA` (timm's call and keys; its
    `qkv`, `aggreg`, `kernel_func` and `proj` are copied as they are: norms, activations and dropout)."""
    qkv: nn.Conv2d = module.qkv.conv
    total, dim = qkv.out_channels // 3, int(module.dim)
    if qkv.out_channels % 3 or total % dim:
        raise refuse(module, f"its qkv width {qkv.out_channels} is not 3 heads x dim {dim}")
    scales = tuple(int(op[0].kernel_size[0]) for op in module.aggreg)
    new = TimmLiteMLA(qkv.in_channels, module.proj.conv.out_channels, heads=total // dim, dim=dim,
                      scales=scales, eps=float(module.eps), **factory(module))
    for name in ("qkv", "aggreg", "kernel_func", "proj"):
        setattr(new, name, copy.deepcopy(getattr(module, name)))
    return finish(new, module, module.state_dict())


def cascaded_from_timm(module: Any) -> TimmCascadedGroupAttention:
    """`timm.models.efficientvit_msra.CascadedGroupAttention` -> `attnzoo.compat.TimmCascadedGroupAttention`
    (timm's call and keys; its `qkvs`, `dws` and `proj` are copied as they are)."""
    heads, key_dim = int(module.num_heads), int(module.key_dim)
    if abs(float(module.scale) - key_dim**-0.5) > 1e-12 * key_dim**-0.5:
        raise refuse(module, f"its scale {module.scale} is not key_dim ** -0.5")
    kernels = tuple(int(dw.conv.kernel_size[0]) for dw in module.dws)
    dim = int(module.qkvs[0].conv.in_channels) * heads
    new = TimmCascadedGroupAttention(dim, key_dim, heads, attn_ratio=module.val_dim / key_dim,
                                     resolution=int(module.resolution), kernels=kernels, **factory(module))
    index = module.attention_bias_idxs
    if index.device.type != "meta" and not torch.equal(new.attention_bias_idxs.cpu(), index.cpu()):
        raise refuse(module, "its attention_bias_idxs is not the offset index of its resolution")
    for name in ("qkvs", "dws", "proj"):
        setattr(new, name, copy.deepcopy(getattr(module, name)))
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.efficientvit_mit.LiteMLA": lite_mla_from_timm,
    "timm.models.efficientvit_msra.CascadedGroupAttention": cascaded_from_timm,
}
