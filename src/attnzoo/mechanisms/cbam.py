"""CBAM: channel attention, spatial attention and the block (the residual block is in `cbam_res`).

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018,
https://arxiv.org/abs/1807.06521.

- channel gate: $\\sigma(\\mathrm{MLP}(\\mathrm{mean}_{hw} x) + \\mathrm{MLP}(\\max_{hw} x))$ per (B, C),
  a shared 1x1-conv MLP;
- spatial gate: $\\sigma(\\mathrm{conv}_k([\\mathrm{mean}_c y, \\max_c y]))$ per (B, H, W), on the
  channel-gated $y$.

Both gates are applied by the family's fused kernel (`attnzoo.kernels.gate`), so the block keeps no
channel-gated intermediate and no max-pool masks for backward. The argument names follow timm's
`CbamModule` (`rd_channels`, `rd_divisor`, `act_layer`, `gate_layer`), with `reduction` = 1 / timm's
`rd_ratio`, the shared `kernel_size` for timm's `spatial_kernel_size` and `bias` for its `mlp_bias`.
Deviation from the official code (kept from the seed): the spatial convolution has no BatchNorm
unless `norm_layer=nn.BatchNorm2d` (the official code and timm have one). The seed's classes
(`ChannelAttention(in_channels, ...)`, `SpatialAttention(kernel_size, ...)`, `CBAtten_Res`) are in
`attnzoo.mechanisms.cbam_seed` and `attnzoo.compat`. Options for other ports: the spatial
convolution's `bias`, the order of its two pooled maps (`pool_order`), any odd `kernel_size`, and the
block's `residual` (fightingcv's `CBAMBlock` has all four: see `attnzoo.convert.from_fightingcv`).
The official code (Jongchan/attention-module) is `CBAM(C, rd_channels=C // reduction, bias=True,
pool_order="max_mean", norm_layer=nn.BatchNorm2d)`: it floors `C / reduction` where attnzoo rounds
(40 / 16: 2 against 3), and its BatchNorm's momentum 0.01 changes only the running statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int
from attnzoo._registry import Example, register
from attnzoo.kernels.gate import GatePlan, fused_gate, to_batch_first
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms.se import from_batch_first, gate_plainly, make_act, rd_width

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM", "cbam_gate"]

PAPER = "CBAM: Convolutional Block Attention Module"
KERNEL_SIZES = (3, 5, 7)  # the seed's choices (cbam_seed, cbam_res)
POOL_ORDERS = ("mean_max", "max_mean")
Layer = Callable[..., nn.Module]


def _plan(ca: ChannelAttention | None, sa: SpatialAttention | None) -> GatePlan:
    return GatePlan(
        channel_fn=None if ca is None else ca.excite,
        channel_stats=("mean", "max"),
        spatial_fn=None if sa is None else sa.excite,
        spatial_stats=("mean", "max") if sa is None else sa.stats,
    )


def cbam_gate(
    x: Tensor, ca: ChannelAttention | None, sa: SpatialAttention | None, need_weights: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Channel then spatial gating of a (B, C, H, W) tensor: `(out, gate)` with `out == x * gate`.

    Without `need_weights` one fused pass and no gate; with it plain autograd and the gate,
    (B, C, 1, 1), (B, 1, H, W) or (B, C, H, W) as the gates present make it.
    """
    plan = _plan(ca, sa)
    if not need_weights:
        channel_params = () if ca is None else tuple(ca.parameters())
        spatial_params = () if sa is None else tuple(sa.parameters())
        return fused_gate(x, plan, channel_params, spatial_params), None
    out, cg, sg = gate_plainly(x, plan)
    channel = None if cg is None else cg[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
    if channel is None or sg is None:
        return out, channel if sg is None else sg
    return out, channel * sg  # (B, C, 1, 1) * (B, 1, H, W) -> (B, C, H, W)


def odd_kernel(kernel_size: int, who: str) -> int:
    """A spatial kernel size: an odd positive int (the output keeps H and W)."""
    if check_int(kernel_size, "kernel_size", who) % 2 == 0:
        raise ValueError(f"{who}: kernel_size must be odd, got {kernel_size}")
    return kernel_size


def finish(
    out: Tensor, gate: Tensor | None, batch_first: bool, need_weights: bool
) -> Tensor | tuple[Tensor, Tensor]:
    out = from_batch_first(out, batch_first)
    if not need_weights:
        return out
    return out, from_batch_first(cast(Tensor, gate), batch_first)


@register(
    "cbam_channel",
    family="gating",
    paper=PAPER,
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    seed_name="ChannelAttention",
)
class ChannelAttention(nn.Module):
    """CBAM channel attention: the input times a per-channel gate.

    $$
    x \\cdot \\sigma(\\mathrm{MLP}(\\mathrm{mean}_{hw} x) + \\mathrm{MLP}(\\max_{hw} x))
    $$

    timm's `ChannelAttn` with `reduction` for `rd_ratio` and `bias` for `mlp_bias`. State dict keys:
    `sharedMLP.0.weight` (rd, C, 1, 1) and `sharedMLP.2.weight` (C, rd, 1, 1) (the seed's), plus
    `.bias` with `bias=True`. The seed's `ChannelAttention(in_channels, reduction=4)` is
    `attnzoo.compat.ChannelAttention`.

    Args:
        channels: Number of input channels C (seed: `in_channels`).
        reduction: Bottleneck ratio; the hidden width is `C / reduction` rounded to a multiple of
            `rd_divisor`. Default: 16 (the paper's; the seed's is 4).
        rd_channels: Hidden width, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 1.
        bias: Biases in the shared MLP (timm's `mlp_bias`). Default: False.
        act_layer: Activation of the shared MLP. Default: `nn.ReLU`.
        gate_layer: Gate activation. Default: `nn.Sigmoid`.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input, rescaled per channel.
        - Weights (`need_weights=True`): the gate (B, C, 1, 1), so that `out == x * weights`.

    Example:
        ```python
        >>> ca = ChannelAttention(64)
        >>> ca(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        bias: bool = False,
        act_layer: Layer = nn.ReLU,
        gate_layer: Layer = nn.Sigmoid,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        hidden = rd_width(channels, reduction, rd_channels, rd_divisor, type(self).__name__)
        self.channels, self.rd_channels = channels, hidden
        self.batch_first = bool(batch_first)
        self.sharedMLP = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=bias, **dd),
            make_act(act_layer),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=bias, **dd),
        )
        self.gate = gate_layer()

    def excite(self, mean: Tensor, peak: Tensor) -> Tensor:
        """The gate (B, C) from the per-channel mean and max (B, C) over H, W.

        The shared MLP runs once on both statistics stacked, its 1x1 convolutions as matrix
        products (the same numbers; a 1x1 convolution of a 1x1 map is a linear map).
        """
        fc1 = cast(nn.Conv2d, self.sharedMLP[0])
        fc2 = cast(nn.Conv2d, self.sharedMLP[2])
        both = torch.cat([mean, peak], dim=0)  # (2B, C)
        w1 = fc1.weight.flatten(1)  # (rd, C, 1, 1) -> (rd, C)
        hidden = self.sharedMLP[1](F.linear(both, w1, fc1.bias))  # (2B, rd)
        avg, top = F.linear(hidden, fc2.weight.flatten(1), fc2.bias).chunk(2, dim=0)  # (2B, C) -> 2 x (B, C)
        gate = self.gate(avg + top)
        if capturing():  # map capture
            record(self, "channel", gate)
        return gate

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        out, gate = cbam_gate(x, self, None, need_weights)
        return finish(out, gate, self.batch_first, need_weights)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}, batch_first={self.batch_first}"


@register(
    "cbam_spatial",
    family="gating",
    paper=PAPER,
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "kernel_size": 3}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    seed_name="SpatialAttention",
)
class SpatialAttention(nn.Module):
    """CBAM spatial attention: $x \\cdot \\sigma(\\mathrm{conv}_k([\\mathrm{mean}_c x, \\max_c x]))$.

    timm's `SpatialAttn` with the width first (timm passes it to every attention layer). State dict
    keys: `conv.weight` (1, 2, k, k), no bias (the seed's; `conv.bias` with `bias=True`), and `bn.*`
    with a `norm_layer`. The seed's
    `SpatialAttention(kernel_size=3, batch_first=True)` is `attnzoo.compat.SpatialAttention`.

    Args:
        channels: Number of input channels C, checked on every input; None accepts any (the gate
            itself works for any C). Default: None.
        kernel_size: Size of the convolution over the two pooled maps, an odd int. Default: 7
            (the paper's; the seed's is 3).
        bias: Bias in the convolution (fightingcv's has one). Default: False.
        pool_order: Order of the pooled maps fed to the convolution: `"mean_max"` (the paper's,
            timm's) or `"max_mean"` (fightingcv's). Default: `"mean_max"`.
        norm_layer: Normalisation after the convolution, `norm_layer(1)`; `nn.BatchNorm2d` as in the
            official code and timm. Default: None.
        gate_layer: Gate activation. Default: `nn.Sigmoid`.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input, rescaled per position.
        - Weights (`need_weights=True`): the gate (B, 1, H, W), so that `out == x * weights`.

    Example:
        ```python
        >>> sa = SpatialAttention(64, kernel_size=7)
        >>> sa(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        ```
    """

    def __init__(
        self,
        channels: int | None = None,
        kernel_size: int = 7,
        *,
        bias: bool = False,
        pool_order: str = "mean_max",
        norm_layer: Layer | None = None,
        gate_layer: Layer = nn.Sigmoid,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        who = type(self).__name__
        if channels is not None:
            check_int(channels, "channels", who)
        odd_kernel(kernel_size, who)
        order = check_choice(pool_order, POOL_ORDERS, "pool_order", who)
        self.stats: tuple[str, ...] = tuple(order.split("_"))  # "max_mean" -> ("max", "mean")
        self.channels, self.kernel_size = channels, kernel_size
        self.batch_first = bool(batch_first)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=bias, **dd)
        self.bn: nn.Module = norm_layer(1, **dd) if norm_layer is not None else nn.Identity()
        self.gate = gate_layer()

    def excite(self, *stats: Tensor) -> Tensor:
        """The gate (B, 1, H, W) from the mean and max (B, 1, H, W) over channels, in `pool_order`."""
        gate = self.gate(self.bn(self.conv(torch.cat(stats, dim=1))))  # (B, 2, H, W) -> (B, 1, H, W)
        if capturing():  # map capture
            record(self, "spatial", gate[:, 0], grid=gate.shape[2:])
        return gate

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        sizes = {} if self.channels is None else {"C": self.channels}
        x = to_batch_first(x, self.batch_first, type(self).__name__, **sizes)
        out, gate = cbam_gate(x, None, self, need_weights)
        return finish(out, gate, self.batch_first, need_weights)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, batch_first={self.batch_first}"


@register(
    "cbam",
    family="gating",
    paper=PAPER,
    year=2018,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "reduction": 2, "kernel_size": 3}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)
    ),
)
class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    Both gates run in one fused pass (no channel-gated intermediate is kept for backward). timm's
    `CbamModule` with `reduction` for `rd_ratio`, `kernel_size` for `spatial_kernel_size`, `bias` for
    `mlp_bias`, and the spatial BatchNorm optional (`norm_layer`), so `timm.create_model(...,
    block_args=dict(attn_layer=CBAM))` takes the class as it is.

    Args:
        channels: Number of input channels C.
        reduction: Bottleneck ratio of the channel MLP (hidden width `C / reduction`, rounded to a
            multiple of `rd_divisor`). Default: 16.
        kernel_size: Spatial convolution size, an odd int. Default: 7 (the paper's).
        rd_channels: Hidden width of the channel MLP, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 1.
        bias: Biases in the channel MLP (timm's `mlp_bias`). Default: False.
        act_layer: Activation of the channel MLP. Default: `nn.ReLU`.
        norm_layer: Normalisation after the spatial convolution; `nn.BatchNorm2d` as the official code
            and timm. Default: None.
        gate_layer: Activation of both gates. Default: `nn.Sigmoid`.
        spatial_bias: Bias in the spatial convolution (fightingcv's has one). Default: False.
        pool_order: Order of the spatial convolution's pooled maps, `"mean_max"` or `"max_mean"`
            (fightingcv's). Default: `"mean_max"`.
        residual: Return `x * gate + x` (fightingcv's `CBAMBlock`) instead of `x * gate`.
            Default: False.
        batch_first: If False the input is (C, B, H, W). Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input.
        - Weights (`need_weights=True`): the product of both gates (B, C, H, W), so that
          `out == x * weights` (`x * weights + x` with `residual`; as large as the input: ask for it
          only to look at it).

    Submodules `ca` (`ChannelAttention`) and `sa` (`SpatialAttention`) hold the weights, under the
    same keys as in the seed's `CBAtten_Res`.

    Example:
        ```python
        >>> cbam = CBAM(64)
        >>> cbam(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        kernel_size: int = 7,
        *,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        bias: bool = False,
        act_layer: Layer = nn.ReLU,
        norm_layer: Layer | None = None,
        gate_layer: Layer = nn.Sigmoid,
        spatial_bias: bool = False,
        pool_order: str = "mean_max",
        residual: bool = False,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = channels
        self.batch_first, self.residual = bool(batch_first), bool(residual)
        self.ca = ChannelAttention(
            channels,
            reduction,
            rd_channels=rd_channels,
            rd_divisor=rd_divisor,
            bias=bias,
            act_layer=act_layer,
            gate_layer=gate_layer,
            **dd,
        )
        self.sa = SpatialAttention(
            channels,
            kernel_size,
            bias=spatial_bias,
            pool_order=pool_order,
            norm_layer=norm_layer,
            gate_layer=gate_layer,
            **dd,
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, residual={self.residual}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        out, gate = cbam_gate(x, self.ca, self.sa, need_weights)
        if self.residual:
            out = out + x
        return finish(out, gate, self.batch_first, need_weights)
