"""The seed's CBAM classes (`attnzoo.compat`): their constructors, forward and state_dict keys.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018,
https://arxiv.org/abs/1807.06521.

Each is the canonical class of `attnzoo.mechanisms.cbam` (or `cbam_res`) built from the seed's
arguments: the seed's hidden width `C // reduction` (a `ValueError` naming the seed's argument when
it is 0), the seed's defaults (kernel 3, reduction 4, stride 2) and no extra options.
`attnzoo.create("ChannelAttention", ...)`, `"SpatialAttention"` and `"CBAtten_Res"` build these.
"""

from __future__ import annotations

from torch import Tensor

from attnzoo._checks import check_choice, check_int
from attnzoo._registry import Example, register_seed
from attnzoo.mechanisms import cbam, cbam_res
from attnzoo.mechanisms.se import hidden_width

__all__ = ["ChannelAttention", "SpatialAttention", "CBAtten_Res"]


@register_seed("cbam_channel", example=Example({"in_channels": 8}, ((2, 8, 5, 5),), (2, 8, 5, 5)))
class ChannelAttention(cbam.ChannelAttention):
    """The seed's `ChannelAttention(in_channels, reduction=4, batch_first=True)`.

    State dict keys `sharedMLP.0.weight` (C/r, C, 1, 1) and `sharedMLP.2.weight` (C, C/r, 1, 1), no
    biases; outputs equal the seed's. Differences: a `ValueError` when `in_channels // reduction` is
    0, input checks, and the fused gate (same values).

    Args:
        in_channels: Number of input channels C.
        reduction: Bottleneck ratio of the shared MLP; the hidden width is `C // reduction`. Default: 4.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input, rescaled per channel.
    """

    def __init__(self, in_channels: int, reduction: int = 4, batch_first: bool = True) -> None:
        hidden = hidden_width(in_channels, reduction, type(self).__name__, channels_name="in_channels")
        super().__init__(in_channels, reduction, rd_channels=hidden, batch_first=batch_first)
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  # the seed's forward(x)
        return super().forward(x)  # type: ignore[return-value]


@register_seed("cbam_spatial", example=Example({"kernel_size": 3}, ((2, 4, 5, 5),), (2, 4, 5, 5)))
class SpatialAttention(cbam.SpatialAttention):
    """The seed's `SpatialAttention(kernel_size=3, batch_first=True)`.

    State dict key `conv.weight` (1, 2, k, k), no bias; outputs equal the seed's. Differences:
    `kernel_size` outside (3, 5, 7) raises `ValueError` (the seed asserts), and input checks.

    Args:
        kernel_size: Size of the convolution over the two pooled maps, one of 3, 5, 7. Default: 3.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input, rescaled per position.
    """

    def __init__(self, kernel_size: int = 3, batch_first: bool = True) -> None:
        check_choice(kernel_size, cbam.KERNEL_SIZES, "kernel_size", type(self).__name__)  # the seed's
        super().__init__(None, kernel_size, batch_first=batch_first)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  # the seed's forward(x)
        return super().forward(x)  # type: ignore[return-value]


@register_seed("cbam_res", example=Example({"in_channels": 8, "out_channels": 8}, ((2, 8, 6, 6),),
                                          (2, 8, 3, 3)))
class CBAtten_Res(cbam_res.ResidualCBAM):  # noqa: N801 (the seed's name)
    """The seed's residual CBAM block `CBAtten_Res(in_channels, out_channels, kernel_size=3, stride=2,
    reduction=4, batch_first=True)`.

    `out = relu(SA(CA(relu(bn1(conv1 x)))) + conv_res(max_pool x))`. The seed's constructor and
    state_dict keys (`conv1`, `bn1`, `ca.sharedMLP.*`, `sa.conv`, `conv_res`); outputs equal the
    seed's where the seed runs. Fixed seed bugs:

    - `batch_first=False` permuted twice (the block, then again inside `ca`/`sa`, which were built
      with `batch_first=False` too); here only the block permutes, so (C, B, H, W) inputs work.
    - The shortcut's `MaxPool2d(3, stride, padding=kernel_size // 2)` fails for kernel_size 5 and 7
      (padding larger than half the pooling window); here its padding is 1, which gives the same
      output size as `conv1` for every odd kernel size, and the same values for kernel_size 3.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels C.
        kernel_size: `conv1` and spatial-attention kernel size, one of 3, 5, 7. Default: 3.
        stride: Stride of `conv1` and of the shortcut's max-pool. Default: 2.
        reduction: Bottleneck ratio of the channel attention (hidden width `C // reduction`). Default: 4.
        batch_first: If False input and output are (C, B, H, W). Default: True.

    Shape:
        - Input: (B, in_channels, H, W), or (in_channels, B, H, W) when `batch_first=False`.
        - Output: (B, out_channels, H', W') with `H' = (H - 1) // stride + 1` (same for W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 2,
        reduction: int = 4,
        batch_first: bool = True,
    ) -> None:
        who = type(self).__name__
        check_int(in_channels, "in_channels", who)
        check_int(out_channels, "out_channels", who)
        check_choice(kernel_size, cbam.KERNEL_SIZES, "kernel_size", who)
        check_int(stride, "stride", who)
        hidden = hidden_width(out_channels, reduction, who, channels_name="out_channels")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            reduction,
            rd_channels=hidden,
            batch_first=batch_first,
        )
        self.reduction = reduction

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  # the seed's forward(x)
        return super().forward(x)  # type: ignore[return-value]
