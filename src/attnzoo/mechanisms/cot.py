"""CoT: the Contextual Transformer block, and fightingcv's simplified `CoTAttention`.

Li, Yao, Pan, Mei, "Contextual Transformer Networks for Visual Recognition", TPAMI 2022,
https://arxiv.org/abs/2107.12292; official code https://github.com/JDAI-CV/CoTNet (`CotLayer` in
models/cotnet.py, its local convolution in cupy_layers/aggregation_zeropad.py).

A k x k grouped convolution of the input gives the static context K1; two 1x1 convolutions of
`[x, K1]` give, at every position, k x k attention weights (one set per group of `share_planes`
channels); these weights aggregate the k x k neighbourhood of the values `V = BN(W_v x)` (a local,
position-dependent convolution), giving the dynamic context K2; an SE-like attention over the two
(radix 2) fuses K1 and K2.

`ContextualTransformer` is the official `CotLayer` (same state_dict keys); its local convolution is
written with padded shifts (the official one is a CuPy CUDA kernel; no `(B, C, k*k, H, W)` unfold
is built). fightingcv's `CoTAttention` is a different module: it averages its k x k "attention"
logits into one per channel and position, takes a softmax over all H*W positions, multiplies it
with the values and adds K1 (no local aggregation, no GroupNorm, no BatchNorm + Swish after the
aggregation, no SE fusion, `[K1, x]` instead of `[x, K1]`, k*k*C instead of k*k*C/8 logits);
`FightingcvCoTAttention` keeps its constructor, names and numbers (`attnzoo.convert.from_fightingcv`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape, checked
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record

__all__ = ["ContextualTransformer", "FightingcvCoTAttention", "local_aggregate"]


def local_aggregate(v: Tensor, w: Tensor, kernel_size: int) -> Tensor:
    """The official CoT local convolution (zero padding, stride 1, one head).

    `out[b, c, p] = sum_j w[b, c % G, j, p] * v[b, c, p + offset_j]` for `v` `(B, C, H, W)` and
    `w` `(B, G, k*k, H, W)`, G dividing C (channel c uses weight group `c % G`, as the official
    kernel does), offsets in row-major order over the k x k window.
    """
    b, c, h, wd = v.shape
    g, pad = w.shape[1], kernel_size // 2
    vp = F.pad(v, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    out = v.new_zeros(b, c // g, g, h, wd)
    for j in range(kernel_size * kernel_size):
        dy, dx = divmod(j, kernel_size)
        patch = vp[:, :, dy:dy + h, dx:dx + wd].reshape(b, c // g, g, h, wd)  # channel c = i*G + c%G
        out = out + patch * w[:, None, :, j]  # (B, 1, G, H, W) broadcast over the C/G channel blocks
    return out.reshape(b, c, h, wd)  # (B, C/G, G, H, W) -> (B, C, H, W)


def _conv_bn(cin: int, cout: int, k: int, groups: int, factory: dict[str, Any]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False, **factory),
            nn.BatchNorm2d(cout, **factory)]


@register(
    "cot",
    family="local",
    paper="Contextual Transformer Networks for Visual Recognition",
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 16}, inputs=((2, 16, 5, 6),), output=(2, 16, 5, 6)),
    aliases=("contextual_transformer", "CotLayer"),
)
class ContextualTransformer(nn.Module):
    """Contextual Transformer (CoT) block (Li et al., 2021), the official `CotLayer`.

    With $K_1 = \\mathrm{ReLU}(\\mathrm{BN}(\\mathrm{Conv}_{k \\times k, g}\\,x))$,
    $V = \\mathrm{BN}(W_v x)$ and
    $A = \\mathrm{GN}(W_\\delta\\,\\mathrm{ReLU}(\\mathrm{BN}(W_\\theta [x, K_1])))$
    ($k^2$ weights per position for each of $C/s$ channel groups):

    $$
    K_2 = \\mathrm{Swish}\\big(\\mathrm{BN}(V \\circledast A)\\big),\\qquad
    a = \\mathrm{softmax}_{r}\\big(\\mathrm{SE}(\\mathrm{mean}_{hw}(K_1 + K_2))\\big),\\qquad
    y = a_0 \\odot K_2 + a_1 \\odot K_1,
    $$

    where $V \\circledast A$ aggregates each position's $k \\times k$ neighbourhood of V with its
    own weights (channel c uses weight group $c \\bmod (C/s)$) and SE is conv-BN-ReLU-conv to
    $2C$ channels (hidden width `max(2C // reduction, 32)`). Its BatchNorm sees pooled features,
    so training needs a batch of at least two, as in the official code.

    Args:
        channels: Input and output channels C, divisible by `groups` and `share_planes`.
        kernel_size: Odd size k of the key convolution and of the local aggregation. Default: 3.
        groups: Groups of the key convolution. Default: 4.
        share_planes: Channels sharing one set of aggregation weights (C/s weight groups).
            Default: 8.
        factor: The attention embedding's hidden width is `C // factor`. Default: 2.
        reduction: The fusion SE's hidden width is `max(2C // reduction, 32)`. Default: 4.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the aggregation weights `(B, C/s, k*k, H, W)`.

    Example:
        ```python
        >>> cot = ContextualTransformer(64)  # 8 weight groups, 3 x 3 neighbourhoods
        >>> out, weights = cot(torch.randn(2, 64, 7, 9), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 64, 7, 9]), torch.Size([2, 8, 9, 7, 9]))

        ```
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        groups: int = 4,
        share_planes: int = 8,
        factor: int = 2,
        reduction: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        for name, value in (("channels", channels), ("kernel_size", kernel_size), ("groups", groups),
                            ("share_planes", share_planes), ("factor", factor), ("reduction", reduction)):
            check_int(value, name, who)
        if kernel_size % 2 == 0:
            raise ValueError(f"{who}: kernel_size must be odd (a centred window), got {kernel_size}")
        check_divisible(channels, groups, "channels", "groups", who)
        check_divisible(channels, share_planes, "channels", "share_planes", who)
        hidden = check_int(channels // factor, "channels // factor", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels, self.kernel_size = channels, kernel_size
        weight_groups, kk = channels // share_planes, kernel_size * kernel_size
        self.key_embed = nn.Sequential(*_conv_bn(channels, channels, kernel_size, groups, factory), nn.ReLU())
        self.embed = nn.Sequential(
            *_conv_bn(2 * channels, hidden, 1, 1, factory),
            nn.ReLU(),
            nn.Conv2d(hidden, kk * weight_groups, 1, **factory),
            nn.GroupNorm(weight_groups, kk * weight_groups, **factory),
        )
        self.conv1x1 = nn.Sequential(*_conv_bn(channels, channels, 1, 1, factory))
        self.bn = nn.BatchNorm2d(channels, **factory)
        attn_chs = max(channels * 2 // reduction, 32)
        self.se = nn.Sequential(
            nn.Conv2d(channels, attn_chs, 1, **factory),
            nn.BatchNorm2d(attn_chs, **factory),
            nn.ReLU(),
            nn.Conv2d(attn_chs, 2 * channels, 1, **factory),
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The CoT block on `x` `(B, C, H, W)`; with `need_weights`, also return the aggregation
        weights `(B, C/s, k*k, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        k1 = self.key_embed(x)  # (B, C, H, W): static context
        kk = self.kernel_size * self.kernel_size
        weights = self.embed(torch.cat([x, k1], dim=1)).reshape(b, -1, kk, h, w)  # (B, C/s, k*k, H, W)
        k2 = local_aggregate(self.conv1x1(x), weights, self.kernel_size)  # (B, C, H, W)
        k2 = F.silu(self.bn(k2))  # dynamic context
        pooled = lean_mean(k2 + k1, (2, 3), keepdim=True)  # (B, C, 1, 1)
        radix = self.se(pooled).reshape(b, c, 2).softmax(dim=2)  # (B, C, 2): over (K2, K1)
        if capturing():  # map capture: the fusion weights of each channel
            record(self, "branch", radix.transpose(1, 2))
        out = k2 * radix[:, :, 0, None, None] + k1 * radix[:, :, 1, None, None]  # (B, C, H, W)
        return (out, weights) if need_weights else out


@checked
class FightingcvCoTAttention(nn.Module):
    """fightingcv's `CoTAttention(dim, kernel_size)`: its constructor, parameter names and numbers.

    Not the paper's block (see `ContextualTransformer`): with K1 as there, $V = \\mathrm{BN}(W_v x)$
    and $L = W_2\\,\\mathrm{ReLU}(\\mathrm{BN}(W_1 [K_1, x]))$ ($k^2 C$ channels),
    $y = K_1 + \\mathrm{softmax}_{hw}(\\mathrm{mean}_{k^2} L) \\odot V$: the $k \\times k$ logits are
    averaged into one per channel and position and normalised over all positions; nothing is
    aggregated locally. The average is taken over the last convolution's weights (the same linear
    map, $k^2$ times fewer products), so that convolution runs as `F.conv2d`, not as a module call.

    Args:
        dim: Input and output channels C, divisible by 4. Default: 512.
        kernel_size: Odd size of the key convolution (and the number of logit sets, $k^2$).
            Default: 3.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): the softmax weights `(B, C, H, W)`.

    Example:
        ```python
        >>> cot = FightingcvCoTAttention(dim=64, kernel_size=3)
        >>> cot(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])

        ```
    """

    def __init__(
        self,
        dim: int = 512,
        kernel_size: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(dim, "dim", who)
        check_int(kernel_size, "kernel_size", who)
        if kernel_size % 2 == 0:  # fightingcv builds it, then fails in every forward
            raise ValueError(
                f"{who}: kernel_size must be odd, got {kernel_size}: the key convolution pads by "
                "kernel_size // 2, which turns H into H + 1 for an even size (fightingcv's torch.cat fails)"
            )
        check_divisible(dim, 4, "dim", "the key convolution's groups", who)
        check_int(2 * dim // 4, "2 * dim // 4", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim, self.kernel_size = dim, kernel_size
        self.key_embed = nn.Sequential(*_conv_bn(dim, dim, kernel_size, 4, factory), nn.ReLU())
        self.value_embed = nn.Sequential(*_conv_bn(dim, dim, 1, 1, factory))
        self.attention_embed = nn.Sequential(
            *_conv_bn(2 * dim, 2 * dim // 4, 1, 1, factory),
            nn.ReLU(),
            nn.Conv2d(2 * dim // 4, kernel_size * kernel_size * dim, 1, **factory),
        )

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """fightingcv's forward on `x` `(B, C, H, W)`; with `need_weights`, also the softmax
        `(B, C, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.dim)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        k1 = self.key_embed(x)  # (B, C, H, W)
        v = self.value_embed(x)  # (B, C, H, W)
        hidden = self.attention_embed[:-1](torch.cat([k1, x], dim=1))  # (B, C/2, H, W)
        # fightingcv's last 1x1 convolution makes k*k logits per channel that it then averages: the
        # average of a linear map is the map with averaged weights, so one convolution makes the C
        # averaged logits directly (k*k times fewer products, no (B, C*k*k, H, W) tensor)
        last: nn.Conv2d = self.attention_embed[-1]  # type: ignore[assignment]
        kk = self.kernel_size * self.kernel_size
        weight = last.weight.view(c, kk, -1, 1, 1).mean(1)  # (C*k*k, C/2, 1, 1) -> (C, C/2, 1, 1)
        bias = None if last.bias is None else last.bias.view(c, kk).mean(1)  # (C,)
        logits = F.conv2d(hidden, weight, bias).reshape(b, c, h * w)  # (B, C, N)
        attn = logits.softmax(dim=-1).reshape(b, c, h, w)  # over all positions
        out = k1 + attn * v
        return (out, attn) if need_weights else out
