"""timm's spatial-reduction attentions: PVT v2's `timm.models.pvt_v2.Attention` and Twins'
`timm.models.twins.GlobalSubSampleAttn` (global sub-sampled attention, PVT v1's) and
`timm.models.twins.LocallyGroupedAttn` (window attention): their constructors, calls
`(x, feat_size)` / `(x, size)` and state_dict keys, run by `attnzoo.attend`.

Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without
Convolutions", ICCV 2021, https://arxiv.org/abs/2102.12122; Wang et al., "PVT v2: Improved Baselines
with Pyramid Vision Transformer", CVMJ 2022, https://arxiv.org/abs/2106.13797; Chu et al., "Twins:
Revisiting the Design of Spatial Attention in Vision Transformers", NeurIPS 2021,
https://arxiv.org/abs/2104.13840.

Spatial reduction: every token of the `(H, W)` map queries keys and values computed from a smaller
map, the tokens through an `r x r` convolution of stride `r` (`sr`) and a LayerNorm (`norm`), so
the `N = H W` queries see `M = (H // r) (W // r)` keys. PVT v2's linear mode pools the map to
`7 x 7` instead, then a 1x1 `sr`, `norm` and GELU (`M = 49` whatever the map). Twins' locally grouped
attention pads the map with zero tokens to a multiple of the window `ws` (at the right and bottom) and
attends within each `ws x ws` window; the padding tokens take part as keys (their keys and values
are `qkv`'s bias), as in timm.

`attnzoo.convert.from_timm` converts the three (the same keys, so timm's checkpoint loads with
`strict=True`), and `attnzoo.replace(model, cls)` swaps a whole PVT v2 or Twins' attention with the
same logits; `attnzoo.capture_maps` then records the rows (over the reduced key map, or over the
`(H, W)` map for the windows, where the padding's share of a row is left out).

Where timm needs the map's size, these classes take it the same way; left out (None), the tokens
must form a square map. Shape letters: B batch, (H, W) the map, N = H W tokens, M keys, C = dim,
h heads, d = C / h head width, r = sr_ratio.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record, record_rows
from attnzoo.maps.records import windows_to_image

__all__ = ["TimmPvtV2Attention", "TimmTwinsGlobalAttention", "TimmTwinsLocalAttention", "map_size"]

Size = tuple[int, int] | list[int] | None


def map_size(size: object, tokens: int, who: str, name: str) -> tuple[int, int]:
    """The `(H, W)` of `tokens` tokens: `size` (an int or a pair, `H W` must be `tokens`), or with
    None a square map."""
    if size is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{who}: without {name}, the {tokens} tokens of x must form a square map; "
                             f"pass {name}=(H, W)")
        return side, side
    height, width = int_pair(size, name, who)
    if height * width != tokens:
        raise ValueError(f"{who} expects {name} (H, W) with H * W = {tokens}, the tokens of x, "
                         f"got {(height, width)}")
    return height, width


class _SubSampled(nn.Module):
    """What PVT v2's and Twins' global attention share: queries `q` of every token, keys and values
    `kv` of the reduced tokens, `proj`; keys and order of registration as timm's."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 dd: dict[str, Any]) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        # The reduction, set by the subclasses (after the projections, timm's order of parameters).
        self.pool: nn.Module | None = None
        self.sr: nn.Conv2d | None = None
        self.norm: nn.Module | None = None
        self.act: nn.Module | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def _reduce(self, x: Tensor, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
        """The tokens the keys and values come from, `(B, M, C)`, and their grid: `sr` (after `pool`)
        on the map of `x`, then `norm` and `act`; `x` itself without `sr`."""
        if self.sr is None or self.norm is None:
            return x, (height, width)
        batch = x.shape[0]
        fmap = x.permute(0, 2, 1).reshape(batch, self.dim, height, width)  # (B, C, H, W)
        if self.pool is not None:
            fmap = self.pool(fmap)
        fmap = self.sr(fmap)  # (B, C, H', W')
        grid = (fmap.shape[-2], fmap.shape[-1])
        reduced = self.norm(fmap.reshape(batch, self.dim, -1).permute(0, 2, 1))  # (B, M, C)
        return (reduced if self.act is None else self.act(reduced)), grid

    def _check_map(self, height: int, width: int, name: str) -> None:
        """The strided reduction needs one `r x r` patch at least (timm's convolution fails on less)."""
        if self.sr is not None and self.pool is None:
            kh, kw = self.sr.kernel_size
            if height < kh or width < kw:
                raise ValueError(f"{type(self).__name__} expects {name} (H, W) of at least sr_ratio = "
                                 f"{kh} on each side, got {(height, width)}")

    def _attention(self, x: Tensor, size: object, name: str) -> Tensor:
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        height, width = map_size(size, tokens, who, name)
        self._check_map(height, width, name)
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        reduced, key_grid = self._reduce(x, height, width)  # (B, M, C)
        kv = self.kv(reduced).reshape(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, h, M, d) each
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points over the reduced map
            record_rows(self, q, k, grid=(height, width), key_grid=key_grid, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))


@register_compat(example=Example({"dim": 8, "num_heads": 2, "sr_ratio": 2}, ((2, 16, 8),), (2, 16, 8),
                                 channel_dim=-1))
class TimmPvtV2Attention(_SubSampled):
    """timm's `pvt_v2.Attention(dim, num_heads=8, sr_ratio=1, linear_attn=False, qkv_bias=True,
    attn_drop=0., proj_drop=0.)` (`attnzoo.compat.TimmPvtV2Attention`): the module docstring says what
    it is; keys `q`, `kv`, `proj` and, with `sr_ratio > 1` or `linear_attn`, `sr` and `norm`.

    $\\mathrm{softmax}(q K^\\top / \\sqrt d)\\,V$ per head with $[K, V] = \\mathrm{kv}(R(x))$ and
    $R = \\mathrm{norm} \\circ \\mathrm{sr}$ (`sr_ratio > 1`), $\\mathrm{GELU} \\circ \\mathrm{norm}
    \\circ \\mathrm{sr} \\circ \\mathrm{pool}_7$ (`linear_attn`), or the identity; then `proj`. Time
    $O(B N M C)$ for the attention, $M = N / r^2$ or 49.

    Shape:
        - x: `(B, N, C)`, the `(H, W)` map's tokens row-major; feat_size: `(H, W)` (None: a square map).
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        sr_ratio: int = 1,
        linear_attn: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, dd)
        self.sr_ratio = check_int(sr_ratio, "sr_ratio", type(self).__name__)
        self.linear_attn = bool(linear_attn)
        if self.linear_attn:  # timm ignores sr_ratio here
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sr_ratio={self.sr_ratio}, linear_attn={self.linear_attn}"

    def forward(self, x: Tensor, feat_size: Size = None) -> Tensor:
        """Attention of the tokens `x` `(B, N, C)` of the `feat_size` map to its reduction: `(B, N, C)`."""
        return self._attention(x, feat_size, "feat_size")


@register_compat(example=Example({"dim": 8, "num_heads": 2, "sr_ratio": 2}, ((2, 16, 8),), (2, 16, 8),
                                 channel_dim=-1))
class TimmTwinsGlobalAttention(_SubSampled):
    """timm's `twins.GlobalSubSampleAttn(dim, num_heads=8, attn_drop=0., proj_drop=0., sr_ratio=1)`
    (`attnzoo.compat.TimmTwinsGlobalAttention`), Twins' global sub-sampled attention (GSA, PVT v1's
    spatial-reduction attention); keys `q`, `kv`, `proj` and, with `sr_ratio > 1`, `sr` and `norm`.

    $\\mathrm{softmax}(q K^\\top / \\sqrt d)\\,V$ per head with $[K, V] = \\mathrm{kv}(\\mathrm{norm}
    (\\mathrm{sr}(x)))$ (`sr_ratio > 1`, else $\\mathrm{kv}(x)$), then `proj`.

    Shape:
        - x: `(B, N, C)`, the `(H, W)` map's tokens row-major; size: `(H, W)` (None: a square map).
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, True, attn_drop, proj_drop, dd)
        self.sr_ratio = check_int(sr_ratio, "sr_ratio", type(self).__name__)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sr_ratio={self.sr_ratio}"

    def forward(self, x: Tensor, size: Size = None) -> Tensor:
        """Attention of the tokens `x` `(B, N, C)` of the `size` map to its reduction: `(B, N, C)`."""
        return self._attention(x, size, "size")


@register_compat(example=Example({"dim": 8, "num_heads": 2, "ws": 3}, ((2, 16, 8),), (2, 16, 8),
                                 channel_dim=-1))
class TimmTwinsLocalAttention(nn.Module):
    """timm's `twins.LocallyGroupedAttn(dim, num_heads=8, attn_drop=0., proj_drop=0., ws=1)`
    (`attnzoo.compat.TimmTwinsLocalAttention`), Twins' locally grouped self-attention (LSA); keys
    `qkv`, `proj` as timm's.

    The map, zero-padded at the right and bottom to multiples of `ws`, is cut into `ws x ws`
    windows; in each, $\\mathrm{softmax}(q k^\\top / \\sqrt d)\\,v$ per head over the window's
    `ws^2` tokens (padding included), then the padding is cropped and `proj` applied. Time
    $O(B H_p W_p\\, ws^2 C)$ for the attention.

    timm asserts `ws != 1`; here `ws=1` runs (each token attends to itself only).

    Shape:
        - x: `(B, N, C)`, the `(H, W)` map's tokens row-major; size: `(H, W)` (None: a square map).
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        ws: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True, **dd)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.ws = check_int(ws, "ws", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, ws={self.ws}"

    def forward(self, x: Tensor, size: Size = None) -> Tensor:
        """Window self-attention over the tokens `x` `(B, N, C)` of the `size` map: `(B, N, C)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens, channels = dims["B"], dims["N"], self.dim
        height, width = map_size(size, tokens, who, "size")
        ws = self.ws
        pad_r, pad_b = (ws - width % ws) % ws, (ws - height % ws) % ws
        fmap = F.pad(x.reshape(batch, height, width, channels), (0, 0, 0, pad_r, 0, pad_b))  # zero tokens
        hp, wp = height + pad_b, width + pad_r
        rows, cols = hp // ws, wp // ws
        windows = fmap.reshape(batch, rows, ws, cols, ws, channels).transpose(2, 3)  # (B, h', w', ws, ws, C)
        qkv = self.qkv(windows).reshape(batch * rows * cols, ws * ws, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B nW, h, ws^2, d) each, windows row-major
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B nW, h, ws^2, d)
        if capturing():  # map capture: every window's rows, then the query points' rows on the map
            with torch.no_grad():
                _, weights = attend(q, k, k[..., :1], scale=self.scale, need_weights=True)
            n = ws * ws
            record(self, "rows", weights, grid=(ws, ws), queries=torch.arange(n, device=x.device),
                   query_grid=(ws, ws))
            windows_to_image(self, self, size=(height, width), padded=(hp, wp), window=(ws, ws))
        out = out.transpose(1, 2).reshape(batch, rows, cols, ws, ws, channels)
        out = out.transpose(2, 3).reshape(batch, hp, wp, channels)[:, :height, :width]  # crop the padding
        return self.proj_drop(self.proj(out.reshape(batch, tokens, channels)))
