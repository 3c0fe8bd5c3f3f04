"""fightingcv (External-Attention-pytorch) -> attnzoo: its attention modules -> canonical classes.

``from_fightingcv(module)`` returns an independent attnzoo module (weights copied) on the module's
device, in its dtype and training mode, whose output equals fightingcv's. Converters are keyed by
dotted class names (``FIGHTINGCV_CONVERTERS``), so nothing here imports fightingcv.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert import fightingcv_gates_a, fightingcv_gates_b, fightingcv_tokens_a
from attnzoo.convert._timm_common import convert_keeping, refuse
from attnzoo.convert.fightingcv_crossformer import CONVERTERS as _FCV_CROSSFORMER  # fcv-crossformer
from attnzoo.convert.fightingcv_deformable import CONVERTERS as _FCV_DEFORMABLE  # fcv-deformable block
from attnzoo.convert.fightingcv_eca_moa import CONVERTERS as _FCV_ECA_MOA  # fcv-eca-moa block
from attnzoo.convert.fightingcv_existing import EXISTING_CONVERTERS as _FCV_INTEROP  # fcv-interop block
from attnzoo.convert.fightingcv_halo import CONVERTERS as _FCV_HALO  # fcv-halo
from attnzoo.convert.fightingcv_tokens_b import CONVERTERS as _FCV_TOKENS_B  # fcv-token-b block

__all__ = ["FIGHTINGCV_CONVERTERS", "from_fightingcv"]


_refuse = functools.partial(refuse, who="from_fightingcv")


def _coord_att(module: Any) -> nn.Module:
    """``CoordAtt(inp, oup, reduction)``: coordinate attention with biases, h-swish (torch's
    ``nn.Hardswish``, the same function) and ``max(8, inp // reduction)`` hidden channels; ``oup=1``
    (a gate that broadcasts over the channels) as ``gate_channels=1``."""
    from attnzoo.mechanisms.coord import CoordAttention

    conv1, conv_h = module.conv1, module.conv_h
    if conv_h.out_channels not in (conv1.in_channels, 1):  # fightingcv's product then fails to broadcast
        raise _refuse(
            module,
            f"inp={conv1.in_channels}, oup={conv_h.out_channels}: the gate must have the input's width or 1",
        )
    weight = conv1.weight
    new = CoordAttention(
        conv1.in_channels, rd_channels=conv1.out_channels, bias=True, gate_channels=conv_h.out_channels,
        device=weight.device, dtype=weight.dtype,
    )
    new.bn1 = copy.deepcopy(module.bn1)  # its eps and momentum
    new.load_state_dict(module.state_dict(), strict=True)
    return new.train(module.training)


FIGHTINGCV_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "fightingcv_attention.attention.CoordAttention.CoordAtt": _coord_att,
    # ---- fcv-interop: SEAttention, CBAMBlock, SKAttention, ACmix (attnzoo.convert.fightingcv_existing)
    **_FCV_INTEROP,
    # ---- fcv-a: BAM, SGE, shuffle, SimAM, triplet, ParNet, CSRA (attnzoo.convert.fightingcv_gates_a)
    **fightingcv_gates_a.CONVERTERS,
    # ---- fcv-token-a: external, MHA variants, EMSA, MUSE, AFT, UFO (fightingcv_tokens_a)
    **fightingcv_tokens_a.CONVERTERS,
    **fightingcv_gates_b.CONVERTERS,
    **_FCV_TOKENS_B,
    **_FCV_ECA_MOA,
    **_FCV_CROSSFORMER,
    **_FCV_DEFORMABLE,
    **_FCV_HALO,
}


def from_fightingcv(module: nn.Module) -> nn.Module:
    """A fightingcv attention module -> the canonical attnzoo module with the same weights and outputs.

    Known classes: the keys of ``FIGHTINGCV_CONVERTERS`` (``CoordAtt`` -> ``CoordAttention``,
    ``SEAttention`` -> ``SqueezeExcite``, ``CBAMBlock`` -> ``CBAM``, ``SKAttention`` -> ``SKConv``,
    ``ACmix`` -> ``ACmix``).

    Args:
        module: An instance of a known fightingcv class.

    Returns:
        The attnzoo module (an independent copy, same device, dtype and training mode; frozen
        parameters stay frozen; forward hooks and pre-hooks move along).

    Raises:
        TypeError: ``module`` is no known fightingcv class, or one attnzoo cannot represent; the
            message names the class and the reason.

    Example:
        ```python
        >>> import torch
        >>> from fightingcv_attention.attention.CoordAttention import CoordAtt
        >>> from attnzoo.convert import from_fightingcv
        >>> theirs = CoordAtt(32, 32).eval()
        >>> x = torch.randn(2, 32, 7, 5)
        >>> torch.allclose(from_fightingcv(theirs)(x), theirs(x), atol=1e-6)
        True

        ```
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_fightingcv expects an nn.Module, got {type(module).__name__}")
    cls = type(module)
    converter = FIGHTINGCV_CONVERTERS.get(f"{cls.__module__}.{cls.__qualname__}")
    if converter is None:
        raise TypeError(
            f"from_fightingcv cannot convert {cls.__module__}.{cls.__qualname__}: known classes are "
            f"{', '.join(sorted(FIGHTINGCV_CONVERTERS))}"
        )
    try:
        return convert_keeping(module, converter)
    except ValueError as err:  # a configuration fightingcv builds but cannot run (C % 2G != 0, ...)
        raise _refuse(module, str(err)) from None
