"""fightingcv -> attnzoo for CrossFormer: fightingcv-attention's `Crossformer.Attention` (the official
CrossFormer attention with its dynamic position bias) -> `attnzoo.CrossFormerGroupAttention`.

`CONVERTERS` maps fightingcv's dotted class names to converters; `attnzoo.convert.fightingcv` adds
them to `FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. The result holds a copy of the
module's weights (same device, dtype and training flag) loaded with `strict=True`.

fightingcv's `CrossFormerBlock` is not converted (attnzoo has no CrossFormer block with its MLP and
norms); its attention `block.attn` converts, and `attnzoo.CrossFormerAttention` runs the block's
grouping (see docs/mechanisms/crossformer.md).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.convert._timm_common import copy_norm_settings
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.functional import relative_position_index_2d
from attnzoo.mechanisms.crossformer import CrossFormerGroupAttention
from attnzoo.mechanisms.crossformer_groups import relative_offsets

__all__ = ["CONVERTERS", "crossformer_attention_from_fightingcv"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def _check_derived(module: Any, group: tuple[int, int]) -> None:
    """fightingcv's `biases` / `relative_position_index` buffers must be the ones its group size gives:
    attnzoo derives them from `group_size`, so a module whose buffers were changed would convert to
    other outputs (a checkpoint with other ones is refused on loading for the same reason)."""
    derived = {"biases": relative_offsets(group, None, torch.float64),
               "relative_position_index": relative_position_index_2d(group)}
    for name, own in derived.items():
        given = getattr(module, name, None)
        if not isinstance(given, Tensor):
            continue
        same = given.shape == own.shape and (
            given.device.type == "meta" or torch.equal(given.cpu().to(own.dtype), own)  # meta: no values
        )
        if not same:
            reason = (f"its {name} buffer is not the one of a {group} group, which attnzoo derives from "
                      f"group_size (was it changed, or loaded for another group size?)")
            raise refuse(module, reason, WHO)


def _group_pair(module: Any) -> tuple[int, int]:
    """fightingcv's `group_size` as `(height, width)`: an int is a square group (fightingcv's
    CrossFormer blocks pass `to_2tuple(g)`; without position bias the attention never reads it)."""
    size = module.group_size
    pair = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    try:  # numpy ints too; not floats or bools
        group = tuple(operator.index(g) for g in pair if not isinstance(g, bool))
    except TypeError:
        group = ()
    if len(group) != 2 or len(pair) != 2:
        raise refuse(module, f"group_size={size!r} is no int nor (height, width) pair of ints", WHO)
    return group[0], group[1]


def crossformer_attention_from_fightingcv(module: Any) -> CrossFormerGroupAttention:
    """`Attention(dim, group_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, position_bias)`
    -> `CrossFormerGroupAttention` with the same options and keys; the logit scale is taken as
    fightingcv computed it (`qk_scale or head_dim ** -0.5`). The saved `biases` and
    `relative_position_index` buffers are dropped (they follow from the group size). With `dim < 16`
    fightingcv's bias MLP is 0 wide, so its bias is one constant per head, which the softmax ignores:
    that converts to `position_bias=False`."""
    group = _group_pair(module)
    dim, heads = module.dim, module.num_heads
    _check_derived(module, group)
    state = {k: v for k, v in module.state_dict().items() if k not in ("biases", "relative_position_index")}
    position_bias = bool(module.position_bias)
    if position_bias:
        pos = module.pos
        if pos.residual:
            reason = "its DynamicPosBias has residual=True (the official attention uses False)"
            raise refuse(module, reason, WHO)
        if pos.pos_dim != dim // 16:
            reason = f"its DynamicPosBias is {pos.pos_dim} wide, not dim // 16 = {dim // 16}"
            raise refuse(module, reason, WHO)
        if pos.pos_dim == 0:  # a constant bias per head: no effect on the softmax
            position_bias = False
            state = {k: v for k, v in state.items() if not k.startswith("pos.")}
    new = CrossFormerGroupAttention(
        dim, group, heads, qkv_bias=module.qkv.bias is not None, qk_scale=float(module.scale),
        attn_drop=module.attn_drop.p, proj_drop=module.proj_drop.p, position_bias=position_bias,
        **factory(module),
    )
    if position_bias:  # its LayerNorms' eps (fightingcv hard-codes the default; a user may not)
        copy_norm_settings(module.pos, new.pos, WHO)
    return finish(new, module, state)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.Crossformer.Attention": crossformer_attention_from_fightingcv,
}
