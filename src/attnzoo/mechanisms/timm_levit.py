"""timm's LeViT attentions, `timm.models.levit.Attention` and `timm.models.levit.AttentionDownsample`:
their constructors, calls and state_dict keys, run by `attnzoo.attend`.

Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", ICCV 2021,
https://arxiv.org/abs/2104.01136.

LeViT's attention adds to the logits a learned bias per head and per 2-D offset: for a query at
`(y, x)` and a key at `(y', x')` of the `(H, W)` map (the `resolution`), the bias is
`attention_biases[head, |y - y'| W + |x - x'|]`, read through the index buffer `attention_bias_idxs`
`(N_q, N_k)`. Queries and keys are `key_dim` wide per head, values `val_dim = int(attn_ratio key_dim)`
(wider: LeViT's `attn_ratio` is 2 or 4); the heads' values pass an activation (Hardswish in LeViT's
models) before the output projection. Every projection is a bias-free Linear (or a 1x1 convolution,
`use_conv`) followed by a BatchNorm (timm's `LinearNorm`, `ConvNorm`; keys `linear`, `bn`).
`AttentionDownsample` takes its queries from the map subsampled by `stride` (every `stride`-th token,
or a 3x3 average with `use_pool`), so the `(ceil(H / s), ceil(W / s))` queries attend to the `H W`
keys and the output has `out_dim` channels.

timm caches the gathered bias per device in eval mode; these classes gather it on every call (it costs
`h N_q N_k` reads, 1/d of the logits' product) because timm's cache goes stale when
`attention_biases` changes in eval mode (`load_state_dict`, an optimizer step) and keeps the gather's
autograd graph, so a second backward in eval mode fails. The numbers are timm's either way.

`attnzoo.convert.from_timm` converts both (the same keys, so timm's checkpoint loads with
`strict=True`; timm's `LinearNorm`/`ConvNorm` and activation are copied as they are), and
`attnzoo.replace(model, cls)` swaps a whole LeViT with the same logits; `attnzoo.capture_maps` then
records the rows, the bias included. Shape letters: B batch, (H, W) = resolution, N = H W tokens,
C = dim, h heads, kd = key_dim, vd = val_dim, s = stride.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmLevitAttention", "TimmLevitAttentionDownsample", "offset_index", "LinearNorm", "ConvNorm",
           "ConvBn"]

Resolution = int | tuple[int, int]


def offset_index(resolution: tuple[int, int], stride: int = 1, device: torch.device | str | None = None
                 ) -> Tensor:
    """LeViT's index `(N_q, N_k)` into a bias table of `H W` offsets: `|y - y'| W + |x - x'|` from the
    queries (every `stride`-th row and column, row-major) to the keys (all `H W`, row-major)."""
    height, width = resolution
    keys = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    queries = torch.stack(torch.meshgrid(torch.arange(0, height, stride), torch.arange(0, width, stride),
                                         indexing="ij")).flatten(1)
    rel = (queries[:, :, None] - keys[:, None, :]).abs()  # (2, N_q, N_k)
    return (rel[0] * width + rel[1]).to(device)


def val_width(key_dim: int, attn_ratio: float, who: str) -> int:
    """`int(attn_ratio * key_dim)`, timm's value width per head, at least 1."""
    ratio = check_float(attn_ratio, "attn_ratio", who, above=0.0)
    if not math.isfinite(ratio) or int(ratio * key_dim) < 1:
        raise ValueError(f"{who}: attn_ratio * key_dim must be >= 1 (the value width per head), got "
                         f"{attn_ratio} * {key_dim}")
    return int(ratio * key_dim)


class OffsetBiasAttention(nn.Module):
    """What LeViT, TinyViT, EfficientFormer (V1, V2) and EfficientViT's cascaded attention share:
    `attention_biases` `(h, H W)` read through `attention_bias_idxs` `(N_q, N_k)`, timm's names, and timm's
    `reset_parameters` and `init_non_persistent_buffers`. The `(H, W)` of the table is `bias_grid`; each
    class keeps timm's `resolution` in timm's form (a pair, or an int for the cascaded attention)."""

    attention_bias_idxs: Tensor

    def _bias_table(self, num_heads: int, resolution: tuple[int, int], stride: int, persistent: bool,
                    dd: dict[str, Any]) -> None:
        self.bias_grid = resolution
        self.bias_stride = stride
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1], **dd))
        self.register_buffer("attention_bias_idxs", offset_index(resolution, stride, dd["device"]),
                             persistent=persistent)

    def get_attention_biases(self, device: torch.device | None = None) -> Tensor:
        """The bias `(h, N_q, N_k)` added to the logits (timm's method; `device` is not needed)."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def init_non_persistent_buffers(self) -> None:
        """Recompute the index (timm's `reinit_non_persistent_buffers`, after building on meta)."""
        index = offset_index(self.bias_grid, self.bias_stride, self.attention_bias_idxs.device)
        with torch.no_grad():
            self.attention_bias_idxs.copy_(index)

    def reset_parameters(self) -> None:
        """Zero biases and a fresh index (timm's `init_weights(needs_reset=True)` calls it)."""
        nn.init.zeros_(self.attention_biases)
        self.init_non_persistent_buffers()


class _BnStart(nn.Module):
    """A layer ending in a BatchNorm `bn` whose weight starts at `bn_weight_init` (timm zero-initialises
    the last layer of a residual branch): `reset_parameters` restores that start after the BatchNorm's
    own reset, which sets it to 1 (torch's deferred initialisation resets children first)."""

    bn: nn.BatchNorm1d | nn.BatchNorm2d
    bn_weight_init: float

    def reset_parameters(self) -> None:
        nn.init.constant_(self.bn.weight, self.bn_weight_init)


class LinearNorm(_BnStart):
    """timm's `levit.LinearNorm`: a bias-free Linear, then a BatchNorm1d over all `B N` tokens."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm1d(out_features, device=device, dtype=dtype)
        self.bn_weight_init = bn_weight_init
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """`(B, N, in)` -> `(B, N, out)`."""
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ConvNorm(_BnStart):
    """timm's `levit.ConvNorm` as the attentions use it: a bias-free 1x1 convolution, then a
    BatchNorm2d."""

    def __init__(self, in_chs: int, out_chs: int, bn_weight_init: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, 1, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_chs, device=device, dtype=dtype)
        self.bn_weight_init = bn_weight_init
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """`(B, in, H, W)` -> `(B, out, H, W)`."""
        return self.bn(self.linear(x))


class ConvBn(_BnStart):
    """timm's `ConvNorm` of EfficientFormer V2 and of Microsoft's EfficientViT (keys `conv`, `bn`): a
    convolution with timm's symmetric padding, with bias (EfficientFormer V2) or without (EfficientViT),
    then a BatchNorm2d whose weight starts at `bn_weight_init`."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bias: bool = True, bn_weight_init: float = 1.0, **dd: Any) -> None:
        super().__init__()
        padding = ((stride - 1) + (kernel - 1)) // 2  # timm's '' padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=bias, **dd)
        self.bn = nn.BatchNorm2d(cout, **dd)
        self.bn_weight_init = bn_weight_init
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """`(B, cin, H, W)` -> `(B, cout, H', W')`."""
        return self.bn(self.conv(x))


class Subsample(nn.Module):
    """timm's `levit.Downsample`: the `(H, W)` map's tokens `(B, N, C)`, every `stride`-th row and
    column (or, `use_pool`, a 3x3 average without the padding), `(B, N_q, C)`."""

    def __init__(self, stride: int, resolution: tuple[int, int], use_pool: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.resolution = resolution
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False) if use_pool else None

    def forward(self, x: Tensor) -> Tensor:
        batch, _, channels = x.shape
        fmap = x.reshape(batch, self.resolution[0], self.resolution[1], channels)
        if self.pool is not None:
            fmap = self.pool(fmap.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            fmap = fmap[:, :: self.stride, :: self.stride]
        return fmap.reshape(batch, -1, channels)


def _grid(resolution: Resolution, who: str) -> tuple[int, int]:
    return int_pair(resolution, "resolution", who)


def _heads(num_heads: int, key_dim: int, who: str) -> tuple[int, int]:
    return check_int(num_heads, "num_heads", who), check_int(key_dim, "key_dim", who)


@register_compat(example=Example({"dim": 8, "key_dim": 4, "num_heads": 2, "attn_ratio": 2, "resolution": 4},
                                 ((2, 16, 8),), (2, 16, 8), channel_dim=-1))
class TimmLevitAttention(OffsetBiasAttention):
    """timm's `levit.Attention(dim, key_dim, num_heads=8, attn_ratio=4., resolution=14, use_conv=False,
    act_layer=nn.SiLU)` (`attnzoo.compat.TimmLevitAttention`): the module docstring says what it is;
    keys `attention_biases`, `qkv.linear`, `qkv.bn`, `proj.ln.linear`, `proj.ln.bn`.

    $\\mathrm{softmax}(q k^\\top / \\sqrt{kd} + B_h[|\\Delta y| W + |\\Delta x|])\\,v$ per head with
    $[q, k, v] = \\mathrm{BN}(x W_{qkv})$, then $\\mathrm{BN}(\\mathrm{act}(\\cdot) W_o)$. Time
    $O(B N^2 h (kd + vd))$.

    Shape:
        - x: `(B, N, C)` with N = H W, the map's tokens row-major; `use_conv`: `(B, C, H, W)`.
        - Output: as x.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4.0,
        resolution: Resolution = 14,
        use_conv: bool = False,
        act_layer: type[nn.Module] = nn.SiLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads, self.key_dim = _heads(num_heads, key_dim, who)
        self.use_conv = bool(use_conv)
        self.scale = key_dim**-0.5
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = val_width(key_dim, attn_ratio, who)
        self.val_attn_dim = self.val_dim * num_heads
        grid = _grid(resolution, who)
        norm = ConvNorm if self.use_conv else LinearNorm
        self.qkv = norm(dim, self.val_attn_dim + self.key_attn_dim * 2, **dd)
        self.proj = nn.Sequential(OrderedDict([("act", act_layer()),
                                               ("ln", norm(self.val_attn_dim, dim, bn_weight_init=0, **dd))]))
        self.resolution = grid
        self._bias_table(self.num_heads, grid, 1, False, dd)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, key_dim={self.key_dim}, num_heads={self.num_heads}, "
                f"val_dim={self.val_dim}, resolution={self.resolution}, use_conv={self.use_conv}")

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the `resolution` map's tokens: `(B, N, C)`, or `(B, C, H, W)` with
        `use_conv`; the same shape out."""
        who = type(self).__name__
        (height, width), heads = self.resolution, self.num_heads
        tokens = height * width
        if self.use_conv:
            batch = check_shape(x, who, "B C H W", C=self.dim, H=height, W=width)["B"]
            qkv = self.qkv(x).reshape(batch, heads, -1, tokens).transpose(-2, -1)  # (B, h, N, 2 kd + vd)
        else:
            batch = check_shape(x, who, "B N C", C=self.dim, N=tokens)["B"]
            qkv = self.qkv(x).reshape(batch, tokens, heads, -1).transpose(1, 2)  # (B, h, N, 2 kd + vd)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
        bias = self.get_attention_biases()  # (h, N, N)
        out = attend(q, k, v, bias=bias, scale=self.scale)  # (B, h, N, vd)
        if capturing():  # map capture: rows of the capture's query points, the bias included
            record_rows(self, q, k, grid=self.resolution, bias=bias, scale=self.scale)
        if self.use_conv:
            out = out.transpose(-2, -1).reshape(batch, self.val_attn_dim, height, width)
        else:
            out = out.transpose(1, 2).reshape(batch, tokens, self.val_attn_dim)
        return self.proj(out)


@register_compat(example=Example({"in_dim": 8, "out_dim": 12, "key_dim": 4, "num_heads": 2, "resolution": 4},
                                 ((2, 16, 8),), (2, 4, 12), channel_dim=-1))
class TimmLevitAttentionDownsample(OffsetBiasAttention):
    """timm's `levit.AttentionDownsample(in_dim, out_dim, key_dim, num_heads=8, attn_ratio=2.0,
    stride=2, resolution=14, use_conv=False, use_pool=False, act_layer=nn.SiLU)`
    (`attnzoo.compat.TimmLevitAttentionDownsample`): the module docstring says what it is; keys
    `attention_biases`, `kv`, `q.ln`, `proj.ln` (each `linear` and `bn`).

    $\\mathrm{softmax}(q k^\\top / \\sqrt{kd} + B_h[|\\Delta y| W + |\\Delta x|])\\,v$ per head with
    $q = \\mathrm{BN}(\\mathrm{down}(x) W_q)$ at the strided positions and $[k, v] = \\mathrm{BN}(x W_{kv})$,
    then $\\mathrm{BN}(\\mathrm{act}(\\cdot) W_o)$. Time $O(B N N_q h (kd + vd))$, $N_q = \\lceil H/s
    \\rceil \\lceil W/s \\rceil$.

    Shape:
        - x: `(B, N, C_in)` with N = H W, row-major; `use_conv`: `(B, C_in, H, W)`.
        - Output: `(B, N_q, C_out)`; `use_conv`: `(B, C_out, ceil(H / s), ceil(W / s))`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 2.0,
        stride: int = 2,
        resolution: Resolution = 14,
        use_conv: bool = False,
        use_pool: bool = False,
        act_layer: type[nn.Module] = nn.SiLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_dim = check_int(in_dim, "in_dim", who)
        self.out_dim = check_int(out_dim, "out_dim", who)
        self.num_heads, self.key_dim = _heads(num_heads, key_dim, who)
        self.stride = check_int(stride, "stride", who)
        self.use_conv, self.use_pool = bool(use_conv), bool(use_pool)
        self.scale = key_dim**-0.5
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = val_width(key_dim, attn_ratio, who)
        self.val_attn_dim = self.val_dim * num_heads
        grid = _grid(resolution, who)
        down: nn.Module
        if self.use_conv:
            norm: type[LinearNorm] | type[ConvNorm] = ConvNorm
            down = nn.AvgPool2d(3 if use_pool else 1, stride=stride, padding=1 if use_pool else 0,
                                count_include_pad=False)
        else:
            norm, down = LinearNorm, Subsample(stride, grid, use_pool)
        self.kv = norm(in_dim, self.val_attn_dim + self.key_attn_dim, **dd)
        self.q = nn.Sequential(OrderedDict([("down", down), ("ln", norm(in_dim, self.key_attn_dim, **dd))]))
        self.proj = nn.Sequential(OrderedDict([("act", act_layer()),
                                               ("ln", norm(self.val_attn_dim, out_dim, **dd))]))
        self.resolution = grid
        self._bias_table(self.num_heads, grid, self.stride, False, dd)
        self.query_grid = (-(-grid[0] // stride), -(-grid[1] // stride))

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, key_dim={self.key_dim}, "
                f"num_heads={self.num_heads}, val_dim={self.val_dim}, stride={self.stride}, "
                f"resolution={self.resolution}, use_conv={self.use_conv}, use_pool={self.use_pool}")

    def forward(self, x: Tensor) -> Tensor:
        """Attention of the strided queries to the whole `resolution` map: `(B, N_q, C_out)`, or
        `(B, C_out, ceil(H / s), ceil(W / s))` with `use_conv`."""
        who = type(self).__name__
        (height, width), heads = self.resolution, self.num_heads
        tokens = height * width
        if self.use_conv:
            batch = check_shape(x, who, "B C H W", C=self.in_dim, H=height, W=width)["B"]
            kv = self.kv(x).reshape(batch, heads, -1, tokens).transpose(-2, -1)  # (B, h, N, kd + vd)
            q = self.q(x).reshape(batch, heads, self.key_dim, -1).transpose(-2, -1)  # (B, h, N_q, kd)
        else:
            batch = check_shape(x, who, "B N C", C=self.in_dim, N=tokens)["B"]
            kv = self.kv(x).reshape(batch, tokens, heads, -1).transpose(1, 2)  # (B, h, N, kd + vd)
            q = self.q(x).reshape(batch, -1, heads, self.key_dim).transpose(1, 2)  # (B, h, N_q, kd)
        k, v = kv.split([self.key_dim, self.val_dim], dim=-1)
        bias = self.get_attention_biases()  # (h, N_q, N)
        out = attend(q, k, v, bias=bias, scale=self.scale)  # (B, h, N_q, vd)
        if capturing():  # map capture: the strided queries' rows over the whole map, the bias included
            record_rows(self, q, k, grid=self.query_grid, key_grid=self.resolution, bias=bias,
                        scale=self.scale)
        if self.use_conv:
            out = out.transpose(-2, -1).reshape(batch, self.val_attn_dim, *self.query_grid)
        else:
            out = out.transpose(1, 2).reshape(batch, -1, self.val_attn_dim)
        return self.proj(out)

