"""DANet: the position and channel attention modules and the dual attention head.

Fu, Liu, Tian, Li, Bao, Fang, Lu, "Dual Attention Network for Scene Segmentation", CVPR 2019,
https://arxiv.org/abs/1809.02983; official code https://github.com/junfu1115/DANet (`PAM_Module`,
`CAM_Module`, `DANetHead` in encoding/models/sseg/danet.py and encoding/nn/da_att.py).

Position attention: SAGAN-like self-attention over the H*W positions (queries and keys C/8, unscaled
logits), run by `attnzoo.functional.attend`, so no N x N matrix is built where SDPA has a fused
kernel. Channel attention: self-attention between the C channels of the map itself (no projections),
with the official `max - energy` logits. Both add `gamma * attention` to the input, gamma starting
at 0. The dual head convolves the input to C/4 channels twice, applies one module to each branch,
convolves again, sums and projects with a 1x1 convolution (the official `DANetHead` without its two
auxiliary outputs).

fightingcv's `PositionAttentionModule`, `ChannelAttentionModule` and `DAModule` are different modules
(attnzoo.mechanisms.danet_fightingcv keeps them, `attnzoo.convert.from_fightingcv` converts them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["DANetPositionAttention", "DANetChannelAttention", "DualAttention"]

_PAPER = "Dual Attention Network for Scene Segmentation"


@register(
    "danet_position",
    family="global",
    paper=_PAPER,
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 16}, inputs=((2, 16, 5, 6),), output=(2, 16, 5, 6)),
    aliases=("PAM_Module", "position_attention"),
    uses_attend=True,
)
class DANetPositionAttention(nn.Module):
    """DANet's position attention module (Fu et al., 2019): SAGAN-like attention over positions.

    $Q = W_q x$, $K = W_k x$ (C/8 channels), $V = W_v x$ (C channels) over the N = H*W positions;
    the logits are not scaled; $\\gamma$ starts at 0:

    $$
    s_{ij} = \\frac{\\exp(Q_i \\cdot K_j)}{\\sum_{j'} \\exp(Q_i \\cdot K_{j'})},\\qquad
    y_i = \\gamma \\sum_j s_{ij} V_j + x_i .
    $$

    Args:
        channels: Input channels C.
        reduction: Queries and keys have `max(C // reduction, 1)` channels. Default: 8.
        rd_channels: Channels of queries and keys, overriding `reduction`. Default: None.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the attention map `(B, N, N)`, row i the weights of
          query position i (row-major `h*W + w`).

    Example:
        ```python
        >>> pam = DANetPositionAttention(64)
        >>> out, attn = pam(torch.randn(2, 64, 4, 5), need_weights=True)
        >>> out.shape, attn.shape
        (torch.Size([2, 64, 4, 5]), torch.Size([2, 20, 20]))

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 8,
        rd_channels: int | None = None,
        *,
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
        self.channels, self.rd_channels = channels, hidden
        self.query_conv = nn.Conv2d(channels, hidden, 1, **factory)  # the official names
        self.key_conv = nn.Conv2d(channels, hidden, 1, **factory)
        self.value_conv = nn.Conv2d(channels, channels, 1, **factory)
        self.gamma = nn.Parameter(torch.zeros(1, **factory))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}"

    def reset_parameters(self) -> None:
        """`gamma` back to 0, so the block starts as the identity (the convolutions reset themselves)."""
        nn.init.zeros_(self.gamma)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the positions of `x` `(B, C, H, W)`; with `need_weights`, also return the
        map `(B, N, N)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        weight = torch.cat([self.query_conv.weight, self.key_conv.weight, self.value_conv.weight])
        bias = torch.cat([self.query_conv.bias, self.key_conv.bias, self.value_conv.bias])  # type: ignore[list-item]
        qkv = nn.functional.conv2d(x, weight, bias).flatten(2).transpose(1, 2)  # (B, N, 2d + C)
        q, k, v = qkv.unsqueeze(1).split([self.rd_channels, self.rd_channels, c], dim=-1)  # (B, 1, N, *)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(h, w), scale=1.0)
        if need_weights:
            out, attn = attend(q, k, v, scale=1.0, need_weights=True)  # (B, 1, N, C), (B, 1, N, N)
        else:
            out = attend(q, k, v, scale=1.0)  # (B, 1, N, C): fused where SDPA can
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, N, C) -> (B, C, H, W)
        out = self.gamma * out + x
        return (out, attn.squeeze(1)) if need_weights else out


@register(
    "danet_channel",
    family="global",
    paper=_PAPER,
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 16}, inputs=((2, 16, 5, 6),), output=(2, 16, 5, 6)),
    aliases=("CAM_Module",),
    uses_attend=True,
)
class DANetChannelAttention(nn.Module):
    """DANet's channel attention module (Fu et al., 2019): attention between the channels of x.

    With $X \\in \\mathbb{R}^{C \\times N}$ the flattened input and $E = X X^\\top$, the official
    logits are $\\max_j E_{ij} - E_{ij}$, so a channel attends most to the channels *least* similar
    to it; the row maximum cancels in the softmax, so the map is $\\mathrm{softmax}(-E)$:

    $$
    y = \\gamma\\,\\mathrm{softmax}\\big(\\max_{j} E_{:,j} - E\\big)\\,X + X .
    $$

    Args:
        channels: Input channels C.
        device: Device of the parameter $\\gamma$. Default: None.
        dtype: dtype of the parameter $\\gamma$. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the channel map `(B, C, C)`.

    Example:
        ```python
        >>> cam = DANetChannelAttention(64)
        >>> cam(torch.randn(2, 64, 4, 5), need_weights=True)[1].shape
        torch.Size([2, 64, 64])

        ```
    """

    def __init__(
        self,
        channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", type(self).__name__)
        self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def reset_parameters(self) -> None:
        """`gamma` back to 0, so the block starts as the identity."""
        nn.init.zeros_(self.gamma)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend between the channels of `x` `(B, C, H, W)`; with `need_weights`, also return the
        map `(B, C, C)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        flat = x.reshape(b, 1, c, h * w)  # (B, 1, C, N): the channels are the tokens
        if capturing():  # map capture: rows of the channel-to-channel attention
            record_rows(self, -flat, flat, grid=(c,), scale=1.0, unit="channel")
        # softmax(max E - E) == softmax(-E): queries -X, keys and values X, unscaled
        if need_weights:
            out, attn = attend(-flat, flat, flat, scale=1.0, need_weights=True)  # (B, 1, C, N)
        else:
            out = attend(-flat, flat, flat, scale=1.0)  # (B, 1, C, N)
        out = self.gamma * out.reshape(b, c, h, w) + x
        return (out, attn.squeeze(1)) if need_weights else out


def _conv_bn_relu(cin: int, cout: int, factory: dict[str, Any]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False, **factory), nn.BatchNorm2d(cout, **factory), nn.ReLU()
    )


@register(
    "danet",
    family="global",
    paper=_PAPER,
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 16}, inputs=((2, 16, 5, 6),), output=(2, 16, 5, 6)),
    aliases=("dual_attention", "DANetHead"),
    uses_attend=True,
)
class DualAttention(nn.Module):
    """DANet's dual attention head (Fu et al., 2019), without its auxiliary outputs.

    With $f_*$ 3x3 conv-BN-ReLU blocks to $C' = C/4$ channels, PAM and CAM the position and
    channel modules:

    $$
    y = W_8\\Big(f_{51}\\big(\\mathrm{PAM}(f_{5a}\\,x)\\big)
        + f_{52}\\big(\\mathrm{CAM}(f_{5c}\\,x)\\big)\\Big) + b_8 .
    $$

    Args:
        channels: Input channels C.
        reduction: The branches have `max(C // reduction, 1)` channels. Default: 4.
        out_channels: Output channels of the final 1x1 convolution. Default: None (C).
        proj_drop: Channel dropout (`nn.Dropout2d`) before the final convolution; the official
            head has 0.1. Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, out_channels, H, W)`.
        - Weights (`need_weights=True`): the position map `(B, N, N)`.

    Example:
        ```python
        >>> da = DualAttention(64).eval()
        >>> da(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        out_channels: int | None = None,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        check_int(reduction, "reduction", who)
        out_channels = channels if out_channels is None else check_int(out_channels, "out_channels", who)
        check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0)
        inter = max(channels // reduction, 1)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = channels
        self.conv5a = _conv_bn_relu(channels, inter, factory)  # the official names
        self.conv5c = _conv_bn_relu(channels, inter, factory)
        self.sa = DANetPositionAttention(inter, **factory)
        self.sc = DANetChannelAttention(inter, **factory)
        self.conv51 = _conv_bn_relu(inter, inter, factory)
        self.conv52 = _conv_bn_relu(inter, inter, factory)
        self.conv8 = nn.Sequential(nn.Dropout2d(proj_drop), nn.Conv2d(inter, out_channels, 1, **factory))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Both branches on `x` `(B, C, H, W)`, summed and projected; with `need_weights`, also the
        position map `(B, N, N)`."""
        check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        if need_weights:
            sa, attn = self.sa(self.conv5a(x), need_weights=True)
        else:
            sa = self.sa(self.conv5a(x))
        feat = self.conv51(sa) + self.conv52(self.sc(self.conv5c(x)))  # (B, C', H, W)
        out = self.conv8(feat)
        return (out, attn) if need_weights else out
