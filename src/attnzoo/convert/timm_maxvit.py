"""timm -> attnzoo for the 2-D attention of MaxViT / CoAtNet (`timm.models.maxxvit.Attention2d` and
`AttentionCl`) and of MobileNetV4's hybrid blocks (`timm.layers.attention2d.Attention2d`, the same
computation as MaxViT's, and `MultiQueryAttention2d`) -> the `attnzoo.compat` classes that keep timm's
constructors, calls and keys (`TimmMaxxvitAttention2d`, `TimmMaxxvitAttentionCl`,
`TimmMultiQueryAttention2d`, `TimmAttention2d`).

The relative position submodule `rel_pos` (timm's `RelPosBias`, `RelPosMlp` or `RelPosBiasTf`) is
deep-copied as it is (keys, numbers, RelPosMlp's dropout draws and `set_window_size` stay timm's); the
compat class adds its `get_bias()` to the logits, as timm's fused path does. Another `rel_pos` class,
or one whose `forward` or `get_bias` is not timm's, is refused, as for the relative-position ViT
(`attnzoo.convert.timm_relpos_vit`): timm's unfused path calls `forward` instead, the same sum only
for timm's own classes.

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import check_rel_pos, default_scale, factory, refuse
from attnzoo.convert.timm_existing import finish
from attnzoo.mechanisms.timm_maxvit import TimmMaxxvitAttention2d, TimmMaxxvitAttentionCl
from attnzoo.mechanisms.timm_mqa import TimmAttention2d, TimmMultiQueryAttention2d

__all__ = ["CONVERTERS"]


def _pointwise(module: Any, conv: nn.Module, name: str) -> None:
    """Refuse a `qkv` or `proj` other than timm's 1x1 convolution (no stride, padding, dilation or groups)."""
    want = ((1, 1), (1, 1), (0, 0), (1, 1), 1, "zeros")
    ok = isinstance(conv, nn.Conv2d) and (conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                          conv.groups, conv.padding_mode) == want
    if not ok:
        raise refuse(module, f"its {name} is not timm's 1x1 convolution ({conv})")


def _options(module: Any, dim: int, dim_attn3: int, dim_out: int, wider_only: bool) -> dict[str, Any]:
    """The compat constructor's arguments that give timm's widths, heads and layout; refused where the
    heads do not tile the attention width (timm's Attention2d then mixes positions into its tokens) or
    the scale is not `dim_head ** -0.5` (timm's fused path ignores `scale`, its other path uses it)."""
    dim_attn, heads, dim_head = dim_attn3 // 3, int(module.num_heads), int(module.dim_head)
    if dim_attn3 % 3 or heads * dim_head != dim_attn:
        raise refuse(module, f"its {heads} heads of dim_head {dim_head} do not tile its attention width "
                     f"{dim_attn3 / 3:g}")
    if hasattr(module, "scale") and not default_scale(module, dim_head):  # layers.Attention2d has none
        raise refuse(module, f"its scale {module.scale} is not dim_head ** -0.5")
    # expand_first: which width the attention runs at (AttentionCl expands in qkv only when wider)
    if dim_attn == dim_out and (dim_out > dim or not wider_only):
        expand_first = True
    elif dim_attn == dim:
        expand_first = dim_out <= dim if wider_only else dim_out == dim
    else:
        raise refuse(module, f"its attention width {dim_attn} is neither dim {dim} nor dim_out {dim_out}")
    if getattr(module, "rel_pos", None) is not None:
        check_rel_pos(module, module.rel_pos)
    return {"dim": dim, "dim_out": dim_out, "dim_head": dim_head, "expand_first": expand_first,
            "head_first": bool(module.head_first), "attn_drop": float(module.attn_drop.p),
            "proj_drop": float(module.proj_drop.p), **factory(module)}


def _finish(new: Any, module: Any) -> Any:
    if getattr(module, "rel_pos", None) is not None:
        new.rel_pos = copy.deepcopy(module.rel_pos)  # timm's class, buffers and window as they are
    return finish(new, module, module.state_dict())


def _pointwise_pair(module: Any) -> tuple[bool, dict[str, Any]]:
    """`(bias, options)` of a module whose `qkv` and `proj` are timm's 1x1 convolutions, both with bias or
    neither (timm's `bias` sets both)."""
    qkv, proj = module.qkv, module.proj
    _pointwise(module, qkv, "qkv")
    _pointwise(module, proj, "proj")
    if (qkv.bias is None) != (proj.bias is None):
        raise refuse(module, "only one of its qkv and proj has a bias (timm's bias sets both)")
    return qkv.bias is not None, _options(module, qkv.in_channels, qkv.out_channels, proj.out_channels,
                                          wider_only=False)


def attention2d_from_timm(module: Any) -> TimmMaxxvitAttention2d:
    """MaxViT / CoAtNet's `timm.models.maxxvit.Attention2d` -> `attnzoo.compat.TimmMaxxvitAttention2d`
    (timm's call and keys; `rel_pos` deep-copied)."""
    bias, options = _pointwise_pair(module)
    return _finish(TimmMaxxvitAttention2d(bias=bias, **options), module)


def layers_attention2d_from_timm(module: Any) -> TimmAttention2d:
    """MobileNetV4's `timm.layers.attention2d.Attention2d` -> `attnzoo.compat.TimmAttention2d` (MaxViT's
    computation and keys, timm's constructor and call `(x, attn_mask=None)`)."""
    bias, options = _pointwise_pair(module)
    new = TimmAttention2d(options["dim"], options["dim_out"], int(module.num_heads), bias=bias,
                          expand_first=options["expand_first"], head_first=options["head_first"],
                          attn_drop=options["attn_drop"], proj_drop=options["proj_drop"], **factory(module))
    return finish(new, module, module.state_dict())


def attention_cl_from_timm(module: Any) -> TimmMaxxvitAttentionCl:
    """MaxViT's `timm.models.maxxvit.AttentionCl` -> `attnzoo.compat.TimmMaxxvitAttentionCl` (timm's call
    and keys; `rel_pos` deep-copied)."""
    qkv: nn.Linear = module.qkv
    proj: nn.Linear = module.proj
    if (qkv.bias is None) != (proj.bias is None):
        raise refuse(module, "only one of its qkv and proj has a bias (timm's bias sets both)")
    options = _options(module, qkv.in_features, qkv.out_features, proj.out_features, wider_only=True)
    return _finish(TimmMaxxvitAttentionCl(bias=qkv.bias is not None, **options), module)


def multi_query_from_timm(module: Any) -> TimmMultiQueryAttention2d:
    """MobileNetV4's `timm.layers.attention2d.MultiQueryAttention2d` ->
    `attnzoo.compat.TimmMultiQueryAttention2d` (timm's call and keys; its `query`, `key`, `value` and
    `output` branches are copied as they are: pooling, padding layers and norms included)."""
    if not default_scale(module, module.key_dim):
        raise refuse(module, f"its scale {module.scale} is not key_dim ** -0.5")
    proj_q, proj_out = module.query.proj, module.output.proj
    new = TimmMultiQueryAttention2d(
        proj_q.in_channels, proj_out.out_channels, module.num_heads, module.key_dim, module.value_dim,
        attn_drop=float(module.attn_drop.p), **factory(module),
    )
    for branch in ("query", "key", "value", "output"):
        setattr(new, branch, copy.deepcopy(getattr(module, branch)))
    new.query_strides, new.kv_stride = tuple(module.query_strides), int(module.kv_stride)
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.maxxvit.Attention2d": attention2d_from_timm,
    "timm.models.maxxvit.AttentionCl": attention_cl_from_timm,
    "timm.layers.attention2d.Attention2d": layers_attention2d_from_timm,
    "timm.layers.attention2d.MultiQueryAttention2d": multi_query_from_timm,
}
