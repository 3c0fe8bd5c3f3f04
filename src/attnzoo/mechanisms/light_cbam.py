"""Light CBAM: CBAM with each gate's two pooled statistics averaged instead of processed twice.

timm's experimental ``LightCbamModule`` (Ross Wightman), after Woo, Park, Lee, Kweon, "CBAM:
Convolutional Block Attention Module", ECCV 2018, https://arxiv.org/abs/1807.06521.

- channel gate: ``sigmoid(MLP((mean_hw x + max_hw x) / 2))`` per (B, C): one MLP pass, not two;
- spatial gate: ``sigmoid(BN(conv_k((mean_c y + max_c y) / 2)))`` per (B, H, W) on the channel-gated
  ``y``: a one-channel map, not two.

timm's state_dict keys (``channel.fc1``, ``channel.fc2``, ``spatial.conv.conv``, ``spatial.conv.bn``)
and numbers. Deviations: ``gate_layer`` is applied to both gates (timm's light modules ignore it and
always use the sigmoid; a converted module keeps timm's gates, and a channel gate with weights,
``gate_layer="prelu"``, becomes a sigmoid that holds them, so timm's checkpoints load); an even
``kernel_size`` is refused (timm's "same" padding then shrinks the map by one row and column, and the
gate no longer fits).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.gate import GatePlan, fused_gate
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_layer, hidden_channels
from attnzoo.mechanisms.se import blend_stats, gate_plainly

__all__ = ["LightCBAM"]


class _LightChannel(nn.Module):
    """The channel gate's MLP under timm's keys: ``fc2(act(fc1(p)))`` with 1x1 convolutions."""

    def __init__(
        self, channels: int, hidden: int, bias: bool, act_layer: type[nn.Module],
        gate_layer: type[nn.Module], factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias, **factory)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias, **factory)
        self.gate = gate_layer()

    def forward(self, pooled: Tensor) -> Tensor:
        """The gate `(B, C)` from the pooled statistic `(B, C)`."""
        return self.gate(self.fc2(self.act(self.fc1(pooled[:, :, None, None]))).flatten(1))  # (B, C)


class _ConvNorm(nn.Module):
    """A bias-free convolution and a BatchNorm, under timm's ``ConvNormAct`` keys ``conv``, ``bn``."""

    def __init__(self, kernel_size: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2, bias=False, **factory)
        self.bn = nn.BatchNorm2d(1, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class _LightSpatial(nn.Module):
    """The spatial gate: ``gate(conv_bn(p))`` on the pooled one-channel map."""

    def __init__(self, kernel_size: int, gate_layer: type[nn.Module], factory: dict[str, Any]) -> None:
        super().__init__()
        self.conv = _ConvNorm(kernel_size, factory)
        self.gate = gate_layer()

    def forward(self, pooled: Tensor) -> Tensor:
        """The gate `(B, 1, H, W)` from the pooled map `(B, 1, H, W)`."""
        return self.gate(self.conv(pooled))


@register(
    "lcbam",
    family="gating",
    paper="CBAM: Convolutional Block Attention Module",
    year=2018,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "reduction": 2, "kernel_size": 3}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)
    ),
    aliases=("light_cbam", "LightCbamModule"),
)
class LightCBAM(nn.Module):
    """Light CBAM (timm's `LightCbamModule`): channel then spatial gating, each on the average of
    the mean- and max-pooled statistics.

    $$
    g^{c} = \\sigma\\Big(W_2\\,\\phi\\big(W_1 \\tfrac{1}{2}(\\mathrm{mean}_{hw} x + \\max_{hw} x)\\big)\\Big),
    \\qquad y = x \\odot g^{c}
    $$

    $$
    g^{s} = \\sigma\\Big(\\mathrm{BN}\\big(w_k * \\tfrac{1}{2}(\\mathrm{mean}_c\\, y + \\max_c y)\\big)\\Big),
    \\qquad z = y \\odot g^{s}
    $$

    Args:
        channels: Number of input channels C.
        reduction: The MLP's hidden width is `C / reduction` rounded to a multiple of `rd_divisor`.
            Default: 16 (timm's `rd_ratio=1/16`).
        rd_channels: Hidden width, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 1.
        kernel_size: Odd side of the spatial convolution (timm's `spatial_kernel_size`). Default: 7.
        bias: Give the MLP's convolutions biases (timm's `mlp_bias`). Default: False.
        act_layer: Activation class of the MLP. Default: `nn.ReLU`.
        gate_layer: Gate activation class of both gates. Default: `nn.Sigmoid`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the combined gate $g^c_c\\, g^s_{h,w}$ `(B, C, H, W)`, so
          that `out = x * weights` (`attnzoo.capture_maps` records the two gates separately).

    Example:
        ```python
        >>> lcbam = LightCBAM(64)
        >>> lcbam(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        kernel_size: int = 7,
        bias: bool = False,
        *,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        hidden = hidden_channels(channels, reduction, rd_channels, rd_divisor, who)
        check_int(kernel_size, "kernel_size", who)
        if kernel_size % 2 == 0:
            raise ValueError(f"{who}: kernel_size must be odd (a centred window), got {kernel_size}")
        check_layer(act_layer, "act_layer", who)
        check_layer(gate_layer, "gate_layer", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels, self.kernel_size = channels, kernel_size
        self.channel = _LightChannel(channels, hidden, bias, act_layer, gate_layer, factory)
        self.spatial = _LightSpatial(kernel_size, gate_layer, factory)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gate `x` `(B, C, H, W)` per channel, then per position; with `need_weights`, also return
        the combined gate `(B, C, H, W)`."""
        check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        plan = GatePlan(self._channel_gate, ("mean", "max"), self._spatial_gate, ("mean", "max"))
        if not need_weights:  # the lean gating kernel (CBAM's): one full-size temporary in backward
            return fused_gate(x, plan, tuple(self.channel.parameters()), tuple(self.spatial.parameters()))
        out, channel_gate, spatial_gate = gate_plainly(x, plan)  # (B, C, H, W), (B, C), (B, 1, H, W)
        return out, cast(Tensor, channel_gate)[:, :, None, None] * cast(Tensor, spatial_gate)

    def _channel_gate(self, mean: Tensor, peak: Tensor) -> Tensor:
        """`(B, C)` from the channel means and maxima over H, W, each `(B, C)`."""
        gate = self.channel(blend_stats(mean, peak))
        if capturing():  # map capture
            record(self, "channel", gate)
        return gate

    def _spatial_gate(self, mean: Tensor, peak: Tensor) -> Tensor:
        """`(B, 1, H, W)` from the means and maxima over C of the channel-gated map, each `(B, 1, H, W)`."""
        gate = self.spatial(blend_stats(mean, peak))
        if capturing():  # map capture
            record(self, "spatial", gate[:, 0], grid=gate.shape[2:])
        return gate

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
