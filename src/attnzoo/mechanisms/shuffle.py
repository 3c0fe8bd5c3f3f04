"""SA: shuffle attention, a channel and a spatial gate on the two halves of each group, then a shuffle.

Zhang, Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks", ICASSP 2021,
https://arxiv.org/abs/2102.00240. Official code: https://github.com/wofmanaf/SA-Net (``sa_layer``).

The channels are split into G groups, each group into two halves: the first half is gated per channel
by its (scaled and shifted) mean, the second per position by its (scaled and shifted) GroupNorm; the
halves are concatenated and the channels shuffled across the two halves. The numbers and state_dict
keys are the official code's and fightingcv's (``cweight``, ``cbias``, ``sweight``, ``sbias``, ``gn``).
Deviations: ``groups`` defaults to the paper's 64 where ``2 * 64`` divides ``channels``, else to
``gcd(channels // 2, 64)``; fightingcv's ``ShuffleAttention(channel, reduction, G)`` takes a
``reduction`` it never uses and defaults to ``G=8``; it also runs with three channels per group (and an
even channel count), splitting each group 2 + 1 with one shared weight per half, which
``from_fightingcv`` reproduces (the constructor here asks for even halves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_float, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms.sge import default_groups

__all__ = ["ShuffleAttention"]


@register(
    "shuffle",
    family="gating",
    paper="SA-Net: Shuffle Attention for Deep Convolutional Neural Networks",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "groups": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("shuffle_attention", "ShuffleAttention", "sa_layer"),
)
class ShuffleAttention(nn.Module):
    """Shuffle attention (Zhang and Yang, 2021).

    Per group, with $x^1, x^2$ its two halves, $\\mathrm{GN}$ a GroupNorm with one channel per group,
    and $w_c, b_c, w_s, b_s$ learned per channel of a half:

    $$
    y^1 = x^1\\,\\sigma(w_c\\,\\mathrm{mean}_{hw}\\,x^1 + b_c),\\qquad
    y^2 = x^2\\,\\sigma(w_s\\,\\mathrm{GN}(x^2) + b_s),\\qquad
    y = \\mathrm{shuffle}_2([y^1; y^2])
    $$

    where $\\mathrm{shuffle}_2$ interleaves the first and second half of the C channels.

    Args:
        channels: Number of input channels C, a multiple of `2 * groups`.
        groups: Number of groups G. Default: None (64, the paper's, where `2 * 64` divides C, else
            `gcd(C // 2, 64)`).
        eps: The GroupNorm's epsilon, > 0. Default: 1e-5.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the gates `(B, C, H, W)` in the input's channel order, so
          that `out` is `x * weights` with its channels shuffled.

    Example:
        ```python
        >>> sa = ShuffleAttention(64, groups=8)
        >>> sa(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        groups: int | None = None,
        *,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        check_divisible(channels, 2, "channels", "2 (two halves per group)", who)
        self.groups = default_groups(channels // 2, groups, 64, who)
        if channels % (2 * self.groups):
            raise ValueError(
                f"{who}: channels={channels} must be divisible by 2 * groups = {2 * self.groups} "
                f"(two halves per group), got groups={self.groups}"
            )
        check_float(eps, "eps", who, above=0)  # eps = 0: a constant group normalises to 0 / 0
        self.channels = channels
        half = channels // (2 * self.groups)
        dd = {"device": device, "dtype": dtype}
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1, **dd))  # type: ignore[arg-type]
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1, **dd))  # type: ignore[arg-type]
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1, **dd))  # type: ignore[arg-type]
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1, **dd))  # type: ignore[arg-type]
        self.gn = nn.GroupNorm(half, half, eps=eps, **dd)  # type: ignore[arg-type]

    def reset_parameters(self) -> None:
        """The official start: both gates' weights 0 and biases 1 (`gn` resets itself)."""
        for weight, bias in ((self.cweight, self.cbias), (self.sweight, self.sbias)):
            nn.init.zeros_(weight)
            nn.init.ones_(bias)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c, h, w = dims["B"], self.channels, dims["H"], dims["W"]
        xg = x.reshape(b * self.groups, c // self.groups, h, w)  # (B, C, H, W) -> (B*G, C/G, H, W)
        first = (c // self.groups + 1) // 2  # C/2G; fightingcv's 3-channel groups split 2 + 1
        x0, x1 = xg[:, :first], xg[:, first:]  # (B*G, C/2G, H, W) each
        pooled = lean_mean(x0, (2, 3), keepdim=True)  # (B*G, C/2G, 1, 1)
        cgate = torch.sigmoid(self.cweight * pooled + self.cbias)  # (B*G, C/2G, 1, 1)
        sgate = torch.sigmoid(self._spatial_logits(x1))  # (B*G, C/2G, H, W)
        if capturing():  # map capture: the spatial gates averaged over their channels
            spatial = sgate.reshape(b, -1, h, w).mean(1)  # (B*G, C/2G, H, W) -> (B, H, W)
            record(self, "spatial", spatial, grid=(h, w))
        out = _gate_and_shuffle(x0 * cgate, x1 * sgate, b, self.groups)  # (B, C, H, W)
        if not need_weights:
            return out
        weights = torch.cat((cgate.expand_as(x0), sgate), 1).reshape(b, c, h, w)  # input channel order
        return out, weights

    def _spatial_logits(self, x1: Tensor) -> Tensor:
        """$w_s\\,\\mathrm{GN}(x^2) + b_s$ as one GroupNorm: $w_s$ and $b_s$ folded into its affine
        (two full-size elementwise passes fewer, forward and backward)."""
        gn = self.gn
        weight = self.sweight.reshape(-1) if gn.weight is None else self.sweight.reshape(-1) * gn.weight
        bias = self.sbias.reshape(-1)
        if gn.bias is not None:
            bias = bias + self.sweight.reshape(-1) * gn.bias
        return F.group_norm(x1, gn.num_groups, weight, bias, gn.eps)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"


def _gate_and_shuffle(first: Tensor, second: Tensor, b: int, groups: int) -> Tensor:
    """Concatenate each group's gated halves and shuffle the channels across the two halves of C.

    first `(B*G, C1, H, W)`, second `(B*G, C2, H, W)` -> `(B, C, H, W)` with C = G * (C1 + C2). With G
    even the shuffled layout is one concatenation of permuted views (one copy, not two): output
    channel `2 j + t` is channel j of the t-th half of C, and each half of C holds G/2 whole groups.
    """
    _, c1, h, w = first.shape
    c = groups * (c1 + second.shape[1])
    if groups % 2:  # a half of C ends inside a group: concatenate, then shuffle
        gated = torch.cat((first, second), 1)  # (B*G, C/G, H, W)
        # (B, 2, C/2, H, W) -> (B, C/2, 2, H, W) -> (B, C, H, W)
        return gated.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)

    def halves(part: Tensor) -> Tensor:  # (B*G, Ck, H, W) -> (B, G/2, Ck, 2, H*W), a view
        return part.reshape(b, 2, groups // 2, part.shape[1], h * w).permute(0, 2, 3, 1, 4)

    return torch.cat((halves(first), halves(second)), 2).reshape(b, c, h, w)  # (B, G/2, C/G, 2, HW)
