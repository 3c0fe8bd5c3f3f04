"""BAM: the bottleneck attention module, a channel and a dilated spatial branch added before one sigmoid.

Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018, https://arxiv.org/abs/1807.06514.
Official code: https://github.com/Jongchan/attention-module (``MODELS/bam.py``).

$$
\\mathrm{out} = x \\odot \\big(1 + \\sigma(M_c(x) + M_s(x))\\big)
$$

The defaults are the paper's: reduction 16, one hidden layer in the channel MLP, two 3x3 convolutions
of dilation 4 in the spatial branch, the branches summed. Deviations and options:

- the official code multiplies the branches (``1 + sigmoid(M_c * M_s)``); ``combine="product"`` gives it;
- the hidden width is at least 1 (the official code builds zero-width layers when C < reduction);
- the paper puts a BatchNorm at the end of each branch; the official code (and this class) does not;
- fightingcv's ``BAMBlock`` uses 3 hidden layers, 3 dilated convolutions of dilation 2 with padding 1 (so
  every convolution shrinks the map by 2, and the block runs only on 7x7 maps, or with ``dia_val=1``);
  ``num_layers``, ``num_dilated``, ``dilation`` and ``padding`` reproduce it (see
  ``attnzoo.convert.from_fightingcv``); a spatial map that neither keeps the size nor shrinks to 1x1
  raises a ``ValueError`` here where fightingcv's ``expand_as`` raises a ``RuntimeError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["BottleneckAttentionModule"]


@register(
    "bam",
    family="gating",
    paper="BAM: Bottleneck Attention Module",
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("bottleneck_attention", "BAMBlock"),
)
class BottleneckAttentionModule(nn.Module):
    """Bottleneck Attention Module (Park et al., 2018).

    A channel branch (an MLP on the per-channel means, with BatchNorm) and a spatial branch (1x1
    reduction, dilated 3x3 convolutions, 1x1 to one map) are broadcast to $(B, C, H, W)$, added and
    squashed; the input is amplified by one plus that attention:

    $$
    M_c = W_1\\,\\mathrm{relu}(\\mathrm{BN}(W_0\\,\\mathrm{mean}_{hw} x)),\\qquad
    M_s = f_{1\\times1}(f_{3\\times3}^{d}(f_{3\\times3}^{d}(f_{1\\times1}(x)))),\\qquad
    y = x \\odot (1 + \\sigma(M_c + M_s))
    $$

    Args:
        channels: Number of input channels C.
        reduction: Hidden width `max(1, C // reduction)` of both branches. Default: 16 (the paper's).
        rd_channels: Hidden width, overriding `reduction`. Default: None.
        num_layers: Hidden layers of the channel MLP (fightingcv: 3). Default: 1 (paper, official).
        num_dilated: Dilated 3x3 convolutions of the spatial branch (fightingcv: 3). Default: 2.
        dilation: Their dilation (fightingcv: 2). Default: 4 (the paper's).
        padding: Their padding; None keeps the size (`padding = dilation`). fightingcv pads by 1,
            so its map shrinks. Default: None.
        combine: `"sum"` (the paper's, fightingcv's) or `"product"` (the official code's) of the
            two branches before the sigmoid. Default: `"sum"`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the attention $\\sigma(\\cdot)$, `(B, C, H, W)`, so that
          `out == x * (1 + weights)`.

    Example:
        ```python
        >>> bam = BottleneckAttentionModule(64)
        >>> bam(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        rd_channels: int | None = None,
        num_layers: int = 1,
        num_dilated: int = 2,
        dilation: int = 4,
        padding: int | None = None,
        combine: str = "sum",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        check_int(channels, "channels", who)
        check_int(reduction, "reduction", who)
        # At least one hidden channel: the official code builds zero-width layers for C < reduction.
        if rd_channels is None:
            hidden = max(1, channels // reduction)
        else:
            hidden = check_int(rd_channels, "rd_channels", who)
        check_int(num_layers, "num_layers", who)
        check_int(num_dilated, "num_dilated", who, minimum=0)
        check_int(dilation, "dilation", who)
        self.padding = dilation if padding is None else check_int(padding, "padding", who, minimum=0)
        self.combine = check_choice(combine, ("sum", "product"), "combine", who)
        self.channels, self.rd_channels = channels, hidden
        self.num_dilated, self.dilation = num_dilated, dilation

        self.channel_gate = nn.Sequential()
        width = channels
        for i in range(num_layers):
            self.channel_gate.add_module(f"fc{i}", nn.Linear(width, hidden, **dd))
            self.channel_gate.add_module(f"bn{i}", nn.BatchNorm1d(hidden, **dd))
            self.channel_gate.add_module(f"act{i}", nn.ReLU())
            width = hidden
        self.channel_gate.add_module("fc_out", nn.Linear(hidden, channels, **dd))

        self.spatial_gate = nn.Sequential()
        self.spatial_gate.add_module("reduce", nn.Conv2d(channels, hidden, 1, **dd))
        self.spatial_gate.add_module("bn_reduce", nn.BatchNorm2d(hidden, **dd))
        self.spatial_gate.add_module("act_reduce", nn.ReLU())
        for i in range(num_dilated):
            conv = nn.Conv2d(hidden, hidden, 3, padding=self.padding, dilation=dilation, **dd)
            self.spatial_gate.add_module(f"conv{i}", conv)
            self.spatial_gate.add_module(f"bn{i}", nn.BatchNorm2d(hidden, **dd))
            self.spatial_gate.add_module(f"act{i}", nn.ReLU())
        self.spatial_gate.add_module("conv_out", nn.Conv2d(hidden, 1, 1, **dd))

    def _check_size(self, size: int, name: str) -> None:
        shrunk = size + self.num_dilated * (2 * self.padding - 2 * self.dilation)
        if shrunk not in (size, 1):
            raise ValueError(
                f"{type(self).__name__}: padding={self.padding} with dilation={self.dilation} turns "
                f"{name}={size} into {shrunk} after {self.num_dilated} convolutions, which cannot be "
                f"broadcast to the input; expected a size that gives {size} or 1"
            )

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        self._check_size(dims["H"], "H")
        self._check_size(dims["W"], "W")
        channel = self.channel_gate(lean_mean(x, (2, 3)))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        spatial = self.spatial_gate(x)  # (B, 1, H, W), or (B, 1, 1, 1) when fightingcv's padding shrinks it
        logits = channel + spatial if self.combine == "sum" else channel * spatial  # (B, C, H, W)
        weights = torch.sigmoid(logits)
        if capturing():  # map capture: the attention averaged over channels
            grid = (dims["H"], dims["W"])
            record(self, "spatial", weights.mean(1).expand(x.shape[0], *grid), grid=grid)
        out = torch.addcmul(x, x, weights)  # x * (1 + weights)
        return (out, weights.expand_as(x)) if need_weights else out

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rd_channels={self.rd_channels}, num_dilated={self.num_dilated}, "
            f"dilation={self.dilation}, padding={self.padding}, combine={self.combine!r}"
        )
