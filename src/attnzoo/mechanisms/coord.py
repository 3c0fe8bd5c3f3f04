"""Coordinate attention and the strip-pooling gates built like it: coord, scoord, ela, strip.

- Hou, Zhou, Feng, "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021,
  https://arxiv.org/abs/2103.02907 (``coord``; ``scoord`` is timm's simplified variant);
- Xu, Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks", 2024,
  https://arxiv.org/abs/2403.01123 (``ela``);
- ``strip``: timm's minimal strip attention (strip pooling, optional depth-wise convolutions).

Every gate pools the map along W (one value per row) and along H (one per column), turns the two
strips into gates ``a_h`` (B, C, H, 1) and ``a_w`` (B, C, 1, W) (one channel wide with coordinate
attention's ``gate_channels=1``), and rescales the input with
``a_h * a_w`` (or ``gate(a_h + a_w)``). The numbers and parameter layout are timm's
(``timm.layers.coord_attn``); ``attnzoo.convert.from_timm`` maps its modules exactly, and
``from_fightingcv`` maps fightingcv's ``CoordAtt`` (biases, ``max(8, C // 32)`` hidden channels).
Deviations: the official ELA shares one convolution and one 16-group GroupNorm between the two
axes and has no activation before the sigmoid; timm (and this file) has one convolution and one
single-group GroupNorm per axis and a SiLU. Even kernel sizes are rejected (timm builds them, then
fails at the first forward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.strips import strip_means
from attnzoo.mechanisms._strip_gates import finish, finish_sum
from attnzoo.mechanisms._widths import check_width, round_width

__all__ = [
    "GroupNorm1", "CoordAttention", "SimpleCoordAttention", "EfficientLocalAttention", "StripAttention"
]

_COORD = "Coordinate Attention for Efficient Mobile Network Design"


class GroupNorm1(nn.GroupNorm):
    """``nn.GroupNorm`` with one group, built like the other norms: ``GroupNorm1(num_channels)``."""

    def __init__(
        self, num_channels: int, eps: float = 1e-5, affine: bool = True, *, device=None, dtype=None
    ) -> None:
        super().__init__(1, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)


def _odd_kernel(kernel_size: int, who: str) -> int:
    check_int(kernel_size, "kernel_size", who)
    if kernel_size % 2 == 0:
        raise ValueError(f"{who}: kernel_size must be odd (the strips keep their length), got {kernel_size}")
    return kernel_size


def _strip_convs(channels: int, kernel_size: int, bias: bool, dd: dict) -> tuple[nn.Conv2d, nn.Conv2d]:
    """Depth-wise (k, 1) and (1, k) convolutions along the H and W strips, length-preserving."""
    pad, c = kernel_size // 2, channels
    conv_h = nn.Conv2d(c, c, (kernel_size, 1), padding=(pad, 0), groups=c, bias=bias, **dd)  # along H
    conv_w = nn.Conv2d(c, c, (1, kernel_size), padding=(0, pad), groups=c, bias=bias, **dd)  # along W
    return conv_h, conv_w


@register(
    "coord",
    family="gating",
    paper=_COORD,
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 7),), output=(2, 8, 5, 7)),
    aliases=("coord_attention", "coordinate_attention"),
)
class CoordAttention(nn.Module):
    """Coordinate attention (Hou et al., 2021): gates along H and along W from strip-pooled features.

    $$
    z^h = \\mathrm{mean}_w\\,x,\\quad z^w = \\mathrm{mean}_h\\,x,\\quad
    [f^h, f^w] = \\delta(\\mathrm{BN}(W_1 [z^h, z^w])),\\quad
    y = x \\odot \\sigma(W_h f^h) \\odot \\sigma(W_w f^w)
    $$

    The shared 1x1 convolution $W_1$ runs once on the H + W pooled positions of each channel.

    Args:
        channels: Number of input channels C.
        reduction: Hidden width ``C / reduction`` rounded to a multiple of ``rd_divisor`` (at least
            ``rd_divisor``). Default: 24 (timm's ``rd_ratio=1/16`` times ``se_factor=2/3``).
        rd_channels: Hidden width, overriding ``reduction``. Default: None.
        rd_divisor: Rounding of the hidden width. Default: 8.
        bias: Biases on the three convolutions (the paper's code has them). Default: False.
        act_layer: Activation after the norm. Default: ``nn.Hardswish`` (the paper's h-swish).
        norm_layer: Norm on the hidden features, built ``norm_layer(rd_channels)``; None for none.
            Default: ``nn.BatchNorm2d``.
        gate_layer: Gate activation class. Default: ``nn.Sigmoid``.
        additive: Gate the sum, ``gate(a_h + a_w)``, instead of the product ``gate(a_h) gate(a_w)``.
            Default: False.
        has_skip: Add the input to the output (``x + y``). Default: False.
        gate_channels: Width of the two gates: C (one gate per channel), or 1 (one gate shared by
            every channel, what the paper's ``CoordAtt(inp, oup=1)`` computes by broadcasting).
            Default: None (C).

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C, H, W); with ``need_weights=True`` also the gate (B, C, H, W).

    Example:
        ```python
        >>> ca = CoordAttention(64)
        >>> ca(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 24.0,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        bias: bool = False,
        act_layer: type[nn.Module] = nn.Hardswish,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        additive: bool = False,
        has_skip: bool = False,
        *,
        gate_channels: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        gates = channels if gate_channels is None else check_int(gate_channels, "gate_channels", who)
        if gates not in (channels, 1):
            raise ValueError(f"{who}: gate_channels must be channels={channels} or 1, got {gates}")
        check_float(reduction, "reduction", who)
        if not reduction > 0:
            raise ValueError(f"{who}: reduction must be > 0, got {reduction}")
        check_int(rd_divisor, "rd_divisor", who)
        if rd_channels is None:
            check_width(channels / reduction, "reduction", reduction, who)
            rd_channels = round_width(channels / reduction, rd_divisor)
        check_int(rd_channels, "rd_channels", who)
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.rd_channels = rd_channels
        self.additive = bool(additive)
        self.has_skip = bool(has_skip)
        # timm's names and layout (conv1, bn1, conv_h, conv_w), so its state_dict loads unchanged.
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.bn1 = norm_layer(rd_channels, **dd) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.conv_h = nn.Conv2d(rd_channels, gates, 1, bias=bias, **dd)
        self.conv_w = nn.Conv2d(rd_channels, gates, 1, bias=bias, **dd)
        self.gate = gate_layer()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        H, W = dims["H"], dims["W"]
        x_h, x_w = strip_means(x)  # (B, C, H, 1), (B, C, 1, W)
        x_w = x_w.transpose(2, 3)  # (B, C, 1, W) -> (B, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))  # (B, rd, H + W, 1)
        y_h, y_w = y.split([H, W], dim=2)  # (B, rd, H, 1), (B, rd, W, 1)
        a_h = self.conv_h(y_h)  # (B, C or 1, H, 1)
        a_w = self.conv_w(y_w).transpose(2, 3)  # (B, C or 1, W, 1) -> (B, C or 1, 1, W)
        if self.additive:
            return finish_sum(self, x, a_h, a_w, self.has_skip, need_weights)
        return finish(self, x, (self.gate(a_w), self.gate(a_h)), self.has_skip, need_weights)

    def extra_repr(self) -> str:
        width = self.conv_h.out_channels
        gates = "" if width == self.channels else f", gate_channels={width}"
        return f"channels={self.channels}, rd_channels={self.rd_channels}, additive={self.additive}{gates}"


@register(
    "scoord",
    family="gating",
    paper=_COORD,
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 7),), output=(2, 8, 5, 7)),
    aliases=("simple_coord",),
)
class SimpleCoordAttention(CoordAttention):
    """timm's simplified coordinate attention: no norm, SiLU, biases, and one gate of the sum.

    $$
    f^h = \\mathrm{SiLU}(W_1 z^h + b_1),\\quad f^w = \\mathrm{SiLU}(W_1 z^w + b_1),\\quad
    y = x \\odot \\sigma\\big(W_h f^h + W_w f^w + b_h + b_w\\big)
    $$

    `CoordAttention` with other defaults; timm's linear layers are its 1x1 convolutions.

    Args:
        channels: Number of input channels C.
        reduction: Hidden width ``C / reduction``, rounded as in `CoordAttention`. Default: 6
            (timm's ``rd_ratio=1/4`` times ``se_factor=2/3``).
        rd_channels: Hidden width, overriding ``reduction``. Default: None.
        rd_divisor: Rounding of the hidden width. Default: 8.
        bias: Biases on the three projections. Default: True.
        act_layer: Activation of the hidden features. Default: ``nn.SiLU``.
        norm_layer: Norm on the hidden features; None for none. Default: None.
        gate_layer: Gate activation class. Default: ``nn.Sigmoid``.
        additive: Gate the sum of the two strips' logits. Default: True.
        has_skip: Add the input to the output. Default: False.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C, H, W); with ``need_weights=True`` also the gate (B, C, H, W).

    Example:
        ```python
        >>> SimpleCoordAttention(32)(torch.randn(2, 32, 5, 6)).shape
        torch.Size([2, 32, 5, 6])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 6.0,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        bias: bool = True,
        act_layer: type[nn.Module] = nn.SiLU,
        norm_layer: type[nn.Module] | None = None,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        additive: bool = True,
        has_skip: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            channels, reduction, rd_channels, rd_divisor, bias, act_layer, norm_layer, gate_layer,
            additive, has_skip, device=device, dtype=dtype,
        )


@register(
    "ela",
    family="gating",
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
    year=2024,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "kernel_size": 3}, inputs=((2, 8, 5, 7),), output=(2, 8, 5, 7)),
    aliases=("efficient_local_attention",),
)
class EfficientLocalAttention(nn.Module):
    """Efficient local attention (Xu and Wan, 2024), as timm builds it: no channel reduction,
    a depth-wise 1-D convolution along each strip.

    $$
    a^h = \\sigma(\\mathrm{SiLU}(\\mathrm{GN}_h(F_h * z^h))),\\quad
    a^w = \\sigma(\\mathrm{SiLU}(\\mathrm{GN}_w(F_w * z^w))),\\quad y = x \\odot a^h \\odot a^w
    $$

    Args:
        channels: Number of input channels C.
        kernel_size: Length of the depth-wise convolutions along the strips; odd. Default: 7.
        bias: Biases on the convolutions. Default: False.
        act_layer: Activation after the norm (``nn.Identity`` gives the paper's). Default: ``nn.SiLU``.
        norm_layer: Norm of each strip, built ``norm_layer(C)``; None for none. Default:
            `GroupNorm1` (timm's; the paper's code uses 16 groups).
        gate_layer: Gate activation class. Default: ``nn.Sigmoid``.
        has_skip: Add the input to the output. Default: False.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C, H, W); with ``need_weights=True`` also the gate (B, C, H, W).

    Example:
        ```python
        >>> EfficientLocalAttention(16)(torch.randn(2, 16, 9, 5)).shape
        torch.Size([2, 16, 9, 5])

        ```
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        bias: bool = False,
        act_layer: type[nn.Module] = nn.SiLU,
        norm_layer: type[nn.Module] | None = GroupNorm1,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        has_skip: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        _odd_kernel(kernel_size, who)
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.kernel_size = kernel_size
        self.has_skip = bool(has_skip)
        self.conv_h, self.conv_w = _strip_convs(channels, kernel_size, bias, dd)
        self.norm_h = norm_layer(channels, **dd) if norm_layer is not None else nn.Identity()
        self.norm_w = norm_layer(channels, **dd) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.gate = gate_layer()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        x_h, x_w = strip_means(x)  # (B, C, H, 1), (B, C, 1, W)
        a_h = self.gate(self.act(self.norm_h(self.conv_h(x_h))))  # (B, C, H, 1)
        a_w = self.gate(self.act(self.norm_w(self.conv_w(x_w))))  # (B, C, 1, W)
        return finish(self, x, (a_h, a_w), self.has_skip, need_weights)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


@register(
    "strip",
    family="gating",
    paper="timm's strip attention (strip pooling)",
    year=2025,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 7),), output=(2, 8, 5, 7)),
    aliases=("strip_attention",),
)
class StripAttention(nn.Module):
    """Strip attention (timm): one gate of the sum of the two strip means, optionally refined by a
    depth-wise 1-D convolution along each strip.

    $$
    y = x \\odot \\sigma\\big(F_h * \\mathrm{mean}_w\\,x + F_w * \\mathrm{mean}_h\\,x\\big)
    $$

    Args:
        channels: Number of input channels C.
        kernel_size: Length of the depth-wise convolutions; odd. Default: 3.
        use_conv: Refine the strips with the convolutions (else the gate is parameter-free).
            Default: True.
        bias: Biases on the convolutions. Default: False.
        gate_layer: Gate activation class. Default: ``nn.Sigmoid``.
        has_skip: Add the input to the output. Default: False.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C, H, W); with ``need_weights=True`` also the gate (B, C, H, W).

    Example:
        ```python
        >>> StripAttention(16)(torch.randn(2, 16, 9, 5)).shape
        torch.Size([2, 16, 9, 5])

        ```
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        use_conv: bool = True,
        bias: bool = False,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        has_skip: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        _odd_kernel(kernel_size, who)
        self.channels = channels
        self.kernel_size = kernel_size
        self.use_conv = bool(use_conv)
        self.has_skip = bool(has_skip)
        self.conv_h: nn.Module = nn.Identity()
        self.conv_w: nn.Module = nn.Identity()
        if use_conv:
            self.conv_h, self.conv_w = _strip_convs(
                channels, kernel_size, bias, {"device": device, "dtype": dtype}
            )
        self.gate = gate_layer()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        x_h, x_w = strip_means(x)  # (B, C, H, 1), (B, C, 1, W)
        return finish_sum(self, x, self.conv_h(x_h), self.conv_w(x_w), self.has_skip, need_weights)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, use_conv={self.use_conv}"
