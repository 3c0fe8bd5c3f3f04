"""timm -> attnzoo for timm's ViT attentions with relative position terms: the relative-position ViT's
`RelPosAttention` -> `attnzoo.compat.TimmRelPosAttention` and SAM's `Attention` ->
`attnzoo.compat.TimmSamAttention`, both keeping timm's constructors, calls and keys.

`RelPosAttention`'s `rel_pos` (timm's `RelPosBias`, `RelPosMlp` or `RelPosBiasTf`) is deep-copied as it
is, like the q/k norms: its keys, numbers (RelPosMlp's dropout draws included) and `set_window_size`
stay timm's. Another `rel_pos` class, or one whose `forward` or `get_bias` is not timm's, is refused:
timm's fused path calls `get_bias()` and its unfused path `forward(attn)`, the same sum only for
timm's own classes. SAM's `rope` (the model's shared `rope_global`/`rope_window`) is kept, not copied,
so the blocks stay tied to the model's as in timm.

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
from attnzoo.mechanisms.timm_relpos_vit import TimmRelPosAttention, TimmSamAttention

__all__ = ["CONVERTERS"]


def _scale(module: Any) -> None:
    if not default_scale(module, module.head_dim):
        raise refuse(module, f"its scale {module.scale} is not head_dim ** -0.5")


def relpos_attention_from_timm(module: Any) -> TimmRelPosAttention:
    """The relative-position ViT's `timm.models.vision_transformer_relpos.RelPosAttention` ->
    `attnzoo.compat.TimmRelPosAttention` (timm's call and keys; `rel_pos` and the q/k norms copied)."""
    qkv: nn.Linear = module.qkv
    _scale(module)
    if module.rel_pos is not None:
        check_rel_pos(module, module.rel_pos)
    new = TimmRelPosAttention(qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
                              attn_drop=float(module.attn_drop.p), proj_drop=float(module.proj_drop.p),
                              **factory(module))
    new.q_norm, new.k_norm = (copy.deepcopy(m) for m in (module.q_norm, module.k_norm))
    new.rel_pos = copy.deepcopy(module.rel_pos)
    return finish(new, module, module.state_dict())


def sam_attention_from_timm(module: Any) -> TimmSamAttention:
    """SAM's `timm.models.vision_transformer_sam.Attention` -> `attnzoo.compat.TimmSamAttention` (timm's
    call and keys; the q/k norms copied, the rope module kept)."""
    qkv: nn.Linear = module.qkv
    _scale(module)
    input_size = None
    if module.use_rel_pos:
        lengths = (module.rel_pos_h.shape[0], module.rel_pos_w.shape[0])
        if any(n % 2 == 0 for n in lengths):
            raise refuse(module, f"its rel_pos_h/rel_pos_w tables have {lengths} rows, not 2 s - 1 for a "
                         "size s")
        input_size = ((lengths[0] + 1) // 2, (lengths[1] + 1) // 2)
    new = TimmSamAttention(qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
                           attn_drop=float(module.attn_drop.p), proj_drop=float(module.proj_drop.p),
                           use_rel_pos=bool(module.use_rel_pos), input_size=input_size, **factory(module))
    new.q_norm, new.k_norm = (copy.deepcopy(m) for m in (module.q_norm, module.k_norm))
    new.rope = module.rope  # shared with the model's other blocks, as in timm (no parameters)
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.vision_transformer_relpos.RelPosAttention": relpos_attention_from_timm,
    "timm.models.vision_transformer_sam.Attention": sam_attention_from_timm,
}
