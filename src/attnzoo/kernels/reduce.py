"""A mean whose backward writes no full-size tensor.

autograd differentiates ``x.mean(dims)`` as ``grad.expand(x.shape) / n``: the division of the broadcast
materialises a quotient as large as ``x``, which autograd then adds to ``x``'s gradient. Pooling a map
to a gate (ParNet's squeeze-excite, PSA, BAM, GC, CoT, polarized, SGE, shuffle and triplet attention,
ViP's reweighting) pays
one full-size write and read per mean in every training step. ``x.sum(dims) * (1 / n)`` is the same
function: the scale applies to the small result, and the sum's backward is a broadcast view that
autograd adds into ``x``'s gradient in place.

Half precision keeps ``mean``: a half-precision sum can overflow where the mean does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["lean_mean"]


def lean_mean(x: Tensor, dims: int | Sequence[int], keepdim: bool = False) -> Tensor:
    """``x.mean(dims, keepdim)``, with a backward that broadcasts instead of writing a quotient.

    Args:
        x: Any floating tensor.
        dims: The axes to average over.
        keepdim: Keep them as size-1 axes. Default: False.

    Returns:
        The mean, shaped as ``x.mean(dims, keepdim)``.
    """
    axes = (dims,) if isinstance(dims, int) else tuple(dims)
    count = 1
    for axis in axes:  # a loop, not a generator: torch.compile(fullgraph=True) traces it
        count *= x.shape[axis]
    if x.dtype in (torch.float16, torch.bfloat16) or not axes or count == 0:  # (an empty mean is NaN)
        return x.mean(axes, keepdim=keepdim)
    return x.sum(axes, keepdim=keepdim) * (1.0 / count)
