"""fightingcv -> attnzoo converters for BAM, SGE, shuffle attention, SimAM, triplet attention, ParNet
attention and residual attention (CSRA); `attnzoo.convert.fightingcv.from_fightingcv` dispatches to them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import copy_norm_settings, refuse
from attnzoo.convert._timm_common import factory as _factory

_PACKAGE = "fightingcv_attention.attention"

__all__ = ["CONVERTERS"]

# dotted fightingcv class name -> converter; filled below.
CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {}


_refuse = functools.partial(refuse, who="from_fightingcv")


def _copy_in_order(theirs: nn.Module, ours: nn.Module) -> nn.Module:
    """Copy ``theirs``'s state (parameters and buffers, in registration order) into ``ours``, whose
    state has the same tensors in the same order under other names; keep the training mode."""
    src, dst = theirs.state_dict(), ours.state_dict()
    if len(src) != len(dst):
        raise _refuse(theirs, f"it holds {len(src)} tensors where attnzoo's class holds {len(dst)}")
    mapped = {}
    for (their_key, value), (our_key, target) in zip(src.items(), dst.items(), strict=True):
        if value.shape != target.shape:
            raise _refuse(
                theirs, f"{their_key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        mapped[our_key] = value
    ours.load_state_dict(mapped, strict=True)
    copy_norm_settings(theirs, ours, "from_fightingcv")  # eps and momentum: not in a state_dict
    return ours.train(theirs.training)


# ---------------------------------------------------------------------------------------------
# fcv-a block: BAM, SGE, shuffle attention, SimAM, triplet attention, ParNet attention, residual
# attention (CSRA). Each converter checks what attnzoo cannot represent and copies the state.


def _bam(module: Any) -> nn.Module:
    """``BAMBlock(channel, reduction, dia_val)``: 3 hidden layers, 3 dilated convolutions of padding 1."""
    from attnzoo.mechanisms.bam import BottleneckAttentionModule

    first, reduce = module.ca.ca.fc0, module.sa.sa.conv_reduce1
    num_layers = sum(1 for name, _ in module.ca.ca.named_children() if name.startswith("fc"))
    dilated = [m for name, m in module.sa.sa.named_children() if name[:5] == "conv_" and name[5:].isdigit()]
    new = BottleneckAttentionModule(
        first.in_features,
        rd_channels=reduce.out_channels,
        num_layers=num_layers,
        num_dilated=len(dilated),
        dilation=dilated[0].dilation[0] if dilated else 1,
        padding=dilated[0].padding[0] if dilated else 0,
        **_factory(module),
    )
    return _copy_in_order(module, new)  # with the BatchNorms' eps and momentum


def _sge(module: Any) -> nn.Module:
    """``SpatialGroupEnhance(groups)``: like fightingcv's, the result takes any channel count divisible
    by ``groups`` (fightingcv's class fixes none)."""
    from attnzoo.mechanisms.sge import SpatialGroupEnhance

    new = SpatialGroupEnhance(module.groups, module.groups, **_factory(module))
    new.channels = None  # type: ignore[assignment]  # fightingcv fixes no channel count
    return _copy_in_order(module, new)


def _shuffle(module: Any) -> nn.Module:
    """``ShuffleAttention(channel, reduction, G)`` (``reduction`` unused), also with its 3-channel groups."""
    from attnzoo.mechanisms.shuffle import ShuffleAttention

    channels, groups = module.channel, module.G
    if channels == 3 * groups and groups % 2 == 0:
        # fightingcv runs groups of three channels as halves of 2 + 1 with one weight each: build
        # the one-channel halves, then widen the module's input (the forward splits 2 + 1).
        new = ShuffleAttention(2 * groups, groups, eps=module.gn.eps, **_factory(module))
        new.channels = channels
    else:
        new = ShuffleAttention(channels, groups, eps=module.gn.eps, **_factory(module))
    return _copy_in_order(module, new)


def _simam(module: Any) -> nn.Module:
    """``SimAM(channels=None, e_lambda)``: parameter-free, any channel count."""
    from attnzoo.mechanisms.simam import SimAM

    new = SimAM(1, module.e_lambda)
    new.channels = None  # fightingcv ignores its channels argument
    return new.train(module.training)


def _triplet(module: Any) -> nn.Module:
    """``TripletAttention(no_spatial)``: any channel count, kernel 7 (read from the convolution)."""
    from attnzoo.mechanisms.triplet import TripletAttention

    conv = module.cw.conv.conv
    new = TripletAttention(1, conv.kernel_size[0], module.no_spatial, **_factory(module))
    new.channels = None  # fightingcv fixes no channel count
    return _copy_in_order(module, new)


def _parnet(module: Any) -> nn.Module:
    """``ParNetAttention(channel)``: convolutions with biases, no BatchNorm on the skip."""
    from attnzoo.mechanisms.parnet import ParNetAttention

    conv = module.conv1x1[0]
    new = ParNetAttention(
        conv.in_channels, bias=conv.bias is not None, skip_norm=False, **_factory(module)
    )
    return _copy_in_order(module, new)


def _residual_attention(module: Any) -> nn.Module:
    """``ResidualAttention(channel, num_class, la)``: the maximum (T = infinity), no normalisation."""
    import math

    from attnzoo.mechanisms.residual_attention import ResidualAttention

    fc = module.fc
    new = ResidualAttention(
        fc.in_channels, fc.out_channels, float(module.la), math.inf, normalize=False,
        **_factory(module),
    )
    return _copy_in_order(module, new)


CONVERTERS.update({
    f"{_PACKAGE}.BAM.BAMBlock": _bam,
    f"{_PACKAGE}.SGE.SpatialGroupEnhance": _sge,
    f"{_PACKAGE}.ShuffleAttention.ShuffleAttention": _shuffle,
    f"{_PACKAGE}.SimAM.SimAM": _simam,
    f"{_PACKAGE}.TripletAttention.TripletAttention": _triplet,
    f"{_PACKAGE}.ParNetAttention.ParNetAttention": _parnet,
    f"{_PACKAGE}.ResidualAttention.ResidualAttention": _residual_attention,
})

# end of the fcv-a block
# ---------------------------------------------------------------------------------------------
