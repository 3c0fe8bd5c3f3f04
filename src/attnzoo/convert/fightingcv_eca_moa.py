"""fightingcv -> attnzoo: `ECAAttention` -> `EfficientChannelAttention`, and the MOA transformer's
`GlobalAttention` -> `LegacyOverlappedAttention` and `WindowAttention` -> `WindowAttention`.

`CONVERTERS` maps fightingcv's dotted class names (package `fightingcv_attention`) to converters;
`attnzoo.convert.fightingcv` adds them to `FIGHTINGCV_CONVERTERS`. fightingcv is never imported here.
Each result holds a copy of the module's weights (same device, dtype and training flag) loaded with
`strict=True`; options fightingcv cannot run are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.eca import EfficientChannelAttention
from attnzoo.mechanisms.moa import LegacyOverlappedAttention
from attnzoo.mechanisms.swin import WindowAttention

__all__ = ["CONVERTERS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def eca_from_fightingcv(module: Any) -> EfficientChannelAttention:
    """`ECAAttention(kernel_size=3)` -> `EfficientChannelAttention(C, kernel_size, bias=True)`.

    fightingcv's differs from the paper's (and timm's) ECA in two ways, both kept: the kernel size is
    fixed (no adaptive size from C) and the convolution has a bias (`nn.Conv1d`'s default). It fixes
    no channel count, so the result has `channels=None` and takes any C. An even `kernel_size` is
    refused: fightingcv's padding `(k - 1) // 2` then yields C - 1 gates and its forward fails.
    """
    conv: nn.Conv1d = module.conv
    kernel = conv.kernel_size[0]
    if kernel % 2 == 0:
        raise refuse(module, f"kernel_size={kernel} is even: its convolution yields C - 1 gates "
                             "and its forward fails", WHO)
    if conv.padding[0] != (kernel - 1) // 2:
        raise refuse(module, f"its padding {conv.padding} is not (kernel_size - 1) // 2", WHO)
    if type(module.sigmoid) is not nn.Sigmoid:
        raise refuse(module, f"its gate is a {type(module.sigmoid).__qualname__}, not nn.Sigmoid", WHO)
    new = EfficientChannelAttention(1, kernel, bias=conv.bias is not None, **factory(module))
    new.channels = None  # fightingcv fixes no channel count
    return finish(new, module, module.state_dict())


def moa_from_fightingcv(module: Any) -> LegacyOverlappedAttention:
    """MOA's `GlobalAttention(dim, window_size, input_resolution, num_heads, qkv_bias, qk_scale, ...)`
    -> `LegacyOverlappedAttention` (its `forward(x, H, W)` and numbers; same keys but the index).

    fightingcv stores no input resolution, only `seq_len = H // window`, and its table is square, so the
    result is made for the `(seq_len * window)^2` map. Refused: a key stride other than the window
    (fightingcv's `nn.Unfold` has stride 14: with another window only a one-window map runs, built
    here as such), a reduction convolution other than 1x1, and widths other than `dim`.
    """
    window, seq = module.window_size[0], module.seq_len
    if tuple(module.window_size) != (window, window):
        raise refuse(module, f"window_size={tuple(module.window_size)} is not square; it uses only "
                             f"{window}", WHO)
    if seq < 1:
        raise refuse(module, "its input_resolution is smaller than its window (seq_len 0)", WHO)
    stride = module.keyembedding.stride
    stride = stride[0] if isinstance(stride, tuple) else stride
    if stride != window and seq != 1:
        raise refuse(module, f"its key stride is {stride}, not its window {window}: it runs only for "
                             f"window 14 or a one-window map, and seq_len={seq}", WHO)
    conv: nn.Conv2d = module.pre_conv
    if conv.kernel_size != (1, 1) or conv.in_channels != module.dim or conv.bias is None:
        raise refuse(module, "its pre_conv is not a 1x1 convolution with bias from dim", WHO)
    new = LegacyOverlappedAttention(
        module.dim,
        window,
        module.num_heads,
        feat_size=seq * window,
        reduction=module.reduction,
        qkv_bias=module.q.bias is not None,
        attn_drop=float(module.attn_drop.p),
        proj_drop=float(module.proj_drop.p),
        **factory(module),
    )
    if new.rd_channels != conv.out_channels:
        raise refuse(module, f"its pre_conv has {conv.out_channels} channels, not dim // reduction", WHO)
    new.scale = float(module.scale)  # qk_scale, or head_dim ** -0.5
    state = dict(module.state_dict())
    index = state.pop("relative_position_index")
    own: torch.Tensor = new.relative_position_index  # type: ignore[assignment]  # a registered buffer
    if not torch.equal(index.to(own.device), own):
        raise refuse(module, "its relative_position_index is not Swin's index of its grid", WHO)
    return finish(new, module, state)


def moa_window_from_fightingcv(module: Any) -> WindowAttention:
    """MOA's Swin-style `WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, ...)` ->
    `WindowAttention` (keys as they are; the persistent index is checked against the computed one)."""
    qkv: nn.Linear = module.qkv
    if qkv.out_features != 3 * module.dim or module.proj.in_features != module.dim:
        raise refuse(module, f"its qkv width {qkv.out_features} is not 3 * dim ({3 * module.dim})", WHO)
    new = WindowAttention(
        module.dim,
        tuple(module.window_size),
        module.num_heads,
        qkv_bias=qkv.bias is not None,
        qk_scale=float(module.scale),
        attn_drop=float(module.attn_drop.p),
        proj_drop=float(module.proj_drop.p),
        **factory(module),
    )
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.ECAAttention.ECAAttention": eca_from_fightingcv,
    f"{_PACKAGE}.MOATransformer.GlobalAttention": moa_from_fightingcv,
    f"{_PACKAGE}.MOATransformer.WindowAttention": moa_window_from_fightingcv,
}
