"""timm -> attnzoo converters for timm's token-mixing attentions: ``LambdaLayer`` (lambda),
``BottleneckAttn`` (bottleneck), ``HaloAttn`` (halo), VOLO's ``OutlookAttention`` (outlook),
MobileViT v2's ``LinearSelfAttention`` (separable self-attention, to `attnzoo.compat`) and SwiftFormer's
``EfficientAdditiveAttention`` (additive attention, to `attnzoo.compat`);
`attnzoo.convert.timm.from_timm` dispatches to them. timm is never imported here: the widths are
read off the module."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import factory as _factory
from attnzoo.convert._timm_common import refuse as _refuse

__all__ = ["CONVERTERS"]


def _finish(new: nn.Module, module: nn.Module) -> nn.Module:
    """Load timm's state_dict strictly (copies), then take its training mode."""
    new.load_state_dict(module.state_dict(), strict=True)
    return new.train(module.training)


def _stride(module: Any) -> int:
    """2 when timm's ``pool`` is its 2 x 2 average pool, 1 for its identity."""
    pool = module.pool
    if isinstance(pool, nn.Identity):
        return 1
    if isinstance(pool, nn.AvgPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)):
        return 2
    raise _refuse(module, f"its pool is {pool}, not timm's AvgPool2d(2, 2) or Identity")


def _pointwise(module: Any, name: str) -> nn.Conv2d:
    conv = getattr(module, name)
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
        raise _refuse(module, f"its {name} is not a 1x1 nn.Conv2d")
    return conv


def _lambda(module: Any) -> nn.Module:
    """LambdaLayer: local lambda convolution (``r``) or global relative embedding (``feat_size``)."""
    from attnzoo.mechanisms.lambda_layer import LambdaLayer

    qkv = _pointwise(module, "qkv")
    r, feat_size = None, None
    if module.conv_lambda is not None:
        conv = module.conv_lambda
        r = conv.kernel_size[0]
        if conv.kernel_size != (r, r, 1) or conv.padding != (r // 2, r // 2, 0) or r % 2 == 0:
            raise _refuse(module, f"its conv_lambda {conv} is not an odd, centred (r, r, 1) convolution")
    else:
        feat_size = tuple(module.feat_size)
    new = LambdaLayer(
        qkv.in_channels, out_channels=module.num_heads * module.dim_v, feat_size=feat_size,
        stride=_stride(module), num_heads=module.num_heads, head_dim=module.dim_qk, r=r,
        qkv_bias=qkv.bias is not None, **_factory(module),
    )
    for name in ("norm_q", "norm_v"):  # eps, momentum, affine, track_running_stats as timm's
        if type(getattr(module, name)) is not nn.BatchNorm2d:
            raise _refuse(module, f"its {name} is not an nn.BatchNorm2d")
        setattr(new, name, copy.deepcopy(getattr(module, name)))
    if new.conv_lambda is not None and module.conv_lambda.bias is None:
        new.conv_lambda.bias = None
    return _finish(new, module)


def _bottleneck(module: Any) -> nn.Module:
    """BottleneckAttn: any width, heads, head width, stride, ``scale_pos_embed``."""
    from attnzoo.mechanisms.bottleneck import BottleneckAttention

    qkv = _pointwise(module, "qkv")
    new = BottleneckAttention(
        qkv.in_channels, out_channels=module.dim_out_v,
        feat_size=(module.pos_embed.height, module.pos_embed.width), stride=_stride(module),
        num_heads=module.num_heads, head_dim=module.dim_head_qk, qkv_bias=qkv.bias is not None,
        scale_pos_embed=bool(module.scale_pos_embed), **_factory(module),
    )
    return _finish(new, module)


def _halo(module: Any) -> nn.Module:
    """HaloAttn: strided queries or the average pool for stride 2, ``scale_pos_embed``."""
    from attnzoo.mechanisms.halo import HaloAttention

    q, kv = _pointwise(module, "q"), _pointwise(module, "kv")
    pooled = _stride(module) == 2
    stride = 2 if pooled or module.block_stride == 2 else 1
    if module.block_stride not in (1, 2) or (pooled and module.block_stride != 1):
        raise _refuse(module, f"its block_stride {module.block_stride} with pool {module.pool} is not timm's")
    new = HaloAttention(
        q.in_channels, out_channels=module.dim_out_v, stride=stride, num_heads=module.num_heads,
        head_dim=module.dim_head_qk, block_size=module.block_size, halo_size=module.halo_size,
        qkv_bias=kv.bias is not None, avg_down=pooled, scale_pos_embed=bool(module.scale_pos_embed),
        **_factory(module),
    )
    if (q.bias is None) != (kv.bias is None):
        raise _refuse(module, "one of q, kv has a bias and the other not")
    return _finish(new, module)


def _outlook(module: Any) -> nn.Module:
    """VOLO's OutlookAttention: the canonical class is VOLO's, with timm's keys (``v``, ``attn``,
    ``proj``) and every kernel size, padding and stride."""
    from attnzoo.mechanisms.outlook import OutlookAttention

    unfold = module.unfold
    if (unfold.kernel_size, unfold.padding, unfold.stride, unfold.dilation) != (
        module.kernel_size, module.padding, module.stride, 1
    ):
        raise _refuse(module, f"its unfold {unfold} does not follow its kernel_size, padding and stride")
    new = OutlookAttention(
        module.v.in_features, module.num_heads, kernel_size=module.kernel_size, padding=module.padding,
        stride=module.stride, qkv_bias=module.v.bias is not None, attn_drop=module.attn_drop.p,
        proj_drop=module.proj_drop.p, **_factory(module),
    )
    new.scale = float(module.scale)  # head_dim ** -0.5 on both sides, unless set by hand
    return _finish(new, module)


def _linear_self_attention(module: Any) -> nn.Module:
    """MobileViT v2's LinearSelfAttention -> `attnzoo.compat.TimmLinearSelfAttention` (timm's keys)."""
    from attnzoo.mechanisms.timm_mobilevit import TimmLinearSelfAttention

    qkv, out = _pointwise(module, "qkv_proj"), _pointwise(module, "out_proj")
    if (qkv.bias is None) != (out.bias is None):
        raise _refuse(module, "one of qkv_proj, out_proj has a bias and the other not")
    new = TimmLinearSelfAttention(module.embed_dim, attn_drop=module.attn_drop.p, proj_drop=module.out_drop.p,
                                  bias=qkv.bias is not None, **_factory(module))
    return _finish(new, module)


def _additive_attention(module: Any) -> nn.Module:
    """SwiftFormer's EfficientAdditiveAttention -> `attnzoo.compat.TimmEfficientAdditiveAttention` (timm's
    keys)."""
    from attnzoo.mechanisms.timm_swiftformer import TimmEfficientAdditiveAttention

    width, token_dim = module.to_query.out_features, module.final.out_features
    if width % token_dim or abs(float(module.scale_factor) - token_dim**-0.5) > 1e-12 * token_dim**-0.5:
        raise _refuse(module, f"its query width {width} is no multiple of token_dim {token_dim}, or its "
                      f"scale_factor {module.scale_factor} is not token_dim ** -0.5")
    new = TimmEfficientAdditiveAttention(module.to_query.in_features, token_dim, width // token_dim,
                                         **_factory(module))
    return _finish(new, module)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.layers.lambda_layer.LambdaLayer": _lambda,
    "timm.layers.bottleneck_attn.BottleneckAttn": _bottleneck,
    "timm.layers.halo_attn.HaloAttn": _halo,
    "timm.models.volo.OutlookAttention": _outlook,
    "timm.models.mobilevit.LinearSelfAttention": _linear_self_attention,
    "timm.models.swiftformer.EfficientAdditiveAttention": _additive_attention,
}
