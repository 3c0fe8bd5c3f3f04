"""Selective Kernel convolution: split into kernel-size branches, fuse, select per channel.

Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019, https://arxiv.org/abs/1903.06586.

    U_i = relu(bn_i(conv_i x))                      i = 0 .. M-1
    s = mean_hw(sum_i U_i);  z = fc(s)              (paper: z = relu(bn(fc s)), ``fuse_norm_act``)
    a = softmax_i(fcs_i(z));  out = sum_i a_i * U_i (per batch and channel)

Branch ``i`` is the seed's grouped ``(3 + 2i) x (3 + 2i)`` convolution, or with ``dilated=True``
the paper's 3x3 convolution with dilation ``1 + i`` (same receptive field, fewer weights).
The selection runs in one fused autograd Function (:func:`attnzoo.kernels.selective.select_branches`):
the branches are never stacked or concatenated, ``mean_hw(sum_i U_i)`` is a sum of per-branch
means, and backward writes each branch gradient in one fused multiply-add.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_float, check_int
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.gate import to_batch_first
from attnzoo.kernels.selective import select_branches
from attnzoo.maps.capture import capturing, record

__all__ = ["SKConv", "SKEConv"]


@register(
    "sk",
    family="gating",
    paper="Selective Kernel Networks",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"in_channels": 8, "L": 4}, inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)),
    aliases=("selective_kernel",),
    seed_name="SKEConv",
)
class SKConv(nn.Module):
    """Selective Kernel convolution (Li et al., 2019): M grouped convolution branches mixed per
    channel by a softmax over branches computed from their pooled sum.

    State dict keys are the seed's: ``convs.i.0`` (Conv2d with bias), ``convs.i.1`` (BatchNorm2d),
    ``fc`` (Linear C -> d), ``fcs.i`` (Linear d -> C), and with ``fuse_norm_act`` also ``fuse.0``
    (BatchNorm1d(d)).

    Args:
        in_channels: Number of input (and output) channels C.
        M: Number of branches, at least 1. Default: 2.
        G: Groups of every branch convolution; must divide C. Default: 2.
        stride: Stride of every branch convolution. Default: 1.
        L: Minimum width of ``z``. Default: 32.
        reduction: ``z`` has ``d = max(int(C / reduction), L)`` features. Default: 2.
        batch_first: If False input and output are (C, B, H, W). Default: True.
        dilated: Branch ``i`` is a 3x3 convolution with dilation ``1 + i`` (the paper's choice)
            instead of the seed's ``(3 + 2i) x (3 + 2i)`` kernel. Default: False.
        fuse_norm_act: ``z = relu(bn(fc s))`` as in the paper and timm, instead of the seed's plain
            ``z = fc s``. Default: False.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: (B, C, H', W') with ``H' = (H - 1) // stride + 1`` (same for W).
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
        *,
        dilated: bool = False,
        fuse_norm_act: bool = False,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(in_channels, "in_channels", who)
        check_int(M, "M", who)
        check_int(G, "G", who)
        check_divisible(in_channels, G, "in_channels", "G", who)
        check_int(stride, "stride", who)
        check_int(L, "L", who, minimum=0)
        if check_float(reduction, "reduction", who) <= 0:
            raise ValueError(f"{who}: reduction must be > 0, got {reduction}")
        self.d = max(int(in_channels / reduction), L)
        if self.d < 1:
            raise ValueError(
                f"{who}: reduction={reduction} and L={L} leave zero hidden features for "
                f"in_channels={in_channels}; expected max(int(in_channels / reduction), L) >= 1"
            )
        self.M, self.in_channels, self.batch_first = M, in_channels, bool(batch_first)
        self.convs = nn.ModuleList()
        for i in range(M):
            size, dilation = (3, 1 + i) if dilated else (3 + 2 * i, 1)
            conv = nn.Conv2d(
                in_channels, in_channels, size, stride=stride, padding=1 + i, dilation=dilation, groups=G
            )
            self.convs.append(nn.Sequential(conv, nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)))
        self.fc = nn.Linear(in_channels, self.d)
        self.fuse: nn.Module = (
            nn.Sequential(nn.BatchNorm1d(self.d), nn.ReLU(inplace=True)) if fuse_norm_act else nn.Identity()
        )
        self.fcs = nn.ModuleList([nn.Linear(self.d, in_channels) for _ in range(M)])

    def attention(self, s: Tensor) -> Tensor:
        """Branch weights (B, M, C), a softmax over branches, from the pooled sum ``s`` (B, C)."""
        z = self.fuse(self.fc(s))  # (B, d)
        weights = torch.softmax(torch.stack([fc(z) for fc in self.fcs], dim=1), dim=1)  # (B, M, C)
        if not torch.jit.is_scripting():
            if capturing():  # map capture
                record(self, "branch", weights)
        return weights

    def forward(self, x: Tensor) -> Tensor:
        x = to_batch_first(x, self.batch_first, type(self).__name__, C=self.in_channels)
        branches = [conv(x) for conv in self.convs]  # M x (B, C, H', W')
        params = (*self.fc.parameters(), *self.fuse.parameters(), *self.fcs.parameters())
        out = select_branches(branches, self.attention, params)
        return out if self.batch_first else out.permute(1, 0, 2, 3)  # (B, C, H, W) -> (C, B, H, W)


@register_seed("sk")
class SKEConv(SKConv):
    """The seed's ``SKEConv(in_channels, M=2, G=2, stride=1, L=32, reduction=2, batch_first=True)``.

    Same constructor, state_dict keys and outputs as the seed (branch ``i``: grouped conv of kernel
    ``3 + 2i``, padding ``1 + i``, BatchNorm, ReLU; ``z = fc(s)`` with no activation). Seed bugs fixed:

    - ``self.M`` was always 2 whatever ``M`` was (the branches were built from ``M``); here ``self.M == M``.
    - ``batch_first=False`` called the non-existent ``x.permutation``; here the input is permuted.
    - The in-place ``unsqueeze_`` on the ReLU outputs broke backward (the seed could not train); the
      branches are combined without modifying them.
    - The seed's comment claims 2C output channels; the output has C channels, as the seed computes.

    Args:
        in_channels: Number of input (and output) channels C.
        M: Number of branches. Default: 2.
        G: Groups of every branch convolution. Default: 2.
        stride: Stride of every branch. Default: 1.
        L: Minimum width of ``z``. Default: 32.
        reduction: ``d = max(int(C / reduction), L)``. Default: 2.
        batch_first: If False input and output are (C, B, H, W). Default: True.

    Shape:
        - Input: (B, C, H, W), or (C, B, H, W) when ``batch_first=False``.
        - Output: (B, C, H', W') with ``H' = (H - 1) // stride + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        M: int = 2,  # noqa: N803
        G: int = 2,  # noqa: N803
        stride: int = 1,
        L: int = 32,  # noqa: N803
        reduction: float = 2,
        batch_first: bool = True,
    ) -> None:
        super().__init__(in_channels, M, G, stride, L, reduction, batch_first)
