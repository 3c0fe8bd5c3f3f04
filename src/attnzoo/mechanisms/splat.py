"""Split attention (ResNeSt's "splat" convolution).

Zhang et al., "ResNeSt: Split-Attention Networks", CVPR-W 2022, https://arxiv.org/abs/2004.08955.

A grouped convolution makes ``radix`` feature-map splits of ``out_channels`` each; their sum is
pooled, a two-layer bottleneck scores every (split, channel), a softmax over the splits (a sigmoid
when ``radix == 1``) weighs them, and the output is the weighted sum of the splits. It changes the
width (``out_channels``) and, with ``stride``, the resolution. The numbers and parameter names are
timm's ``SplitAttn`` (``timm.layers.split_attn``); ``attnzoo.convert.from_timm`` maps it exactly.
Deviations from timm: ``rd_channels`` is the whole hidden width (timm multiplies it by ``radix``),
the default padding keeps the size for every dilation (timm's ``kernel_size // 2`` ignores it), and
the activation modules are not in-place. Without ``need_weights`` or map capture the splits are
combined by SK's fused selection (`attnzoo.kernels.selective.select_splits`): they stay views of the
convolution's output, a ReLU ``act_layer`` runs inside it (its output is never held whole), no
(B, radix, C, H, W) product is built, and backward writes the splits' gradient, the pooled sum's
gradient and the ReLU's mask into one buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_float, check_int, check_shape
from attnzoo._geometry import check_conv_fits
from attnzoo._registry import Example, register
from attnzoo.kernels.selective import select_splits, select_with_weights
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_width, round_width

__all__ = ["SplitAttention"]


@register(
    "splat",
    family="gating",
    paper="ResNeSt: Split-Attention Networks",
    year=2022,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "rd_channels": 8}, inputs=((2, 8, 5, 7),), output=(2, 8, 5, 7)),
    aliases=("split_attention", "resnest"),
)
class SplitAttention(nn.Module):
    """Split attention (Zhang et al., 2022): a grouped convolution into ``radix`` splits, mixed per
    channel by a softmax over the splits computed from their pooled sum.

    $$
    U_r = \\delta(\\mathrm{BN}(\\mathrm{conv}(x))_r),\\quad
    s = \\mathrm{mean}_{hw} \\sum_r U_r,\\quad
    a = \\mathrm{softmax}_r\\big(W_2\\,\\delta(\\mathrm{BN}(W_1 s))\\big),\\quad
    y = \\sum_r a_r \\odot U_r
    $$

    The softmax runs over the splits within each of the ``groups`` cardinal groups.

    Args:
        channels: Number of input channels C.
        out_channels: Output width C'. Default: None (C).
        kernel_size: Side of the split convolution. Default: 3.
        stride: Stride of the split convolution. Default: 1.
        padding: Padding of the split convolution. Default: None (``dilation * (kernel_size - 1) // 2``,
            the same size at stride 1).
        dilation: Dilation of the split convolution. Default: 1.
        groups: Cardinality: groups of the convolution (times ``radix``) and of the bottleneck; must
            divide C' and the hidden width, and ``groups * radix`` must divide C. Default: 1.
        bias: Bias on the split convolution. Default: False.
        radix: Number of splits R. Default: 2.
        reduction: Hidden width ``C * R / reduction`` rounded to a multiple of ``rd_divisor``, at
            least 32. Default: 4 (timm's ``rd_ratio=0.25``).
        rd_channels: Hidden width of the bottleneck, overriding ``reduction``. Default: None.
        rd_divisor: Rounding of the hidden width. Default: 8.
        act_layer: Activation class after the convolution and in the bottleneck. Default: ``nn.ReLU``.
        norm_layer: Norm class after the convolution and in the bottleneck; None for none. Default: None.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, C', H', W') with H', W' the convolution's output size; with
          ``need_weights=True`` also the split weights (B, R, C').

    Example:
        ```python
        >>> splat = SplitAttention(64, out_channels=32, stride=2)
        >>> splat(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 32, 5, 4])

        ```
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        radix: int = 2,
        reduction: float = 4.0,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        out_channels = channels if out_channels is None else out_channels
        for value, name in ((out_channels, "out_channels"), (kernel_size, "kernel_size"), (stride, "stride"),
                            (dilation, "dilation"), (groups, "groups"), (radix, "radix"),
                            (rd_divisor, "rd_divisor")):
            check_int(value, name, who)
        check_float(reduction, "reduction", who)
        if not reduction > 0:
            raise ValueError(f"{who}: reduction must be > 0, got {reduction}")
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        check_int(padding, "padding", who, minimum=0)
        if rd_channels is None:
            check_width(channels * radix / reduction, "reduction", reduction, who)
            rd_channels = round_width(channels * radix / reduction, rd_divisor, minimum=32, round_limit=0.9)
        check_int(rd_channels, "rd_channels", who)
        check_divisible(channels, groups * radix, "channels", "groups * radix", who)
        check_divisible(out_channels, groups, "out_channels", "groups", who)
        check_divisible(rd_channels, groups, "rd_channels", "groups", who)
        dd = {"device": device, "dtype": dtype}
        mid = out_channels * radix
        self.channels, self.out_channels, self.radix, self.groups = channels, out_channels, radix, groups
        self.rd_channels = rd_channels
        # timm's names and layout, so its state_dict loads unchanged.
        self.conv = nn.Conv2d(channels, mid, kernel_size, stride, padding, dilation, groups=groups * radix,
                              bias=bias, **dd)
        self.bn0 = norm_layer(mid, **dd) if norm_layer is not None else nn.Identity()
        self.drop: nn.Module = nn.Identity()  # from_timm puts timm's drop_layer (DropBlock) here
        self.act0 = act_layer()
        self.fc1 = nn.Conv2d(out_channels, rd_channels, 1, groups=groups, **dd)
        self.bn1 = norm_layer(rd_channels, **dd) if norm_layer is not None else nn.Identity()
        self.act1 = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, mid, 1, groups=groups, **dd)

    def split_weights(self, pooled: Tensor) -> Tensor:
        """Weights (B, R, C') of the splits from the pooled sum of the splits (B, C')."""
        B, R, G = pooled.shape[0], self.radix, self.groups
        hidden = self.act1(self.bn1(self.fc1(pooled[:, :, None, None])))  # (B, C') -> (B, rd, 1, 1)
        logits = self.fc2(hidden).view(B, G, R, -1)  # (B, R * C', 1, 1) -> (B, G, R, C' / G)
        if R == 1:
            return torch.sigmoid(logits).view(B, 1, -1)  # (B, 1, 1, C') -> (B, 1, C')
        # softmax over the splits of each cardinal group; (B, G, R, C'/G) -> (B, R, G, C'/G) -> (B, R, C')
        return torch.softmax(logits, dim=2).transpose(1, 2).reshape(B, R, -1)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        conv = self.conv
        check_conv_fits((dims["H"], dims["W"]), conv.kernel_size, conv.padding, conv.dilation,  # type: ignore[arg-type]
                        type(self).__name__)
        pre = self.drop(self.bn0(self.conv(x)))  # (B, R * C', H', W')
        B, R = pre.shape[0], self.radix
        if not (need_weights or capturing()):  # SK's fused selection, the splits as views of u
            params = [p for m in (self.fc1, self.bn1, self.act1, self.fc2) for p in m.parameters()]
            if type(self.act0) is nn.ReLU:  # the ReLU runs inside the kernel, a few samples at a time
                return select_splits(pre, R, self.split_weights, params, relu=True)
            return select_splits(self.act0(pre), R, self.split_weights, params)
        u = self.act0(pre)
        splits = u.view(B, R, self.out_channels, *u.shape[2:])  # (B, R * C', H', W') -> (B, R, C', H', W')
        # unbind, not splits[:, r]: its backward stacks the R gradients once, where R selects would
        # each fill a zero (B, R, C', H', W') gradient and add them (two full-size buffers more at peak)
        out, weights = select_with_weights(splits.unbind(1), self.split_weights)  # weights (B, R, C')
        if capturing():  # map capture: the weights of the splits
            record(self, "branch", weights)
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, out_channels={self.out_channels}, radix={self.radix}, "
                f"groups={self.groups}, rd_channels={self.rd_channels}")
