"""Bilinear attentional transforms (BAT), a non-local block of grouped block-mixing matrices.

Chi, Yuan, Yu, Bai, Sun, Dai, "Non-Local Neural Networks With Grouped Bilinear Attentional
Transforms", CVPR 2020, https://openaccess.thecvf.com/content_CVPR_2020/html/Chi_Non-Local_Neural_Networks_With_Grouped_Bilinear_Attentional_Transforms_CVPR_2020_paper.html
(code: https://github.com/BA-Transform/BAT-Image-Classification).

The map (H, W multiples of ``block_size`` b) is cut into b x b blocks of rows and of columns. Per
group of channels, a row-stochastic b x b matrix P mixes the row blocks and a column-stochastic
Q mixes the column blocks: ``y = (P kron I) x (Q kron I)``. The numbers and parameter names are
timm's ``BatNonLocalAttn`` (``timm.layers.non_local_attn``); ``attnzoo.convert.from_timm`` maps it
exactly. Deviations: timm builds the (H, H) and (W, W) Kronecker matrices and multiplies by them;
here P and Q act on the blocks directly (the same sums without the zeros), so memory stays
O(B C H W); the normalised sigmoids are computed as ``softmax(logsigmoid(.))`` (the same values),
which stays finite where timm's ``sigmoid / sum`` divides 0 by 0 on large inputs. Channel counts
the groups do not divide, and sizes that are no multiple of ``block_size``, raise
``ValueError`` (timm asserts or fails in ``view``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_float, check_int, check_shape
from attnzoo._fx import fx_leaf
from attnzoo._geometry import divisor_window, grid2d
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, record
from attnzoo.maps.records import query_cells
from attnzoo.mechanisms._widths import check_width, round_width

__all__ = ["BilinearAttnTransform", "BATNonLocalAttention"]


class _ConvNormAct(nn.Sequential):
    """1x1 convolution (no bias), norm, activation; timm's ``ConvNormAct`` keys (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, act_layer: type[nn.Module], norm_layer: type[nn.Module] | None,
                 dd: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False, **dd)
        self.bn = norm_layer(cout, **dd) if norm_layer is not None else nn.Identity()
        self.act = act_layer()


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class BilinearAttnTransform(nn.Module):
    """The grouped bilinear transform ``y = (P kron I) x (Q kron I)``, then a 1x1 conv-norm-act.

    Args:
        channels: Number of input channels C (divisible by ``groups``).
        block_size: Blocks per side b; H and W must be multiples of it. Default: 7.
        groups: Channel groups G, each with its own P and Q. Default: 2.
        act_layer: Activation class. Default: ``nn.ReLU``.
        norm_layer: Norm class; None for none. Default: ``nn.BatchNorm2d``.

    Shape:
        - Input: (B, C, H, W), H and W multiples of b.
        - Output: (B, C, H, W); the matrices (B, 2, G, b, b): P, then Q transposed (rows sum to 1).
    """

    def __init__(
        self,
        channels: int,
        block_size: int = 7,
        groups: int = 2,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        for value, name in ((channels, "channels"), (block_size, "block_size"), (groups, "groups")):
            check_int(value, name, who)
        check_divisible(channels, groups, "channels", "groups", who)
        dd = {"device": device, "dtype": dtype}
        self.channels, self.block_size, self.groups = channels, block_size, groups
        b2g = block_size * block_size * groups
        self.conv1 = _ConvNormAct(channels, groups, act_layer, norm_layer, dd)
        self.conv_p = nn.Conv2d(groups, b2g, (block_size, 1), **dd)
        self.conv_q = nn.Conv2d(groups, b2g, (1, block_size), **dd)
        self.conv2 = _ConvNormAct(channels, channels, act_layer, norm_layer, dd)

    def matrices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """P (B, G, b, b), rows summing to 1, and Q (B, G, b, b), columns summing to 1."""
        B, b, G = x.shape[0], self.block_size, self.groups
        z = self.conv1(x)  # (B, G, H, W)
        p = self.conv_p(F.adaptive_max_pool2d(z, (b, 1))).view(B, G, b, b)  # (B, b*b*G, 1, 1) -> (B, G, b, b)
        q = self.conv_q(F.adaptive_max_pool2d(z, (1, b))).view(B, G, b, b)  # (B, b*b*G, 1, 1) -> (B, G, b, b)
        # sigmoid(l) / sum sigmoid(l) == softmax(logsigmoid(l)), which stays finite when every
        # sigmoid of a row underflows to 0 (timm's division gives 0/0 = NaN there)
        return torch.softmax(F.logsigmoid(p), dim=3), torch.softmax(F.logsigmoid(q), dim=2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, C, H, W = x.shape
        b, G = self.block_size, self.groups
        p, q = self.matrices(x)
        # (P kron I_t) x: row h = i*t + a takes sum_j P[i, j] x[j*t + a]; t = H / b
        rows = x.reshape(B, G, C // G, b, (H // b) * W)  # (B, C, H, W) -> (B, G, C/G, b, t*W)
        y = torch.matmul(p[:, :, None], rows)
        # y (Q kron I_u): column k*u + e takes sum_l y[l*u + e] Q[l, k]; u = W / b. The block axis l is
        # moved first (one copy), so each (B, G) takes one (b, b) @ (b, C/G H u) product: broadcasting Q
        # over (C/G, H) instead ran B G C/G H tiny products, and its backward summed a gradient of Q
        # per (C/G, H), 2.6x the time of the copies and the one product
        u = W // b
        cols = y.reshape(B, G, C // G, H, b, u).permute(0, 1, 4, 2, 3, 5)  # (B, G, b, C/G, H, u)
        y = torch.matmul(q.transpose(2, 3), cols.reshape(B, G, b, -1))  # (B, G, b, C/G H u)
        y = y.view(B, G, b, C // G, H, u).permute(0, 1, 3, 4, 2, 5)  # (B, G, C/G, H, b, u)
        y = self.conv2(y.reshape(B, C, H, W))  # (B, G, C/G, H, b, u) -> (B, C, H, W)
        return y, torch.stack([p, q.transpose(2, 3)], dim=1)  # (B, 2, G, b, b)


@register(
    "bat",
    family="global",
    paper="Non-Local Neural Networks With Grouped Bilinear Attentional Transforms",
    year=2020,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "block_size": 2, "proj_drop": 0.0},
        inputs=((2, 8, 4, 6),),
        output=(2, 8, 4, 6),
        # H and W must be multiples of block_size
        free_sizes=(FreeSize(((0, 2),), 2, step=2, low=2), FreeSize(((0, 3),), 3, step=2, low=2)),
    ),
    aliases=("bilinear_attentional_transform",),
    # Blocks per side that divide the map (7 where it allows, as timm's default).
    for_input=lambda geo: {"block_size": divisor_window(*grid2d(geo))},
)
class BATNonLocalAttention(nn.Module):
    """BAT non-local block (Chi et al., 2020): reduce, bilinear attentional transform, expand, add.

    $$
    P = \\mathrm{norm}_{\\text{rows}}\\,\\sigma(\\mathrm{conv}_p(\\text{max-pool}_{b\\times 1} z)),\\quad
    Q = \\mathrm{norm}_{\\text{cols}}\\,\\sigma(\\mathrm{conv}_q(\\text{max-pool}_{1\\times b} z)),\\quad
    y = x + \\mathrm{drop}\\big(\\phi_{out}\\big((P \\otimes I)\\,\\phi_{in}(x)\\,(Q \\otimes I)\\big)\\big)
    $$

    with $z$ a 1x1 projection of $\\phi_{in}(x)$ to G maps, one (P, Q) pair per channel group, and
    $\\phi$ 1x1 conv-norm-act layers.

    Args:
        channels: Number of input channels C.
        block_size: Blocks per side b; H and W must be multiples of it. Default: 7.
        groups: Channel groups of the transform; must divide the hidden width. Default: 2.
        reduction: Hidden width ``C / reduction`` rounded to a multiple of ``rd_divisor``. Default: 4
            (timm's ``rd_ratio=0.25``).
        rd_channels: Hidden width, overriding ``reduction``. Default: None.
        rd_divisor: Rounding of the hidden width. Default: 8.
        proj_drop: Channel dropout (``nn.Dropout2d``) on the block's output before the residual
            sum. Default: 0.2 (the paper's and timm's).
        act_layer: Activation class. Default: ``nn.ReLU``.
        norm_layer: Norm class; None for none. Default: ``nn.BatchNorm2d``.

    Shape:
        - Input: (B, C, H, W), H and W multiples of ``block_size``.
        - Output: (B, C, H, W); with ``need_weights=True`` also the matrices (B, 2, G, b, b): P,
          then Q transposed (every row sums to 1).

    Example:
        ```python
        >>> bat = BATNonLocalAttention(64, block_size=7).eval()
        >>> bat(torch.randn(2, 64, 14, 21)).shape
        torch.Size([2, 64, 14, 21])

        ```
    """

    def __init__(
        self,
        channels: int,
        block_size: int = 7,
        groups: int = 2,
        reduction: float = 4.0,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        proj_drop: float = 0.2,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        for value, name in ((channels, "channels"), (block_size, "block_size"), (groups, "groups"),
                            (rd_divisor, "rd_divisor")):
            check_int(value, name, who)
        check_float(reduction, "reduction", who)
        if not reduction > 0:
            raise ValueError(f"{who}: reduction must be > 0, got {reduction}")
        check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0)
        derived = rd_channels is None
        if rd_channels is None:
            check_width(channels / reduction, "reduction", reduction, who)
            rd_channels = round_width(channels / reduction, rd_divisor, round_limit=0.9)
        check_int(rd_channels, "rd_channels", who)
        if derived and rd_channels % groups:  # name what the user gave: reduction and rd_divisor
            raise ValueError(f"{who}: rd_channels={rd_channels} (channels / reduction rounded to rd_divisor="
                             f"{rd_divisor}) must be divisible by groups={groups}; give rd_channels")
        check_divisible(rd_channels, groups, "rd_channels", "groups", who)
        dd = {"device": device, "dtype": dtype}
        self.channels, self.block_size, self.rd_channels = channels, block_size, rd_channels
        # timm's names and layout (conv1, ba, conv2, dropout), so its state_dict loads unchanged.
        self.conv1 = _ConvNormAct(channels, rd_channels, act_layer, norm_layer, dd)
        self.ba = BilinearAttnTransform(
            rd_channels, block_size, groups, act_layer, norm_layer, device=device, dtype=dtype
        )
        self.conv2 = _ConvNormAct(rd_channels, channels, act_layer, norm_layer, dd)
        self.dropout = nn.Dropout2d(proj_drop)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        who, b = type(self).__name__, self.block_size
        dims = check_shape(x, who, "B C H W", C=self.channels)
        for letter in ("H", "W"):
            if dims[letter] % b:
                raise ValueError(
                    f"{who} expects x of shape (B, {self.channels}, H, W) with H and W multiples of "
                    f"block_size={b}, got {tuple(x.shape)}"
                )
        y, weights = self.ba(self.conv1(x))
        out = x + self.dropout(self.conv2(y))
        if capturing():  # map capture, one record: block (i, k) takes block (j, l) with P[i, j] Q[l, k]
            # (P's and Q's own records were drawn as P's alone: horizontal bands, no column mixing)
            idx = query_cells((dims["H"], dims["W"]), (dims["H"] // b, dims["W"] // b), b, x.device)
            p_rows, qt_rows = weights[:, 0][:, :, idx // b], weights[:, 1][:, :, idx % b]  # (B, G, Q, b) each
            rows = (p_rows[..., :, None] * qt_rows[..., None, :]).flatten(3)  # (B, G, Q, b*b), rows sum to 1
            record(self, "rows", rows, grid=(b, b), queries=idx, query_grid=(b, b),
                   note=f"{b}x{b} blocks: each query's weight on the pixels at its offset in every block")
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}, block_size={self.block_size}"
