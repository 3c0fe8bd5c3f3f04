"""The seed's dual max-gated channel/spatial block (seed 001, a snippet with no paper).

```text
x = x + channel_attention(x * sigmoid(max_hw x))     # channel branch, gated per (B, C)
x = x + space_attention(x * sigmoid(max_c x))        # spatial branch, gated per (B, H, W)
```

Each branch is a 3x3 conv (with bias), BatchNorm and ReLU at the full channel count. The two max
gates go through the family's fused kernel (`attnzoo.kernels.gate`): the gradient of each max pool is
scattered to its argmax instead of being built as a full-size tensor and added to the input's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.gate import GatePlan, fused_gate, to_batch_first
from attnzoo.maps.capture import capturing, record

__all__ = ["DualGatedAttention", "SeedDualAttention"]

_CHANNEL_GATE = GatePlan(channel_fn=torch.sigmoid, channel_stats=("max",))
_SPATIAL_GATE = GatePlan(spatial_fn=torch.sigmoid, spatial_stats=("max",))


def _conv_bn_relu(channels: int, dd: dict[str, Any]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True, **dd),
        nn.BatchNorm2d(channels, **dd),
        nn.ReLU(inplace=True),
    )


@register(
    "dual_gated",
    family="gating",
    paper="Max-gated channel and spatial residual attention (seed snippet, no paper)",
    year=2024,
    layout="NCHW",
    example=Example(kwargs={"channels": 4}, inputs=((2, 4, 5, 5),), output=(2, 4, 5, 5)),
    seed_name="SeedDualAttention",
)
class DualGatedAttention(nn.Module):
    """Two residual conv branches, on the input gated per channel by `sigmoid(max_hw x)` and on
    the result gated per position by `sigmoid(max_c x)` (the seed-001 snippet).

    Submodules and state_dict keys are the snippet's: `channel_attention.{0,1}` and
    `space_attention.{0,1}` (Conv2d(C, C, 3, padding=1) with bias, then BatchNorm2d(C)), plus a
    parameter-free `sigmoid`, so the recorded `SeedDualAttention` checkpoints load with
    `strict=True` and give the same outputs.

    The two gates have no parameters; `attnzoo.capture_maps` records them (`channel` (B, C) and
    `spatial` (B, H, W)), so `forward` has no `need_weights`.

    Args:
        channels: Number of input channels C (512 in the snippet).
        device: Device of the parameters and buffers. Default: None.
        dtype: dtype of the parameters and buffers. Default: None.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C, H, W).

    Example:
        ```python
        >>> block = DualGatedAttention(64)
        >>> block(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        ```
    """

    def __init__(
        self, channels: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        check_int(channels, "channels", type(self).__name__)
        self.channels = channels
        self.space_attention = _conv_bn_relu(channels, dd)
        self.channel_attention = _conv_bn_relu(channels, dd)
        self.sigmoid = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, True, type(self).__name__, C=self.channels)
        if capturing():  # map capture: the channel gate (B, C)
            record(self, "channel", torch.sigmoid(x.amax((2, 3))))
        x = x + self.channel_attention(fused_gate(x, _CHANNEL_GATE))  # x * sigmoid(max_hw x), conv branch
        if capturing():  # map capture: the spatial gate (B, H, W)
            record(self, "spatial", torch.sigmoid(x.amax(1)), grid=x.shape[2:])
        return x + self.space_attention(fused_gate(x, _SPATIAL_GATE))  # x * sigmoid(max_c x), conv branch


@register_seed("dual_gated", example=Example({"channels": 4}, ((2, 4, 5, 5),), (2, 4, 5, 5)))
class SeedDualAttention(DualGatedAttention):
    """The seed-001 snippet as the recorded class `SeedDualAttention(channels)`: identical to
    `DualGatedAttention` (the snippet has no bug to fix).

    Args:
        channels: Number of input channels C.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
