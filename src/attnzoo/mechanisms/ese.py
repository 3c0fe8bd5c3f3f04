"""Effective Squeeze-Excitation: SE with one full-width linear layer and a hard-sigmoid gate.

Lee, Park, "CenterMask: Real-Time Anchor-Free Instance Segmentation", CVPR 2020,
https://arxiv.org/abs/1911.06667 (section 3.3, the eSE module of VoVNetV2).

``out = x * hard_sigmoid(W mean_hw(x) + b)``: SE's two-layer bottleneck, whose reduction loses
channel information, becomes a single ``C x C`` layer. Deviations from the paper: none; timm's
experimental ``add_maxpool`` (pool with ``(mean + max) / 2``) is available, off by default.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.gate import GatePlan, fused_gate
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_layer
from attnzoo.mechanisms.se import blend_stats, gate_plainly

__all__ = ["EffectiveSqueezeExcite", "HardSigmoid", "pooled_mean_max"]


class HardSigmoid(nn.Module):
    """`clamp(z / 6 + 1/2, 0, 1)`: `nn.Hardsigmoid` as a composite op, so it has a double backward
    (torch's `hardsigmoid_backward` has none) and works under `torch.func` transforms."""

    def forward(self, z: Tensor) -> Tensor:
        return torch.clamp(z / 6 + 0.5, 0.0, 1.0)


def pooled_mean_max(x: Tensor, add_maxpool: bool) -> Tensor:
    """The per-channel mean of `x` `(B, C, H, W)` over H, W, or `(mean + max) / 2` with `add_maxpool`."""
    pooled = x.mean((2, 3))  # (B, C)
    if add_maxpool:
        pooled = 0.5 * pooled + 0.5 * x.amax((2, 3))
    return pooled


@register(
    "ese",
    family="gating",
    paper="CenterMask: Real-Time Anchor-Free Instance Segmentation",
    year=2020,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("effective_se", "EffectiveSEModule"),
)
class EffectiveSqueezeExcite(nn.Module):
    """Effective Squeeze-Excitation (eSE, Lee and Park, 2020).

    One linear layer (a 1x1 convolution, with bias) maps the per-channel means to per-channel
    gates:

    $$
    s_c = \\frac{1}{HW}\\sum_{h,w} x_{c,h,w},\\qquad g = \\mathrm{hsigmoid}(W s + b),\\qquad
    y_{c,h,w} = g_c\\,x_{c,h,w}
    $$

    with $\\mathrm{hsigmoid}(z) = \\min(\\max(z/6 + 1/2, 0), 1)$.

    Args:
        channels: Number of input channels C.
        add_maxpool: Pool with `(mean + max) / 2` instead of the mean (a timm experiment).
            Default: False.
        gate_layer: Gate activation class. Default: `HardSigmoid` (the paper's hard sigmoid, the
            same function as `nn.Hardsigmoid`, with a double backward).
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape, each channel rescaled.
        - Weights (`need_weights=True`): the gate `(B, C)`.

    Example:
        ```python
        >>> ese = EffectiveSqueezeExcite(64)
        >>> ese(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        add_maxpool: bool = False,
        *,
        gate_layer: type[nn.Module] = HardSigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        check_layer(gate_layer, "gate_layer", who)
        self.channels = channels
        self.add_maxpool = add_maxpool
        self.fc = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)  # timm's key: fc (C, C, 1, 1)
        self.gate = gate_layer()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Rescale each channel of `x` `(B, C, H, W)`; with `need_weights`, also return the gate `(B, C)`."""
        check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        stats = ("mean", "max") if self.add_maxpool else ("mean",)
        plan = GatePlan(channel_fn=self.excite, channel_stats=stats)
        if not need_weights:  # the lean gating kernel: one full-size temporary in backward
            return fused_gate(x, plan, tuple(self.parameters()))
        out, gate, _ = gate_plainly(x, plan)
        return out, cast(Tensor, gate)  # (B, C, H, W), (B, C)

    def excite(self, *stats: Tensor) -> Tensor:
        """The gate `(B, C)` from the channel mean (and max), each `(B, C)`."""
        weight = self.fc.weight.flatten(1)  # (C, C, 1, 1) -> (C, C)
        gate = self.gate(F.linear(blend_stats(*stats), weight, self.fc.bias))  # (B, C)
        if capturing():  # map capture: the channel gate
            record(self, "channel", gate)
        return gate

    def extra_repr(self) -> str:
        return f"channels={self.channels}, add_maxpool={self.add_maxpool}"
