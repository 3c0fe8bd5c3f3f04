"""External attention, "Beyond Self-attention: External Attention using Two Linear Layers for Visual
Tasks" (Guo et al., 2021), arXiv:2105.02358.

Two small learnable memories $M_k \\in \\mathbb{R}^{S \\times C}$ and $M_v \\in \\mathbb{R}^{S \\times C}$
(linear layers without bias) replace the keys and values; the $N \\times S$ affinity is normalised twice:
a softmax over the N tokens, then an $\\ell_1$ normalisation over the S memory slots.

Deviations: the paper's code adds $\\varepsilon = 10^{-9}$ to the $\\ell_1$ denominator; `eps` keeps it
(default 1e-9), `from_fightingcv` sets it to 0 as fightingcv's `ExternalAttention` has none. fightingcv's
class is single-head with no output projection, as is this one (the paper's multi-head EAMLP adds
head splitting and projections around the same operator).

Shape letters: B batch, N tokens, C channels (`dim`), S memory slots (`memory_size`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, record

__all__ = ["ExternalAttention"]


@register(
    "external",
    family="external",
    paper="Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks",
    year=2021,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "memory_size": 4},
        inputs=((2, 7, 8),),
        output=(2, 7, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1),),
    ),
    aliases=("external_attention", "ea"),
)
class ExternalAttention(nn.Module):
    r"""External attention: two linear memories and double normalisation.

    $$
    A = \mathrm{softmax}_N(X M_k^\top), \qquad
    \hat A_{n,s} = \frac{A_{n,s}}{\varepsilon + \sum_{s'} A_{n,s'}}, \qquad Y = \hat A M_v
    $$

    the softmax taken over the N tokens (per memory slot), the $\ell_1$ normalisation over the S slots
    (per token). Time $O(B N S C)$, memory $O(B N (S + C))$: linear in the number of tokens.

    Args:
        dim: Width C of the tokens.
        memory_size: Number S of memory slots (fightingcv's `S`). Default: 64.
        eps: Added to the $\ell_1$ denominator (the paper's code uses 1e-9). Default: 1e-9.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`; with `need_weights=True` also the doubly normalised weights
          `(B, N, S)` (token n's weights over the memory slots).

    Example:
        ```python
        >>> ea = ExternalAttention(64, memory_size=8)
        >>> x = torch.randn(2, 49, 64)
        >>> ea(x).shape
        torch.Size([2, 49, 64])
        >>> out, weights = ea(x, need_weights=True)
        >>> weights.shape
        torch.Size([2, 49, 8])

        ```
    """

    def __init__(
        self,
        dim: int,
        memory_size: int = 64,
        eps: float = 1e-9,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.memory_size = check_int(memory_size, "memory_size", who)
        self.eps = check_float(eps, "eps", who, minimum=0.0)
        if eps == float("inf"):
            raise ValueError(f"{who}: eps must be finite, got {eps}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.mk = nn.Linear(dim, memory_size, bias=False, **factory)
        self.mv = nn.Linear(memory_size, dim, bias=False, **factory)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, memory_size={self.memory_size}, eps={self.eps}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from the tokens to the memory; `(out, weights)` with `need_weights`.

        Args:
            x: Tokens `(B, N, C)`.
            need_weights: Also return the `(B, N, S)` weights. Default: False.
        """
        check_shape(x, type(self).__name__, "B N C", "x", C=self.dim)
        attn = self.mk(x).softmax(dim=1)  # (B, N, S), softmax over the tokens
        attn = attn / (attn.sum(dim=2, keepdim=True) + self.eps)  # (B, N, S), l1 over the slots
        if capturing():  # the most used memory slots, each as a map of the tokens' weights on it
            slots = attn.sum(dim=(0, 1)).topk(min(4, self.memory_size)).indices  # (U,)
            record(self, "rows", attn[:, :, slots].transpose(1, 2)[:, None], grid=(attn.shape[1],),
                   queries=slots, query_grid=(self.memory_size,),
                   labels=[f"memory slot {i} of {self.memory_size}" for i in slots.tolist()],
                   note="each panel: the tokens' weights on one memory slot (after both normalisations)")
        out = self.mv(attn)  # (B, N, C)
        return (out, attn) if need_weights else out
