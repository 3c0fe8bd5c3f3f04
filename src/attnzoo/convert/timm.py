"""timm -> attnzoo: timm's attention layers (`timm.layers.create_attn` and friends) -> the canonical
attnzoo classes that compute the same function.

`from_timm(module)` returns an independent attnzoo module (weights and buffers copied) on the
module's device, in its dtype and training mode, whose output equals timm's. Converters are keyed by
timm's dotted class names (`TIMM_CONVERTERS`), so nothing here imports timm; `attnzoo.convert`
registers every key, so `attnzoo.convert.convert` and `attnzoo.replace(model, TimmClass)` reach
them too. The converters live by family in `timm_existing`, `timm_gates`, `timm_strip`, `timm_token`,
`timm_vit`, `timm_pvt`, `timm_xca` and the other `timm_*` modules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from attnzoo.convert import (  # one family per module
    timm_convit,
    timm_davit,
    timm_efficientvit,
    timm_existing,
    timm_gates,
    timm_levit,
    timm_maxvit,
    timm_mvit,
    timm_pvt,
    timm_relpos_vit,
    timm_strip,
    timm_token,
    timm_vit,
    timm_xca,
)
from attnzoo.convert._timm_common import convert_keeping
from attnzoo.convert._timm_common import dotted as _dotted
from attnzoo.convert._timm_common import same_forward as _same_forward

__all__ = ["TIMM_CONVERTERS", "from_timm"]

TIMM_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    **timm_existing.EXISTING_CONVERTERS,  # se, cbam, sk, Swin's window attention, nl
    **timm_gates.CONVERTERS,
    **timm_strip.CONVERTERS,
    **timm_token.CONVERTERS,
    **timm_vit.CONVERTERS,  # ViT, BEiT, VOLO, CaiT and EVA attention -> attnzoo.compat
    **timm_pvt.CONVERTERS,  # PVT v2's and Twins' spatial-reduction and window attention -> attnzoo.compat
    **timm_xca.CONVERTERS,  # XCiT's and EdgeNeXt's cross-covariance attention -> attnzoo.compat
    **timm_relpos_vit.CONVERTERS,  # the relative-position ViT's and SAM's attention -> attnzoo.compat
    **timm_levit.CONVERTERS,  # LeViT, TinyViT, EfficientFormer (V1, V2) offset-bias attention -> compat
    **timm_maxvit.CONVERTERS,  # MaxViT / CoAtNet's Attention2d and AttentionCl -> attnzoo.compat
    **timm_davit.CONVERTERS,  # DaViT's window and channel attention -> attnzoo.compat
    **timm_efficientvit.CONVERTERS,  # the two EfficientViTs: MIT linear, Microsoft cascaded -> attnzoo.compat
    **timm_convit.CONVERTERS,  # ConViT's gated positional and plain attention -> attnzoo.compat
    **timm_mvit.CONVERTERS,  # MViT v2's pooling attention -> attnzoo.compat
}


def from_timm(module: nn.Module) -> nn.Module:
    """A timm attention module -> the canonical attnzoo module with the same weights and outputs.

    Known classes: the keys of ``TIMM_CONVERTERS`` (``CoordAttn``, ``SimpleCoordAttn``,
    ``EfficientLocalAttn``, ``StripAttn``, ...). The result is an independent copy (weights and
    buffers copied, timm's activation and norm instances deep-copied) on the module's device, in its
    dtype and training mode; frozen parameters (``requires_grad=False``) stay frozen, and forward
    hooks and pre-hooks move along.

    Args:
        module: An instance of a known timm class (a subclass that keeps timm's forward too).

    Returns:
        The attnzoo module.

    Raises:
        TypeError: ``module`` is no known timm class, or one attnzoo cannot represent (an overridden
            forward, an unknown gate or norm); the message names the class and the reason.

    Example:
        ```python
        >>> import torch, timm.layers
        >>> from attnzoo.convert import from_timm
        >>> theirs = timm.layers.create_attn("coord", 32).eval()
        >>> ours = from_timm(theirs)
        >>> x = torch.randn(2, 32, 7, 5)
        >>> torch.allclose(ours(x), theirs(x), atol=1e-6)
        True

        ```
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_timm expects an nn.Module, got {type(module).__name__}")
    for base in type(module).__mro__:
        converter = TIMM_CONVERTERS.get(_dotted(base))
        if converter is not None:
            _same_forward(module, base)
            return convert_keeping(module, converter)
    raise TypeError(
        f"from_timm cannot convert {_dotted(type(module))}: known timm classes are "
        f"{', '.join(sorted(TIMM_CONVERTERS))}"
    )
