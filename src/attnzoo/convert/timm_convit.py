"""timm -> attnzoo for ConViT's attention: the gated positional self-attention of its local blocks
(`timm.models.convit.GPSA`) -> `attnzoo.compat.TimmGPSA`, and the plain multi-head attention of its later
blocks (`timm.models.convit.MHSA`) -> `attnzoo.compat.TimmAttention` (the same computation and keys).

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
from attnzoo.mechanisms.timm_attention import TimmAttention
from attnzoo.mechanisms.timm_convit import TimmGPSA

__all__ = ["CONVERTERS"]


def _options(module: Any, dim: int) -> dict[str, Any]:
    """Refuse heads that do not divide `dim` (timm's reshape fails) or another scale; the dropouts."""
    heads = int(module.num_heads)
    if dim % heads:
        raise refuse(module, f"its {heads} heads do not divide dim {dim} (timm's forward fails)")
    if not default_scale(module, dim // heads):
        raise refuse(module, f"its scale {module.scale} is not head_dim ** -0.5")
    return {"attn_drop": float(module.attn_drop.p), "proj_drop": float(module.proj_drop.p), **factory(module)}


def gpsa_from_timm(module: Any) -> TimmGPSA:
    """ConViT's `timm.models.convit.GPSA` -> `attnzoo.compat.TimmGPSA` (timm's call and keys)."""
    qk: nn.Linear = module.qk
    dim = qk.in_features
    new = TimmGPSA(dim, module.num_heads, qkv_bias=qk.bias is not None,
                   locality_strength=float(module.locality_strength), **_options(module, dim))
    return finish(new, module, module.state_dict())


def mhsa_from_timm(module: Any) -> TimmAttention:
    """ConViT's `timm.models.convit.MHSA` -> `attnzoo.compat.TimmAttention` (ViT's attention, same keys)."""
    qkv: nn.Linear = module.qkv
    dim = qkv.in_features
    new = TimmAttention(dim, module.num_heads, qkv_bias=qkv.bias is not None, **_options(module, dim))
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.convit.GPSA": gpsa_from_timm,
    "timm.models.convit.MHSA": mhsa_from_timm,
}
