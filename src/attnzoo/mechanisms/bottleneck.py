"""Bottleneck self-attention (BoTNet): global multi-head self-attention over a feature map with 2-D
relative position logits, in place of the 3x3 convolution of a ResNet bottleneck.

Srinivas, Lin, Parmar, Shlens, Abbeel, Vaswani, "Bottleneck Transformers for Visual Recognition",
CVPR 2021, https://arxiv.org/abs/2101.11605.

The numbers and state_dict keys are timm's ``BottleneckAttn`` (``timm.layers.bottleneck_attn``,
``create_attn("bottleneck")``); ``attnzoo.convert.from_timm`` converts it exactly. Deviations: the
relative logits are gathered from the tables by index (timm pads and reshapes, the same numbers);
the softmax attention runs in ``attnzoo.functional.attend`` with the logits as its bias; ``stride``
other than 1 or 2 raises ``ValueError`` (timm silently ignores it), as does an input whose size is
not ``feat_size`` (timm asserts); ``out_channels`` must be divisible by ``num_heads``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._geometry import grid2d, int_pair
from attnzoo._registry import Example, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms._relpos import check_stride, qk_head_width, rel_logits_2d

__all__ = ["BottleneckAttention", "RelPosTables"]

_PAPER = "Bottleneck Transformers for Visual Recognition"


class RelPosTables(nn.Module):
    """The two relative position tables `height_rel` `(2 Th - 1, d)` and `width_rel` `(2 Tw - 1, d)`
    (timm's ``PosEmbedRel`` keys), initialised from a normal of std `scale`."""

    def __init__(
        self, size: tuple[int, int], head_dim: int, scale: float, factory: dict[str, Any]
    ) -> None:
        super().__init__()
        self.height_rel = nn.Parameter(torch.empty(2 * size[0] - 1, head_dim, **factory))
        self.width_rel = nn.Parameter(torch.empty(2 * size[1] - 1, head_dim, **factory))
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.height_rel, std=self.scale)
        nn.init.trunc_normal_(self.width_rel, std=self.scale)

    def forward(self, q: Tensor, keys: tuple[int, int]) -> Tensor:
        """Logits `(..., Qh*Qw, Kh*Kw)` of queries `(..., Qh, Qw, d)` over a `keys` grid."""
        return rel_logits_2d(q, self.height_rel, self.width_rel, keys)


@register(
    "bottleneck",
    family="global",
    paper=_PAPER,
    year=2021,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "feat_size": (4, 5), "num_heads": 2},
        inputs=((2, 8, 4, 5),),
        output=(2, 8, 4, 5),
        free_sizes=(),  # the relative position tables fix H and W
    ),
    aliases=("bottleneck_attn", "botnet"),
    uses_attend=True,
    for_input=lambda g: {"feat_size": grid2d(g)},  # a square token sequence is a map too
)
class BottleneckAttention(nn.Module):
    """BoTNet's multi-head self-attention with 2-D relative position logits (Srinivas et al., 2021).

    Per head, with queries, keys and values from one 1x1 convolution and relative tables
    $r^h$, $r^w$ over vertical and horizontal offsets, query $i$ and key $j$ score

    $$
    \\ell_{ij} = s\\, q_i^\\top k_j + q_i^\\top\\big(r^h_{y_j - y_i} + r^w_{x_j - x_i}\\big),
    \\qquad y_i = \\sum_j \\mathrm{softmax}_j(\\ell_{ij})\\, v_j
    $$

    with $s = d^{-1/2}$ (`scale_pos_embed=True` scales the relative term too). Heads are
    concatenated; `stride=2` average-pools the output by 2. The softmax attention runs in
    `attnzoo.functional.attend` with the relative logits as its bias.

    Time $O(B h N^2 d)$ and memory $O(B h N^2)$ for $N = HW$: the attention is global.

    Args:
        channels: Number of input channels C.
        out_channels: Output width (`num_heads` times the value head width). Default: `channels`.
        feat_size: Input size `(H, W)` (or one int), which the relative tables fix. Default: 7.
        stride: 1, or 2 to average-pool the output by 2. Default: 1.
        num_heads: Number of heads h. Default: 4.
        head_dim: Query/key width d per head. Default: None, timm's
            `make_divisible(out_channels * qk_ratio, 8) // num_heads`.
        qk_ratio: Query/key to output width ratio used when `head_dim` is None. Default: 1.0.
        qkv_bias: Bias in the q, k, v convolution. Default: False.
        scale_pos_embed: Scale the relative logits by $s$ as well. Default: False.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)` with `(H, W) = feat_size`.
        - Output: `(B, out_channels, H / stride, W / stride)` (floored).
        - Weights (`need_weights=True`): `(B, h, H*W, H*W)`.

    Example:
        ```python
        >>> attn = BottleneckAttention(64, feat_size=(8, 8))
        >>> attn(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])

        ```
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        feat_size: int | tuple[int, int] = 7,
        stride: int = 1,
        num_heads: int = 4,
        head_dim: int | None = None,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        scale_pos_embed: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        out = channels if out_channels is None else check_int(out_channels, "out_channels", who)
        check_int(num_heads, "num_heads", who)
        check_divisible(out, num_heads, "out_channels", "num_heads", who)
        self.feat_size = int_pair(feat_size, "feat_size", who)
        self.stride = check_stride(stride, who)
        self.channels, self.out_channels, self.num_heads = channels, out, num_heads
        self.head_dim = qk_head_width(out, num_heads, head_dim, qk_ratio, who)
        self.v_head_dim = out // num_heads
        self.scale = self.head_dim**-0.5
        self.scale_pos_embed = scale_pos_embed
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        qk = num_heads * self.head_dim
        self.qkv = nn.Conv2d(channels, 2 * qk + out, 1, bias=qkv_bias, **factory)
        self.pos_embed = RelPosTables(self.feat_size, self.head_dim, self.scale, factory)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, out_channels={self.out_channels}, feat_size={self.feat_size}, "
                f"num_heads={self.num_heads}, stride={self.stride}")

    def reset_parameters(self) -> None:
        """timm's initialisation: fan-in truncated normals for the projection, std $s$ for the tables."""
        nn.init.trunc_normal_(self.qkv.weight, std=self.qkv.weight.shape[1] ** -0.5)
        self.pos_embed.reset_parameters()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over `x` `(B, C, H, W)`; with `need_weights`, also return the weights `(B, h, N, N)`."""
        height, width = self.feat_size
        sizes = check_shape(x, type(self).__name__, "B C H W", C=self.channels, H=height, W=width)
        batch, heads, n = sizes["B"], self.num_heads, height * width
        qk = heads * self.head_dim
        q, k, v = self.qkv(x).flatten(2).split([qk, qk, self.out_channels], dim=1)  # (B, *, N) each
        # each slice copied as it lies (channel-major, so the batch and head axes merge), not
        # transposed: a straight copy is cheaper, and the products take the transposed view as it is
        q, k, v = (  # (B, h, N, d), (B, h, N, d), (B, h, N, e)
            t.reshape(batch * heads, -1, n).view(batch, heads, -1, n).transpose(-1, -2) for t in (q, k, v)
        )
        grid = q.reshape(batch, heads, height, width, self.head_dim)  # (B, h, H, W, d)
        bias = self.pos_embed(grid, (height, width))  # (B, h, N, N)
        if self.scale_pos_embed:
            bias = bias * self.scale
        result = attend(q, k, v, bias=bias, scale=self.scale, need_weights=need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():
            record_rows(self, q, k, grid=(height, width), bias=bias, scale=self.scale)
        y = out.transpose(-1, -2).reshape(batch, self.out_channels, height, width)  # (B, h*e, H, W)
        if self.stride == 2:
            y = F.avg_pool2d(y, 2)
        return (y, weights) if weights is not None else y
