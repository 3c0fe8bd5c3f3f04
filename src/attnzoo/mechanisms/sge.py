"""SGE: spatial group-wise enhance, a per-group spatial gate from the similarity to the group's mean.

Li, Hu, Yang, "Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional
Networks", 2019, https://arxiv.org/abs/1905.09646. Official code: https://github.com/implus/PytorchInsight
(``classification/models/imagenet/resnet_sge.py``).

$$
\\mathrm{out}_g = x_g \\cdot \\sigma(\\gamma_g\\, \\hat c_g + \\beta_g),\\qquad
c_g = \\sum_{k} x_{g,k} \\, \\mathrm{mean}_{hw}\\, x_{g,k}
$$

with $\\hat c_g$ the map $c_g$ normalised over the H*W positions. The numbers are the official code's
(unbiased standard deviation plus 1e-5, $\\gamma = 0$ and $\\beta = 1$ at initialisation). Deviations:

- ``groups`` defaults to the paper's 64 where it divides ``channels``, else to ``gcd(channels, 64)``;
- a 1x1 map gives the gate $\\sigma(\\beta)$ (its one position is at the mean), where the official
  code and fightingcv divide 0 by a NaN standard deviation;
- the gradient of a constant group is finite (the standard deviation of a constant map is taken as 0
  without differentiating the square root at 0);
- fightingcv's ``SpatialGroupEnhance(groups)`` initialises $\\beta$ to 0, not 1 (``from_fightingcv``
  copies its values, so converted modules give its numbers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_float, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["SpatialGroupEnhance"]


def default_groups(channels: int, groups: int | None, limit: int, who: str) -> int:
    """`groups` as given, or the largest divisor of `channels` that also divides the paper's `limit`."""
    check_int(channels, "channels", who)
    if groups is None:
        return math.gcd(channels, limit)
    return check_int(groups, "groups", who)


@register(
    "sge",
    family="gating",
    paper="Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "groups": 4}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("spatial_group_enhance", "SpatialGroupEnhance"),
)
class SpatialGroupEnhance(nn.Module):
    """Spatial Group-wise Enhance (Li et al., 2019).

    The channels are split into G groups. In each group the similarity of every position's feature
    vector to the group's mean vector gives a map; the map, standardised over the positions and
    scaled by one learned $\\gamma_g$, $\\beta_g$ per group, gates the group:

    $$
    c_{g,hw} = \\sum_{k \\in g} x_{k,hw}\\,\\bar x_k,\\qquad
    \\hat c_g = \\frac{c_g - \\mathrm{mean}(c_g)}{\\mathrm{std}(c_g) + \\epsilon},\\qquad
    y_{k,hw} = x_{k,hw}\\,\\sigma(\\gamma_g \\hat c_{g,hw} + \\beta_g)
    $$

    Args:
        channels: Number of input channels C.
        groups: Number of groups G, dividing C. Default: None (64, the paper's, where it divides
            C, else `gcd(C, 64)`).
        eps: Added to the standard deviation, > 0. Default: 1e-5 (the official code's).
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the gate per group, `(B, G, H, W)`.

    Example:
        ```python
        >>> sge = SpatialGroupEnhance(64, groups=8)
        >>> out, gate = sge(torch.randn(2, 64, 7, 9), need_weights=True)
        >>> gate.shape
        torch.Size([2, 8, 7, 9])

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
        self.groups = default_groups(channels, groups, 64, who)
        check_divisible(channels, self.groups, "channels", "groups", who)
        self.eps = check_float(eps, "eps", who, above=0)  # eps = 0 divides 0 by 0 on a constant group
        self.channels: int | None = channels  # None (set by from_fightingcv): any multiple of groups
        # The official keys and shapes: weight (gamma) and bias (beta), (1, G, 1, 1).
        self.weight = nn.Parameter(torch.zeros(1, self.groups, 1, 1, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.ones(1, self.groups, 1, 1, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """The official start: weight 0, bias 1 (every group's gate at sigmoid(1))."""
        nn.init.zeros_(self.weight)
        nn.init.ones_(self.bias)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        who = type(self).__name__
        dims = (
            check_shape(x, who, "B C H W")
            if self.channels is None
            else check_shape(x, who, "B C H W", C=self.channels)
        )
        b, c, h, w, g = dims["B"], dims["C"], dims["H"], dims["W"], self.groups
        if c % g:
            raise ValueError(f"{who} expects x with channels divisible by groups={g}, got {tuple(x.shape)}")
        xg = x.reshape(b, g, c // g, h, w)  # (B, C, H, W) -> (B, G, C/G, H, W)
        mean = lean_mean(x, (2, 3)).reshape(b, g, 1, -1)  # (B, C) -> (B, G, 1, C/G)
        sim = (mean @ xg.flatten(3)).squeeze(2)  # (B, G, 1, C/G) @ (B, G, C/G, H*W) -> (B, G, H*W)
        sim = sim - sim.mean(-1, keepdim=True)
        var = sim.pow(2).sum(-1, keepdim=True) / max(h * w - 1, 1)  # unbiased, as torch.std
        positive = var > 0
        std = torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)  # no sqrt'(0)
        t = (sim / (std + self.eps)).reshape(b, g, h, w)  # (B, G, H*W) -> (B, G, H, W)
        gate = torch.sigmoid(t * self.weight + self.bias)  # (B, G, H, W)
        if capturing():  # map capture: the gate averaged over groups
            record(self, "spatial", gate.mean(1), grid=(h, w))
        out = (xg * gate[:, :, None]).reshape(b, c, h, w)  # (B, G, C/G, H, W) -> (B, C, H, W)
        return (out, gate) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, eps={self.eps}"
