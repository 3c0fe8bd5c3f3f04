"""torchvision -> attnzoo: Swin's `ShiftedWindowAttention` and `ShiftedWindowAttentionV2` ->
`attnzoo.compat.ShiftedWindowAttention` / `attnzoo.compat.ShiftedWindowAttentionV2`, and the
squeeze-excitation of its CNNs -> `attnzoo.SqueezeExcite` (`attnzoo.convert.torchvision_se`).

The converted Swin module holds the very same `Parameter` and buffer tensors (state_dict keys and an
optimizer built before the conversion stay valid); `copy.deepcopy` the torchvision module first for
an independent copy. The squeeze-excitation is converted into new parameters (an optimizer must be
built after `replace`), keeping each one's `requires_grad`. Forward hooks and pre-hooks move along (the
Swin module's backward and state_dict hooks too, shared so that their handles still remove them).
torchvision is imported only when a module is converted.
"""

from __future__ import annotations

import functools

from torch import nn

from attnzoo.convert._source_keys import share_hooks
from attnzoo.convert._timm_common import convert_keeping, refuse
from attnzoo.convert.torchvision_se import SE_CLASS, se_from_torchvision
from attnzoo.mechanisms.swin_torchvision import (
    TorchvisionShiftedWindowAttention,
    TorchvisionShiftedWindowAttentionV2,
)

__all__ = ["from_torchvision", "TORCHVISION_CLASSES"]

# Dotted names the converter registry keys on (torchvision need not be installed to register them).
TORCHVISION_CLASSES = (
    "torchvision.models.swin_transformer.ShiftedWindowAttention",
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
    SE_CLASS,
)

_V1_STATE = {"relative_position_bias_table", "relative_position_index", "qkv.weight", "qkv.bias",
             "proj.weight", "proj.bias"}
_V2_STATE = {"logit_scale", "relative_coords_table", "relative_position_index", "qkv.weight", "qkv.bias",
             "proj.weight", "proj.bias", "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight"}
_OVERRIDABLE = ("forward", "get_relative_position_bias", "define_relative_position_bias_table",
                "define_relative_position_index")


_refuse = functools.partial(refuse, who="from_torchvision")


def _plain_linear(module: nn.Module, name: str, owner: nn.Module) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise _refuse(owner, f"its {name} is a {type(module).__qualname__}, not a plain nn.Linear")
    return module


def _check_representable(module: nn.Module, base: type, v2: bool) -> None:
    for method in _OVERRIDABLE:
        if getattr(type(module), method) is not getattr(base, method):
            raise _refuse(module, f"it overrides {method}, which attnzoo's class cannot reproduce")
    expected = _V2_STATE if v2 else _V1_STATE
    keys = set(module.state_dict())
    optional = {"qkv.bias", "proj.bias"}
    if keys - expected or (expected - optional) - keys:
        raise _refuse(module, f"its state_dict keys {sorted(keys)} are not torchvision's {sorted(expected)}")
    extra = [name for name, _ in module.named_children() if name not in ("qkv", "proj", "cpb_mlp")]
    if extra:
        raise _refuse(module, f"it has sub-modules torchvision's class does not have: {extra}")
    _plain_linear(module.get_submodule("qkv"), "qkv", module)
    _plain_linear(module.get_submodule("proj"), "proj", module)
    if v2:
        mlp = module.get_submodule("cpb_mlp")
        layers = list(mlp.children()) if type(mlp) is nn.Sequential else []
        if len(layers) != 3 or not isinstance(layers[1], nn.ReLU):
            raise _refuse(module, "its cpb_mlp is not torchvision's Sequential(Linear, ReLU, Linear)")
        _plain_linear(layers[0], "cpb_mlp.0", module)
        _plain_linear(layers[2], "cpb_mlp.2", module)
    window, shift = list(getattr(module, "window_size", ())), list(getattr(module, "shift_size", ()))
    sizes_ok = len(window) == 2 and len(shift) == 2
    if not sizes_ok or any(s < 0 or s >= w for s, w in zip(shift, window, strict=True)):
        raise _refuse(module, f"shift_size {shift} must lie in [0, window_size {window}) per side")


def from_torchvision(module: nn.Module) -> nn.Module:
    """torchvision's Swin attention -> `attnzoo.compat`'s class of the same name, same weights; its
    squeeze-excitation (`torchvision.ops.misc.SqueezeExcitation`) -> `attnzoo.SqueezeExcite`
    (`attnzoo.convert.torchvision_se`).

    `ShiftedWindowAttentionV2` becomes `attnzoo.compat.ShiftedWindowAttentionV2`, and
    `ShiftedWindowAttention` `attnzoo.compat.ShiftedWindowAttention`. The result has the same
    configuration, shares the module's `Parameter` objects, buffers and hook tables, keeps its training
    flag, and gives the same output (float64: within 1e-10), so
    `attnzoo.replace(model, torchvision.models.swin_transformer.ShiftedWindowAttention)` swaps every
    window attention of a `swin_t` (or, for V2, `swin_v2_t`) without changing its logits.

    Args:
        module: A `torchvision.models.swin_transformer.ShiftedWindowAttention`,
            `ShiftedWindowAttentionV2` or `torchvision.ops.misc.SqueezeExcitation`.

    Returns:
        The attnzoo module.

    Raises:
        TypeError: `module` is not one of them, or one attnzoo cannot represent (a subclass that
            overrides `forward` or the bias methods, other parameters or sub-modules, a replaced
            `qkv`/`proj`); the message names the class and the reason.

    Example:
        ```python
        >>> import torch
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttentionV2
        >>> from attnzoo.convert import from_torchvision
        >>> theirs = ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2)
        >>> ours = from_torchvision(theirs)
        >>> x = torch.randn(1, 7, 9, 16)
        >>> torch.allclose(ours(x), theirs(x), atol=1e-5)
        True

        ```
    """
    try:
        from torchvision.models import swin_transformer as tv
        from torchvision.ops.misc import SqueezeExcitation
    except ImportError:  # pragma: no cover - without torchvision nothing can be one of its modules
        raise TypeError(f"from_torchvision expects a torchvision attention module, got "
                        f"{type(module).__qualname__} (torchvision is not installed)") from None
    if isinstance(module, SqueezeExcitation):  # copied weights: frozen ones stay frozen, hooks move
        return convert_keeping(module, se_from_torchvision)
    new_cls: type[TorchvisionShiftedWindowAttention]
    if isinstance(module, tv.ShiftedWindowAttentionV2):
        base, new_cls, v2 = tv.ShiftedWindowAttentionV2, TorchvisionShiftedWindowAttentionV2, True
    elif isinstance(module, tv.ShiftedWindowAttention):
        base, new_cls, v2 = tv.ShiftedWindowAttention, TorchvisionShiftedWindowAttention, False
    else:
        raise TypeError(f"from_torchvision expects torchvision's ShiftedWindowAttention, "
                        f"ShiftedWindowAttentionV2 or SqueezeExcitation, got {type(module).__qualname__}")
    _check_representable(module, base, v2)
    weight = module.qkv.weight
    new = new_cls(
        module.qkv.in_features,
        list(module.window_size),
        list(module.shift_size),
        module.num_heads,
        qkv_bias=module.qkv.bias is not None,
        proj_bias=module.proj.bias is not None,
        attention_dropout=float(module.attention_dropout),
        dropout=float(module.dropout),
        device="meta",  # allocates nothing: every tensor is replaced by the module's own below
        dtype=weight.dtype,
    )
    for name, param in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        setattr(new.get_submodule(owner) if owner else new, leaf, param)
    for name, buffer in module.named_buffers():
        new.register_buffer(name, buffer)  # both buffers sit on the module itself (checked above)
    for (_, ours), (_, theirs) in zip(new.named_modules(), module.named_modules(), strict=True):
        ours.training = theirs.training
    share_hooks(module, new)  # handles registered on the torchvision module keep working
    return new
