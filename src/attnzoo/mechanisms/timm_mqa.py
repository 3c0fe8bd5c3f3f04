"""timm's multi-query attention on NCHW maps (`timm.layers.attention2d.MultiQueryAttention2d`, the attention
of MobileNetV4's hybrid models `mobilenetv4_hybrid_*`): its constructor, call and state_dict keys, run by
`attnzoo.attend`.

Multi-query attention (Shazeer, 2019, "Fast Transformer Decoding: One Write-Head is All You Need"), as
MobileNetV4 (Qin et al., 2024) uses it: h query heads share one key head and one value head, so the
keys and values cost one head's projection. Optionally the queries are average-pooled by
`query_strides` (and the output upsampled back, bilinearly) and the keys and values are downsampled by a
strided depthwise convolution (`kv_stride`), each followed by a norm layer:

$$\\mathrm{head}_i = \\mathrm{softmax}(q_i k^\\top / \\sqrt{d_k} + M)\\,v, \\quad
\\mathrm{out} = W_o\\,\\mathrm{up}([\\mathrm{head}_1, \\dots, \\mathrm{head}_h])$$

The submodules are timm's `Sequential`s under timm's names (`query.down_pool`, `query.norm`, `query.proj`,
`key.down_conv`, `key.norm`, `key.proj`, `value.*`, `output.upsample`, `output.proj`, `output.drop`),
so timm's checkpoints load with `strict=True`; `attnzoo.convert.from_timm` copies timm's own
(padding layers, norm classes and all).

Time O(B h L P d) and memory O(B h L P) for L = H'W' queries and P keys (the SDPA kernels keep the map
out of memory where they run).

Shape letters: B batch, C = dim, H, W map, H', W' the pooled query map, h heads, d_k key width, d_v value
width, L queries, P keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from attnzoo._checks import check_choice, check_divisible, check_dropout, check_int, check_mask, check_shape
from attnzoo._geometry import check_conv_fits, int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_maxvit import TimmMaxxvitAttention2d

__all__ = ["TimmMultiQueryAttention2d", "TimmAttention2d"]


def _static_padding(padding: str | int, kernel: int, stride: int, dilation: int, who: str) -> int:
    """timm's `create_conv2d` padding for these layers: '' symmetric, 'valid' none, 'same' where it is
    static; timm's dynamic 'same' padding (a stride above 1) is not built here (`from_timm` copies it)."""
    if isinstance(padding, int) and not isinstance(padding, bool):
        if check_int(padding, "padding", who, minimum=0):  # timm pads key.proj too: every forward fails
            raise ValueError(f"{who}: an int padding above 0 also pads timm's 1x1 key.proj, so the key map "
                             f"outgrows the value map and every call fails; got padding={padding}")
        return 0
    check_choice(padding, ("", "same", "valid"), "padding", who)
    if padding == "valid":
        return 0
    if padding == "same" and (stride > 1 or (dilation * (kernel - 1)) % 2):
        raise ValueError(
            f"{who}: padding='same' with stride {stride}, kernel {kernel} and dilation {dilation} is timm's "
            "dynamic padding, which this constructor does not build; convert timm's module with from_timm"
        )
    return ((stride - 1) + dilation * (kernel - 1)) // 2


@register_compat(example=Example({"dim": 8, "num_heads": 2, "query_strides": 2, "kv_stride": 2},
                                 ((2, 8, 4, 6),), (2, 8, 4, 6)))
class TimmMultiQueryAttention2d(nn.Module):
    """timm's `MultiQueryAttention2d(dim, dim_out=None, num_heads=8, key_dim=None, value_dim=None,
    query_strides=1, kv_stride=1, dw_kernel_size=3, dilation=1, padding='', attn_drop=0., proj_drop=0.,
    norm_layer=nn.BatchNorm2d, use_bias=False)` (`attnzoo.compat.TimmMultiQueryAttention2d`): the module
    docstring gives the formula.

    Where timm fails, this runs: a query map that `padding='same'` pools to the ceiling of `H / s` (timm
    reshapes to the floor and fails) is laid out by its own size.

    Shape:
        - x: `(B, C, H, W)`; attn_mask: bool (True = may attend) or float (added), broadcastable to
          `(B, h, L, P)` (torch's `scaled_dot_product_attention` rule, timm's default path), or None.
        - Output: `(B, dim_out, H' s_h, W' s_w)`: `(B, dim_out, H, W)` where the strides divide H and W.
    """

    key: nn.Sequential
    value: nn.Sequential

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        num_heads: int = 8,
        key_dim: int | None = None,
        value_dim: int | None = None,
        query_strides: int | tuple[int, int] = 1,
        kv_stride: int = 1,
        dw_kernel_size: int = 3,
        dilation: int = 1,
        padding: str | int = "",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        use_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        dim_out = check_int(dim_out or dim, "dim_out", who)  # timm's `dim_out or dim`
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.key_dim = check_int(key_dim or dim // num_heads, "key_dim (default dim // num_heads)", who)
        self.value_dim = check_int(value_dim or dim // num_heads, "value_dim (default dim // num_heads)", who)
        self.query_strides = int_pair(query_strides, "query_strides", who)
        self.kv_stride = check_int(kv_stride, "kv_stride", who)
        kernel = check_int(dw_kernel_size, "dw_kernel_size", who)
        dilation = check_int(dilation, "dilation", who)
        self.scale = self.key_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        pointwise = _static_padding(padding, 1, 1, 1, who)  # timm pads key.proj alone with `padding`
        self.query = nn.Sequential()
        if any(s > 1 for s in self.query_strides):
            if padding == "same":  # timm's AvgPool2dSame: dynamic padding
                raise ValueError(f"{who}: padding='same' with query_strides > 1 is timm's dynamic padding, "
                                 "which this constructor does not build; convert timm's module with "
                                 "from_timm")
            self.query.add_module("down_pool", nn.AvgPool2d(kernel_size=self.query_strides))
            self.query.add_module("norm", norm_layer(dim, **dd))
        self.query.add_module("proj", nn.Conv2d(dim, self.num_heads * self.key_dim, 1, bias=use_bias, **dd))
        down = _static_padding(padding, kernel, self.kv_stride, dilation, who) if self.kv_stride > 1 else 0
        for name, width, pad in (("key", self.key_dim, pointwise), ("value", self.value_dim, 0)):
            branch = nn.Sequential()
            if self.kv_stride > 1:
                branch.add_module("down_conv", nn.Conv2d(
                    dim, dim, kernel, stride=self.kv_stride, padding=down, dilation=dilation, groups=dim,
                    bias=False, **dd))
                branch.add_module("norm", norm_layer(dim, **dd))
            branch.add_module("proj", nn.Conv2d(dim, width, 1, padding=pad, bias=use_bias, **dd))
            setattr(self, name, branch)
        self.output = nn.Sequential()
        if any(s > 1 for s in self.query_strides):
            self.output.add_module("upsample", nn.Upsample(scale_factor=self.query_strides, mode="bilinear",
                                                           align_corners=False))
        self.output.add_module("proj", nn.Conv2d(self.value_dim * self.num_heads, dim_out, 1, bias=use_bias,
                                                 **dd))
        self.output.add_module("drop", check_dropout(proj_drop, "proj_drop", who))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's `init_weights`: Xavier-uniform projections and downsampling convolutions."""
        for branch, name in (("query", "proj"), ("key", "proj"), ("value", "proj"), ("output", "proj"),
                             ("key", "down_conv"), ("value", "down_conv")):
            conv = getattr(getattr(self, branch), name, None)
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, key_dim={self.key_dim}, "
                f"value_dim={self.value_dim}, query_strides={self.query_strides}, kv_stride={self.kv_stride}")

    def _check_fits(self, size: tuple[int, int], who: str) -> None:
        """Refuse a map smaller than the query pooling or the key/value convolutions (torch would fail
        inside them); timm's dynamic-padding layers, copied by `from_timm`, fit any map."""
        pool = getattr(self.query, "down_pool", None)
        if type(pool) is nn.AvgPool2d:
            check_conv_fits(size, _pair(pool.kernel_size), _pair(pool.padding), (1, 1), who)
        for branch in (self.key, self.value):
            conv = getattr(branch, "down_conv", None)
            if type(conv) is nn.Conv2d and isinstance(conv.padding, tuple):
                check_conv_fits(size, conv.kernel_size, conv.padding, conv.dilation, who)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Multi-query attention of the (pooled) map's positions over the (downsampled) keys: see Shape."""
        who = type(self).__name__
        dims = check_shape(x, who, "B C H W", C=self.dim)
        batch, heads = dims["B"], self.num_heads
        self._check_fits((dims["H"], dims["W"]), who)
        q = self.query(x)  # (B, h d_k, H', W')
        k, v = self.key(x), self.value(x)  # (B, d_k, Hk, Wk), (B, d_v, Hk', Wk')
        (qh, qw), (kh, kw) = q.shape[-2:], k.shape[-2:]
        if k.shape[-2:] != v.shape[-2:]:
            raise ValueError(f"{who} expects the key and value maps of one size, got {tuple(k.shape[-2:])} "
                             f"and {tuple(v.shape[-2:])} (timm pads key.proj alone with an int padding)")
        if attn_mask is not None:  # SDPA's rule, checked here so that the message names attn_mask
            check_mask(attn_mask, (batch, heads, qh * qw, kh * kw), who, "attn_mask")
        # contiguous as timm's (the fused kernels round alike only on alike layouts), heads shared by expand
        q = q.reshape(batch, heads, self.key_dim, qh * qw).transpose(-1, -2).contiguous()  # (B, h, L, d_k)
        k, v = (t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1).expand(batch, heads, kh * kw, -1)
                for t in (k, v))  # (B, h, P, d_k), (B, h, P, d_v)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, mask=attn_mask, dropout_p=dropout_p, scale=self.scale)  # (B, h, L, d_v)
        if capturing():  # map capture: rows of the capture's query points over the key map
            record_rows(self, q, k, grid=(qh, qw), key_grid=(kh, kw), mask=attn_mask, scale=self.scale)
        # a contiguous NCHW map, as timm's: a channels-last one (the reshape's view with one head) would
        # make `output` draw its dropout mask in another memory order
        out = out.transpose(2, 3).reshape(batch, heads * self.value_dim, qh, qw)  # (B, h d_v, H', W')
        out = out.contiguous()
        return self.output(out)  # (B, dim_out, H' s_h, W' s_w)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 8, 3, 5),), (2, 8, 3, 5)))
class TimmAttention2d(TimmMaxxvitAttention2d):
    """timm's `layers.attention2d.Attention2d(dim, dim_out=None, num_heads=32, bias=True, expand_first=False,
    head_first=False, attn_drop=0., proj_drop=0.)` (`attnzoo.compat.TimmAttention2d`; MobileNetV4's hybrid
    blocks without multi-query attention): MaxViT's `TimmMaxxvitAttention2d` (the same computation and
    keys) with timm's constructor and call `(x, attn_mask=None)`.

    Shape:
        - x: `(B, dim, H, W)`; attn_mask: bool (True = may attend) or float (added), broadcastable to
          `(B, h, N, N)` (N = H W), or None.
        - Output: `(B, dim_out, H, W)`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        num_heads: int = 32,
        bias: bool = True,
        expand_first: bool = False,
        head_first: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        name = "dim_out" if expand_first and dim_out else "dim"  # the argument the attention width comes from
        width = check_int(dim_out or dim, name, who) if expand_first else check_int(dim, "dim", who)
        heads = check_int(num_heads, "num_heads", who)
        check_divisible(width, heads, name, "num_heads", who)  # timm's view fails
        super().__init__(dim, dim_out, dim_head=width // heads, bias=bias, expand_first=expand_first,
                         head_first=head_first, attn_drop=attn_drop, proj_drop=proj_drop, device=device,
                         dtype=dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Self-attention over the positions of `x` `(B, C, H, W)`, timm's `attn_mask` as MaxViT's shared
        term: `(B, dim_out, H, W)`."""
        if attn_mask is not None:  # checked here so that the message names attn_mask
            who = type(self).__name__
            dims = check_shape(x, who, "B C H W", C=self.dim)
            tokens = dims["H"] * dims["W"]
            check_mask(attn_mask, (dims["B"], self.num_heads, tokens, tokens), who, "attn_mask")
        return super().forward(x, shared_rel_pos=attn_mask)
