"""fightingcv -> attnzoo for spatial token mixers: fightingcv-attention's `CrissCrossAttention`,
`AxialAttention`, `OutlookAttention`, `MobileViTv2Attention`, ... -> the canonical classes.

`CONVERTERS` maps fightingcv's dotted class names (xmu-xiaoma666/External-Attention-pytorch, package
`fightingcv_attention`) to converters; `attnzoo.convert.fightingcv` adds them to
`FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. Each result holds a copy of the module's
weights (same device, dtype and training flag) loaded with `strict=True`; where fightingcv only runs for
some options, the converter refuses the options it cannot run (the message says why).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.criss_cross import CrissCrossAttention

__all__ = ["CONVERTERS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def criss_cross_from_fightingcv(module: Any) -> CrissCrossAttention:
    """`CrissCrossAttention(in_dim)` -> `CrissCrossAttention(in_dim, rd_channels=in_dim // 8)`; same keys."""
    rd = module.query_conv.out_channels
    if rd < 1:
        raise refuse(module, f"in_dim={module.query_conv.in_channels} < 8 gives zero query channels", WHO)
    new = CrissCrossAttention(module.query_conv.in_channels, rd_channels=rd, **factory(module))
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.CrissCrossAttention.CrissCrossAttention": criss_cross_from_fightingcv,
}
