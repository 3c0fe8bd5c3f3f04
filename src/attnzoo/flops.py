"""FLOP counting that is right for attention: fused kernels counted, grouped-conv backward corrected.

`torch.utils.flop_counter` has no formula for the CPU flash-attention kernels (`attnzoo.kernels.flash`
registers torch's SDPA formulas for them, whose backward also counts the recomputed logits) and
over-counts grouped-convolution backward by the group count (torch 2.14, see shared/MEASURED.md), so
`count_flops` runs attention on the math path (one count whichever kernel would run) and maps
`convolution_backward` itself.
Used by `attnzoo.find` and by the `attnzoo bench` command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.functional import fused_attn

__all__ = ["count_flops"]


def _conv_backward_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Convolution-backward FLOPs: each of grad-input and grad-weight costs one forward convolution.

    `torch.utils.flop_counter`'s own formula counts one of the two as if `groups` were 1, which
    over-counts depth-wise convolutions many times (see shared/MEASURED.md). `args` are the
    shapes of `aten.convolution_backward(grad_out, input, weight, bias_sizes, stride, padding,
    dilation, transposed, output_padding, groups, output_mask)`.
    """
    from torch.utils.flop_counter import conv_flop_count

    grad_out_shape, x_shape, w_shape = args[0], args[1], args[2]
    transposed, output_mask = bool(args[7]), args[10]
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of `step` (multiply-add = 2 FLOPs), with attention on the math path."""
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with fused_attn(False), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return int(counter.get_total_flops())
