"""ACmix: On the Integration of Self-Attention and Convolution (Pan et al., CVPR 2022).

Paper: https://arxiv.org/abs/2111.14556. Official code: `LeapLabTHU/ACmix`, `ResNet/test_bottleneck.py`.
Official parameter names, state_dict, initialisation and numbers (checked against recorded official
outputs); an independent implementation. `ACmix(channels, ...)` is the canonical class;
`OfficialACmix` (exported as `attnzoo.compat.ACmix`) has the official constructor
`(in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride=1, dilation=1)` and
`forward(x)`. Differences (details in `docs/acmix.md`):

- The position grid is built in the input's dtype/device (official: the default dtype, so float64
  needs `torch.set_default_dtype`).
- No `kernel_att**2`-fold unfold of k, v, pe: a kernel walks the neighbour offsets over shifted
  slices (forward and backward). `q . pe[centre]` cancels in the softmax and is dropped; the rest
  folds into the keys (`k - pe`). `fc` is folded into the `dep_conv` weights (both linear).
- Lifted: H, W not divisible by `stride` (output `ceil(H / stride)`, as unfold gives); any odd
  `kernel_conv` (padding `kernel_conv // 2`; the official hard-codes 1, which runs only for
  `3 <= kernel_conv <= stride + 2`, and `OfficialACmix` keeps it there); `dilation` spaces the
  attention window (official: crashes; the conv branch stays undilated, as official); maps not
  larger than the padding use repeated reflection (`numpy.pad` "reflect"; official: crashes).
- Rejected at construction: even `kernel_att`/`kernel_conv`, `out_planes % head != 0`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.neighbourhood import neighbourhood_attention, reflect_pad
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_local_rows

__all__ = ["ACmix", "OfficialACmix", "neighbourhood_attention", "reflect_pad"]


def position_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The official 2-channel grid: channel 0 is `linspace(-1, 1, W)` along x, channel 1 along y.

    Built in `dtype` (float32 for half types, then cast). Shape: `(1, 2, H, W)`.
    """
    build = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    loc_x = torch.linspace(-1.0, 1.0, width, dtype=build, device=device).expand(height, width)
    loc_y = torch.linspace(-1.0, 1.0, height, dtype=build, device=device)[:, None].expand(height, width)
    return torch.stack([loc_x, loc_y]).unsqueeze(0).to(dtype)  # (1, 2, H, W)


def neighbour_weights(q: Tensor, k_pad: Tensor, kernel: int, dilation: int, stride: int) -> Tensor:
    """The softmax weights of `neighbourhood_attention`, with plain (differentiable) ops.

    Query `(y, x)` against `k_pad[..., stride*y + dilation*i, stride*x + dilation*j]`, neighbours
    `(i, j)` row-major (the official `unfold` order).

    Shape:
        - q: `(N, d, Ho, Wo)`; k_pad: `(N, d, Hp, Wp)`.
        - Output: `(N, Ho, Wo, kernel**2)`.
    """
    out_h, out_w = q.shape[-2:]
    end_y, end_x = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    rows = [slice(i * dilation, i * dilation + end_y, stride) for i in range(kernel)]
    cols = [slice(j * dilation, j * dilation + end_x, stride) for j in range(kernel)]
    logits = [(q * k_pad[..., r, c]).sum(1) for r in rows for c in cols]  # kernel**2 x (N, Ho, Wo)
    return torch.stack(logits, -1).softmax(-1)  # (N, Ho, Wo, kernel**2)


@register(
    "acmix",
    family="hybrid",
    paper="On the Integration of Self-Attention and Convolution",
    year=2022,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 4, "out_channels": 8, "kernel_att": 3, "num_heads": 2},
        inputs=((2, 4, 5, 6),),
        output=(2, 8, 5, 6),
        channel_dim=1,
    ),
    seed_name="ACmix",
    limitations={
        "fullgraph": (
            "ACmix's neighbourhood kernel accumulates into preallocated strided buffers (`out=`), which "
            "Dynamo cannot put in one graph; torch.compile works with a graph break there"
        ),
    },
)
class ACmix(nn.Module):
    r"""ACmix: a local self-attention branch and a convolution branch sharing one set of 1x1 projections.

    Three 1x1 convolutions give q, k, v (`out_channels` channels, `num_heads` heads of
    `head_dim = out_channels // num_heads`). The attention branch lets every (strided) pixel attend
    its `kernel_att x kernel_att` reflection-padded neighbourhood per head, with a relative position
    term; the convolution branch mixes the `3 * num_heads` q/k/v feature maps per head-channel into
    `kernel_conv**2` maps (`fc`) and applies a grouped `kernel_conv x kernel_conv` convolution
    (`dep_conv`, initialised to shifts). The output is `rate1 * attention + rate2 * convolution`.

    Algorithm (input `(B, C, H, W)`, $h$ = `num_heads`, $d$ = `head_dim`, $s$ = `stride`,
    `Ho, Wo = ceil(H/s), ceil(W/s)`, `ka = kernel_att`, `kc = kernel_conv`):

    1. `q, k, v = conv1(x), conv2(x), conv3(x)`: `(B, h*d, H, W)` each, channel `g*d + c`
       belongs to head g.
    2. `pe = conv_p(grid)`: `(1, d, H, W)`, the grid holding `linspace(-1, 1)` along x and y.
    3. Attention logits of query pixel p (taken every s pixels) and neighbour n of its
       `ka x ka` window (keys and pe reflection-padded by `dilation*(ka-1)//2`):
       $d^{-1/2}\, q_p \cdot (k_n + pe_p - pe_n)$; softmax over the `ka**2` neighbours;
       output $\sum_n w_n v_n$: `(B, h*d, Ho, Wo)`. ($q_p \cdot pe_p$ cancels in the softmax and
       so does `conv_p.bias`.)
    4. `fc` maps, per pixel and head-channel c, the `3h` values `(q, k, v)[g*d + c]` to `kc**2`
       values: `(B, kc**2, d, H*W)`, read as `(B, d*kc**2, H, W)` (channel `c*kc**2 + j`).
    5. `dep_conv`: grouped `kc x kc` convolution, `groups=d`, stride s, padding `kc//2`, no
       bias: `(B, out_channels, Ho, Wo)`.
    6. Output `rate1 * attention + rate2 * convolution`.

    The official `in_planes`, `out_planes` and `head` are `channels`, `out_channels` and
    `num_heads` here; `kernel_att` and `kernel_conv` (the paper's $k_{att}$, $k_{conv}$) keep their
    names: ACmix has two kernels, neither of which is "the" `kernel_size`.

    Args:
        channels: Input channels C (official: `in_planes`).
        out_channels: Output channels; divisible by `num_heads` (official: `out_planes`, required).
            Default: None (= `channels`).
        kernel_att: Side of the attention neighbourhood, odd. Default: 7.
        num_heads: Number of heads (official: `head`). Default: 4.
        kernel_conv: Kernel size of the convolution branch, odd (the official supports only 3).
            Default: 3.
        stride: Output stride of both branches; the output side is `ceil(H / stride)`. Default: 1.
        dilation: Spacing of the attention neighbourhood (the convolution branch is not dilated, as
            in the official code, where only 1 runs). Default: 1.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, channels, H, W)`.
        - Output: `(B, out_channels, ceil(H / stride), ceil(W / stride))`.
        - Weights (`need_weights=True`): `(B, num_heads, Ho, Wo, kernel_att**2)`, the attention
          branch's softmax over each output pixel's neighbours, row-major.

    Example:
        ```python
        >>> m = ACmix(64)          # out_channels=64, kernel_att=7, num_heads=4, kernel_conv=3, stride=1
        >>> m(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 56, 56])

        ```
    """

    # Argument names in error messages; the official class spells them its own way.
    _names = {"channels": "channels", "out_channels": "out_channels", "num_heads": "num_heads"}

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        kernel_att: int = 7,
        num_heads: int = 4,
        kernel_conv: int = 3,
        stride: int = 1,
        dilation: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who, names = type(self).__name__, self._names
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = check_int(channels, names["channels"], who)
        out_channels = channels if out_channels is None else out_channels
        self.out_channels = check_int(out_channels, names["out_channels"], who)
        self.num_heads = check_int(num_heads, names["num_heads"], who)
        check_divisible(out_channels, num_heads, names["out_channels"], names["num_heads"], who)
        self.kernel_att = check_int(kernel_att, "kernel_att", who)
        self.kernel_conv = check_int(kernel_conv, "kernel_conv", who)
        for name, size in (("kernel_att", kernel_att), ("kernel_conv", kernel_conv)):
            if size % 2 == 0:
                raise ValueError(f"{who}: {name} must be odd (a centred window), got {size}")
        self.stride = check_int(stride, "stride", who)
        self.dilation = check_int(dilation, "dilation", who)
        self.head_dim = out_channels // num_heads
        self.padding_att = dilation * (kernel_att - 1) // 2  # the official formula, for odd kernel_att

        kc2 = kernel_conv * kernel_conv
        self.rate1 = nn.Parameter(torch.empty(1, **factory))
        self.rate2 = nn.Parameter(torch.empty(1, **factory))
        self.conv1 = nn.Conv2d(channels, out_channels, kernel_size=1, **factory)
        self.conv2 = nn.Conv2d(channels, out_channels, kernel_size=1, **factory)
        self.conv3 = nn.Conv2d(channels, out_channels, kernel_size=1, **factory)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1, **factory)
        self.fc = nn.Conv2d(3 * num_heads, kc2, kernel_size=1, bias=False, **factory)
        self.dep_conv = nn.Conv2d(kc2 * self.head_dim, out_channels, kernel_size=kernel_conv, bias=False,
                                  groups=self.head_dim, padding=kernel_conv // 2, stride=stride, **factory)
        self.conv_padding = (kernel_conv // 2, kernel_conv // 2)  # dep_conv's (top/left, bottom/right)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As official: both rates 0.5; `dep_conv` kernel j is the one-hot shift to tap j.

        The 1x1 convolutions keep PyTorch's default initialisation from construction (the official
        `reset_parameters` does not touch them either), so a given seed gives official weights.
        """
        kc = self.kernel_conv
        with torch.no_grad():
            self.rate1.fill_(0.5)
            self.rate2.fill_(0.5)
            shift = torch.eye(kc * kc, dtype=self.dep_conv.weight.dtype, device=self.dep_conv.weight.device)
            self.dep_conv.weight.copy_(shift.view(1, kc * kc, kc, kc).expand_as(self.dep_conv.weight))

    def extra_repr(self) -> str:
        names = self._names
        return (
            f"{names['channels']}={self.channels}, {names['out_channels']}={self.out_channels}, "
            f"kernel_att={self.kernel_att}, {names['num_heads']}={self.num_heads}, "
            f"kernel_conv={self.kernel_conv}, stride={self.stride}, dilation={self.dilation}"
        )

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Apply ACmix to the map `x` `(B, channels, H, W)`.

        Args:
            x: The map.
            need_weights: Also return the attention branch's weights
                `(B, num_heads, Ho, Wo, kernel_att**2)` (computed with plain ops). Default: False.

        Returns:
            `out` `(B, out_channels, Ho, Wo)`, or `(out, weights)` with `need_weights`.
        """
        who = type(self).__name__
        sizes = check_shape(x, who, "B C H W", C=self.channels)
        if x.dtype != self.conv1.weight.dtype:
            want = self.conv1.weight.dtype
            raise TypeError(f"{who} expects x with the parameters' dtype {want}, got {x.dtype}")
        batch, height, width = sizes["B"], sizes["H"], sizes["W"]
        h, d, s = self.num_heads, self.head_dim, self.stride
        out_h, out_w = -(-height // s), -(-width // s)
        projections = (self.conv1, self.conv2, self.conv3)  # one 1x1 convolution for q, k, v
        weight = torch.cat([c.weight for c in projections])  # (3*h*d, C, 1, 1)
        bias = torch.cat([c.bias for c in projections if c.bias is not None])
        qkv = F.conv2d(x.contiguous(), weight, bias)  # (B, 3*h*d, H, W), channel t*h*d + g*d + c

        # Attention branch: k - pe folded into the keys (the centre term q . pe cancels in the softmax).
        pe = self.conv_p(position_grid(height, width, x.dtype, x.device))  # (1, d, H, W)
        q, k, v = qkv.reshape(batch, 3, h, d, height, width).unbind(1)  # (B, h, d, H, W) each
        q = (q[..., ::s, ::s] * d**-0.5).reshape(batch * h, d, out_h, out_w)  # (B*h, d, Ho, Wo)
        k = reflect_pad((k - pe).reshape(batch * h, d, height, width), self.padding_att)  # (B*h, d, Hp, Wp)
        v = reflect_pad(v.reshape(batch, h * d, height, width), self.padding_att)  # (B, h*d, Hp, Wp)
        v = v.reshape(batch * h, d, *v.shape[-2:])  # (B*h, d, Hp, Wp), a view: F.pad's map is contiguous
        att = neighbourhood_attention(q, k, v, self.kernel_att, self.dilation, s)  # (B*h, d, Ho, Wo)
        if capturing():  # map capture: rows of the attention branch
            record_local_rows(self, q, k, kernel=self.kernel_att, dilation=self.dilation, stride=s,
                              padding=self.padding_att, size=(height, width), heads=h)

        # Convolution branch: fc folded into dep_conv; its input groups q, k, v by head-channel c.
        fc = self.fc.weight[:, :, 0, 0]  # (kc*kc, 3h)
        mixed = torch.einsum("ojuv,jt->otuv", self.dep_conv.weight, fc)  # (h*d, 3h, kc, kc)
        grouped = qkv.reshape(batch, 3 * h, d, height, width).transpose(1, 2)  # (B, d, 3h, H, W)
        grouped = grouped.reshape(batch, d * 3 * h, height, width)  # channel c*3h + t*h + g
        before, after = self.conv_padding
        if before != after:  # the official's padding 1 with a larger kernel: pad so that Ho = ceil(H/s)
            grouped, before = F.pad(grouped, (before, after, before, after)), 0
        conv = F.conv2d(grouped, mixed * self.rate2, None, s, before, 1, d)  # (B, h*d, Ho, Wo)
        out = torch.addcmul(conv, self.rate1, att.reshape(batch, h * d, out_h, out_w))  # (B, h*d, Ho, Wo)
        if not need_weights:
            return out
        weights = neighbour_weights(q, k, self.kernel_att, self.dilation, s)  # (B*h, Ho, Wo, ka*ka)
        return out, weights.unflatten(0, (batch, h))  # (B, h, Ho, Wo, ka*ka)


@register_seed("acmix", example=Example({"in_planes": 4, "out_planes": 8, "kernel_att": 3, "head": 2},
                                       ((2, 4, 5, 6),), (2, 8, 5, 6)))
class OfficialACmix(ACmix):
    """The official `ACmix` (`attnzoo.compat.ACmix`): `ACmix(in_planes, out_planes, kernel_att, head, ...)`.

    The official constructor (`out_planes` required), attribute names (`in_planes`, `out_planes`,
    `head`, `head_dim`, ...), `forward(x)`, state_dict and initialisation; the canonical `ACmix`
    with `channels = in_planes`, `out_channels = out_planes`, `num_heads = head`. Golden official
    state_dicts load into it with `strict=True`. `dep_conv` pads 1 at the top/left, as the official,
    wherever the official runs (`3 <= kernel_conv <= stride + 2`, e.g. `kernel_conv=5, stride=3`);
    other `kernel_conv` (which crash there) get the canonical `kernel_conv // 2`.

    Shape:
        - Input: `(B, in_planes, H, W)`.
        - Output: `(B, out_planes, ceil(H / stride), ceil(W / stride))`.

    Example:
        ```python
        >>> from attnzoo.compat import ACmix
        >>> ACmix(64, 64, 7, 4, 3, stride=2)(torch.randn(1, 64, 56, 56)).shape
        torch.Size([1, 64, 28, 28])

        ```
    """

    _names = {"channels": "in_planes", "out_channels": "out_planes", "num_heads": "head"}

    def __init__(self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4,
                 kernel_conv: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(in_planes, out_planes, kernel_att, head, kernel_conv, stride, dilation)
        self.in_planes, self.out_planes, self.head = in_planes, out_planes, head
        if 3 <= self.kernel_conv <= self.stride + 2:
            # The official dep_conv pads 1 whatever kernel_conv is, and its sizes fit exactly here: keep
            # its taps (rows s*y - 1 .. s*y + kc - 2); the bottom/right padding only makes Ho = ceil(H/s).
            self.conv_padding = (1, self.kernel_conv - 2)
            self.dep_conv.padding = (1, 1)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """`out` `(B, out_planes, ceil(H / stride), ceil(W / stride))` for `x` `(B, in_planes, H, W)`."""
        return super().forward(x)  # type: ignore[return-value]
