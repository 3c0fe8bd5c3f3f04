"""PSA: the pyramid split attention module of EPSANet.

Zhang, Zhang, Zu, Meng, "EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional
Neural Network", ACCV 2022, https://arxiv.org/abs/2105.14447; official code
https://github.com/murufeng/EPSANet (`PSAModule`).

S branches convolve the input with kernels 3, 5, 7, 9 (groups 1, 4, 8, 16), each to C/S channels
(the SPC module); an SE weight module squeezes each branch to a C/S gate vector; a softmax across
the S branches turns the S vectors into attention weights that rescale the branches, which are
concatenated back to C channels.

The defaults are the paper's and the official code's: every branch sees the whole input, one SE
module (with biases, hidden width `(C / S) // 16`) is shared by the branches, the convolutions have
no bias. fightingcv's `PSA` differs, reproduced with options (`attnzoo.convert.from_fightingcv`):
branch i convolves only the i-th C/S slice of the input (`split_input=True`, ungrouped), every branch
has its own SE module (`shared_se=False`) without biases (`se_bias=False`) and hidden width
`C // (S * reduction)`, and its convolutions have biases (`conv_bias=True`). fightingcv also
writes the branch outputs into its input tensor in place, keeps its layers in Python lists (so
`state_dict`, `.to()` and the optimiser never see them) and needs 3 <= kernel <= 2S + 1; attnzoo
does none of this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["PyramidSplitAttention"]


def _sizes(values: Sequence[int], name: str, who: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{who}: {name} must be a non-empty sequence of ints, got {values!r}")
    return tuple(check_int(v, name, who) for v in values)


@register(
    "psa",
    family="gating",
    paper="EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 16, "reduction": 2},
                    inputs=((2, 16, 5, 6),), output=(2, 16, 5, 6)),
    aliases=("pyramid_split_attention",),
)
class PyramidSplitAttention(nn.Module):
    """Pyramid split attention (EPSANet's PSA module, Zhang et al., 2021).

    Branch i convolves x with a $k_i \\times k_i$ kernel in $G_i$ groups to $F_i$ (C/S channels);
    a shared SE module gives $z_i = \\sigma(W_2\\,\\delta(W_1\\,\\mathrm{mean}_{hw} F_i))$ and

    $$
    a_i = \\frac{\\exp z_i}{\\sum_{j=1}^{S} \\exp z_j},\\qquad
    y = \\mathrm{concat}_i\\,(a_i \\odot F_i),
    $$

    the softmax taken per channel across the S branches.

    Args:
        channels: Input and output channels C, divisible by S = `len(kernel_sizes)`.
        kernel_sizes: Odd kernel size of each branch. Default: (3, 5, 7, 9).
        groups: Groups of each branch's convolution, each dividing C (C/S with `split_input`) and
            C/S. Default: None, the paper's 1, 4, 8, 16 (then 32, 64, ...), each capped to its
            greatest common divisor with C/S (so `PyramidSplitAttention(16)` has 1, 4, 4, 4).
        reduction: The SE hidden width is `max(C // (S * reduction), 1)`. Default: 16.
        rd_channels: The SE hidden width, overriding `reduction`. Default: None.
        split_input: Branch i convolves only the i-th C/S input channels (fightingcv). Default: False.
        shared_se: One SE module for all branches (the paper's); False gives each its own.
            Default: True.
        conv_bias: The branch convolutions have biases. Default: False.
        se_bias: The SE convolutions have biases. Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: `(B, C, H, W)`, branch i in channels `i*C/S ... (i+1)*C/S - 1`.
        - Weights (`need_weights=True`): the softmax weights `(B, S, C/S)`.

    Example:
        ```python
        >>> psa = PyramidSplitAttention(64)  # 4 branches of 16 channels
        >>> out, weights = psa(torch.randn(2, 64, 7, 9), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 64, 7, 9]), torch.Size([2, 4, 16]))

        ```
    """

    def __init__(
        self,
        channels: int,
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        groups: Sequence[int] | None = None,
        reduction: int = 16,
        rd_channels: int | None = None,
        *,
        split_input: bool = False,
        shared_se: bool = True,
        conv_bias: bool = False,
        se_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        kernels = _sizes(kernel_sizes, "kernel_sizes", who)
        branches = len(kernels)
        check_divisible(channels, branches, "channels", "len(kernel_sizes)", who)
        width = channels // branches
        if groups is None:  # the official 1, 4, 8, 16, ..., capped to divide C / S
            groups = [math.gcd(1 if i == 0 else 2 ** (i + 1), width) for i in range(branches)]
        group_counts = _sizes(groups, "groups", who)
        if len(group_counts) != len(kernels):
            raise ValueError(
                f"{who}: groups must have one entry per kernel size ({len(kernels)}), got {group_counts}"
            )
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"{who}: kernel_sizes must be odd (centred windows), got {kernels}")
        fan_in = width if split_input else channels
        for g in group_counts:
            check_divisible(fan_in, g, "the input channels of a branch", "groups", who)
            check_divisible(width, g, "the output channels of a branch (C / S)", "groups", who)
        check_int(reduction, "reduction", who)
        hidden = max(channels // (branches * reduction), 1) if rd_channels is None else rd_channels
        check_int(hidden, "rd_channels", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = channels
        self.branches = branches
        self.split_input = split_input
        self.shared_se = shared_se
        self.convs = nn.ModuleList(
            nn.Conv2d(fan_in, width, k, padding=k // 2, groups=g, bias=conv_bias, **factory)
            for k, g in zip(kernels, group_counts, strict=True)
        )
        n = 1 if shared_se else branches  # SE modules, run as one grouped 1x1 convolution
        self.fc1 = nn.Conv2d(n * width, n * hidden, 1, groups=n, bias=se_bias, **factory)
        self.fc2 = nn.Conv2d(n * hidden, n * width, 1, groups=n, bias=se_bias, **factory)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, branches={self.branches}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Rescale the pyramid branches of `x` `(B, C, H, W)`; with `need_weights`, also return
        the softmax weights `(B, S, C/S)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, s = dims["B"], self.branches
        parts = x.chunk(s, dim=1) if self.split_input else (x,) * s  # S x (B, C/S or C, H, W)
        feats = torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], 1)  # (B, C, H, W)
        pooled = lean_mean(feats, (2, 3), keepdim=True)  # (B, C, 1, 1)
        if self.shared_se:
            pooled = pooled.reshape(b * s, -1, 1, 1)  # (B*S, C/S, 1, 1): the shared SE per branch
        z = torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))  # (B*S, C/S, 1, 1) or (B, C, 1, 1)
        weights = z.reshape(b, s, -1).softmax(dim=1)  # (B, S, C/S): softmax across the branches
        if capturing():  # map capture: the branch weights of each channel
            record(self, "branch", weights)
        out = feats * weights.reshape(b, -1, 1, 1)  # (B, C, 1, 1) broadcast over H, W
        return (out, weights) if need_weights else out
