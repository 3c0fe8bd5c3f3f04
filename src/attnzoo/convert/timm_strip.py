"""timm -> attnzoo converters for the strip-pooling gates (coord, scoord, ela, strip), split attention
(splat) and BAT (bat); `attnzoo.convert.timm.from_timm` dispatches to them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert._timm_common import TimmKeys, rename, same_norm
from attnzoo.convert._timm_common import factory as _factory
from attnzoo.convert._timm_common import refuse as _refuse

__all__ = ["CONVERTERS"]


def _finish(new: Any, module: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` strictly (copies), then take the module's training mode."""
    new.load_state_dict(state, strict=True)
    return new.train(module.training)


# ---- breadth-b: coord_attn (coord, scoord, ela, strip) ------------------------------------------


def _gate_class(module: Any, gate: Any) -> type[nn.Module]:
    """timm's sigmoid / hard sigmoid modules -> the same function: `nn.Sigmoid`, or attnzoo's
    `HardSigmoid` (torch's `hardsigmoid_backward` has no derivative, so `nn.Hardsigmoid` broke double
    backward, as `copy_activation` says for the other timm gates)."""
    from attnzoo.mechanisms.ese import HardSigmoid

    name = type(gate).__name__.lower().replace("_", "")
    if name == "sigmoid":
        return nn.Sigmoid
    if name == "hardsigmoid":
        return HardSigmoid
    raise _refuse(module, f"its gate is a {type(gate).__qualname__}, not a sigmoid or hard sigmoid")


def _norm_class(module: Any, norm: Any) -> type[nn.Module] | None:
    from attnzoo.mechanisms.coord import GroupNorm1

    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, nn.GroupNorm) and norm.num_groups == 1:
        return GroupNorm1
    if type(norm) in (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm):
        return type(norm)
    raise _refuse(module, f"its norm is a {type(norm).__qualname__}, which attnzoo does not rebuild")


def _with_layers(new: Any, module: Any, names: tuple[str, ...]) -> None:
    """Copy timm's activation / norm instances (their options: eps, momentum, inplace, ...)."""
    for name in names:
        setattr(new, name, copy.deepcopy(getattr(module, name)))


def _coord(module: Any) -> nn.Module:
    from attnzoo.mechanisms.coord import CoordAttention

    conv1 = module.conv1
    new = CoordAttention(
        conv1.in_channels,
        rd_channels=conv1.out_channels,
        bias=conv1.bias is not None,
        norm_layer=_norm_class(module, module.bn1),
        gate_layer=_gate_class(module, module.gate),
        has_skip=module.has_skip,
        **_factory(module),
    )
    _with_layers(new, module, ("bn1", "act"))
    return _finish(new, module, module.state_dict())


def _scoord(module: Any) -> nn.Module:
    from attnzoo.mechanisms.coord import SimpleCoordAttention

    fc1 = module.fc1
    new = SimpleCoordAttention(
        fc1.in_features,
        rd_channels=fc1.out_features,
        bias=fc1.bias is not None,
        gate_layer=_gate_class(module, module.gate),
        has_skip=module.has_skip,
        **_factory(module),
    )
    _with_layers(new, module, ("act",))
    # a timm checkpoint still loads strictly after `attnzoo.replace(model, SimpleCoordAttn)`
    new.register_load_state_dict_pre_hook(TimmKeys(scoord_keys, tuple(_SCOORD_NAMES)))
    return _finish(new, module, scoord_keys(module.state_dict()))


_SCOORD_NAMES = {"fc1.": "conv1.", "fc_h.": "conv_h.", "fc_w.": "conv_w."}


def scoord_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `SimpleCoordAttn` keys -> `SimpleCoordAttention`'s: its three Linear layers become 1x1
    convolutions (weights `(out, in)` -> `(out, in, 1, 1)`); other keys (an activation with weights,
    `act_layer=nn.PReLU`) are kept as they are."""
    linear_weights = {names + "weight" for names in _SCOORD_NAMES.values()}
    return {key: value[..., None, None] if key in linear_weights and value.dim() == 2 else value
            for key, value in rename(state, _SCOORD_NAMES).items()}


def _strip_kernel(module: Any, conv: Any) -> int:
    if not isinstance(conv, nn.Conv2d):
        raise _refuse(module, f"its conv_h is a {type(conv).__qualname__}, not an nn.Conv2d")
    k = conv.kernel_size[0]
    if k % 2 == 0:
        raise _refuse(module, f"kernel_size={k} is even (timm's forward fails on it)")
    return k


def _ela(module: Any) -> nn.Module:
    from attnzoo.mechanisms.coord import EfficientLocalAttention

    conv = module.conv_h
    new = EfficientLocalAttention(
        conv.in_channels,
        kernel_size=_strip_kernel(module, conv),
        bias=conv.bias is not None,
        act_layer=type(module.act),
        norm_layer=_norm_class(module, module.norm_h),
        gate_layer=_gate_class(module, module.gate),
        has_skip=module.has_skip,
        **_factory(module),
    )
    _with_layers(new, module, ("norm_h", "norm_w", "act"))
    return _finish(new, module, module.state_dict())


def _strip(module: Any) -> nn.Module:
    from attnzoo.mechanisms.coord import StripAttention

    if not module.use_conv:
        raise _refuse(module, "use_conv=False keeps no channel count; use StripAttention(C, use_conv=False)")
    conv = module.conv_h
    new = StripAttention(
        conv.in_channels,
        kernel_size=_strip_kernel(module, conv),
        bias=conv.bias is not None,
        gate_layer=_gate_class(module, module.gate),
        has_skip=module.has_skip,
        **_factory(module),
    )
    return _finish(new, module, module.state_dict())


# ---- breadth-b: split_attn (splat) --------------------------------------------------------------


def _splat(module: Any) -> nn.Module:
    from attnzoo.mechanisms.splat import SplitAttention

    conv, fc1 = module.conv, module.fc1
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple) or len(set(conv.padding)) != 1:
        raise _refuse(module, f"its convolution pads {conv.padding!r} ({conv.padding_mode}), not zeros")
    sides = {tuple(set(conv.kernel_size)), tuple(set(conv.stride)), tuple(set(conv.dilation))}
    if any(len(side) != 1 for side in sides):
        raise _refuse(module, "its convolution is not square (kernel_size, stride, dilation)")
    bn0 = module.bn0
    norm = None if isinstance(bn0, nn.Identity) else type(bn0)
    new = SplitAttention(
        conv.in_channels,
        out_channels=fc1.in_channels,
        kernel_size=conv.kernel_size[0],
        stride=conv.stride[0],
        padding=conv.padding[0],
        dilation=conv.dilation[0],
        groups=fc1.groups,
        bias=conv.bias is not None,
        radix=module.radix,
        rd_channels=fc1.out_channels,
        norm_layer=norm,
        **_factory(module),
    )
    _with_layers(new, module, ("bn0", "drop", "act0", "bn1", "act1"))
    return _finish(new, module, module.state_dict())


# ---- breadth-b: non_local_attn (bat) ------------------------------------------------------------


def _act_of(cna: Any) -> nn.Module:
    """The activation of one of timm's ``ConvNormAct``: its norm's (``BatchNormAct2d``) or its own."""
    return getattr(cna.bn, "act", getattr(cna, "act", nn.Identity()))


def _conv_norm_act(module: Any, cna: Any) -> tuple[type[nn.Module], type[nn.Module] | None]:
    """act_layer and norm_layer of one of timm's ``ConvNormAct`` (its norm may hold the activation)."""
    conv, bn = cna.conv, cna.bn
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.bias is not None:
        raise _refuse(module, "its ConvNormAct convolutions must be 1x1 without bias")
    act = _act_of(cna)
    if any(True for _ in act.parameters()):  # ours builds its own, under another key
        raise _refuse(module, f"its activation {type(act).__qualname__} has weights")
    drop = getattr(bn, "drop", nn.Identity())
    if not isinstance(drop, nn.Identity):
        raise _refuse(module, f"its norms hold a {type(drop).__qualname__} drop")
    if isinstance(bn, nn.Identity):
        return type(act), None
    if not isinstance(bn, nn.BatchNorm2d):
        raise _refuse(module, f"its norm is a {type(bn).__qualname__}, not a BatchNorm2d")
    return type(act), nn.BatchNorm2d


def _bat(module: Any) -> nn.Module:
    from attnzoo.mechanisms.bat import BATNonLocalAttention

    ba = module.ba
    act_layer, norm_layer = _conv_norm_act(module, module.conv1)
    new = BATNonLocalAttention(
        module.conv1.conv.in_channels,
        block_size=ba.block_size,
        groups=ba.groups,
        rd_channels=module.conv1.conv.out_channels,
        proj_drop=module.dropout.p,
        act_layer=act_layer,
        norm_layer=norm_layer,
        **_factory(module),
    )
    for name in ("conv1", "ba.conv1", "ba.conv2", "conv2"):
        theirs: Any = module.get_submodule(name)
        ours: Any = new.get_submodule(name)
        if _conv_norm_act(module, theirs) != (act_layer, norm_layer):
            raise _refuse(module, f"its {name} has another activation or norm than conv1")
        # the activation itself, with its settings (LeakyReLU's slope), not one built from its class
        ours.act = copy.deepcopy(_act_of(theirs))
        if norm_layer is not None:
            if not (theirs.bn.affine and theirs.bn.track_running_stats):
                raise _refuse(module, f"its {name} norm has no affine weights or no running statistics")
            same_norm(ours.bn, theirs.bn)
    return _finish(new, module, module.state_dict())


_BREADTH_B: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.layers.coord_attn.CoordAttn": _coord,
    "timm.layers.coord_attn.SimpleCoordAttn": _scoord,
    "timm.layers.coord_attn.EfficientLocalAttn": _ela,
    "timm.layers.coord_attn.StripAttn": _strip,
    "timm.layers.split_attn.SplitAttn": _splat,
    "timm.layers.non_local_attn.BatNonLocalAttn": _bat,
}


CONVERTERS = _BREADTH_B
