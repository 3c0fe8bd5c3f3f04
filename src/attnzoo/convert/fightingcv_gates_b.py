"""fightingcv -> attnzoo, group b: `PSA`, `ParallelPolarizedSelfAttention`,
`SequentialPolarizedSelfAttention`, `DoubleAttention` (A2Atttention.py),
`S2Attention`, `CoTAttention`, DANet's `PositionAttentionModule`, `ChannelAttentionModule`, `DAModule`.

`CONVERTERS` maps fightingcv-attention's dotted class names (xmu-xiaoma666/External-Attention-pytorch)
to converters; `attnzoo.convert.fightingcv` adds them to `FIGHTINGCV_CONVERTERS`. fightingcv is never
imported here. Each result holds a copy of the module's weights (same device, dtype and training
flag) and reproduces fightingcv's outputs, its particularities set as options of the canonical
class (each converter names them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert._timm_common import copy_norm_settings
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.cot import FightingcvCoTAttention
from attnzoo.mechanisms.danet_fightingcv import (
    FightingcvChannelAttentionModule,
    FightingcvDAModule,
    FightingcvPositionAttentionModule,
)
from attnzoo.mechanisms.double_attention import DoubleAttention
from attnzoo.mechanisms.polarized import ParallelPolarizedSelfAttention, SequentialPolarizedSelfAttention
from attnzoo.mechanisms.psa import PyramidSplitAttention
from attnzoo.mechanisms.s2 import S2Attention

__all__ = ["CONVERTERS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def psa_from_fightingcv(module: Any) -> PyramidSplitAttention:
    """`PSA(channel, reduction, S)` -> `PyramidSplitAttention(channel, kernel_sizes=(3, 5, ..., 2S+1),
    groups=(1,) * S, split_input=True, shared_se=False, conv_bias=True, se_bias=False)`.

    fightingcv keeps its layers in Python lists (`convs`, `se_blocks`): they are read from there.
    Its SE blocks become one grouped 1x1 convolution pair (`fc1`, `fc2`).
    """
    convs, blocks = list(module.convs), list(module.se_blocks)
    s = module.S
    if len(convs) != s or len(blocks) != s:
        raise refuse(module, f"it has {len(convs)} convs and {len(blocks)} SE blocks for S={s}", WHO)
    for conv in convs:
        if conv.groups != 1 or conv.bias is None or conv.padding != (conv.kernel_size[0] // 2,) * 2:
            raise refuse(module, "its convolutions are not fightingcv's (ungrouped, biased, centred)", WHO)
    first = convs[0]
    width, channels = first.out_channels, first.out_channels * s
    fc1s, fc2s = [b[1] for b in blocks], [b[3] for b in blocks]
    if any(f.bias is not None for f in fc1s + fc2s):
        raise refuse(module, "its SE convolutions have biases (fightingcv's have none)", WHO)
    new = PyramidSplitAttention(
        channels,
        kernel_sizes=tuple(c.kernel_size[0] for c in convs),
        groups=(1,) * s,
        rd_channels=fc1s[0].out_channels,
        split_input=True,
        shared_se=False,
        conv_bias=True,
        se_bias=False,
        **factory(first),
    )
    if new.convs[0].in_channels != width:
        raise refuse(module, f"its convolutions take {width} channels, not C / S", WHO)
    state = {}
    for i, conv in enumerate(convs):
        state[f"convs.{i}.weight"] = conv.weight.detach()
        state[f"convs.{i}.bias"] = conv.bias.detach()
    state["fc1.weight"] = torch.cat([f.weight.detach() for f in fc1s])  # (S*rd, C/S, 1, 1)
    state["fc2.weight"] = torch.cat([f.weight.detach() for f in fc2s])  # (C, rd, 1, 1)
    return finish(new, module, state)


def _polarized(cls: type[nn.Module]) -> Callable[[Any], nn.Module]:
    def convert(module: Any) -> nn.Module:
        """`{Parallel,Sequential}PolarizedSelfAttention(channel)` -> the class of the same name with
        `rd_channels = channel // 2` and fightingcv's parameter names (a strict state_dict copy)."""
        wv, ln = module.ch_wv, module.ln
        if not isinstance(ln, nn.LayerNorm) or ln.normalized_shape != (wv.in_channels,):
            raise refuse(module, "its ln is not a LayerNorm over the channels", WHO)
        new = cls(wv.in_channels, rd_channels=wv.out_channels, bias=wv.bias is not None, **factory(wv))
        new.ln = nn.LayerNorm(
            ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
            bias=ln.bias is not None, **factory(wv),
        )
        return finish(new, module, module.state_dict())

    convert.__name__ = f"{cls.__name__}_from_fightingcv"
    return convert


def double_attention_from_fightingcv(module: Any) -> DoubleAttention:
    """`DoubleAttention(in_channels, c_m, c_n, reconstruct)` -> `DoubleAttention(in_channels,
    rd_channels=c_m, num_descriptors=c_n, reconstruct=reconstruct, softmax_over="batch")`: fightingcv
    takes both softmaxes over the batch (`F.softmax` without `dim` on a 3-D tensor). Same names."""
    new = DoubleAttention(
        module.in_channels, rd_channels=module.c_m, num_descriptors=module.c_n,
        reconstruct=module.reconstruct, softmax_over="batch", **factory(module),
    )
    return finish(new, module, module.state_dict())


def s2_from_fightingcv(module: Any) -> S2Attention:
    """`S2Attention(channels)` -> `S2Attention(channels, shift="fightingcv")`, same names: fightingcv's
    in-place shifts smear the first row or column on CPU (`attnzoo.mechanisms.s2`). Refused unless
    its split attention has the module's width (fightingcv builds it for 512 channels whatever
    `channels` is, so only C = 512 runs there)."""
    channels = module.mlp2.in_features
    if module.split_attention.channel != channels or module.split_attention.k != 3:
        raise refuse(
            module,
            f"its split attention is built for {module.split_attention.channel} channels and "
            f"{module.split_attention.k} branches, its block for {channels} and 3 (it cannot run)",
            WHO,
        )
    new = S2Attention(channels, shift="fightingcv", **factory(module))
    return finish(new, module, module.state_dict())


def cot_from_fightingcv(module: Any) -> FightingcvCoTAttention:
    """`CoTAttention(dim, kernel_size)` -> `FightingcvCoTAttention(dim, kernel_size)` (its names and
    numbers; not the paper's CoT block, `attnzoo.ContextualTransformer`). BatchNorm eps and momentum
    are copied."""
    new = FightingcvCoTAttention(module.dim, module.kernel_size, **factory(module))
    copy_norm_settings(module, new, WHO)
    return finish(new, module, module.state_dict())


def _position(module: Any) -> FightingcvPositionAttentionModule:
    """`PositionAttentionModule` -> `FightingcvPositionAttentionModule` (same names and numbers)."""
    cnn, pa = module.cnn, module.pa
    if pa.h != 1 or pa.d_k != cnn.in_channels or pa.d_v != cnn.in_channels:
        raise refuse(module, "its attention is not one head of the convolution's width", WHO)
    new = FightingcvPositionAttentionModule(cnn.in_channels, cnn.kernel_size[0], **factory(module))
    new.pa.dropout.p = pa.dropout.p
    return finish(new, module, module.state_dict())


def _channel(module: Any) -> FightingcvChannelAttentionModule:
    """`ChannelAttentionModule` -> `FightingcvChannelAttentionModule`, built for the `H*W` positions
    of fightingcv's output projection (as `H=H*W, W=1`)."""
    cnn, pa = module.cnn, module.pa
    if pa.h != 1:
        raise refuse(module, f"its attention has {pa.h} heads, not 1", WHO)
    k = cnn.kernel_size[0]
    new = FightingcvChannelAttentionModule(cnn.in_channels, k, pa.d_model, 1, **factory(module))
    new.pa.dropout.p = pa.dropout.p
    return finish(new, module, module.state_dict())


def danet_from_fightingcv(module: Any) -> nn.Module:
    """`PositionAttentionModule`, `ChannelAttentionModule`, `DAModule` -> the `Fightingcv*` class of
    the same name (attnzoo.mechanisms.danet_fightingcv); fightingcv's `DAModule` always holds modules
    built for 512 channels, kernel 3 and 7 x 7 inputs, whatever its arguments."""
    name = type(module).__name__
    if name == "PositionAttentionModule":
        return _position(module)
    if name == "ChannelAttentionModule":
        return _channel(module)
    pos, chan = _position(module.position_attention_module), _channel(module.channel_attention_module)
    if pos.cnn.kernel_size != chan.cnn.kernel_size or pos.d_model != chan.d_model:
        raise refuse(module, "its two modules have different widths or kernel sizes", WHO)
    new = FightingcvDAModule(pos.d_model, pos.cnn.kernel_size[0], chan.positions, 1, **factory(module))
    new.position_attention_module, new.channel_attention_module = pos, chan
    return new.train(module.training)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.PSA.PSA": psa_from_fightingcv,
    f"{_PACKAGE}.PolarizedSelfAttention.ParallelPolarizedSelfAttention": _polarized(
        ParallelPolarizedSelfAttention
    ),
    f"{_PACKAGE}.PolarizedSelfAttention.SequentialPolarizedSelfAttention": _polarized(
        SequentialPolarizedSelfAttention
    ),
    f"{_PACKAGE}.A2Atttention.DoubleAttention": double_attention_from_fightingcv,
    f"{_PACKAGE}.S2Attention.S2Attention": s2_from_fightingcv,
    f"{_PACKAGE}.CoTAttention.CoTAttention": cot_from_fightingcv,
    **{f"{_PACKAGE}.DANet.{n}": danet_from_fightingcv
       for n in ("PositionAttentionModule", "ChannelAttentionModule", "DAModule")},
}
