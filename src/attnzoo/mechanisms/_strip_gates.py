"""How the strip-pooling gates (`attnzoo.mechanisms.coord`) apply their gates to the map.

The gate multiplies the map through the lean kernels of `attnzoo.kernels.strips`; the full-size
gate (B, C, H, W) is only built when map capture or ``need_weights`` asks for it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.kernels.strips import strip_gate, sum_gate
from attnzoo.maps.capture import capturing, record

__all__ = ["finish", "finish_sum", "report"]


def finish(module: nn.Module, x: Tensor, gates: tuple[Tensor, ...], has_skip: bool, need_weights: bool):
    """``x`` times each of `gates` in turn (plus ``x`` with the skip), the map recorded, the gate
    returned on request. The full-size product of two strip gates is made only when it is asked for."""
    out = strip_gate(x, gates, has_skip)  # two strips: the lean kernel (attnzoo.kernels.strips)
    if not (need_weights or capturing()):
        return out
    full = (gates[0] if len(gates) == 1 else gates[0] * gates[1]).expand_as(x)  # (B, C, H, W)
    return report(module, x, out, full, need_weights)


def finish_sum(module: nn.Module, x: Tensor, a_h: Tensor, a_w: Tensor, has_skip: bool, need_weights: bool):
    """``x * gate(a_h + a_w)`` (plus ``x``) for logits strips (B, C, H, 1) and (B, C, 1, W) (or one channel
    wide): the lean kernel for a sigmoid gate (`attnzoo.kernels.strips.sum_gate`), `finish` for any other."""
    gate: nn.Module = module.gate  # type: ignore[assignment]  # every strip gate has one
    if type(gate) is not nn.Sigmoid:
        return finish(module, x, (gate(a_h + a_w),), has_skip, need_weights)
    out = sum_gate(x, a_h, a_w, has_skip)
    if not (need_weights or capturing()):
        return out
    return report(module, x, out, torch.sigmoid(a_h + a_w).expand_as(x), need_weights)  # (B, C, H, W)


def report(module: nn.Module, x: Tensor, out: Tensor, full: Tensor, need_weights: bool):
    """Record the gate `full` (B, C, H, W) for map capture, and return it on request."""
    if capturing():  # map capture: the channel-mean of the (B, C, H, W) gate
        record(module, "spatial", full.mean(1), grid=x.shape[2:])
    return (out, full) if need_weights else out
