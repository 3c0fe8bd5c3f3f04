"""timm -> attnzoo for the attentions with LeViT's learned offset bias: LeViT's `Attention` and
`AttentionDownsample`, TinyViT's `Attention` and EfficientFormer's (v1) `Attention` -> the
`attnzoo.compat` classes that keep timm's constructors, calls and keys (`TimmLevitAttention`,
`TimmLevitAttentionDownsample`, `TimmTinyVitAttention`, `TimmEfficientFormerAttention`).

LeViT's projections (`qkv`, `kv`, `q`, `proj`: a Linear or 1x1 convolution and a BatchNorm, the
subsampling, the activation) are copied as they are (deep copies of timm's submodules), so their
BatchNorm settings, activation and any subclass come along; TinyViT's `norm` too.

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.timm_efficientformer_v2 import (
    TimmEfficientFormerV2Attention,
    TimmEfficientFormerV2AttentionDownsample,
)
from attnzoo.mechanisms.timm_levit import TimmLevitAttention, TimmLevitAttentionDownsample, offset_index
from attnzoo.mechanisms.timm_levit_family import TimmEfficientFormerAttention, TimmTinyVitAttention

__all__ = ["CONVERTERS"]


def _ratio(module: Any) -> float:
    """An `attn_ratio` that gives the module's value width (`int(attn_ratio * key_dim)`), also where
    timm keeps only the width (LeViT; EfficientFormer V2 calls it `d`)."""
    val_dim, key_dim = int(getattr(module, "val_dim", getattr(module, "d", 0))), int(module.key_dim)
    ratio = val_dim / key_dim
    return ratio if int(ratio * key_dim) == val_dim else math.nextafter(ratio, math.inf)


def _widths(module: Any, layer: nn.Module, per_head: int, name: str) -> tuple[int, int]:
    """`(in, out)` of a Linear, a 1x1 convolution or timm's `LinearNorm`/`ConvNorm` (its `linear`);
    refused unless out is `num_heads * per_head`, the width the heads are split from."""
    weight = getattr(getattr(layer, "linear", layer), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim not in (2, 4):
        raise refuse(module, f"its {name} is no Linear or convolution ({type(layer).__qualname__})")
    out, width = int(weight.shape[0]), int(weight.shape[1])
    if out != module.num_heads * per_head:
        raise refuse(module, f"its {name} gives {out} channels, not num_heads * {per_head} = "
                     f"{module.num_heads * per_head}")
    return width, out


def _bias(module: Any, resolution: tuple[int, int], stride: int = 1) -> None:
    """Refuse a bias table or index that is not LeViT's for `resolution` (timm computes the index)."""
    table, index = module.attention_biases, module.attention_bias_idxs
    want = offset_index(resolution, stride, "cpu")
    readable = index.device.type != "meta"  # a module built on meta has no values to compare yet
    wrong_table = tuple(table.shape) != (module.num_heads, resolution[0] * resolution[1])
    if wrong_table or index.shape != want.shape or (readable and not torch.equal(index.cpu(), want)):
        raise refuse(module, f"its attention_biases {tuple(table.shape)} or attention_bias_idxs is not the "
                     f"offset bias of a {resolution} map")


def levit_attention_from_timm(module: Any) -> TimmLevitAttention:
    """LeViT's `timm.models.levit.Attention` -> `attnzoo.compat.TimmLevitAttention` (`qkv` and `proj`
    copied as they are)."""
    dim, _ = _widths(module, module.qkv, 2 * module.key_dim + module.val_dim, "qkv")
    resolution = (int(module.resolution[0]), int(module.resolution[1]))
    _bias(module, resolution)
    new = TimmLevitAttention(dim, int(module.key_dim), int(module.num_heads), attn_ratio=_ratio(module),
                             resolution=resolution, use_conv=bool(module.use_conv), **factory(module))
    new.qkv, new.proj = copy.deepcopy(module.qkv), copy.deepcopy(module.proj)
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


def levit_downsample_from_timm(module: Any) -> TimmLevitAttentionDownsample:
    """LeViT's `timm.models.levit.AttentionDownsample` -> `attnzoo.compat.TimmLevitAttentionDownsample`
    (`kv`, `q` and `proj` copied as they are)."""
    in_dim, _ = _widths(module, module.kv, module.key_dim + module.val_dim, "kv")
    _widths(module, module.q.ln, module.key_dim, "q.ln")
    out_dim = int(getattr(module.proj.ln, "linear", module.proj.ln).weight.shape[0])
    resolution, stride = (int(module.resolution[0]), int(module.resolution[1])), int(module.stride)
    _bias(module, resolution, stride)
    down = module.q.down
    pool = getattr(down, "kernel_size", 1) not in (1, (1, 1)) if module.use_conv else down.pool is not None
    new = TimmLevitAttentionDownsample(in_dim, out_dim, int(module.key_dim), int(module.num_heads),
                                       attn_ratio=_ratio(module), stride=stride, resolution=resolution,
                                       use_conv=bool(module.use_conv), use_pool=pool, **factory(module))
    new.kv, new.q, new.proj = copy.deepcopy(module.kv), copy.deepcopy(module.q), copy.deepcopy(module.proj)
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


def tiny_vit_attention_from_timm(module: Any) -> TimmTinyVitAttention:
    """TinyViT's `timm.models.tiny_vit.Attention` -> `attnzoo.compat.TimmTinyVitAttention` (`norm`
    copied; timm's fused path ignores `scale`, its other path uses it, and so does the result)."""
    dim, _ = _widths(module, module.qkv, 2 * module.key_dim + module.val_dim, "qkv")
    resolution = (int(module.resolution[0]), int(module.resolution[1]))
    _bias(module, resolution)
    new = TimmTinyVitAttention(dim, int(module.key_dim), int(module.num_heads), attn_ratio=_ratio(module),
                               resolution=resolution, **factory(module))
    new.norm = copy.deepcopy(module.norm)
    new.scale = float(module.key_dim) ** -0.5 if getattr(module, "fused_attn", False) else float(module.scale)
    return finish(new, module, module.state_dict())


def _grid_of(module: Any) -> tuple[int, int]:
    """EfficientFormer keeps no resolution: the `(H, W)` whose offset index is the module's (the square
    first); refused when none is."""
    tokens = int(module.attention_bias_idxs.shape[-1])
    side = math.isqrt(tokens)
    square = [(side, side)] if side * side == tokens else []
    pairs = square + [(h, tokens // h) for h in range(1, tokens + 1)
                      if tokens % h == 0 and (h, h) not in square]
    index = module.attention_bias_idxs
    for pair in pairs:
        want = offset_index(pair, 1, index.device)
        if index.shape == want.shape and bool((index == want).all()):
            return pair
    raise refuse(module, "its attention_bias_idxs is no (H, W) map's offset index")


def efficientformer_attention_from_timm(module: Any) -> TimmEfficientFormerAttention:
    """EfficientFormer's `timm.models.efficientformer.Attention` ->
    `attnzoo.compat.TimmEfficientFormerAttention` (the persistent index loads with the rest)."""
    dim, _ = _widths(module, module.qkv, 2 * module.key_dim + module.val_dim, "qkv")
    resolution = _grid_of(module)
    _bias(module, resolution)
    new = TimmEfficientFormerAttention(dim, int(module.key_dim), int(module.num_heads),
                                       attn_ratio=_ratio(module), resolution=resolution, **factory(module))
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


_V2_PARTS = ("stride_conv", "upsample", "q", "k", "v", "v_local", "talking_head1", "talking_head2", "act",
             "proj")


def _copy_parts(new: nn.Module, module: Any) -> None:
    """timm's submodules deep-copied into the converted module (their classes, paddings and norms kept)."""
    for name in _V2_PARTS:
        if hasattr(module, name):
            setattr(new, name, copy.deepcopy(getattr(module, name)))


def efficientformer_v2_from_timm(module: Any) -> TimmEfficientFormerV2Attention:
    """EfficientFormer V2's `timm.models.efficientformer_v2.Attention2d` ->
    `attnzoo.compat.TimmEfficientFormerV2Attention` (its layers copied as they are)."""
    dim, _ = _widths(module, module.q.conv, int(module.key_dim), "q")
    resolution = (int(module.resolution[0]), int(module.resolution[1]))
    _bias(module, resolution)
    stride = None if module.stride_conv is None else int(module.stride_conv.conv.stride[0])
    size = resolution if stride is None else (resolution[0] * stride, resolution[1] * stride)
    new = TimmEfficientFormerV2Attention(dim, int(module.key_dim), int(module.num_heads), _ratio(module),
                                         resolution=size, stride=stride, **factory(module))
    new.scale = float(module.scale)
    _copy_parts(new, module)
    return finish(new, module, module.state_dict())


def efficientformer_v2_downsample_from_timm(module: Any) -> TimmEfficientFormerV2AttentionDownsample:
    """EfficientFormer V2's `timm.models.efficientformer_v2.Attention2dDownsample` ->
    `attnzoo.compat.TimmEfficientFormerV2AttentionDownsample` (its layers copied as they are)."""
    dim, _ = _widths(module, module.k.conv, int(module.key_dim), "k")
    resolution = (int(module.resolution[0]), int(module.resolution[1]))
    _bias(module, resolution, 2)
    new = TimmEfficientFormerV2AttentionDownsample(dim, int(module.key_dim), int(module.num_heads),
                                                   _ratio(module), resolution=resolution,
                                                   out_dim=int(module.out_dim), **factory(module))
    new.scale = float(module.scale)
    _copy_parts(new, module)
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.models.levit.Attention": levit_attention_from_timm,
    "timm.models.levit.AttentionDownsample": levit_downsample_from_timm,
    "timm.models.tiny_vit.Attention": tiny_vit_attention_from_timm,
    "timm.models.efficientformer.Attention": efficientformer_attention_from_timm,
    "timm.models.efficientformer_v2.Attention2d": efficientformer_v2_from_timm,
    "timm.models.efficientformer_v2.Attention2dDownsample": efficientformer_v2_downsample_from_timm,
}
