"""Finding attention in a model: attnzoo's modules and recognisable third-party ones."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnzoo._registry import Spec, list_modules
from attnzoo.surgery.places import _verify, check_model

__all__ = ["FoundAttention", "find"]


# Third-party attention classes recognised by name (timm, torchvision, torch).
_THIRD_PARTY = {
    "SEModule": "channel gate (timm)",
    "EffectiveSEModule": "channel gate (timm)",
    "SqueezeExcite": "channel gate (timm)",
    "SqueezeExcitation": "channel gate (torchvision)",
    "EcaModule": "channel gate (timm)",
    "CbamModule": "channel + spatial gate (timm)",
    "LightCbamModule": "channel + spatial gate (timm)",
    "SelectiveKernel": "selective kernel (timm)",
    "NonLocalAttn": "non-local (timm)",
    "GlobalContext": "global context (timm)",
    "MultiheadAttention": "multi-head attention (torch)",
    "Attention": "multi-head self-attention (timm)",
    "WindowAttention": "window attention (timm)",
}


@dataclass
class FoundAttention:
    """One attention module found in a model."""

    name: str
    kind: str
    cls: str
    params: int
    flops: int | None


def _attnzoo_kinds() -> dict[object, Spec]:
    kinds: dict[object, Spec] = {}
    for spec in list_modules():
        kinds[spec.cls] = spec
        if spec.seed_cls is not None:
            kinds[spec.seed_cls] = spec
    return kinds


def find(model: nn.Module, example_input: Any = None) -> list[FoundAttention]:
    """List the attention modules in `model`: attnzoo's and recognisable third-party ones.

    Nested attention (a CBAM's channel gate inside the CBAM) is reported once, at the outermost
    module. With `example_input`, each module's FLOPs are counted on the inputs it receives in one
    forward (attention on the math path, so fused kernels are counted); otherwise `flops` is None.
    """
    import attnzoo.compat as compat  # lazy: compat imports the mechanism families

    check_model(model, "find")
    kinds = _attnzoo_kinds()
    compat_classes = {getattr(compat, n) for n in compat.__all__}
    found: list[tuple[str, nn.Module, str]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        spec = next((kinds[c] for c in type(module).__mro__ if c in kinds), None)  # subclasses too
        ours = type(module).__module__.startswith("attnzoo.")
        if spec is not None:
            kind = f"{spec.name} ({spec.family})"
        elif ours and type(module) in compat_classes:
            kind = "compat (attnzoo)"
        elif not ours and type(module).__name__ in _THIRD_PARTY and module is not model:
            kind = _THIRD_PARTY[type(module).__name__]
        else:
            continue
        found.append((name, module, kind))
        covered.append(name)
    modules = [m for _, m, _ in found]
    flops = _flops_per_module(model, modules, example_input) if example_input is not None else {}
    return [
        FoundAttention(name, kind, type(m).__name__, sum(p.numel() for p in m.parameters()), flops.get(id(m)))
        for name, m, kind in found
    ]


def _flops_per_module(model: nn.Module, modules: list[nn.Module], example_input: Any) -> dict[int, int]:
    from attnzoo.flops import count_flops

    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, kw: captured.setdefault(id(mod), (args, kw)) and None, with_kwargs=True
        )
        for m in modules
    ]
    try:
        _verify(model, example_input)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for m in modules:
        if id(m) in captured:
            args, kw = captured[id(m)]
            with torch.no_grad():
                result[id(m)] = count_flops(functools.partial(m, *args, **kw))
    return result
