"""Gather-Excite: gather context over a spatial extent, then redistribute it as a gate.

Hu, Shen, Albanie, Sun, Vedaldi, "Gather-Excite: Exploiting Feature Context in Convolutional Neural
Networks", NeurIPS 2018, https://arxiv.org/abs/1810.12348.

``out = x * sigmoid(interp(mlp(gather_e(x))))``: the gather pools each channel over a window of
``extent`` (0 = the whole map) with an average pool (GE-theta-minus) or strided depth-wise
convolutions (GE-theta, ``extra_params``); an optional 1x1-convolution MLP (GE-theta-plus, timm's
default) transforms it; nearest-neighbour interpolation brings it back to H x W. Follows timm's
``GatherExcite`` (its options, state_dict keys and numbers), whose constructor fails in timm 1.0.31
for every configuration with parameters (``*dd`` passed positionally). Deviations: with
``extent=0, extra_params=True`` the depth-wise convolution spans the whole ``feat_size`` map
without padding, as in the paper (timm pads it to "same", which gathers a local context per
position; a converted timm module keeps timm's padding); ``extent`` must be a power of two with
``extra_params`` (timm uses ``int(log2(extent))`` convolutions for any even extent).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register
from attnzoo.kernels.gate import GatePlan, fused_gate
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_layer, hidden_channels
from attnzoo.mechanisms.ese import pooled_mean_max
from attnzoo.mechanisms.se import blend_stats

__all__ = ["GatherExcite"]


class _PointwiseMlp(nn.Module):
    """``fc2(act(fc1(x)))`` with 1x1 convolutions on maps (timm's ``ConvMlp`` keys ``fc1``, ``fc2``)."""

    def __init__(
        self, channels: int, hidden: int, act_layer: type[nn.Module], factory: dict[str, Any]
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, **factory)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, 1, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@register(
    "ge",
    family="gating",
    paper="Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks",
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("gather_excite",),
)
class GatherExcite(nn.Module):
    """Gather-Excite (Hu et al., 2018), as timm's `GatherExcite` (`create_attn("ge")`).

    $$
    \\xi = \\mathrm{gather}_e(x),\\qquad
    g = \\sigma\\big(\\mathrm{interp}_{H \\times W}(\\mathrm{MLP}(\\xi))\\big),\\qquad y = x \\odot g
    $$

    The gather is the mean over the map (`extent=0`), an average pool of size `2e - 1` and stride
    `e` (padding `e - 1`, padded cells not counted), or with `extra_params` depth-wise convolutions:
    one spanning the whole `feat_size` map (`extent=0`) or `log2(e)` 3x3 convolutions of stride 2
    (each followed by `norm_layer`, with `act_layer` between them).

    Args:
        channels: Number of input channels C.
        extent: Gather window: 0 for the whole map, else an even stride e (a power of two with
            `extra_params`). Default: 0.
        extra_params: Gather with depth-wise convolutions instead of pooling. Default: False.
        use_mlp: Transform the gathered context with `fc2(act(fc1(.)))` 1x1 convolutions. Default: True.
        reduction: The MLP's hidden width is `C / reduction` rounded to a multiple of `rd_divisor`.
            Default: 16 (timm's `rd_ratio=1/16`).
        rd_channels: Hidden width of the MLP, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 1.
        add_maxpool: Pool with `(mean + max) / 2` (a timm experiment; pooling gathers only).
            Default: False.
        feat_size: Input size (an int or `(H, W)`), required by `extent=0, extra_params=True`.
            Default: None.
        act_layer: Activation class of the MLP and between gather convolutions. Default: `nn.ReLU`.
        norm_layer: Normalisation class after each gather convolution, or None. Default:
            `nn.BatchNorm2d`.
        gate_layer: Gate activation class. Default: `nn.Sigmoid`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)` (`(B, C, *feat_size)` for `extent=0, extra_params=True`).
        - Output: same shape.
        - Weights (`need_weights=True`): the gate before interpolation, `(B, C, h, w)` (`h = w = 1`
          for `extent=0`).

    Example:
        ```python
        >>> ge = GatherExcite(64, extent=4)
        >>> ge(torch.randn(2, 64, 14, 15)).shape
        torch.Size([2, 64, 14, 15])

        ```
    """

    def __init__(
        self,
        channels: int,
        extent: int = 0,
        extra_params: bool = False,
        use_mlp: bool = True,
        reduction: int = 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        add_maxpool: bool = False,
        feat_size: int | tuple[int, int] | None = None,
        *,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        hidden = hidden_channels(channels, reduction, rd_channels, rd_divisor, who)
        check_int(extent, "extent", who, minimum=0)
        if extent % 2:
            raise ValueError(f"{who}: extent must be 0 (global) or even, got {extent}")
        check_layer(act_layer, "act_layer", who)
        check_layer(gate_layer, "gate_layer", who)
        if norm_layer is not None:
            check_layer(norm_layer, "norm_layer", who)
        # channels None (set by attnzoo.convert.from_timm for a module without weights): any C.
        self.channels: int | None = channels
        self.extent, self.add_maxpool = extent, add_maxpool
        # checked whether or not it is used (timm accepts it always): a wrong one is a mistake either way
        given_size = None if feat_size is None else int_pair(feat_size, "feat_size", who)
        self.feat_size: tuple[int, int] | None = None  # input size the gather requires, if any
        self.gather: nn.Sequential | None = None
        if extra_params:
            self.gather = nn.Sequential()
            if extent == 0:
                if given_size is None:
                    raise ValueError(f"{who}: extent=0 with extra_params=True needs feat_size, got None")
                self.feat_size = given_size
                kernels = [(self.feat_size, 1, 0)]  # (kernel, stride, padding): one map-wide convolution
            else:
                if extent & (extent - 1):
                    raise ValueError(f"{who}: extent must be a power of two with extra_params, got {extent}")
                kernels = [((3, 3), 2, 1)] * int(math.log2(extent))
            for i, (kernel, stride, padding) in enumerate(kernels, 1):
                self.gather.add_module(f"conv{i}", nn.Conv2d(
                    channels, channels, kernel, stride, padding, groups=channels, bias=False, **factory
                ))
                if norm_layer is not None:
                    self.gather.add_module(f"norm{i}", norm_layer(channels, **factory))
                if i < len(kernels):
                    self.gather.add_module(f"act{i}", act_layer())
        self.mlp: nn.Module = nn.Identity()
        if use_mlp:
            self.mlp = _PointwiseMlp(channels, hidden, act_layer, factory)
        self.gate = gate_layer()

    def _gathered(self, x: Tensor) -> Tensor:
        """The gathered context `(B, C, h, w)`."""
        if self.gather is not None:
            return self.gather(x)
        if self.extent == 0:
            return pooled_mean_max(x, self.add_maxpool)[:, :, None, None]  # (B, C, 1, 1)
        kernel, stride = 2 * self.extent - 1, self.extent
        pooled = F.avg_pool2d(x, kernel, stride, kernel // 2, count_include_pad=False)  # (B, C, h, w)
        if self.add_maxpool:
            pooled = 0.5 * pooled + 0.5 * F.max_pool2d(x, kernel, stride, kernel // 2)
        return pooled

    def _excite(self, *stats: Tensor) -> Tensor:
        """The global gate `(B, C)` from the channel mean (and max), each `(B, C)`."""
        gate = self.gate(self.mlp(blend_stats(*stats)[:, :, None, None])).flatten(1)  # (B, C, 1, 1) -> (B, C)
        if capturing():  # map capture
            record(self, "channel", gate)
        return gate

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gate `x` `(B, C, H, W)`; with `need_weights`, also return the gate `(B, C, h, w)`."""
        sizes: dict[str, int] = {} if self.channels is None else {"C": self.channels}
        if self.feat_size is not None:
            sizes.update(H=self.feat_size[0], W=self.feat_size[1])
        dims = check_shape(x, type(self).__name__, "B C H W", **sizes)  # type: ignore[arg-type]
        if self.gather is None and self.extent == 0 and not need_weights:  # a global channel gate:
            stats = ("mean", "max") if self.add_maxpool else ("mean",)  # the lean gating kernel
            plan = GatePlan(channel_fn=self._excite, channel_stats=stats)
            return fused_gate(x, plan, tuple(self.parameters()))
        gate = self.gate(self.mlp(self._gathered(x)))  # (B, C, h, w)
        if capturing():  # map capture: per channel (global extent) or per gathered position
            if gate.shape[-2:] == (1, 1):
                record(self, "channel", gate.flatten(1))
            else:
                record(self, "spatial", gate.mean(1), grid=gate.shape[-2:])
        if gate.shape[-2:] == (1, 1):
            out = x * gate
        else:
            out = x * F.interpolate(gate, size=(dims["H"], dims["W"]))  # nearest, (B, C, H, W)
        return (out, gate) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, extent={self.extent}, add_maxpool={self.add_maxpool}"
