"""timm's EfficientFormer V2 attention (`timm.models.efficientformer_v2.Attention2d` and
`Attention2dDownsample`, `efficientformerv2_s0` ... `efficientformerv2_l`): their constructors, calls and
state_dict keys.

EfficientFormerV2 (Li et al., 2023, "Rethinking Vision Transformers for MobileNet Size and Speed") attends
over a small map with LeViT's learned offset bias `B`, talking heads around the softmax (1x1 convolutions
`T_1`, `T_2` across the heads) and a depth-wise "local value" branch:

$$A = T_2\\,\\mathrm{softmax}\\big(T_1 (q k^\\top / \\sqrt{d_k} + B)\\big), \\quad
\\mathrm{out} = W_o\\,\\mathrm{act}\\big(\\mathrm{up}(A v + \\mathrm{dw}(v))\\big)$$

optionally on a map halved by a strided depth-wise convolution first (`stride`, upsampled back). The
downsampling variant takes its queries from every other position (a strided depth-wise convolution plus
a strided pooling) and has no talking heads.

Time O(B h N^2 d) and memory O(B h N^2) (the talking heads mix whole maps), N = H W.

Shape letters: B batch, C = dim, H, W map (= resolution), N = H W, h heads, d_k key, d value width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, query_indices, record, record_rows
from attnzoo.mechanisms.timm_cait import TALKING_HEADS_NOTE
from attnzoo.mechanisms.timm_levit import ConvBn, OffsetBiasAttention, val_width

__all__ = ["TimmEfficientFormerV2Attention", "TimmEfficientFormerV2AttentionDownsample"]


class _LocalGlobalQuery(nn.Module):
    """timm's `LocalGlobalQuery`: a strided depth-wise 3x3 convolution plus a strided pooling, projected."""

    def __init__(self, cin: int, cout: int, **dd: Any) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, **dd)
        self.proj = ConvBn(cin, cout, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.local(x) + self.pool(x))


class _Common(OffsetBiasAttention):
    """The widths and checks both classes share."""

    def _widths(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, who: str) -> None:
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.scale = key_dim**-0.5
        self.d = val_width(key_dim, attn_ratio, who)
        self.dh = self.d * num_heads
        self.attn_ratio = attn_ratio

    def _check_map(self, x: Tensor, size: tuple[int, int], what: str) -> None:
        """The bias is made for one map size: another fails timm's reshape or, worse, fits it wrongly."""
        if tuple(x.shape[-2:]) != size:
            raise ValueError(f"{type(self).__name__} expects a {size[0]} x {size[1]} map ({what}), got "
                             f"{x.shape[-2]} x {x.shape[-1]}")

    def _heads(self, t: Tensor, length: int) -> Tensor:
        """`(B, h c, H, W)` -> `(B, h, N, c)`, timm's head-major channels."""
        return t.reshape(t.shape[0], self.num_heads, -1, length).transpose(-1, -2)


@register_compat(example=Example({"dim": 8, "key_dim": 2, "num_heads": 2, "attn_ratio": 2, "resolution": 3},
                                 ((2, 8, 3, 3),), (2, 8, 3, 3)))
class TimmEfficientFormerV2Attention(_Common):
    """timm's `efficientformer_v2.Attention2d(dim=384, key_dim=32, num_heads=8, attn_ratio=4, resolution=7,
    act_layer=nn.GELU, stride=None)` (`attnzoo.compat.TimmEfficientFormerV2Attention`): the module docstring
    gives the formula. The bias is gathered on every call (timm caches it per device in eval mode).

    Shape:
        - x: `(B, dim, H, W)` with `(H, W)` = `resolution` (with `stride`: a map the strided convolution
          takes to `ceil(resolution / stride)`).
        - Output: `(B, dim, H, W)` (with `stride`: the strided map upsampled back by `stride`).
    """

    def __init__(
        self,
        dim: int = 384,
        key_dim: int = 32,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int | tuple[int, int] = 7,
        act_layer: type[nn.Module] = nn.GELU,
        stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self._widths(dim, key_dim, num_heads, attn_ratio, who)
        self.input_resolution = int_pair(resolution, "resolution", who)
        self.stride_conv: nn.Module | None = None
        self.upsample: nn.Module | None = None
        size = self.input_resolution
        if stride is not None:
            stride = check_int(stride, "stride", who)
            size = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
            self.stride_conv = ConvBn(dim, dim, 3, stride, groups=dim, **dd)
            self.upsample = nn.Upsample(scale_factor=stride, mode="bilinear")
        self.N = size[0] * size[1]
        kh = key_dim * num_heads
        self.q, self.k = ConvBn(dim, kh, **dd), ConvBn(dim, kh, **dd)
        self.v = ConvBn(dim, self.dh, **dd)
        self.v_local = ConvBn(self.dh, self.dh, 3, groups=self.dh, **dd)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1, **dd)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1, **dd)
        self.act = act_layer()
        self.proj = ConvBn(self.dh, dim, **dd)
        self.resolution = size
        self._bias_table(num_heads, size, 1, False, dd)

    def forward(self, x: Tensor) -> Tensor:
        """Attention over the (strided) map `x` `(B, C, H, W)`: `(B, C, H, W)`."""
        batch = check_shape(x, type(self).__name__, "B C H W", C=self.dim)["B"]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        self._check_map(x, self.resolution, "resolution" if self.stride_conv is None else "after the stride")
        q, k = self._heads(self.q(x), self.N), self._heads(self.k(x), self.N)  # (B, h, N, d_k)
        v = self.v(x)
        v_local = self.v_local(v)  # (B, h d, H', W')
        logits = (q @ k.transpose(-1, -2)) * self.scale + self.get_attention_biases()  # (B, h, N, N)
        weights = self.talking_head2(self.talking_head1(logits).softmax(dim=-1))  # mixed across the heads
        if capturing():  # map capture: the mixed weights' rows of the capture's query points
            idx = query_indices(self.resolution, x.device)
            record(self, "rows", weights.index_select(-2, idx), grid=self.resolution, queries=idx,
                   query_grid=self.resolution, note=TALKING_HEADS_NOTE)
        out = (weights @ self._heads(v, self.N)).transpose(2, 3).reshape(batch, self.dh, *self.resolution)
        out = out + v_local
        if self.upsample is not None:
            out = self.upsample(out)
        return self.proj(self.act(out))


@register_compat(example=Example({"dim": 8, "key_dim": 2, "num_heads": 2, "attn_ratio": 2, "resolution": 4},
                                 ((2, 8, 4, 4),), (2, 8, 2, 2)))
class TimmEfficientFormerV2AttentionDownsample(_Common):
    """timm's `efficientformer_v2.Attention2dDownsample(dim=384, key_dim=16, num_heads=8, attn_ratio=4,
    resolution=7, out_dim=None, act_layer=nn.GELU)` (`attnzoo.compat.
    TimmEfficientFormerV2AttentionDownsample`): every other position's query over the whole map, run by
    `attnzoo.attend` with the offset bias.

    Shape:
        - x: `(B, dim, H, W)` with `(H, W)` = `resolution`.
        - Output: `(B, out_dim, ceil(H / 2), ceil(W / 2))`.
    """

    def __init__(
        self,
        dim: int = 384,
        key_dim: int = 16,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int | tuple[int, int] = 7,
        out_dim: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self._widths(dim, key_dim, num_heads, attn_ratio, who)
        size = int_pair(resolution, "resolution", who)
        self.resolution2 = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        self.N, self.N2 = size[0] * size[1], self.resolution2[0] * self.resolution2[1]
        self.out_dim = check_int(out_dim or dim, "out_dim", who)
        kh = key_dim * num_heads
        self.q = _LocalGlobalQuery(dim, kh, **dd)
        self.k, self.v = ConvBn(dim, kh, **dd), ConvBn(dim, self.dh, **dd)
        self.v_local = ConvBn(self.dh, self.dh, 3, 2, groups=self.dh, **dd)
        self.act = act_layer()
        self.proj = ConvBn(self.dh, self.out_dim, **dd)
        self.resolution = size
        self._bias_table(num_heads, size, 2, False, dd)

    def forward(self, x: Tensor) -> Tensor:
        """Every other position attends over the map `x` `(B, C, H, W)`: `(B, out_dim, H/2, W/2)`."""
        batch = check_shape(x, type(self).__name__, "B C H W", C=self.dim)["B"]
        self._check_map(x, self.resolution, "resolution")
        q = self._heads(self.q(x), self.N2)  # (B, h, N2, d_k)
        k, v = self._heads(self.k(x), self.N), self.v(x)  # (B, h, N, d_k), (B, h d, H, W)
        v_local = self.v_local(v)  # (B, h d, H/2, W/2)
        bias = self.get_attention_biases()[None]  # (1, h, N2, N)
        out = attend(q, k, self._heads(v, self.N), bias=bias, scale=self.scale)  # (B, h, N2, d)
        if capturing():  # map capture: the strided queries' rows over the whole map
            record_rows(self, q, k, grid=self.resolution2, key_grid=self.resolution, bias=bias,
                        scale=self.scale)
        out = out.transpose(2, 3).reshape(batch, self.dh, *self.resolution2) + v_local
        return self.proj(self.act(out))
