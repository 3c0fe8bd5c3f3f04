"""timm -> attnzoo converters for the channel gates (eca, ecam, ceca, ese, the SE of the EfficientNet
family's blocks, legacy SENet's and HGNet's), global context (gc, gca), gather-excite (ge) and light
CBAM (lcbam); `attnzoo.convert.timm.from_timm` dispatches to them."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from attnzoo.convert._timm_common import TimmKeys, copy_activation, rename, same_norm
from attnzoo.convert._timm_common import factory as _factory
from attnzoo.convert._timm_common import refuse as _refuse

__all__ = ["CONVERTERS"]

# dotted timm class name -> converter; filled below.
CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {}
TIMM_CONVERTERS = CONVERTERS  # the name the blocks below register under


def _finish(ours: nn.Module, theirs: nn.Module) -> nn.Module:
    """Copy the weights (strict) and the training flag of ``theirs`` into ``ours``."""
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.train(theirs.training)


# =============================================================================================
# breadth-a block: channel gates (eca, ecam, ceca, ese), global context (gc, gca),
# gather-excite (ge), light CBAM (lcbam).
# =============================================================================================


def _eca(module: Any) -> nn.Module:
    """EcaModule (plain or ``use_mlp=True``) and CecaModule. Their weights do not depend on the channel
    count (timm's ``EcaModule`` even takes ``channels=None``), so the converted module has
    ``channels=None`` and, like timm's, accepts any C."""
    from attnzoo.mechanisms.eca import (
        CircularEfficientChannelAttention,
        EfficientChannelAttention,
        EfficientChannelAttentionMlp,
    )

    conv, conv2 = module.conv, getattr(module, "conv2", None)
    if not isinstance(conv, nn.Conv1d) or (conv2 is not None and not isinstance(conv2, nn.Conv1d)):
        raise _refuse(module, "its conv layers are not nn.Conv1d")
    factory = _factory(module)
    if conv2 is not None:  # use_mlp=True
        ours: nn.Module = EfficientChannelAttentionMlp(
            1, conv2.kernel_size[0], rd_channels=conv.out_channels, **factory
        )
        ours.act = copy_activation(module.act, "act", module)
    elif type(module).__name__ == "CecaModule":
        kernel, bias = conv.kernel_size[0], conv.bias is not None
        ours = CircularEfficientChannelAttention(1, kernel, bias=bias, **factory)
    else:
        if conv.padding[0] != (conv.kernel_size[0] - 1) // 2:
            raise _refuse(module, f"its padding {conv.padding} is not (kernel_size - 1) // 2")
        ours = EfficientChannelAttention(1, conv.kernel_size[0], bias=conv.bias is not None, **factory)
    ours.gate = copy_activation(module.gate, "gate", module)
    ours.channels = None  # type: ignore[assignment]
    return _finish(ours, module)


for _name in ("timm.layers.eca.EcaModule", "timm.layers.eca.CecaModule"):
    TIMM_CONVERTERS[_name] = _eca


def _ese(module: Any) -> nn.Module:
    """EffectiveSEModule: the 1x1 convolution ``fc`` (C, C, 1, 1) with bias, and the gate."""
    from attnzoo.mechanisms.ese import EffectiveSqueezeExcite

    fc = module.fc
    square = isinstance(fc, nn.Conv2d) and fc.in_channels == fc.out_channels
    if not square or fc.kernel_size != (1, 1) or fc.groups != 1:
        raise _refuse(module, "its fc is not a square 1x1 nn.Conv2d")
    if fc.bias is None:
        raise _refuse(module, "its fc has no bias")
    ours = EffectiveSqueezeExcite(fc.in_channels, bool(module.add_maxpool), **_factory(module))
    ours.gate = copy_activation(module.gate, "gate", module)
    return _finish(ours, module)


TIMM_CONVERTERS["timm.layers.squeeze_excite.EffectiveSEModule"] = _ese


def _context_mlp(mlp: nn.Module, owner: nn.Module, ours: nn.Module) -> None:
    """Check one of timm's ConvMlp transforms and copy its activation and LayerNorm eps into ``ours``."""
    norm, drop = getattr(mlp, "norm", None), getattr(mlp, "drop", None)
    if not isinstance(norm, nn.LayerNorm) or (isinstance(drop, nn.Dropout) and drop.p > 0):
        raise _refuse(owner, "its context MLP is not fc1 -> LayerNorm2d -> act -> fc2 without dropout")
    ours.act = copy_activation(mlp.act, "act_layer", owner)
    ours.norm.eps = norm.eps  # type: ignore[union-attr]


def _global_context(module: Any) -> nn.Module:
    """GlobalContext: any of use_attn, fuse_add, fuse_scale; the width from the weights."""
    from attnzoo.mechanisms.global_context import GlobalContext, GlobalContextAdd

    mlps = [m for m in (module.mlp_add, module.mlp_scale) if m is not None]
    if not mlps:
        raise _refuse(module, "neither fuse_add nor fuse_scale is set (timm's module is an identity)")
    channels, hidden = mlps[0].fc1.in_channels, mlps[0].fc1.out_channels
    fuse_add, fuse_scale = module.mlp_add is not None, module.mlp_scale is not None
    cls = GlobalContextAdd if fuse_add and not fuse_scale else GlobalContext
    ours = cls(
        channels, rd_channels=hidden, use_attn=module.conv_attn is not None,
        fuse_add=fuse_add, fuse_scale=fuse_scale, **_factory(module),
    )
    for name in ("mlp_add", "mlp_scale"):
        if getattr(module, name) is not None:
            _context_mlp(getattr(module, name), module, getattr(ours, name))
    ours.gate = copy_activation(module.gate, "gate", module)
    return _finish(ours, module)


TIMM_CONVERTERS["timm.layers.global_context.GlobalContext"] = _global_context


def _gather_excite(module: Any) -> nn.Module:
    """GatherExcite: pooling or convolution gathers, with or without the MLP.

    A convolution gather is copied as it is (timm pads the ``extent=0`` convolution to "same"; the
    copy keeps that, and accepts any input size as timm does). A module without weights has no
    channel count: the converted one has ``channels=None`` and accepts any C, like timm's.
    """
    from attnzoo.mechanisms.gather_excite import GatherExcite

    gather, mlp = module.gather, module.mlp
    channels = None
    if gather is not None:
        for name, child in gather.named_children():
            if isinstance(child, nn.Conv2d):
                if not (child.groups == child.in_channels == child.out_channels):
                    raise _refuse(module, f"its gather.{name} is not a depth-wise convolution")
                channels = child.in_channels
            elif isinstance(child, nn.BatchNorm2d):
                if not isinstance(child.eps, float) or not isinstance(child.momentum, (float, type(None))):
                    raise _refuse(
                        module, f"its gather.{name} has eps={child.eps!r}, momentum={child.momentum!r}"
                    )
    if isinstance(mlp, nn.Identity):
        use_mlp, hidden = False, 1
    else:
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        norm, drop = getattr(mlp, "norm", None), getattr(mlp, "drop", None)
        if not (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d) and isinstance(norm, nn.Identity)):
            raise _refuse(module, "its mlp is not timm's ConvMlp (fc1 -> act -> fc2, no norm)")
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            raise _refuse(module, "its mlp has dropout")
        use_mlp, hidden, channels = True, fc1.out_channels, fc1.in_channels
    ours = GatherExcite(
        channels or 1, module.extent, use_mlp=use_mlp, rd_channels=hidden,
        add_maxpool=bool(module.add_maxpool), **_factory(module),
    )
    if gather is not None:
        ours.gather = copy.deepcopy(gather)
    if use_mlp:
        ours.mlp.act = copy_activation(mlp.act, "mlp.act", module)
    ours.gate = copy_activation(module.gate, "gate", module)
    ours.channels = channels
    return _finish(ours, module)


TIMM_CONVERTERS["timm.layers.gather_excite.GatherExcite"] = _gather_excite


class _UnappliedGate(nn.Sigmoid):
    """The sigmoid, holding the weights of the gate module it stands for.

    timm's light CBAM builds its channel gate from `gate_layer` but always applies `F.sigmoid`; a
    gate with weights (`gate_layer="prelu"`) leaves them in its checkpoints, unused. This keeps them
    at the same key, so those checkpoints load with `strict=True`, and computes what timm computes.
    """

    def __init__(self, unused: nn.Module) -> None:
        super().__init__()
        for name, param in unused.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in unused.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self.stands_for = type(unused).__qualname__

    def extra_repr(self) -> str:
        return f"unapplied={self.stands_for}"


def _light_cbam(module: Any) -> nn.Module:
    """LightCbamModule: the channel MLP, the spatial conv + BatchNorm. timm's channel gate is always
    the sigmoid (``F.sigmoid``, whatever its ``gate`` holds); its spatial gate is copied."""
    from attnzoo.mechanisms.light_cbam import LightCBAM

    channel, spatial = module.channel, module.spatial
    fc1, fc2 = channel.fc1, channel.fc2
    conv, bn = spatial.conv.conv, spatial.conv.bn
    if not all(isinstance(m, nn.Conv2d) for m in (fc1, fc2, conv)) or not isinstance(bn, nn.BatchNorm2d):
        raise _refuse(module, "its layers are not timm's (1x1 convolutions, a conv + BatchNorm)")
    kernel = conv.kernel_size[0]
    if conv.kernel_size != (kernel, kernel) or kernel % 2 == 0 or conv.padding != (kernel // 2,) * 2:
        raise _refuse(module, f"its spatial convolution {conv} is not odd, square and 'same'-padded")
    if not isinstance(getattr(bn, "act", nn.Identity()), nn.Identity):
        raise _refuse(module, "its spatial BatchNorm has an activation")
    ours = LightCBAM(
        fc1.in_channels, rd_channels=fc1.out_channels, kernel_size=kernel, bias=fc1.bias is not None,
        **_factory(module),
    )
    ours.channel.act = copy_activation(channel.act, "channel.act", module)
    ours.channel.gate = _UnappliedGate(copy_activation(channel.gate, "channel.gate", module))
    ours.spatial.gate = copy_activation(spatial.gate, "spatial.gate", module)
    same_norm(ours.spatial.conv.bn, bn)
    return _finish(ours, module)


TIMM_CONVERTERS["timm.layers.cbam.LightCbamModule"] = _light_cbam


def _pointwise_with_bias(conv: Any) -> bool:
    pointwise = isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
    return pointwise and conv.bias is not None


def _two_conv_se(module: Any, convs: tuple[str, str], act: str, gate: str) -> nn.Module:
    """A `SqueezeExcite` for a timm SE made of two 1x1 convolutions with bias (named `convs`, the second
    undoing the first's width) around the activation `act`, gated by `gate` (both copied)."""
    from attnzoo.mechanisms.se import SqueezeExcite

    reduce, expand = (getattr(module, name) for name in convs)
    for name, conv in zip(convs, (reduce, expand), strict=True):
        if not _pointwise_with_bias(conv):
            raise _refuse(module, f"its {name} is not a 1x1 nn.Conv2d with bias")
    if (expand.in_channels, expand.out_channels) != (reduce.out_channels, reduce.in_channels):
        raise _refuse(module, f"its {convs[1]} ({expand.in_channels} -> {expand.out_channels}) does not undo "
                              f"{convs[0]}")
    ours = SqueezeExcite(reduce.in_channels, rd_channels=reduce.out_channels, bias=True, **_factory(module))
    ours.act = copy_activation(getattr(module, act), act, module)
    ours.gate = copy_activation(getattr(module, gate), gate, module)
    return ours


def _efficientnet_se(module: Any) -> nn.Module:
    """The SE of timm's EfficientNet / MobileNetV3 / MnasNet blocks (``SqueezeExcite``: ``conv_reduce``,
    ``act1``, ``conv_expand``, ``gate``, both convolutions with bias) -> `SqueezeExcite` (``fc1``,
    ``act``, ``fc2``, ``gate``), its activation and gate copied (a hard sigmoid becomes attnzoo's, with
    a double backward). A pre-hook keeps timm's keys loading, so an EfficientNet checkpoint still loads
    with ``strict=True`` after `attnzoo.replace`."""
    ours = _two_conv_se(module, ("conv_reduce", "conv_expand"), "act1", "gate")
    ours.register_load_state_dict_pre_hook(TimmKeys(_efficientnet_se_keys, ("conv_reduce.", "conv_expand.")))
    ours.load_state_dict(_efficientnet_se_keys(module.state_dict()), strict=True)
    return ours.train(module.training)


_SE_NAMES = {"conv_reduce.": "fc1.", "conv_expand.": "fc2."}


def _efficientnet_se_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's EfficientNet ``SqueezeExcite`` keys -> `SqueezeExcite`'s."""
    return rename(state, _SE_NAMES)


TIMM_CONVERTERS["timm.models._efficientnet_blocks.SqueezeExcite"] = _efficientnet_se


# The SE modules that timm's model files define for themselves: legacy SENet's and HGNet's.




def _senet_se(module: Any) -> nn.Module:
    """`timm.models.senet.SEModule` (legacy_seresnet*, legacy_senet154): 1x1 convolutions `fc1`, `fc2`
    with biases around ReLU, a sigmoid gate: `SqueezeExcite` with the same keys."""
    return _finish(_two_conv_se(module, ("fc1", "fc2"), "relu", "sigmoid"), module)


def _hgnet_ese_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HGNet's ``EseModule`` keys -> `EffectiveSqueezeExcite`'s."""
    return rename(state, {"conv.": "fc."})


def _hgnet_ese(module: Any) -> nn.Module:
    """`timm.models.hgnet.EseModule` (hgnet_*): a square 1x1 `conv` with bias and a sigmoid:
    `EffectiveSqueezeExcite` with a sigmoid gate; HGNet's `conv.*` keys load through a pre-hook."""
    from attnzoo.mechanisms.ese import EffectiveSqueezeExcite

    conv = module.conv
    if not (_pointwise_with_bias(conv) and conv.in_channels == conv.out_channels):
        raise _refuse(module, "its conv is not a square 1x1 nn.Conv2d with bias")
    ours = EffectiveSqueezeExcite(conv.in_channels, False, **_factory(module))
    ours.gate = copy_activation(module.sigmoid, "sigmoid", module)
    ours.register_load_state_dict_pre_hook(TimmKeys(_hgnet_ese_keys, ("conv.",)))
    ours.load_state_dict(_hgnet_ese_keys(module.state_dict()), strict=True)
    return ours.train(module.training)


TIMM_CONVERTERS["timm.models.senet.SEModule"] = _senet_se
TIMM_CONVERTERS["timm.models.hgnet.EseModule"] = _hgnet_ese
