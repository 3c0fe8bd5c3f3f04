"""Squeeze-and-Excitation channel gate, and the gating family's shared helpers.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", CVPR 2018, https://arxiv.org/abs/1709.01507.

$$
\\mathrm{out} = x \\cdot \\sigma(W_2\\, \\mathrm{relu}(W_1\\, \\mathrm{mean}_{hw}\\, x))
$$

The gate is applied by the family's fused kernel (`attnzoo.kernels.gate`): forward reads `x` twice and
writes the output once; backward keeps no intermediate of the input's size besides one product.
Deviation from the paper: the bottleneck has no biases by default, like the seed (`bias=True` gives
the paper's and timm's `SEModule`); the argument names are timm's (`rd_channels`, `rd_divisor`,
`add_maxpool`, `act_layer`, `norm_layer`, `gate_layer`), with `reduction` = 1 / timm's `rd_ratio`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.gate import GatePlan, fused_gate, to_batch_first
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_width

__all__ = ["SqueezeExcite", "SELayer"]


# ---------------------------------------------------------------------------------------------
# Shared by the gating family (cbam.py, cbam_seed.py)


def hidden_width(
    channels: int, reduction: int, who: str, name: str = "reduction", channels_name: str = "channels"
) -> int:
    """The seeds' hidden width `channels // reduction`, rejecting a reduction that leaves none.

    `name` and `channels_name` are the caller's argument names, so messages name what was passed.
    """
    check_int(channels, channels_name, who)
    check_int(reduction, name, who)
    hidden = channels // reduction
    if hidden < 1:
        raise ValueError(
            f"{who}: {name}={reduction} leaves zero hidden channels for {channels_name}={channels}; "
            f"expected {name} <= {channels}"
        )
    return hidden


def make_divisible(value: float, divisor: int) -> int:
    """`value` rounded to the nearest multiple of `divisor`, at least `divisor` (timm's rounding of
    gate widths, with no lower limit relative to `value`)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def rd_width(channels: int, reduction: float, rd_channels: int | None, rd_divisor: int, who: str) -> int:
    """The hidden width of a gate: `rd_channels` if given, else `channels / reduction` rounded to a
    multiple of `rd_divisor` (timm's `make_divisible(channels * rd_ratio, rd_divisor)`)."""
    check_int(channels, "channels", who)
    if check_float(reduction, "reduction", who) <= 0:
        raise ValueError(f"{who}: reduction must be > 0, got {reduction}")
    check_int(rd_divisor, "rd_divisor", who)
    if rd_channels is not None:
        return check_int(rd_channels, "rd_channels", who)
    check_width(channels / reduction, "reduction", reduction, who)
    return make_divisible(channels / reduction, rd_divisor)


def make_act(layer: Callable[..., nn.Module]) -> nn.Module:
    """An activation module, in place where the class allows it (as timm's `create_act_layer`)."""
    try:
        return layer(inplace=True)
    except TypeError:
        return layer()


def gate_plainly(x: Tensor, plan: GatePlan) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The gating of `plan` in plain autograd, returning the gates: `(out, cg (B, C), sg (B, 1, H, W))`.

    Used with `need_weights=True`: the same numbers as `fused_gate`, and gates that carry gradients.
    """
    y, cg, sg = x, None, None
    if plan.channel_fn is not None:
        stats = [x.mean((2, 3)) if s == "mean" else x.amax((2, 3)) for s in plan.channel_stats]  # (B, C)
        cg = plan.channel_fn(*stats)
        y = x * cg[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
    if plan.spatial_fn is not None:
        stats = [
            y.mean(1, keepdim=True) if s == "mean" else y.amax(1, keepdim=True) for s in plan.spatial_stats
        ]
        sg = plan.spatial_fn(*stats)  # (B, 1, H, W)
        y = y * sg
    return y, cg, sg


def blend_stats(*stats: Tensor) -> Tensor:
    """One pooled statistic from `(mean,)` or `(mean, max)`: the mean, or timm's `0.5 * (mean + max)`
    (`add_maxpool`, LightCBAM)."""
    return stats[0] if len(stats) == 1 else 0.5 * stats[0] + 0.5 * stats[1]


def from_batch_first(t: Tensor, batch_first: bool) -> Tensor:
    """Undo `to_batch_first` on an output (or a gate broadcastable to it)."""
    return t if batch_first else t.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)


# ---------------------------------------------------------------------------------------------
# Squeeze-and-Excitation


@register(
    "se",
    family="gating",
    paper="Squeeze-and-Excitation Networks",
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("squeeze_excite", "squeeze_excitation"),
    seed_name="SELayer",
)
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation channel gate (Hu et al., 2018).

    Each channel is rescaled by $\\sigma(W_2\\, \\delta(W_1 s))$, where $s$ is the per-channel mean over
    H and W and $\\delta$ the activation. The constructor is timm's `SEModule`'s with `reduction`
    (= 1 / `rd_ratio`) in place of `rd_ratio`, so `timm.create_model(..., block_args=dict(
    attn_layer=SqueezeExcite))` takes the class as it is; the state_dict keys are timm's too
    (`fc1`, `bn`, `fc2`, 1x1 convolutions), and timm's checkpoints load with timm's defaults,
    `bias=True, rd_divisor=8`. The seed's `SELayer(channel, reduction)` is `attnzoo.compat.SELayer`.

    Args:
        channels: Number of input channels C.
        reduction: Bottleneck ratio; the hidden width is `C / reduction` rounded to a multiple of
            `rd_divisor` (at least `rd_divisor`). Default: 16 (the paper's). Seed: `reduction`.
        rd_channels: Hidden width, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this (timm's SE uses 8). Default: 1.
        add_maxpool: Squeeze with `0.5 * mean + 0.5 * max` over H, W (timm's option). Default: False.
        bias: Give the two 1x1 convolutions biases (the paper and timm have them, the seed has not).
            Default: False.
        act_layer: Activation of the bottleneck. Default: `nn.ReLU`.
        norm_layer: Normalisation after the first convolution, e.g. `nn.BatchNorm2d`. Default: None.
        gate_layer: Gate activation. Default: `nn.Sigmoid`.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input, the input rescaled per channel.
        - Weights (`need_weights=True`): the gate, (B, C, 1, 1) (or (C, B, 1, 1)), so that
          `out == x * weights`.

    Example:
        ```python
        >>> se = SqueezeExcite(64, reduction=16)
        >>> se(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> out, gate = se(torch.randn(2, 64, 8, 8), need_weights=True)
        >>> gate.shape
        torch.Size([2, 64, 1, 1])
        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        add_maxpool: bool = False,
        bias: bool = False,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        gate_layer: Callable[..., nn.Module] = nn.Sigmoid,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        hidden = rd_width(channels, reduction, rd_channels, rd_divisor, type(self).__name__)
        self.channels, self.rd_channels = channels, hidden
        self.add_maxpool = bool(add_maxpool)
        self.batch_first = bool(batch_first)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias, **dd)
        self.bn: nn.Module = norm_layer(hidden, **dd) if norm_layer is not None else nn.Identity()
        self.act = make_act(act_layer)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias, **dd)
        self.gate = gate_layer()

    def excite(self, *stats: Tensor) -> Tensor:
        """The gate (B, C) from the squeezed statistics, each (B, C): the mean (and the max)."""
        s = blend_stats(*stats)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        hidden = self.act(self.bn(self.fc1(s)))  # (B, rd, 1, 1)
        gate = self.gate(self.fc2(hidden)).flatten(1)  # (B, C, 1, 1) -> (B, C)
        if capturing():  # map capture
            record(self, "channel", gate)
        return gate

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        plan = GatePlan(
            channel_fn=self.excite, channel_stats=("mean", "max") if self.add_maxpool else ("mean",)
        )
        if not need_weights:
            return from_batch_first(fused_gate(x, plan, tuple(self.parameters())), self.batch_first)
        out, gate, _ = gate_plainly(x, plan)
        weights = cast(Tensor, gate)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        return from_batch_first(out, self.batch_first), from_batch_first(weights, self.batch_first)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}, batch_first={self.batch_first}"


@register_seed("se", example=Example({"channel": 8}, ((2, 8, 5, 5),), (2, 8, 5, 5)))
class SELayer(nn.Module):
    """The seed's `SELayer(channel, reduction=2, batch_first=True)`.

    State dict keys `fc.0.weight` (C/r, C) and `fc.2.weight` (C, C/r) (linear layers, no bias), as in
    the seed; the hidden width is `channel // reduction`. Outputs equal the seed's; the differences
    are a `ValueError` (instead of a crash in `nn.Linear`) when `channel // reduction` is 0, input
    checks that name the expected shape, and the fused gate (same values). The canonical class is
    `attnzoo.SqueezeExcite` (`channels`, `reduction`, ...).

    Args:
        channel: Number of input channels C.
        reduction: Bottleneck ratio. Default: 2.
        batch_first: If False the input is (C, B, H, W). Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: same shape as the input.
    """

    def __init__(self, channel: int, reduction: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        hidden = hidden_width(channel, reduction, type(self).__name__, channels_name="channel")
        self.channels = channel
        self.batch_first = bool(batch_first)
        self.fc = nn.Sequential(
            nn.Linear(channel, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channel, bias=False),
            nn.Sigmoid(),
        )

    def excite(self, mean: Tensor) -> Tensor:
        """The gate (B, C) from the per-channel mean (B, C)."""
        gate = self.fc(mean)
        if capturing():  # map capture
            record(self, "channel", gate)
        return gate

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        out = fused_gate(
            x, GatePlan(channel_fn=self.excite, channel_stats=("mean",)), tuple(self.parameters())
        )
        return from_batch_first(out, self.batch_first)

    def extra_repr(self) -> str:
        return f"channel={self.channels}, batch_first={self.batch_first}"
