"""fightingcv -> attnzoo for deformable attention: fightingcv-attention's `DAT.DAttentionBaseline` ->
`attnzoo.mechanisms.deformable_fightingcv.FightingcvDeformableAttention` (the canonical class with the
coordinates of DAT's first release, whose numbers fightingcv computes).

`CONVERTERS` maps fightingcv's dotted class name to the converter; `attnzoo.convert.fightingcv` adds it
to `FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. The state_dict keys are the same (loaded
with `strict=True`). Options fightingcv cannot run are refused with `TypeError` naming why:
`no_off=True` (its forward calls `offset.fill(0.0)`, which torch tensors lack) and `fixed_pe=True` with
the table in use (its forward reads `self.n_sample`, which it never sets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.deformable_fightingcv import FightingcvDeformableAttention

__all__ = ["CONVERTERS"]

WHO = "from_fightingcv"


def deformable_from_fightingcv(module: Any) -> FightingcvDeformableAttention:
    """`DAttentionBaseline(q_size, kv_size, n_heads, n_head_channels, n_groups, attn_drop, proj_drop,
    stride, offset_range_factor, use_pe, dwc_pe, no_off, fixed_pe, stage_idx)` ->
    `FightingcvDeformableAttention(n_heads * n_head_channels, n_heads, groups=n_groups,
    feat_size=kv_size, stride, kernel_size=(9, 7, 5, 3)[stage_idx], offset_range_factor, use_pe,
    dwc_pe, attn_drop, proj_drop)`; `q_size` only sizes the `fixed_pe` table fightingcv cannot run."""
    if module.no_off:
        raise refuse(module, "no_off=True: its forward calls offset.fill(0.0), which torch tensors do not "
                     "have (AttributeError)", WHO)
    table = module.use_pe and not module.dwc_pe
    if table and module.fixed_pe:
        raise refuse(module, "fixed_pe=True: its forward reads self.n_sample, which it never sets "
                     "(AttributeError)", WHO)
    heads, groups = module.n_heads, module.n_groups
    if heads % groups != 0:
        raise refuse(module, f"n_groups={groups} must divide n_heads={heads}", WHO)
    conv = module.conv_offset[0]
    new = FightingcvDeformableAttention(
        module.nc,
        heads,
        groups,
        feat_size=(module.kv_h, module.kv_w),
        stride=conv.stride[0],
        kernel_size=conv.kernel_size[0],
        offset_range_factor=float(module.offset_range_factor),
        use_pe=bool(module.use_pe),
        dwc_pe=bool(module.use_pe and module.dwc_pe),
        attn_drop=module.attn_drop.p,
        proj_drop=module.proj_drop.p,
        **factory(module),
    )
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "fightingcv_attention.attention.DAT.DAttentionBaseline": deformable_from_fightingcv,
}
