"""Helpers shared by the timm converters (`attnzoo.convert.timm_*`) and the fightingcv ones."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.convert._source_keys import attach_source_keys, cpu_probe, share_hooks
from attnzoo.convert.registry import refuse_converted_inside

__all__ = [
    "dotted", "refuse", "factory", "copy_activation", "same_forward", "TimmKeys", "rename",
    "convert_keeping",
    "default_scale", "check_rel_pos", "same_norm", "copy_norm_settings",
]



def dotted(cls: type) -> str:
    """`module.QualName` of a class: the key of the converter tables (timm is never imported)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse(module: Any, reason: str, who: str = "from_timm") -> TypeError:
    """The error every converter raises for a module it cannot represent; `who` names the converter."""
    return TypeError(f"{who} cannot convert {type(module).__qualname__}: {reason}")


def factory(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of a module's first floating parameter or buffer."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def same_norm(ours: nn.Module, theirs: nn.Module) -> None:
    """Give our norm layer the other's eps, and its momentum where it has one (BatchNorm, InstanceNorm):
    a state_dict holds neither setting."""
    ours.eps = theirs.eps
    if isinstance(theirs, nn.modules.batchnorm._NormBase):
        ours.momentum = theirs.momentum  # type: ignore[assignment]


# the kinds of norm layer that pair; BatchNorm and InstanceNorm share a base class but not a kind
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def copy_norm_settings(module: nn.Module, new: nn.Module, who: str) -> None:
    """`same_norm` for every norm layer of `new` and the one at the same place in `module`: their norm
    layers in registration order, pair by pair, so a converter that copies tensors does not keep
    attnzoo's defaults. Refuses where the two hold different norm layers; `who` names the converter."""
    theirs = [m for m in module.modules() if isinstance(m, _NORMS)]
    ours = [m for m in new.modules() if isinstance(m, _NORMS)]
    kinds = [[next(k for k in _NORMS if isinstance(m, k)) for m in side] for side in (theirs, ours)]
    if kinds[0] != kinds[1]:
        names = [[type(m).__name__ for m in side] for side in (theirs, ours)]
        raise refuse(module, f"its norm layers {names[0]} do not pair with attnzoo's {names[1]}", who)
    for source, target in zip(theirs, ours, strict=True):
        same_norm(target, source)


def default_scale(module: Any, head_dim: int) -> bool:
    """Whether timm's ``module.scale`` is ``head_dim ** -0.5`` up to rounding: the stand-ins compute that
    scale themselves, and timm's fused paths ignore any other value, so another one cannot convert."""
    scale = float(module.scale)
    return abs(scale - head_dim**-0.5) <= 1e-12 * abs(scale)


_REL_POS = ("RelPosBias", "RelPosMlp", "RelPosBiasTf")  # in timm.layers.pos_embed_rel


def check_rel_pos(module: Any, rel_pos: nn.Module) -> None:
    """Refuse a `rel_pos` whose `forward` or `get_bias` is not defined by one of timm's classes."""
    known = {f"timm.layers.pos_embed_rel.{name}" for name in _REL_POS}
    for method in ("forward", "get_bias"):
        owner = next((base for base in type(rel_pos).__mro__ if method in vars(base)), None)
        if owner is None or dotted(owner) not in known:
            raise refuse(module, f"its rel_pos is a {type(rel_pos).__qualname__}, whose {method} is not that "
                         f"of timm's {', '.join(_REL_POS)}")


def copy_activation(module: object, name: str, owner: nn.Module, who: str = "from_timm") -> nn.Module:
    """A copy of an activation or gate module to put into the attnzoo module, weights
    (`gate_layer="prelu"`) included: the attnzoo modules call it as a module, so it trains too. An
    `nn.Hardsigmoid` becomes attnzoo's `HardSigmoid`, the same function with a double backward."""
    if not isinstance(module, nn.Module):
        raise refuse(owner, f"its {name} is a {type(module).__name__}, not an nn.Module", who)
    if type(module) is nn.Hardsigmoid:
        from attnzoo.mechanisms.ese import HardSigmoid

        return HardSigmoid()
    return copy.deepcopy(module)


def same_forward(module: Any, cls: type) -> None:
    """Refuse a subclass of a known timm class that overrides its forward."""
    for base in type(module).__mro__:
        if "forward" in vars(base):
            if base is not cls:
                raise refuse(module, f"it overrides forward ({base.__qualname__}.forward)")
            return


def rename(state: Mapping[str, Tensor], names: Mapping[str, str]) -> dict[str, Tensor]:
    """`state` with every key starting with a prefix in `names` renamed (`{"ca.se.": "ca.sharedMLP."}`);
    other keys are kept."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        out[key if prefix is None else names[prefix] + key[len(prefix):]] = value
    return out


class TimmKeys:
    """A ``load_state_dict`` pre-hook that lets a converted module load timm's own keys.

    A converter whose attnzoo class names its weights differently registers one on the module it
    returns, so ``model.load_state_dict(timm_checkpoint, strict=True)`` still works after
    ``attnzoo.replace(model, TimmClass)``. When a key under the module's prefix starts with one of
    ``markers`` (names only timm's layout has), the module's part of the state_dict is rewritten
    by ``translate`` (timm's local keys -> attnzoo's); attnzoo's own keys load unchanged. The hook is
    a plain object holding a module-level function, so the model still pickles.
    """

    def __init__(self, translate: Callable[[dict[str, Tensor]], dict[str, Tensor]], markers: tuple[str, ...]):
        self.translate = translate
        self.markers = markers

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        own = [key for key in state_dict if key.startswith(prefix)]
        local = {key[len(prefix):]: key for key in own}
        if not any(name.startswith(self.markers) for name in local):
            return
        translated = self.translate({name: state_dict[key] for name, key in local.items()})
        for key in own:
            del state_dict[key]
        state_dict.update({prefix + name: value for name, value in translated.items()})


def convert_keeping(module: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """`convert(module)`, with the module's forward hooks and pre-hooks, whose parameters keep the
    module's ``requires_grad`` (a frozen layer stays frozen, and a feature hook keeps firing, after
    `attnzoo.replace`). The converters copy weights into new parameters, often renamed, reshaped,
    split or fused: with every parameter frozen the whole result is frozen; with some frozen, `convert`
    runs once more on a copy whose i-th parameter holds the value i + 1, and a converted parameter is
    trainable exactly when one of the parameters its values come from is."""
    refuse_converted_inside(module)
    params = list(module.parameters())
    new = convert(module)
    attach_source_keys(module, new, convert)  # the source's checkpoints keep loading
    share_hooks(module, new, keys_kept=False)  # renamed keys: the state_dict hooks stay behind
    if all(p.requires_grad for p in params):
        return new
    if not any(p.requires_grad for p in params):
        return new.requires_grad_(False)
    probe = cpu_probe(module)  # float64 on the CPU, hooks left behind
    with torch.no_grad():
        for i, p in enumerate(probe.parameters()):
            p.fill_(i + 1)
    with torch.random.fork_rng(devices=[]):  # the probe's conversion draws initial weights
        marked = convert(probe)
    for param, mark in zip(new.parameters(), marked.parameters(), strict=True):
        ids = mark.detach().double().unique()
        whole = ids.round() == ids
        if not bool(whole.all()) or bool((ids < 1).any()) or bool((ids > len(params)).any()):
            continue  # not a copy of the module's parameters: left trainable
        param.requires_grad_(any(params[int(i) - 1].requires_grad for i in ids.tolist()))
    return new
