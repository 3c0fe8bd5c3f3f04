"""Selective Kernel convolution: split into kernel-size branches, fuse, select per channel.

Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019, https://arxiv.org/abs/1903.06586.

$$
U_i = \\mathrm{relu}(\\mathrm{bn}_i(\\mathrm{conv}_i\\, x)), \\quad
s = \\mathrm{mean}_{hw} \\textstyle\\sum_i U_i, \\quad z = \\mathrm{fc}(s), \\quad
a = \\mathrm{softmax}_i(\\mathrm{fc}_i(z)), \\quad \\mathrm{out} = \\textstyle\\sum_i a_i U_i
$$

for the branches $i = 0 \\ldots M-1$, per batch and channel (the paper's $z = \\mathrm{relu}(\\mathrm{bn}(
\\mathrm{fc}\\, s))$ with `fuse_norm_act=True`). Branch `i` is the seed's grouped `(3 + 2i) x (3 + 2i)`
convolution, or with `keep_3x3=True` (timm's name) the paper's 3x3 convolution with dilation `1 + i`
(same receptive field, fewer weights). The selection runs in one fused autograd Function
(`attnzoo.kernels.selective.select_branches`): the branches are never stacked or concatenated,
`mean_hw(sum_i U_i)` is a sum of per-branch means, and backward writes each branch gradient in one
fused multiply-add.

Options for timm's `SelectiveKernel` and fightingcv's `SKAttention` (`attnzoo.convert`): any odd
`kernel_sizes` (fightingcv's 1x1 branch), a module-wide `dilation`, `out_channels`, `split_input`
(branch i sees the i-th of M equal channel slices, timm's default) and `bias=False` (timm's
convolutions and attention layers have no biases).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_float, check_int
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.gate import to_batch_first
from attnzoo.kernels.selective import select_branches, select_with_weights
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_width
from attnzoo.mechanisms.se import from_batch_first

__all__ = ["SKConv", "SKEConv"]


@register(
    "sk",
    family="gating",
    paper="Selective Kernel Networks",
    year=2019,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "min_rd_channels": 4}, inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)
    ),
    aliases=("selective_kernel",),
    seed_name="SKEConv",
    for_input=lambda geo: {"groups": 2 if geo.channels % 2 == 0 else 1},  # groups must divide C
)
class SKConv(nn.Module):
    """Selective Kernel convolution (Li et al., 2019): M grouped convolution branches mixed per
    channel by a softmax over branches computed from their pooled sum.

    State dict keys are the seed's: `convs.i.0` (Conv2d with bias), `convs.i.1` (BatchNorm2d),
    `fc` (Linear C' -> d), `fcs.i` (Linear d -> C'), and with `fuse_norm_act` also `fuse.0`
    (BatchNorm1d(d)); C' is `out_channels`. The seed's `SKEConv(in_channels, M, G, stride, L, reduction)` is
    `attnzoo.compat.SKEConv`.

    Args:
        channels: Number of input channels C (seed: `in_channels`).
        num_branches: Number of branches M, at least 1 (seed: `M`; timm: `num_paths`). Default:
            None, `len(kernel_sizes)` or 2.
        groups: Groups of every branch convolution; must divide the branch's input and output
            widths (seed: `G`). Default: 2.
        stride: Stride of every branch convolution. Default: 1.
        min_rd_channels: Minimum width of `z` (seed and paper: `L`). Default: 32.
        reduction: `z` has `d = max(int(C' / reduction), min_rd_channels)` features. Default: 2.
        rd_channels: Width d of `z`, overriding `reduction` and `min_rd_channels`. Default: None.
        kernel_sizes: Odd kernel size of each branch (fightingcv's `kernels`, timm's
            `kernel_size`); M entries. Default: None, `(3, 5, ..., 1 + 2M)` (the seed's).
        dilation: Dilation of every branch (multiplied into the `keep_3x3` dilations). Default: 1.
        keep_3x3: A branch of kernel k is a 3x3 convolution with dilation `dilation * (k - 1) / 2`
            (the paper's choice, timm's name; branch i: dilation `1 + i` by default) instead of a
            k x k kernel. Default: False.
        out_channels: Output width C'. Default: None, C.
        split_input: Branch i convolves the i-th of M equal channel slices of the input (timm's
            `split_input`; C must be divisible by M) instead of the whole input. Default: False.
        bias: Biases in the branch convolutions, `fc` and `fcs` (timm has none). Default: True.
        fuse_norm_act: `z = relu(bn(fc s))` as in the paper and timm, instead of the seed's plain
            `z = fc s`. Default: False.
        batch_first: If False input and output are (C, B, H, W). Default: True.
        device: Device of the parameters and buffers. Default: None.
        dtype: dtype of the parameters and buffers. Default: None.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: (B, C', H', W') with `H' = (H - 1) // stride + 1` (same for W).
        - Weights (`need_weights=True`): the branch weights (B, M, C'), a softmax over M.

    Example:
        ```python
        >>> sk = SKConv(64, num_branches=2)
        >>> out, weights = sk(torch.randn(2, 64, 8, 8), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 64, 8, 8]), torch.Size([2, 2, 64]))
        ```
    """

    def __init__(
        self,
        channels: int,
        num_branches: int | None = None,
        groups: int = 2,
        stride: int = 1,
        min_rd_channels: int = 32,
        reduction: float = 2,
        *,
        rd_channels: int | None = None,
        kernel_sizes: Sequence[int] | None = None,
        dilation: int = 1,
        keep_3x3: bool = False,
        out_channels: int | None = None,
        split_input: bool = False,
        bias: bool = True,
        fuse_norm_act: bool = False,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        who = type(self).__name__
        check_int(channels, "channels", who)
        sizes = _kernel_sizes(kernel_sizes, num_branches, keep_3x3, who)
        num_branches = len(sizes)
        out = channels if out_channels is None else check_int(out_channels, "out_channels", who)
        check_int(groups, "groups", who)
        if split_input:
            check_divisible(channels, num_branches, "channels", "num_branches (split_input)", who)
        width = channels // num_branches if split_input else channels  # input width of a branch
        check_divisible(width, groups, "channels" if width == channels else "channels / num_branches",
                        "groups", who)
        check_divisible(out, groups, "out_channels", "groups", who)
        check_int(stride, "stride", who)
        check_int(dilation, "dilation", who)
        check_int(min_rd_channels, "min_rd_channels", who, minimum=0)
        if check_float(reduction, "reduction", who) <= 0:
            raise ValueError(f"{who}: reduction must be > 0, got {reduction}")
        if rd_channels is None:
            check_width(out / reduction, "reduction", reduction, who)
            self.d = max(int(out / reduction), min_rd_channels)
        else:
            self.d = check_int(rd_channels, "rd_channels", who)
        if self.d < 1:
            raise ValueError(
                f"{who}: reduction={reduction} and min_rd_channels={min_rd_channels} leave zero hidden "
                f"features for channels={channels}; expected max(int(channels / reduction), "
                "min_rd_channels) >= 1"
            )
        self.channels, self.num_branches, self.batch_first = channels, num_branches, bool(batch_first)
        self.out_channels, self.kernel_sizes, self.split_input = out, sizes, bool(split_input)
        self.convs = nn.ModuleList()
        for k in sizes:
            size, dil = (3, dilation * (k - 1) // 2) if keep_3x3 else (k, dilation)
            conv = nn.Conv2d(width, out, size, stride=stride, padding=dil * (size - 1) // 2, dilation=dil,
                             groups=groups, bias=bias, **dd)
            self.convs.append(nn.Sequential(conv, nn.BatchNorm2d(out, **dd), nn.ReLU(inplace=True)))
        self.fc = nn.Linear(out, self.d, bias=bias, **dd)
        self.fuse: nn.Module = (
            nn.Sequential(nn.BatchNorm1d(self.d, **dd), nn.ReLU(inplace=True))
            if fuse_norm_act
            else nn.Identity()
        )
        self.fcs = nn.ModuleList([nn.Linear(self.d, out, bias=bias, **dd) for _ in range(num_branches)])

    def attention(self, s: Tensor) -> Tensor:
        """Branch weights (B, M, C), a softmax over branches, from the pooled sum `s` (B, C)."""
        z = self.fuse(self.fc(s))  # (B, d)
        weights = torch.softmax(torch.stack([fc(z) for fc in self.fcs], dim=1), dim=1)  # (B, M, C)
        if capturing():  # map capture
            record(self, "branch", weights)
        return weights

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.channels)
        if self.split_input:  # M x (B, C / M, H, W) -> M x (B, C', H', W')
            parts = x.split(self.channels // self.num_branches, dim=1)
            branches = [conv(part) for conv, part in zip(self.convs, parts, strict=True)]
        else:
            branches = [conv(x) for conv in self.convs]  # M x (B, C', H', W')
        if not need_weights:
            params = (*self.fc.parameters(), *self.fuse.parameters(), *self.fcs.parameters())
            return from_batch_first(select_branches(branches, self.attention, params), self.batch_first)
        out, weights = select_with_weights(branches, self.attention)  # plain autograd, (B, M, C) weights
        return from_batch_first(out, self.batch_first), weights

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, kernel_sizes={self.kernel_sizes}, "
            f"split_input={self.split_input}, d={self.d}"
        )


def _kernel_sizes(
    kernel_sizes: Sequence[int] | None, num_branches: int | None, keep_3x3: bool, who: str
) -> tuple[int, ...]:
    """The branches' kernel sizes: `kernel_sizes` checked, or the seed's `(3, 5, ...)` for M branches."""
    if kernel_sizes is None:
        m = 2 if num_branches is None else check_int(num_branches, "num_branches", who)
        return tuple(3 + 2 * i for i in range(m))
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Sequence):
        raise TypeError(f"{who}: kernel_sizes must be a sequence of ints, got {type(kernel_sizes).__name__}")
    sizes = tuple(kernel_sizes)
    if not sizes:
        raise ValueError(f"{who}: kernel_sizes must not be empty")
    for k in sizes:
        if check_int(k, "kernel_sizes", who) % 2 == 0 or (keep_3x3 and k < 3):
            least = 3 if keep_3x3 else 1
            raise ValueError(f"{who}: kernel_sizes must hold odd ints >= {least}, got {sizes}")
    if num_branches is not None and check_int(num_branches, "num_branches", who) != len(sizes):
        raise ValueError(
            f"{who}: num_branches={num_branches} does not match kernel_sizes={sizes} ({len(sizes)} entries)"
        )
    return sizes


@register_seed("sk", example=Example({"in_channels": 8, "L": 4}, ((2, 8, 5, 6),), (2, 8, 5, 6)))
class SKEConv(SKConv):
    """The seed's `SKEConv(in_channels, M=2, G=2, stride=1, L=32, reduction=2, batch_first=True)`.

    Same constructor, state_dict keys and outputs as the seed (branch `i`: grouped conv of kernel
    `3 + 2i`, padding `1 + i`, BatchNorm, ReLU; `z = fc(s)` with no activation). Seed bugs fixed:

    - `self.M` was always 2 whatever `M` was (the branches were built from `M`); here `self.M == M`.
    - `batch_first=False` called the non-existent `x.permutation`; here the input is permuted.
    - The in-place `unsqueeze_` on the ReLU outputs broke backward (the seed could not train); the
      branches are combined without modifying them.
    - The seed's comment claims 2C output channels; the output has C channels, as the seed computes.

    Args:
        in_channels: Number of input (and output) channels C.
        M: Number of branches. Default: 2.
        G: Groups of every branch convolution. Default: 2.
        stride: Stride of every branch. Default: 1.
        L: Minimum width of `z`. Default: 32.
        reduction: `d = max(int(C / reduction), L)`. Default: 2.
        batch_first: If False input and output are (C, B, H, W). Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when `batch_first=False`.
        - Output: (B, C, H', W') with `H' = (H - 1) // stride + 1`.
    """

    def __init__(
        self,
        in_channels: int,
        M: int = 2,  # noqa: N803 (the paper's and the seed's names)
        G: int = 2,  # noqa: N803
        stride: int = 1,
        L: int = 32,  # noqa: N803
        reduction: float = 2,
        batch_first: bool = True,
    ) -> None:
        who = type(self).__name__
        check_int(in_channels, "in_channels", who)
        check_int(M, "M", who)
        check_int(G, "G", who)
        check_divisible(in_channels, G, "in_channels", "G", who)
        check_int(L, "L", who, minimum=0)
        if check_float(reduction, "reduction", who) > 0 and max(int(in_channels / reduction), L) < 1:
            raise ValueError(
                f"{who}: reduction={reduction} and L={L} leave zero hidden features for "
                f"in_channels={in_channels}; expected max(int(in_channels / reduction), L) >= 1"
            )
        super().__init__(in_channels, M, G, stride, L, reduction, batch_first=batch_first)
        self.M, self.in_channels = M, in_channels

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  # the seed's forward(x)
        return super().forward(x)  # type: ignore[return-value]
