"""torchvision's squeeze-excitation (`torchvision.ops.misc.SqueezeExcitation`, the SE of its
EfficientNet, EfficientNetV2, MobileNetV3 and RegNetY) -> `attnzoo.SqueezeExcite`.

The keys match as they stand (`fc1`, `fc2`, both 1x1 convolutions with bias); the activation and the
gate are copied into `act` and `gate` (an `nn.Hardsigmoid` becomes attnzoo's `HardSigmoid`, the same
function with a double backward). An activation or gate with weights keeps them, and a pre-hook
maps torchvision's `activation.` / `scale_activation.` keys onto them, so a torchvision checkpoint
still loads with `strict=True` after `attnzoo.replace`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from attnzoo.convert._timm_common import TimmKeys, copy_activation, factory, refuse, rename
from attnzoo.mechanisms.se import SqueezeExcite

__all__ = ["SE_CLASS", "se_from_torchvision"]

SE_CLASS = "torchvision.ops.misc.SqueezeExcitation"
_NAMES = {"activation.": "act.", "scale_activation.": "gate."}
_OVERRIDABLE = ("forward", "_scale")

_refuse = functools.partial(refuse, who="from_torchvision")


def _keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's `SqueezeExcitation` keys -> `SqueezeExcite`'s (only weighted activations differ)."""
    return rename(state, _NAMES)


def se_from_torchvision(module: Any) -> SqueezeExcite:
    """torchvision's `SqueezeExcitation(input_channels, squeeze_channels, activation, scale_activation)`
    -> `SqueezeExcite(input_channels, rd_channels=squeeze_channels, bias=True)` with its weights
    copied, its activation and gate, device, dtype and training flag: the same output
    (`x * gate(fc2(act(fc1(mean_hw x))))`, float64 within 1e-10).

    Raises:
        TypeError: A subclass that overrides `forward` or `_scale`, or layers that are not
            torchvision's (1x1 convolutions with bias, a global average pool); the message names the
            class and the reason.
    """
    from torchvision.ops.misc import SqueezeExcitation

    for method in _OVERRIDABLE:
        if getattr(type(module), method) is not getattr(SqueezeExcitation, method):
            raise _refuse(module, f"it overrides {method}, which attnzoo's class cannot reproduce")
    fc1, fc2, pool = module.fc1, module.fc2, module.avgpool
    for name, conv in (("fc1", fc1), ("fc2", fc2)):
        pointwise = type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1
        if not pointwise or conv.bias is None or conv.stride != (1, 1) or conv.padding != (0, 0):
            raise _refuse(module, f"its {name} is not a plain 1x1 nn.Conv2d with bias")
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        raise _refuse(module, "its avgpool is not a global average pool (AdaptiveAvgPool2d(1))")
    ours = SqueezeExcite(fc1.in_channels, rd_channels=fc1.out_channels, bias=True, **factory(module))
    ours.act = copy_activation(module.activation, "activation", module, "from_torchvision")
    ours.gate = copy_activation(module.scale_activation, "scale_activation", module, "from_torchvision")
    ours.register_load_state_dict_pre_hook(TimmKeys(_keys, tuple(_NAMES)))
    ours.load_state_dict(_keys(module.state_dict()), strict=True)
    return ours.train(module.training)
