"""The token-major row layouts of the neighbourhood kernel (`neighbourhood_nd._ChunkedNeighbourhood`)
and its products of a block of query rows with their gathered neighbours.

Shape letters: B batch, h heads, N queries (nc in a block), S keys, K neighbours per query, c width.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "as_4d", "counting", "head_major", "mix", "outer", "reduce_to", "rows", "scores", "token_major",
    "token_major_empty", "token_major_view", "token_rows",
]


def counting() -> bool:
    """Whether a dispatch mode (`FlopCounterMode`) is recording, outside `torch.compile`: the products
    below then run as batched products, which the mode counts, instead of the faster elementwise
    products and sums it does not."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0


def as_4d(bias: Tensor) -> Tensor:
    """A bias of rank <= 4 with ones prepended: `(B or 1, h or 1, N or 1, K or 1)`."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # (.., N or 1, K or 1)


def rows(t: Tensor, n0: int, n1: int) -> Tensor:
    """Rows n0:n1 of a 4-D tensor's query axis, or the tensor itself where that axis broadcasts."""
    return t if t.shape[2] == 1 else t[:, :, n0:n1]


def token_major(t: Tensor) -> Tensor:
    """`(B, h, N, c)` -> `(N, B h, c)`, the kernel's layout (a view when t came from a token-major
    projection with B = 1, else one copy)."""
    b, h, n, c = t.shape
    return t.permute(2, 0, 1, 3).reshape(n, b * h, c)


def token_rows(t: Tensor) -> Tensor:
    """`(B, h, S, c)` -> `(S, B h c)`: one row of every key (a view where the strides allow)."""
    return t.permute(2, 0, 1, 3).reshape(t.shape[2], -1)


def scores(block: Tensor, gathered: Tensor) -> Tensor:
    """`(nc, B h, c)` rows dotted with their `(nc, K, B h, c)` neighbours: `(nc, B h, K)`.

    Under a dispatch mode (`FlopCounterMode`) as batched products, which the mode counts; else as
    a product and a sum, which is faster for these `1 x c` by `c x K` products.
    """
    if counting():
        return (block.unsqueeze(2) @ gathered.permute(0, 2, 3, 1)).squeeze(2)
    return (block.unsqueeze(2) * gathered.transpose(1, 2)).sum(-1)


def mix(weights: Tensor, gathered: Tensor, out: Tensor) -> None:
    """`out` `(nc, B h, c)` = the `(nc, B h, K)` weights times their `(nc, K, B h, c)` neighbours
    (as batched products under a dispatch mode, like `scores`)."""
    if counting():
        out.copy_((weights.unsqueeze(2) @ gathered.transpose(1, 2)).squeeze(2))
    else:
        torch.sum(gathered * weights.transpose(1, 2).unsqueeze(-1), 1, out=out)


def token_major_empty(q: Tensor, c: int) -> Tensor:
    """An empty `(B, h, N, c)` tensor like q, stored token-major (`(N, B, h, c)` in memory)."""
    b, h, n, _ = q.shape
    return torch.empty_strided((b, h, n, c), (h * c, c, b * h * c, 1), dtype=q.dtype, device=q.device)


def token_major_view(t: Tensor) -> Tensor:
    """A `(B, h, N, c)` tensor stored token-major (`token_major_empty`) seen as `(N, B h, c)`."""
    b, h, n, c = t.shape
    return t.permute(2, 0, 1, 3).view(n, b * h, c)


def head_major(t: Tensor, b: int, h: int) -> Tensor:
    """`(N, B h, c)` -> the `(B, h, N, c)` view callers expect."""
    return t.unflatten(1, (b, h)).permute(1, 2, 0, 3)


def outer(weights: Tensor, block: Tensor, out: Tensor) -> None:
    """`out` `(nc, K, B h, c)` = each `(nc, B h, K)` weight times its query's `(nc, B h, c)` row: the
    gradients of the gathered keys and values (as batched `K x 1` by `1 x c` products under a
    dispatch mode, like `scores`, so `FlopCounterMode` counts them)."""
    if counting():
        out.copy_((weights.unsqueeze(-1) @ block.unsqueeze(2)).transpose(1, 2))
    else:
        torch.mul(weights.transpose(1, 2).unsqueeze(-1), block.unsqueeze(1), out=out)


def reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` summed over the axes where `shape` broadcasts (size 1), keeping them."""
    dims = [i for i, (a, want) in enumerate(zip(t.shape, shape, strict=True)) if want == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t
