"""timm -> attnzoo for timm's spatial-reduction attentions: PVT v2's `Attention`, Twins'
`GlobalSubSampleAttn` and `LocallyGroupedAttn`, and Next-ViT's `EfficientAttention` -> the `attnzoo.compat`
classes that keep timm's constructors, calls and keys (`TimmPvtV2Attention`, `TimmTwinsGlobalAttention`,
`TimmTwinsLocalAttention`, `TimmNextVitAttention`).

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
from attnzoo.mechanisms.timm_nextvit import TimmNextVitAttention
from attnzoo.mechanisms.timm_pvt import TimmPvtV2Attention, TimmTwinsGlobalAttention, TimmTwinsLocalAttention

__all__ = ["CONVERTERS"]


def _heads(module: Any, dim: int) -> None:
    """Refuse heads that do not divide `dim` or a scale other than `(dim // num_heads) ** -0.5` (timm's
    fused path ignores `scale`, its other path uses it)."""
    heads = module.num_heads
    if dim % heads or not default_scale(module, dim // heads):
        raise refuse(module, f"its scale {module.scale} is not (dim // num_heads) ** -0.5 or its {heads} "
                     f"heads do not divide dim {dim}")


def _sr_ratio(module: Any, linear: bool = False) -> int:
    """The ratio of the reduction `sr`: 1 without it; refused unless it is timm's `r x r` convolution of
    stride `r` (1x1 in the linear mode), without padding, dilation or groups."""
    sr = module.sr
    if sr is None:
        return 1
    ratio = sr.kernel_size[0] if isinstance(sr, nn.Conv2d) else 0
    want = (ratio, ratio), (ratio, ratio), (0, 0), (1, 1), 1
    if not ratio or (sr.kernel_size, sr.stride, sr.padding, sr.dilation, sr.groups) != want or (
            linear and ratio != 1):
        raise refuse(module, f"its sr is not timm's strided r x r convolution ({sr})")
    return int(ratio)


def _copy_reduction(new: Any, module: Any) -> None:
    """timm's norm (any eps) and, in PVT v2's linear mode, its pool and activation."""
    for name in ("norm", "pool", "act"):
        if getattr(module, name, None) is not None:
            setattr(new, name, copy.deepcopy(getattr(module, name)))


def pvt_v2_attention_from_timm(module: Any) -> TimmPvtV2Attention:
    """PVT v2's `timm.models.pvt_v2.Attention` -> `attnzoo.compat.TimmPvtV2Attention` (timm's call and
    keys; its norm and, in the linear mode, pool and activation are copied)."""
    q: nn.Linear = module.q
    _heads(module, q.in_features)
    linear = module.pool is not None
    ratio = _sr_ratio(module, linear)
    new = TimmPvtV2Attention(q.in_features, module.num_heads, sr_ratio=ratio, linear_attn=linear,
                             qkv_bias=q.bias is not None, attn_drop=float(module.attn_drop.p),
                             proj_drop=float(module.proj_drop.p), **factory(module))
    _copy_reduction(new, module)
    return finish(new, module, module.state_dict())


def twins_global_attention_from_timm(module: Any) -> TimmTwinsGlobalAttention:
    """Twins' `timm.models.twins.GlobalSubSampleAttn` -> `attnzoo.compat.TimmTwinsGlobalAttention`."""
    q: nn.Linear = module.q
    _heads(module, q.in_features)
    if q.bias is None or module.kv.bias is None:
        raise refuse(module, "its q or kv has no bias (timm's always have)")
    new = TimmTwinsGlobalAttention(q.in_features, module.num_heads, attn_drop=float(module.attn_drop.p),
                                   proj_drop=float(module.proj_drop.p), sr_ratio=_sr_ratio(module),
                                   **factory(module))
    _copy_reduction(new, module)
    return finish(new, module, module.state_dict())


def twins_local_attention_from_timm(module: Any) -> TimmTwinsLocalAttention:
    """Twins' `timm.models.twins.LocallyGroupedAttn` -> `attnzoo.compat.TimmTwinsLocalAttention`."""
    qkv: nn.Linear = module.qkv
    _heads(module, qkv.in_features)
    if qkv.bias is None:
        raise refuse(module, "its qkv has no bias (timm's always has)")
    new = TimmTwinsLocalAttention(qkv.in_features, module.num_heads, attn_drop=float(module.attn_drop.p),
                                  proj_drop=float(module.proj_drop.p), ws=int(module.ws), **factory(module))
    return finish(new, module, module.state_dict())


def nextvit_attention_from_timm(module: Any) -> TimmNextVitAttention:
    """Next-ViT's `timm.models.nextvit.EfficientAttention` -> `attnzoo.compat.TimmNextVitAttention` (timm's
    call and keys; its pooling and norm copied as they are)."""
    q: nn.Linear = module.q
    if not default_scale(module, int(module.head_dim)):
        raise refuse(module, f"its scale {module.scale} is not head_dim ** -0.5")
    new = TimmNextVitAttention(q.in_features, int(module.out_dim), int(module.head_dim),
                               qkv_bias=q.bias is not None, attn_drop=float(module.attn_drop.p),
                               proj_drop=float(module.proj_drop.p), sr_ratio=int(module.sr_ratio),
                               **factory(module))
    new.sr, new.norm = copy.deepcopy(module.sr), copy.deepcopy(module.norm)
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.pvt_v2.Attention": pvt_v2_attention_from_timm,
    "timm.models.twins.GlobalSubSampleAttn": twins_global_attention_from_timm,
    "timm.models.twins.LocallyGroupedAttn": twins_local_attention_from_timm,
    "timm.models.nextvit.EfficientAttention": nextvit_attention_from_timm,
}
