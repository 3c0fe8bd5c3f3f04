"""SimAM: a parameter-free attention from the energy of each neuron against its channel.

Yang, Zhang, Li, Xie, "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural
Networks", ICML 2021, https://proceedings.mlr.press/v139/yang21o.html (no arXiv version). Official
code: https://github.com/ZjjConan/SimAM.

$$
\\mathrm{out} = x \\cdot \\sigma\\Big(\\frac{(x - \\mu)^2}{4(\\hat\\sigma^2 + \\lambda)} + \\frac12\\Big)
$$

with $\\mu$ and $\\hat\\sigma^2$ the mean and the unbiased variance of each channel over H and W. The
numbers are the official code's and fightingcv's (identical code). Deviation: on a 1x1 map (where
$H W - 1 = 0$) the variance is taken as 0, so the gate is $\\sigma(1/2)$; the official code divides
0 by 0 and returns NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.simam import simam_gate, simam_plain
from attnzoo.maps.capture import capturing, record

__all__ = ["SimAM"]


@register(
    "simam",
    family="gating",
    paper="SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("simple_attention",),
)
class SimAM(nn.Module):
    """SimAM (Yang et al., 2021): each activation is gated by its inverse minimal energy.

    An activation that stands out from the others of its channel (large $(x - \\mu)^2$ relative to
    the channel's variance) is more important; no parameter is learned:

    $$
    e^{-1}_{c,hw} = \\frac{(x_{c,hw} - \\mu_c)^2}{4(\\hat\\sigma_c^2 + \\lambda)} + \\frac12,\\qquad
    y_{c,hw} = x_{c,hw}\\,\\sigma(e^{-1}_{c,hw})
    $$

    Args:
        channels: Number of input channels C (checked; the module has no parameters).
        e_lambda: The regulariser $\\lambda$ of the energy, > 0. Default: 1e-4 (the paper's).
        device: Accepted for the shared vocabulary; nothing is allocated. Default: None.
        dtype: Accepted for the shared vocabulary; nothing is allocated. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the gate `(B, C, H, W)`, so that `out == x * weights`.

    Example:
        ```python
        >>> simam = SimAM(64)
        >>> simam(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        e_lambda: float = 1e-4,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels: int | None = check_int(channels, "channels", who)  # None: any C (from_fightingcv)
        self.e_lambda = check_float(e_lambda, "e_lambda", who, above=0)  # 0: a constant map gives 0 / 0
        del device, dtype  # no parameter or buffer to place

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if self.channels is None:
            check_shape(x, type(self).__name__, "B C H W")
        else:
            check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        if not (need_weights or capturing()):
            return simam_gate(x, self.e_lambda)  # the lean kernel (attnzoo.kernels.simam)
        out, gate = simam_plain(x, self.e_lambda)  # (B, C, H, W) each
        if capturing():  # map capture: the gate averaged over channels
            record(self, "spatial", gate.mean(1), grid=x.shape[2:])
        return (out, gate) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, e_lambda={self.e_lambda}"
