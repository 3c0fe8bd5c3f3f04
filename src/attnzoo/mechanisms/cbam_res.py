"""A residual CBAM block: conv-BN-ReLU, CBAM, and a max-pool + 1x1-conv shortcut (the seed's `CBAtten_Res`).

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018,
https://arxiv.org/abs/1807.06521. The block itself is the seed's (the paper puts CBAM inside ResNet
blocks); the gates are `attnzoo.mechanisms.cbam`'s, applied by the fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int
from attnzoo._registry import Example, FreeSize, register
from attnzoo.kernels.gate import to_batch_first
from attnzoo.mechanisms.cbam import KERNEL_SIZES, PAPER, ChannelAttention, SpatialAttention, cbam_gate, finish

__all__ = ["ResidualCBAM"]


@register(
    "cbam_res",
    family="gating",
    paper=PAPER,
    year=2018,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 4, "out_channels": 8, "reduction": 2, "stride": 2},
        inputs=((2, 4, 6, 5),),
        output=(2, 8, 3, 3),
        free_sizes=(FreeSize(((0, 2),), 2, derived=True), FreeSize(((0, 3),), 3, derived=True))),
    seed_name="CBAtten_Res",
)
class ResidualCBAM(nn.Module):
    """A residual CBAM block (the seed's `CBAtten_Res`): conv-BN-ReLU, channel and spatial
    attention, plus a max-pool + 1x1-conv shortcut, then ReLU.

    $$
    \\mathrm{out} = \\mathrm{relu}(\\mathrm{SA}(\\mathrm{CA}(
    \\mathrm{relu}(\\mathrm{bn_1}(\\mathrm{conv_1}\\, x)))) + \\mathrm{conv_{res}}(\\mathrm{maxpool}\\, x))
    $$

    State dict keys are the seed's (`conv1`, `bn1`,
    `ca.sharedMLP.*`, `sa.conv`, `conv_res`). The shortcut's max-pool has window 3 and padding 1,
    which gives the output size of `conv1` for every odd kernel size. With the defaults
    (`out_channels=channels`, `stride=1`) the block keeps the input's shape. The seed's constructor
    `CBAtten_Res(in_channels, out_channels, kernel_size=3, stride=2, reduction=4)` is
    `attnzoo.compat.CBAtten_Res`.

    Args:
        channels: Number of input channels (seed: `in_channels`).
        out_channels: Number of output channels C. Default: None (= `channels`).
        kernel_size: `conv1` and spatial-attention kernel size, one of 3, 5, 7. Default: 3 (the seed's).
        stride: Stride of `conv1` and of the shortcut's max-pool. Default: 1 (the seed's is 2).
        reduction: Bottleneck ratio of the channel attention (hidden width `C / reduction`, rounded
            to a multiple of `rd_divisor`). Default: 16 (the seed's is 4).
        rd_channels: Hidden width of the channel attention, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 1.
        batch_first: If False input and output are (C, B, H, W). Default: True.
        device: Device of the parameters and buffers. Default: None.
        dtype: dtype of the parameters and buffers. Default: None.

    Shape:
        - Input: (B, channels, H, W), or (channels, B, H, W) when `batch_first=False`.
        - Output: (B, out_channels, H', W') with `H' = (H - 1) // stride + 1` (same for W).
        - Weights (`need_weights=True`): the CBAM gate on the convolved features (B, C, H', W').

    Example:
        ```python
        >>> block = ResidualCBAM(32, 64, stride=2)
        >>> block(torch.randn(2, 32, 16, 16)).shape
        torch.Size([2, 64, 8, 8])
        ```
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
        reduction: float = 16,
        *,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        who = type(self).__name__
        check_int(channels, "channels", who)
        out_channels = channels if out_channels is None else check_int(out_channels, "out_channels", who)
        check_choice(kernel_size, KERNEL_SIZES, "kernel_size", who)
        check_int(stride, "stride", who)
        self.in_channels, self.out_channels = channels, out_channels
        self.batch_first = bool(batch_first)
        self.padding = kernel_size // 2
        self.max_pool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.conv_res = nn.Conv2d(channels, out_channels, kernel_size=1, stride=1, bias=True, **dd)
        self.conv1 = nn.Conv2d(
            channels, out_channels, kernel_size, stride=stride, padding=self.padding, bias=True, **dd
        )
        self.bn1 = nn.BatchNorm2d(out_channels, **dd)
        self.relu = nn.ReLU(inplace=True)  # after bn1; the block's last ReLU is `clamp_min` (forward)
        self.ca = ChannelAttention(
            out_channels, reduction, rd_channels=rd_channels, rd_divisor=rd_divisor, **dd
        )
        self.sa = SpatialAttention(out_channels, kernel_size, **dd)

    def extra_repr(self) -> str:
        return f"channels={self.in_channels}, out_channels={self.out_channels}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.in_channels)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, C_out, H', W')
        out, gate = cbam_gate(out, self.ca, self.sa, need_weights)
        out = out.add_(self.conv_res(self.max_pool(x)))  # shortcut (B, C_out, H', W')
        # ReLU as clamp_min, whose backward keeps its input rather than its output: a caller may add to
        # the output in place (timm's blocks do `x += shortcut` after their attention layer).
        out = out.clamp_min(0)
        return finish(out, gate, self.batch_first, need_weights)
