"""ACmix: On the Integration of Self-Attention and Convolution (Pan et al., CVPR 2022).

Paper: https://arxiv.org/abs/2111.14556. Official code: ``LeapLabTHU/ACmix``, ``ResNet/test_bottleneck.py``.
Official constructor, parameter names, state_dict, initialisation and numbers (checked against recorded
official outputs); an independent implementation. Differences (details in ``docs/acmix.md``):

- The position grid is built in the input's dtype/device (official: the default dtype, so float64
  needs ``torch.set_default_dtype``).
- No ``kernel_att**2``-fold unfold of k, v, pe: a kernel walks the neighbour offsets over shifted
  slices (forward and backward). ``q . pe[centre]`` cancels in the softmax and is dropped; the rest
  folds into the keys (``k - pe``). ``fc`` is folded into the ``dep_conv`` weights (both linear).
- Lifted: H, W not divisible by ``stride`` (output ``ceil(H / stride)``, as unfold gives); any odd
  ``kernel_conv`` (padding ``kernel_conv // 2``, official: 1 hard-coded); ``dilation`` spaces the
  attention window (official: crashes; the conv branch stays undilated, as official); maps not
  larger than the padding use repeated reflection (``numpy.pad`` "reflect"; official: crashes).
- Rejected at construction: even ``kernel_att``/``kernel_conv``, ``out_planes % head != 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._geometry import heads_for
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.neighbourhood import neighbourhood_attention, reflect_pad
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_local_rows

__all__ = ["ACmix", "neighbourhood_attention", "reflect_pad"]


def position_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The official 2-channel grid: channel 0 is ``linspace(-1, 1, W)`` along x, channel 1 along y.

    Built in ``dtype`` (float32 for half types, then cast). Shape: ``(1, 2, H, W)``.
    """
    build = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    loc_x = torch.linspace(-1.0, 1.0, width, dtype=build, device=device).expand(height, width)
    loc_y = torch.linspace(-1.0, 1.0, height, dtype=build, device=device)[:, None].expand(height, width)
    return torch.stack([loc_x, loc_y]).unsqueeze(0).to(dtype)  # (1, 2, H, W)


@register(
    "acmix",
    family="hybrid",
    paper="On the Integration of Self-Attention and Convolution",
    year=2022,
    layout="NCHW",
    example=Example(
        kwargs={"in_planes": 4, "out_planes": 8, "kernel_att": 3, "head": 2},
        inputs=((2, 4, 5, 6),),
        output=(2, 8, 5, 6),
        channel_dim=1,
    ),
    seed_name="ACmix",
    for_input=lambda geo: {"head": heads_for(geo.channels, 4)},
)
class ACmix(nn.Module):
    """ACmix: a local self-attention branch and a convolution branch sharing one set of 1x1 projections.

    Three 1x1 convolutions give q, k, v (``out_planes`` channels, ``head`` heads of
    ``head_dim = out_planes // head``). The attention branch lets every (strided) pixel attend its
    ``kernel_att x kernel_att`` reflection-padded neighbourhood per head, with a relative position
    term; the convolution branch mixes the ``3 * head`` q/k/v feature maps per head-channel into
    ``kernel_conv**2`` maps (``fc``) and applies a grouped ``kernel_conv x kernel_conv`` convolution
    (``dep_conv``, initialised to shifts). The output is ``rate1 * attention + rate2 * convolution``.

    Args:
        in_planes: Input channels C.
        out_planes: Output channels; divisible by ``head``.
        kernel_att: Side of the attention neighbourhood, odd. Default: 7.
        head: Number of heads. Default: 4.
        kernel_conv: Kernel size of the convolution branch, odd (the official supports only 3).
            Default: 3.
        stride: Output stride of both branches; the output side is ``ceil(H / stride)``. Default: 1.
        dilation: Spacing of the attention neighbourhood (the convolution branch is not dilated, as
            in the official code, where only 1 runs). Default: 1.

    Algorithm (shapes for input ``(B, C, H, W)``, ``h = head``, ``d = head_dim``, ``s = stride``,
    ``Ho, Wo = ceil(H/s), ceil(W/s)``, ``ka = kernel_att``, ``kc = kernel_conv``):

    1. ``q, k, v = conv1(x), conv2(x), conv3(x)``: ``(B, h*d, H, W)`` each, channel ``g*d + c``
       belongs to head g.
    2. ``pe = conv_p(grid)``: ``(1, d, H, W)``, the grid holding ``linspace(-1, 1)`` along x and y.
    3. Attention logits of query pixel p (taken every s pixels) and neighbour n of its
       ``ka x ka`` window (keys and pe reflection-padded by ``dilation*(ka-1)//2``):
       ``(q_p * d**-0.5) . (k_n + pe_p - pe_n)``; softmax over the ``ka**2`` neighbours;
       output ``sum_n w_n v_n``: ``(B, h*d, Ho, Wo)``. (``q_p . pe_p`` cancels in the softmax and
       so does ``conv_p.bias``.)
    4. ``fc`` maps, per pixel and head-channel c, the ``3h`` values ``(q, k, v)[g*d + c]`` to ``kc**2``
       values: ``(B, kc**2, d, H*W)``, read as ``(B, d*kc**2, H, W)`` (channel ``c*kc**2 + j``).
    5. ``dep_conv``: grouped ``kc x kc`` convolution, ``groups=d``, stride s, padding ``kc//2``, no
       bias: ``(B, out_planes, Ho, Wo)``.
    6. Output ``rate1 * attention + rate2 * convolution``.

    Shape:
        - Input: ``(B, in_planes, H, W)``.
        - Output: ``(B, out_planes, ceil(H / stride), ceil(W / stride))``.

    Example:
        >>> m = ACmix(64, 64)          # kernel_att=7, head=4, kernel_conv=3, stride=1
        >>> m(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 56, 56])
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4,
                 kernel_conv: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        who = type(self).__name__
        self.in_planes = check_int(in_planes, "in_planes", who)
        self.out_planes = check_int(out_planes, "out_planes", who)
        self.head = check_int(head, "head", who)
        check_divisible(out_planes, head, "out_planes", "head", who)
        self.kernel_att = check_int(kernel_att, "kernel_att", who)
        self.kernel_conv = check_int(kernel_conv, "kernel_conv", who)
        for name, size in (("kernel_att", kernel_att), ("kernel_conv", kernel_conv)):
            if size % 2 == 0:
                raise ValueError(f"{who}: {name} must be odd (a centred window), got {size}")
        self.stride = check_int(stride, "stride", who)
        self.dilation = check_int(dilation, "dilation", who)
        self.head_dim = out_planes // head
        self.padding_att = dilation * (kernel_att - 1) // 2  # the official formula, for odd kernel_att

        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        kc2 = kernel_conv * kernel_conv
        self.dep_conv = nn.Conv2d(kc2 * self.head_dim, out_planes, kernel_size=kernel_conv, bias=False,
                                  groups=self.head_dim, padding=kernel_conv // 2, stride=stride)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As official: both rates 0.5; ``dep_conv`` kernel j is the one-hot shift to tap j.

        The 1x1 convolutions keep PyTorch's default initialisation from construction (the official
        ``reset_parameters`` does not touch them either), so a given seed gives official weights.
        """
        kc = self.kernel_conv
        with torch.no_grad():
            self.rate1.fill_(0.5)
            self.rate2.fill_(0.5)
            shift = torch.eye(kc * kc, dtype=self.dep_conv.weight.dtype, device=self.dep_conv.weight.device)
            self.dep_conv.weight.copy_(shift.view(1, kc * kc, kc, kc).expand_as(self.dep_conv.weight))

    def extra_repr(self) -> str:
        return (
            f"in_planes={self.in_planes}, out_planes={self.out_planes}, kernel_att={self.kernel_att}, "
            f"head={self.head}, kernel_conv={self.kernel_conv}, stride={self.stride}, "
            f"dilation={self.dilation}"
        )

    def forward(self, x: Tensor) -> Tensor:
        sizes = check_shape(x, type(self).__name__, "B C H W", C=self.in_planes)
        if x.dtype != self.conv1.weight.dtype:
            want = self.conv1.weight.dtype
            raise TypeError(f"ACmix expects x with the parameters' dtype {want}, got {x.dtype}")
        batch, height, width = sizes["B"], sizes["H"], sizes["W"]
        h, d, s, kc = self.head, self.head_dim, self.stride, self.kernel_conv
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
        v = v.reshape(batch * h, d, *v.shape[-2:])  # a view: F.pad returns a contiguous map
        att = neighbourhood_attention(q, k, v, self.kernel_att, self.dilation, s)  # (B*h, d, Ho, Wo)
        if not torch.jit.is_scripting():
            if capturing():  # map capture: rows of the attention branch
                record_local_rows(self, q, k, kernel=self.kernel_att, dilation=self.dilation, stride=s,
                                  padding=self.padding_att, size=(height, width), heads=h)

        # Convolution branch: fc folded into dep_conv; its input groups q, k, v by head-channel c.
        fc = self.fc.weight[:, :, 0, 0]  # (kc*kc, 3h)
        mixed = torch.einsum("ojuv,jt->otuv", self.dep_conv.weight, fc)  # (h*d, 3h, kc, kc)
        grouped = qkv.reshape(batch, 3 * h, d, height, width).transpose(1, 2)  # (B, d, 3h, H, W)
        grouped = grouped.reshape(batch, d * 3 * h, height, width)  # channel c*3h + t*h + g
        conv = F.conv2d(grouped, mixed * self.rate2, None, s, kc // 2, 1, d)  # (B, h*d, Ho, Wo)
        return torch.addcmul(conv, self.rate1, att.reshape(batch, h * d, out_h, out_w))


register_seed("acmix")(ACmix)
