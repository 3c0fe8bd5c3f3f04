"""CBAM: channel attention, spatial attention, the block, and the seed's residual block.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018,
https://arxiv.org/abs/1807.06521.

- channel gate: ``sigmoid(MLP(mean_hw x) + MLP(max_hw x))`` per (B, C), a shared 1x1-conv MLP;
- spatial gate: ``sigmoid(conv_k([mean_c y, max_c y]))`` per (B, H, W), on the channel-gated ``y``.

Both gates are applied by the family's fused kernel (:mod:`attnzoo.kernels.gate`), so the block keeps no
channel-gated intermediate and no max-pool masks for backward. Deviations from the paper, kept
from the seed: the spatial convolution has no BatchNorm unless ``norm=True`` (the official code and
timm's ``CbamModule`` have one), and the seed's default kernel is 3 (the paper's is 7).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int
from attnzoo._registry import Example, register
from attnzoo.kernels.gate import GatePlan, fused_gate, to_batch_first
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms.se import hidden_width

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM", "CBAtten_Res"]

_PAPER = "CBAM: Convolutional Block Attention Module"
KERNEL_SIZES = (3, 5, 7)


def _cbam(x: Tensor, ca: ChannelAttention | None, sa: SpatialAttention | None) -> Tensor:
    """Channel then spatial gating of a (B, C, H, W) tensor in one fused pass."""
    plan = GatePlan(
        channel_fn=None if ca is None else ca.gate,
        channel_stats=("mean", "max"),
        spatial_fn=None if sa is None else sa.gate,
        spatial_stats=("mean", "max"),
    )
    channel_params = () if ca is None else tuple(ca.parameters())
    spatial_params = () if sa is None else tuple(sa.parameters())
    return fused_gate(x, plan, channel_params, spatial_params)


@register(
    "cbam_channel",
    family="gating",
    paper=_PAPER,
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"in_channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    seed_name="ChannelAttention",
)
class ChannelAttention(nn.Module):
    """CBAM channel attention: ``x * sigmoid(MLP(mean_hw x) + MLP(max_hw x))``.

    The seed's class, with its constructor and state_dict keys (``sharedMLP.0.weight`` (C/r, C, 1, 1),
    ``sharedMLP.2.weight`` (C, C/r, 1, 1)); outputs equal the seed's. Differences: a ``ValueError``
    when ``in_channels // reduction`` is 0, input checks, and the fused gate (same values).

    Args:
        in_channels: Number of input channels C.
        reduction: Bottleneck ratio of the shared MLP; the hidden width is ``C // reduction``. Default: 4.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: same shape as the input, rescaled per channel.
    """

    def __init__(self, in_channels: int, reduction: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        hidden = hidden_width(in_channels, reduction, type(self).__name__, channels_name="in_channels")
        self.in_channels = in_channels
        self.batch_first = bool(batch_first)
        self.sharedMLP = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, kernel_size=1, bias=False),
        )

    def gate(self, mean: Tensor, peak: Tensor) -> Tensor:
        """The gate (B, C) from the per-channel mean and max (B, C) over H, W.

        The shared MLP runs once on both statistics stacked, its 1x1 convolutions as matrix
        products (the same numbers; a 1x1 convolution of a 1x1 map is a linear map).
        """
        fc1 = cast(nn.Conv2d, self.sharedMLP[0]).weight  # (C/r, C, 1, 1)
        fc2 = cast(nn.Conv2d, self.sharedMLP[2]).weight  # (C, C/r, 1, 1)
        both = torch.cat([mean, peak], dim=0)  # (2B, C)
        hidden = torch.relu(F.linear(both, fc1.flatten(1)))  # (C/r, C, 1, 1) -> (C/r, C)
        avg, top = F.linear(hidden, fc2.flatten(1)).chunk(2, dim=0)  # (2B, C) -> 2 x (B, C)
        gate = torch.sigmoid(avg + top)
        if not torch.jit.is_scripting():
            if capturing():  # map capture
                record(self, "channel", gate)
        return gate

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.in_channels)
        out = _cbam(x, self, None)
        return out if self.batch_first else out.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)


@register(
    "cbam_spatial",
    family="gating",
    paper=_PAPER,
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"kernel_size": 3, "channels": 8}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    seed_name="SpatialAttention",
    for_input=lambda geo: {"channels": geo.channels},
)
class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``x * sigmoid(conv_k([mean_c x, max_c x]))``.

    The seed's class, with its constructor and state_dict key (``conv.weight`` (1, 2, k, k), no bias);
    outputs equal the seed's. Differences: ``kernel_size`` outside (3, 5, 7) raises ``ValueError``
    (the seed asserts), and two keyword-only options.

    Args:
        kernel_size: Size of the convolution over the two pooled maps, one of 3, 5, 7. Default: 3.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.
        channels: If given, inputs must have this many channels (the gate itself works for any C).
            Default: None.
        norm: Add a ``BatchNorm2d(1)`` after the convolution (key ``bn``), as in the official CBAM
            code and timm's ``SpatialAttn``. Default: False.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: same shape as the input, rescaled per position.
    """

    def __init__(
        self,
        kernel_size: int = 3,
        batch_first: bool = True,
        *,
        channels: int | None = None,
        norm: bool = False,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_choice(kernel_size, KERNEL_SIZES, "kernel_size", who)
        if channels is not None:
            check_int(channels, "channels", who)
        self.kernel_size = kernel_size
        self.channels = channels
        self.batch_first = bool(batch_first)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(1) if norm else nn.Identity()

    def gate(self, mean: Tensor, peak: Tensor) -> Tensor:
        """The gate (B, 1, H, W) from the mean and max (B, 1, H, W) over channels."""
        gate = torch.sigmoid(
            self.bn(self.conv(torch.cat([mean, peak], dim=1)))
        )  # (B, 2, H, W) -> (B, 1, H, W)
        if not torch.jit.is_scripting():
            if capturing():  # map capture
                record(self, "spatial", gate[:, 0], grid=gate.shape[2:])
        return gate

    def forward(self, x: Tensor) -> Tensor:
        sizes = {} if self.channels is None else {"C": self.channels}
        x = to_batch_first(x, self.batch_first, type(self).__name__, **sizes)
        out = _cbam(x, None, self)
        return out if self.batch_first else out.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)


@register(
    "cbam",
    family="gating",
    paper=_PAPER,
    year=2018,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "reduction": 2, "kernel_size": 3}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)
    ),
)
class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    Both gates run in one fused pass (no channel-gated intermediate is kept for backward).

    Args:
        channels: Number of input channels C.
        reduction: Bottleneck ratio of the channel MLP (hidden width ``C // reduction``). Default: 16.
        kernel_size: Spatial convolution size, one of 3, 5, 7. Default: 7 (the paper's).
        spatial_norm: BatchNorm after the spatial convolution, as the official code. Default: False.
        batch_first: If False the input is (C, B, H, W). Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: same shape as the input.

    Submodules ``ca`` (:class:`ChannelAttention`) and ``sa`` (:class:`SpatialAttention`) hold the
    weights, under the same keys as in the seed's ``CBAtten_Res``.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        kernel_size: int = 7,
        *,
        spatial_norm: bool = False,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.batch_first = bool(batch_first)
        self.ca = ChannelAttention(channels, reduction)
        self.sa = SpatialAttention(kernel_size, norm=spatial_norm)

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        out = _cbam(x, self.ca, self.sa)
        return out if self.batch_first else out.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)


@register(
    "cbam_res",
    family="gating",
    paper=_PAPER,
    year=2018,
    layout="NCHW",
    example=Example(
        kwargs={"in_channels": 4, "out_channels": 8, "reduction": 2, "stride": 2},
        inputs=((2, 4, 6, 5),),
        output=(2, 8, 3, 3),
    ),
    seed_name="CBAtten_Res",
)
class CBAtten_Res(nn.Module):  # noqa: N801 (the seed's name)
    """The seed's residual CBAM block: conv-BN-ReLU, channel and spatial attention, plus a
    max-pool + 1x1-conv shortcut, then ReLU.

    ``out = relu(SA(CA(relu(bn1(conv1 x)))) + conv_res(max_pool x))``. The seed's constructor and
    state_dict keys (``conv1``, ``bn1``, ``ca.sharedMLP.*``, ``sa.conv``, ``conv_res``); outputs equal
    the seed's where the seed runs. Fixed seed bugs:

    - ``batch_first=False`` permuted twice (the block, then again inside ``ca``/``sa``, which were built
      with ``batch_first=False`` too); here only the block permutes, so (C, B, H, W) inputs work.
    - The shortcut's ``MaxPool2d(3, stride, padding=kernel_size // 2)`` fails for kernel_size 5 and 7
      (padding larger than half the pooling window); here its padding is 1, which gives the same
      output size as ``conv1`` for every odd kernel size, and the same values for kernel_size 3.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels C.
        kernel_size: ``conv1`` and spatial-attention kernel size, one of 3, 5, 7. Default: 3.
        stride: Stride of ``conv1`` and of the shortcut's max-pool. Default: 2.
        reduction: Bottleneck ratio of the channel attention. Default: 4.
        batch_first: If False input and output are (C, B, H, W). Default: True.

    Shape:
        - Input: (B, in_channels, H, W), or (in_channels, B, H, W) when ``batch_first=False``.
        - Output: (B, out_channels, H', W') with ``H' = (H - 1) // stride + 1`` (same for W).
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
        super().__init__()
        who = type(self).__name__
        check_int(in_channels, "in_channels", who)
        check_int(out_channels, "out_channels", who)
        check_choice(kernel_size, KERNEL_SIZES, "kernel_size", who)
        check_int(stride, "stride", who)
        hidden_width(out_channels, reduction, who, channels_name="out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.batch_first = bool(batch_first)
        self.reduction = reduction
        self.padding = kernel_size // 2
        self.max_pool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.conv_res = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=True)
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=self.padding, bias=True
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.ca = ChannelAttention(out_channels, reduction=reduction)
        self.sa = SpatialAttention(kernel_size=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.in_channels)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, C_out, H', W')
        out = _cbam(out, self.ca, self.sa)
        out = self.relu(out.add_(self.conv_res(self.max_pool(x))))  # shortcut (B, C_out, H', W')
        return out if self.batch_first else out.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)
