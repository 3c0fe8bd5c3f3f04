"""Polarized self-attention: a channel-only and a spatial-only branch, in parallel or in sequence.

Liu, Xu, Zhang, Yu, Zhang, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
arXiv 2021, https://arxiv.org/abs/2107.00782; official code https://github.com/DeLightCMU/PSA.

Channel-only branch: a softmax over the H*W positions of a one-channel query pools C/2 value
channels to a vector; a 1x1 convolution back to C channels, LayerNorm and a sigmoid give a channel
gate. Spatial-only branch: a softmax over the C/2 channels of a globally pooled query weights C/2 value
channels at each position; a sigmoid gives a spatial gate. `polarized_parallel` adds the two gated
inputs, `polarized_sequential` applies the spatial branch to the channel branch's output.

The module follows the paper (LayerNorm in the channel branch, as its Eq. 1 and Fig. 2 have) and
fightingcv's `ParallelPolarizedSelfAttention` / `SequentialPolarizedSelfAttention`, whose parameter
names (`ch_wv`, `ch_wq`, `ch_wz`, `ln`, `sp_wv`, `sp_wq`) and outputs it keeps. The official code has
no LayerNorm and no convolution biases: `layer_norm=False, bias=False`. Deviation in the computation,
not the result: the value projections are applied to the softmax-pooled input (they are linear and
the softmax weights sum to one), so no `(B, C/2, H, W)` value tensor is built, and the output is
one product `x * gate`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape, checked
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["ParallelPolarizedSelfAttention", "SequentialPolarizedSelfAttention"]

_PAPER = "Polarized Self-Attention: Towards High-quality Pixel-wise Regression"


def _pointwise(conv: nn.Conv2d) -> Tensor:
    return conv.weight[:, :, 0, 0]  # (C_out, C_in, 1, 1) -> (C_out, C_in)


@checked  # the registry checks each class's own forward; this one is inherited
class _Polarized(nn.Module):
    """Shared parameters and gates of the two compositions."""

    sequential: bool = False

    def __init__(
        self,
        channels: int,
        reduction: int = 2,
        rd_channels: int | None = None,
        *,
        bias: bool = True,
        layer_norm: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        check_int(reduction, "reduction", who)
        hidden = max(channels // reduction, 1) if rd_channels is None else rd_channels
        check_int(hidden, "rd_channels", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = channels
        self.ch_wv = nn.Conv2d(channels, hidden, 1, bias=bias, **factory)
        self.ch_wq = nn.Conv2d(channels, 1, 1, bias=bias, **factory)
        self.ch_wz = nn.Conv2d(hidden, channels, 1, bias=bias, **factory)
        self.ln = nn.LayerNorm(channels, **factory) if layer_norm else nn.Identity()
        self.sp_wv = nn.Conv2d(channels, hidden, 1, bias=bias, **factory)
        self.sp_wq = nn.Conv2d(channels, hidden, 1, bias=bias, **factory)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def channel_gate(self, flat: Tensor) -> Tensor:
        """The channel-only gate `(B, C)` of `flat` `(B, C, N)`."""
        logits = F.conv1d(flat, self.ch_wq.weight[..., 0], self.ch_wq.bias)  # (B, 1, N)
        p = logits.softmax(dim=-1)  # (B, 1, N): softmax over the positions
        pooled = (flat * p).sum(-1)  # (B, C): the softmax-pooled input
        # W_v applied after pooling (exact: the weights sum to 1, so the bias passes unchanged)
        context = F.linear(pooled, _pointwise(self.ch_wv), self.ch_wv.bias)  # (B, C/2)
        z = F.linear(context, _pointwise(self.ch_wz), self.ch_wz.bias)  # (B, C)
        return torch.sigmoid(self.ln(z))  # (B, C)

    def spatial_gate(self, flat: Tensor, scale: Tensor | None) -> Tensor:
        """The spatial-only gate `(B, N)` of `flat * scale[..., None]` (scale `(B, C)` or None)."""
        mean = lean_mean(flat, -1)  # (B, C): global average pooling, commuted with the 1x1 query
        if scale is not None:
            mean = mean * scale
        q = F.linear(mean, _pointwise(self.sp_wq), self.sp_wq.bias).softmax(-1)  # (B, C/2) over channels
        w = q @ _pointwise(self.sp_wv)  # (B, C): query times the value projection
        if scale is not None:
            w = w * scale
        logits = (w.unsqueeze(1) @ flat).squeeze(1)  # (B, 1, C) @ (B, C, N) -> (B, N)
        if self.sp_wv.bias is not None:
            logits = logits + (q * self.sp_wv.bias).sum(-1, keepdim=True)  # (B, 1)
        return torch.sigmoid(logits)  # (B, N)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gate `x` `(B, C, H, W)`; with `need_weights`, also return the combined gate `(B, C, H, W)`
        (`out == x * weights`)."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        flat = x.reshape(b, c, h * w)  # (B, C, N)
        g_ch = self.channel_gate(flat)  # (B, C)
        g_sp = self.spatial_gate(flat, g_ch if self.sequential else None)  # (B, N)
        if capturing():  # map capture: both gates
            record(self, "channel", g_ch)
            record(self, "spatial", g_sp.reshape(b, h, w), grid=(h, w))
        g_ch = g_ch[:, :, None, None]  # (B, C, 1, 1)
        g_sp = g_sp.reshape(b, 1, h, w)  # (B, N) -> (B, 1, H, W)
        gate = g_ch * g_sp if self.sequential else g_ch + g_sp  # broadcasts to (B, C, H, W)
        out = x * gate
        return (out, gate) if need_weights else out


@register(
    "polarized_parallel",
    family="gating",
    paper=_PAPER,
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)),
    aliases=("psa_p", "ParallelPolarizedSelfAttention"),
)
class ParallelPolarizedSelfAttention(_Polarized):
    """Polarized self-attention, parallel layout (Liu et al., 2021): $y = A^{ch} \\odot x + A^{sp} \\odot x$.

    With $N = HW$, $W_q^{ch}$ one channel, $W_v$, $W_q^{sp}$ C/2 channels:

    $$
    A^{ch} = \\sigma\\Big(\\mathrm{LN}\\big(W_z\\, W_v^{ch} x\\,
        \\mathrm{softmax}_N(W_q^{ch} x)^\\top\\big)\\Big) \\in \\mathbb{R}^{C},\\qquad
    A^{sp} = \\sigma\\Big(\\mathrm{softmax}_{C/2}\\big(W_q^{sp}\\,\\mathrm{mean}_N x\\big)^\\top
        W_v^{sp} x\\Big) \\in \\mathbb{R}^{N}.
    $$

    Args:
        channels: Input and output channels C.
        reduction: The branches' inner width is `max(C // reduction, 1)`. Default: 2 (the paper's C/2).
        rd_channels: The inner width, overriding `reduction`. Default: None.
        bias: The 1x1 convolutions have biases (fightingcv's; the official code has none).
            Default: True.
        layer_norm: LayerNorm over the channels before the channel gate's sigmoid (the paper's;
            the official code has none). Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the combined gate `(B, C, H, W)`, `out == x * weights`.

    Example:
        ```python
        >>> psa = ParallelPolarizedSelfAttention(64)
        >>> psa(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """


@register(
    "polarized_sequential",
    family="gating",
    paper=_PAPER,
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)),
    aliases=("psa_s", "SequentialPolarizedSelfAttention"),
)
class SequentialPolarizedSelfAttention(_Polarized):
    """Polarized self-attention, sequential layout (Liu et al., 2021):
    $z = A^{ch}(x) \\odot x$, $y = A^{sp}(z) \\odot z$.

    The gates are those of `ParallelPolarizedSelfAttention`; the spatial branch reads the channel
    branch's output $z$ (computed from x and $A^{ch}$ without building z).

    Args:
        channels: Input and output channels C.
        reduction: The branches' inner width is `max(C // reduction, 1)`. Default: 2 (the paper's C/2).
        rd_channels: The inner width, overriding `reduction`. Default: None.
        bias: The 1x1 convolutions have biases (fightingcv's; the official code has none).
            Default: True.
        layer_norm: LayerNorm over the channels before the channel gate's sigmoid (the paper's;
            the official code has none). Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the combined gate `(B, C, H, W)`, `out == x * weights`.

    Example:
        ```python
        >>> psa = SequentialPolarizedSelfAttention(64)
        >>> out, gate = psa(torch.randn(2, 64, 7, 9), need_weights=True)
        >>> gate.shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    sequential = True
