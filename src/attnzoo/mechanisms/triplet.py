"""Triplet attention: three spatial gates, each over a plane of two of the three axes (C, H, W).

Misra, Nalamada, Arasanipalai, Hou, "Rotate to Attend: Convolutional Triplet Attention Module",
WACV 2021, https://arxiv.org/abs/2010.03045. Official code: https://github.com/landskape-ai/triplet-attention.

Each branch pools one axis away with max and mean (the "Z-pool"), convolves the two maps with one
k x k convolution and BatchNorm, and gates the input over the remaining plane; the three gated
inputs are averaged. The numbers are the official code's and fightingcv's (the same code; BatchNorm
momentum 0.01). Deviation: the branches are computed from pooled statistics of the input in place
of permuted copies (the same numbers, no input-sized copies), and ``kernel_size`` is an argument
(the official code fixes 7).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["TripletAttention"]


class ZGate(nn.Module):
    """One branch: `sigmoid(BN(conv([max; mean])))` on two pooled maps, `(B, 2, P, Q) -> (B, 1, P, Q)`."""

    def __init__(
        self, kernel_size: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=pad, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, device=device, dtype=dtype)

    def forward(self, pooled_max: Tensor, pooled_mean: Tensor) -> Tensor:
        return torch.sigmoid(self.bn(self.conv(torch.stack((pooled_max, pooled_mean), 1))))


@register(
    "triplet",
    family="gating",
    paper="Rotate to Attend: Convolutional Triplet Attention Module",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("triplet_attention", "TripletAttention"),
)
class TripletAttention(nn.Module):
    """Triplet attention (Misra et al., 2021).

    With $Z_a(x) = [\\max_a x; \\mathrm{mean}_a x]$ the pooling of axis $a$ and $\\phi_i$ a k x k
    convolution with BatchNorm:

    $$
    y = \\frac13\\, x \\odot \\big(\\sigma(\\phi_1(Z_H x)) + \\sigma(\\phi_2(Z_W x))
      + \\sigma(\\phi_3(Z_C x))\\big)
    $$

    broadcast over the pooled axis; `no_spatial=True` drops the third (H, W) branch and averages two.

    Args:
        channels: Number of input channels C (checked; the gates work for any C).
        kernel_size: Odd side of each branch's convolution. Default: 7 (the paper's).
        no_spatial: Drop the (H, W) branch, as the official option. Default: False.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the averaged gate `(B, C, H, W)`, so that `out == x * weights`.

    Example:
        ```python
        >>> triplet = TripletAttention(64)
        >>> triplet(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        no_spatial: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels: int | None = check_int(channels, "channels", who)  # None: any C (from_fightingcv)
        check_int(kernel_size, "kernel_size", who)
        if kernel_size % 2 == 0:
            raise ValueError(f"{who}: kernel_size must be odd (a centred window), got {kernel_size}")
        self.kernel_size, self.no_spatial = kernel_size, bool(no_spatial)
        self.cw = ZGate(kernel_size, device, dtype)  # over (C, W), H pooled
        self.hc = ZGate(kernel_size, device, dtype)  # over (H, C), W pooled
        self.hw = None if self.no_spatial else ZGate(kernel_size, device, dtype)  # over (H, W), C pooled

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        (
            check_shape(x, type(self).__name__, "B C H W")
            if self.channels is None
            else check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        )
        g_cw = self.cw(x.amax(2), lean_mean(x, 2)).transpose(1, 2)  # (B, 1, C, W) -> (B, C, 1, W)
        g_hc = self.hc(x.amax(3).transpose(1, 2), lean_mean(x, 3).transpose(1, 2))  # (B, 1, H, C)
        g_hc = g_hc.permute(0, 3, 2, 1)  # (B, 1, H, C) -> (B, C, H, 1)
        if self.hw is None:
            weights = (g_cw + g_hc) * 0.5  # (B, C, H, W)
        else:
            g_hw = self.hw(x.amax(1), lean_mean(x, 1))  # (B, 1, H, W)
            weights = (g_cw + g_hc + g_hw) * (1 / 3)  # (B, C, H, W)
        if capturing():  # map capture: the gate averaged over channels
            record(self, "spatial", weights.mean(1), grid=x.shape[2:])
        out = x * weights
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, no_spatial={self.no_spatial}"
