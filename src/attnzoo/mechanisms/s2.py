"""S²-MLPv2's spatial-shift block with split attention.

Yu, Li, Cai, Sun, Li, "S²-MLPv2: Improved Spatial-Shift MLP Architecture for Vision", arXiv 2021,
https://arxiv.org/abs/2108.01072 (the block of its Fig. 2 and its pseudo-code).

A linear layer expands each position's C channels to 3C; the first C are shifted by one position in
four directions (a quarter of the channels each, down/up along H then right/left along W), the next
C in the transposed order, the last C are kept; split attention (an MLP on the summed branches, a
softmax over the three branches per channel) mixes the three, and a linear layer projects back.

Deviations: fightingcv's `S2Attention(channels)` builds its split attention with the default
`channel=512` whatever `channels` is, so it runs only for C = 512; attnzoo's uses C. fightingcv's
shifts are in-place copies between overlapping slices (`x[:, 1:] = x[:, :-1]`), whose result is
left to the copy kernel: PyTorch's CPU kernel copies in ascending order, so every shift towards
higher indices smears the first row (or column) over the whole axis, while shifts towards lower
indices come out right; autograd still records copies from the unchanged source, so fightingcv's
gradients are those of the true shift, not of the values it computed. `shift="fightingcv"`
reproduces both (the smeared values, the shift's gradient); the default is the paper's shift (the
border row keeps its value), with its own gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.maps.capture import capturing, record

__all__ = ["S2Attention"]

# (dim, step) of the four channel quarters: dim 1 is H, dim 2 is W of a (B, H, W, C) tensor
_SHIFT1 = ((1, 1), (1, -1), (2, 1), (2, -1))
_SHIFT2 = ((2, 1), (2, -1), (1, 1), (1, -1))


def _shift_one(t: Tensor, dim: int, step: int, smear: bool) -> Tensor:
    """`t` shifted by one along `dim` (step +1: towards higher indices); the vacated border keeps
    its value, or with `smear` (+1 only) every position takes the first one's value (the gradient
    stays the shift's, as in fightingcv)."""
    n = t.shape[dim]
    if n == 1:
        return t
    if step < 0:
        return torch.cat([t.narrow(dim, 1, n - 1), t.narrow(dim, n - 1, 1)], dim)
    shifted = torch.cat([t.narrow(dim, 0, 1), t.narrow(dim, 0, n - 1)], dim)
    if not smear:
        return shifted
    # fightingcv's overlapping in-place copy: the values of the smear, but autograd records a
    # copy from the (unchanged) source view, so its gradient is the shift's
    return shifted + (t.narrow(dim, 0, 1) - shifted).detach()


def _spatial_shift(t: Tensor, plan: tuple[tuple[int, int], ...], smear: bool) -> Tensor:
    """The four channel quarters of `t` `(B, H, W, C)` shifted as `plan` says."""
    c = t.shape[-1]
    bounds = (0, c // 4, c // 2, c * 3 // 4, c)
    parts = [
        _shift_one(t[..., bounds[i]:bounds[i + 1]], dim, step, smear)  # (B, H, W, C_i)
        for i, (dim, step) in enumerate(plan)
    ]
    return torch.cat(parts, -1)  # (B, H, W, C)


class _SplitMix(nn.Module):
    """Split attention's MLP (fightingcv's `SplitAttention` parameter names)."""

    def __init__(self, channels: int, branches: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.mlp1 = nn.Linear(channels, channels, bias=False, **factory)
        self.mlp2 = nn.Linear(channels, channels * branches, bias=False, **factory)

    def forward(self, a: Tensor) -> Tensor:
        return self.mlp2(F.gelu(self.mlp1(a)))  # (B, C) -> (B, k C)


@register(
    "s2",
    family="gating",
    paper="S²-MLPv2: Improved Spatial-Shift MLP Architecture for Vision",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)),
    aliases=("s2_attention", "S2Attention"),
)
class S2Attention(nn.Module):
    """Spatial-shift block with split attention (S²-MLPv2, Yu et al., 2021).

    With $[x_1, x_2, x_3] = W_1 x + b_1$ (per position, C channels each), $\\mathcal{S}_1$,
    $\\mathcal{S}_2$ the two spatial shifts and $N = HW$:

    $$
    a = \\sum_{n}\\big(\\mathcal{S}_1 x_1 + \\mathcal{S}_2 x_2 + x_3\\big)_n,\\qquad
    [\\hat a_1, \\hat a_2, \\hat a_3] = W_b\\,\\mathrm{GELU}(W_a a),\\qquad
    y = W_2 \\sum_{k=1}^{3} \\mathrm{softmax}_k(\\hat a)_k \\odot \\mathcal{S}_k x_k + b_2 .
    $$

    Args:
        channels: Input and output channels C.
        shift: "paper" (the border keeps its value) or "fightingcv" (shifts towards higher
            indices smear the first row or column, as fightingcv's in-place copies do on CPU,
            with the gradient of the paper's shift, as fightingcv's autograd records it).
            Default: "paper".
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the split-attention weights `(B, 3, C)`, a softmax over
          the three branches.

    Example:
        ```python
        >>> s2 = S2Attention(64)
        >>> out, weights = s2(torch.randn(2, 64, 7, 9), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 64, 7, 9]), torch.Size([2, 3, 64]))

        ```
    """

    def __init__(
        self,
        channels: int,
        *,
        shift: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        self.shift = check_choice(shift, ("paper", "fightingcv"), "shift", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = channels
        self.mlp1 = nn.Linear(channels, channels * 3, **factory)
        self.mlp2 = nn.Linear(channels, channels, **factory)
        self.split_attention = _SplitMix(channels, 3, factory)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, shift={self.shift!r}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Shift, mix and project `x` `(B, C, H, W)`; with `need_weights`, also return the branch
        weights `(B, 3, C)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c = dims["B"], dims["C"]
        smear = self.shift == "fightingcv"
        t = self.mlp1(x.permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C) -> (B, H, W, 3C)
        x1, x2, x3 = t.split(c, dim=-1)  # 3 x (B, H, W, C)
        x1 = _spatial_shift(x1, _SHIFT1, smear)
        x2 = _spatial_shift(x2, _SHIFT2, smear)
        a = (x1 + x2 + x3).sum((1, 2))  # (B, C): summed over the branches and positions
        weights = self.split_attention(a).reshape(b, 3, c).softmax(dim=1)  # (B, 3, C)
        if capturing():  # map capture: the branch weights per channel
            record(self, "branch", weights)
        w1, w2, w3 = weights[:, :, None, None].unbind(1)  # 3 x (B, 1, 1, C)
        mixed = x1 * w1 + x2 * w2 + x3 * w3  # (B, H, W, C)
        out = self.mlp2(mixed).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        return (out, weights) if need_weights else out
