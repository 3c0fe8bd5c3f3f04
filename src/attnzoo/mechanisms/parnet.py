"""ParNet attention: the RepVGG-SSE block of ParNet, 1x1 and 3x3 convolutions plus a skip-squeeze-excite.

Goyal, Bochkovskiy, Deng, Koltun, "Non-deep Networks", NeurIPS 2022, https://arxiv.org/abs/2110.07641.
Authors' code: https://github.com/imankgoyal/NonDeepNetworks.

$$
\\mathrm{out} = \\mathrm{SiLU}\\big(\\mathrm{BN}(W_{1\\times1} x) + \\mathrm{BN}(W_{3\\times3} x)
  + \\mathrm{BN}(x)\\,\\sigma(W_{se}\\,\\mathrm{mean}_{hw}\\,\\mathrm{BN}(x))\\big)
$$

The paper's Skip-Squeeze-Excitation applies the squeeze-excite gate (one 1x1 convolution, no
bottleneck) to the BatchNorm'ed skip connection; the two convolutions have no bias (a BatchNorm
follows each). Deviations are fightingcv's, as options: its ``ParNetAttention(channel)`` has no BatchNorm
on the skip (``skip_norm=False``) and gives both convolutions a bias (``bias=True``);
``from_fightingcv`` sets both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["ParNetAttention"]


@register(
    "parnet",
    family="gating",
    paper="Non-deep Networks",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("parnet_attention", "ParNetAttention", "rep_vgg_sse"),
)
class ParNetAttention(nn.Module):
    """ParNet's RepVGG-SSE block (Goyal et al., 2021).

    Three parallel branches on the input, summed and passed through SiLU: a 1x1 convolution with
    BatchNorm, a 3x3 convolution with BatchNorm, and the skip connection (BatchNorm'ed) gated per
    channel by a one-layer squeeze-excite:

    $$
    s = \\mathrm{BN}_0(x),\\qquad
    y = \\mathrm{SiLU}\\big(\\mathrm{BN}_1(W_1 x) + \\mathrm{BN}_3(W_3 x)
      + s \\cdot \\sigma(W_{se}\\,\\mathrm{mean}_{hw} s + b_{se})\\big)
    $$

    Args:
        channels: Number of input (and output) channels C.
        bias: Give the 1x1 and 3x3 convolutions a bias (fightingcv's). Default: False.
        skip_norm: BatchNorm on the skip branch before the squeeze-excite (the paper's; fightingcv
            has none). Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the squeeze-excite gate `(B, C, 1, 1)`.

    Example:
        ```python
        >>> block = ParNetAttention(64)
        >>> block(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        *,
        bias: bool = False,
        skip_norm: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", type(self).__name__)
        dd = {"device": device, "dtype": dtype}
        # Registration order = fightingcv's state order (sse, conv1x1, conv3x3), the skip norm last.
        self.se = nn.Conv2d(channels, channels, 1, **dd)  # type: ignore[arg-type]
        self.conv1x1 = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=bias, **dd), nn.BatchNorm2d(channels, **dd)  # type: ignore[arg-type]
        )
        self.conv3x3 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias, **dd),  # type: ignore[arg-type]
            nn.BatchNorm2d(channels, **dd),  # type: ignore[arg-type]
        )
        self.skip_norm: nn.Module = nn.BatchNorm2d(channels, **dd) if skip_norm else nn.Identity()  # type: ignore[arg-type]

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        skip = self.skip_norm(x)
        gate = torch.sigmoid(self.se(lean_mean(skip, (2, 3), keepdim=True)))  # (B, C, 1, 1)
        if capturing():  # map capture: the squeeze-excite gate
            record(self, "channel", gate.flatten(1))
        out = nn.functional.silu(self.conv1x1(x) + self.conv3x3(x) + skip * gate)
        return (out, gate) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
