"""Squeeze-and-Excitation channel gate.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", CVPR 2018, https://arxiv.org/abs/1709.01507.

``out = x * sigmoid(W2 relu(W1 mean_hw(x)))``. The gate is applied by the family's fused kernel
(:mod:`attnzoo.kernels.gate`): forward reads ``x`` twice and writes the output once; backward keeps no
intermediate of the input's size besides one product. Deviation from the paper: none; the
bottleneck has no biases by default, like the seed (``bias=True`` gives timm's ``SEModule``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.gate import GatePlan, fused_gate, to_batch_first
from attnzoo.maps.capture import capturing, record

__all__ = ["SqueezeExcite", "SELayer"]


def hidden_width(
    channels: int, reduction: int, who: str, name: str = "reduction", channels_name: str = "channels"
) -> int:
    """``channels // reduction``, rejecting a reduction that leaves no hidden channel.

    ``name`` and ``channels_name`` are the caller's argument names, so messages name what was passed.
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

    Each channel is rescaled by ``sigmoid(W2 relu(W1 s))``, where ``s`` is the per-channel mean over
    H and W.

    Args:
        channels: Number of input channels C.
        reduction: Bottleneck ratio; the hidden width is ``C // reduction`` and must be at least 1.
            Default: 16 (the paper's).
        bias: Give the two linear layers biases (timm's ``SEModule`` has them). Default: False.
        batch_first: If False the input is (C, B, H, W), as in the seed. Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: same shape as the input, the input rescaled per channel.

    Example:
        >>> se = SqueezeExcite(64, reduction=16)
        >>> se(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self, channels: int, reduction: int = 16, *, bias: bool = False, batch_first: bool = True
    ) -> None:
        super().__init__()
        hidden = hidden_width(channels, reduction, type(self).__name__)
        self.channels = channels
        self.batch_first = bool(batch_first)
        # Same layout as the seed's SELayer, so its state_dict keys (fc.0, fc.2) load unchanged.
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        plan = GatePlan(channel_fn=self.fc, channel_stats=("mean",))
        out = fused_gate(x, plan, tuple(self.parameters()))
        if not torch.jit.is_scripting():
            if capturing():  # map capture: the gate (B, C), recomputed
                record(self, "channel", self.fc(x.mean((2, 3))))
        return out if self.batch_first else out.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, batch_first={self.batch_first}"


@register_seed("se")
class SELayer(SqueezeExcite):
    """The seed's ``SELayer(channel, reduction=2, batch_first=True)``: :class:`SqueezeExcite` with the
    seed's argument names and default reduction.

    State dict keys ``fc.0.weight`` (C/r, C) and ``fc.2.weight`` (C, C/r), as in the seed. Outputs equal
    the seed's; the differences are a ``ValueError`` (instead of a crash in ``nn.Linear``) when
    ``channel // reduction`` is 0, and input checks that name the expected shape.

    Args:
        channel: Number of input channels C.
        reduction: Bottleneck ratio. Default: 2.
        batch_first: If False the input is (C, B, H, W). Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: same shape as the input.
    """

    def __init__(self, channel: int, reduction: int = 2, batch_first: bool = True) -> None:
        super().__init__(channel, reduction, batch_first=batch_first)
