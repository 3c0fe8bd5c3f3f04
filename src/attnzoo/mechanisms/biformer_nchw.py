"""BiFormer's NCHW refactor of Bi-Level Routing Attention (`ops/bra_nchw.py`), arXiv:2303.08810.

Official code: `rayleizhu/BiFormer` `ops/bra_nchw.py` with `ops/torch/rrsda.py`. It is the same
idea as `attnzoo.BiLevelRoutingAttention` with fewer options, 1x1 convolutions for the
projections (`qkv_linear`, `output_linear`) and its own region and padding rules, so its
numbers differ from the legacy module whenever H or W is not a multiple of `n_win` (the official
docstring says so too). The fast path is shared with the legacy module (one `index_select` of the
routed regions, then `attnzoo.attend`).

`BiLevelRoutingAttention2d(channels, ...)` is the canonical class: channels first like
`nn.Conv2d`/`nn.BatchNorm2d` (whose `2d` suffix names the same `(N, C, H, W)` layout),
`device=`/`dtype=`, `forward(x, need_weights=False)`. `nchwBRA(dim, ...)` is the official class
(`attnzoo.nchwBRA`, `attnzoo.compat.nchwBRA`), with the official constructor, `auto_pad` and
`attn_backend` included, and `forward(x, ret_attn_mask=False)`. Both have the official state_dict.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_float, check_int, check_shape
from attnzoo._geometry import num_windows
from attnzoo._registry import Example, FreeSize, register, register_seed
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_routed_rows, record_routing
from attnzoo.mechanisms._regions import merge, routed_attention, side_conv, to_windows

__all__ = ["BiLevelRoutingAttention2d", "nchwBRA"]


@register(
    "bra_nchw",
    family="biformer",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (NCHW refactor)",
    year=2023,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "num_heads": 2, "n_win": 2, "topk": 4},
        inputs=((2, 8, 4, 4),),
        output=(2, 8, 4, 4),free_sizes=(FreeSize(((0, 2),), 2, low=2), FreeSize(((0, 3),), 3, low=2))),
    seed_name="nchwBRA",
    uses_attend=True,
    for_input=lambda geo: {"n_win": (n := num_windows(geo)), "topk": min(4, n * n)},
)
class BiLevelRoutingAttention2d(nn.Module):
    r"""BiFormer's NCHW Bi-Level Routing Attention, numerically equal to the official `nchwBRA`.

    Algorithm (`(rh, rw) = (H // n_win, W // n_win)`, a **floor**):

    1. `q, k, v = qkv_linear(x).chunk(3)`: a 1x1 convolution `channels -> 3*channels`.
    2. Regions of `rh x rw` tokens; the last row/column of regions may be partial, so there
       are $R = \lceil H/r_h \rceil \lceil W/r_w \rceil$ regions, which can exceed `n_win**2`
       (13x15 with `n_win=4` gives 25).
    3. Routing: region means of q and k (`avg_pool2d` with `ceil_mode`: partial regions
       average their real tokens only), logits `q_r @ k_r^T` `(N, R, R)` **unscaled**, no
       softmax; the `topk` largest per row give `r_idx`; all heads share it (hard routing).
    4. q, k, v are zero-padded **after** the projection to whole regions. Padded keys are zero
       vectors (logit 0) and are **not masked**; padded values are 0.
    5. Each region's tokens attend, per head, to the `topk * rh*rw` tokens of its routed regions:
       $\mathrm{softmax}(s\, q k^T) v$ with $s$ = `qk_scale or channels ** -0.5` (the **full**
       channel width, "to be consistent with old models").
    6. Crop, add `lepe(v)` (depth-wise conv of the un-padded v), then `output_linear` (1x1).

    Official names are kept where no shared one fits (`n_win`, `topk`, `side_dwconv`); the
    official `dim` is `channels` here. The official `auto_pad` (ignored: padding always happens)
    and `attn_backend` (only `'torch'`) are only on `nchwBRA`.

    Args:
        channels: Channels C of the input and output (official: `dim`).
        num_heads: Heads; `channels` must be divisible by it. Default: 8.
        n_win: Sets the region size `(H // n_win, W // n_win)`; H and W must be `>= n_win`.
            Default: 7.
        qk_scale: Logit scale; None or 0 give `channels ** -0.5`. Default: None.
        topk: Regions each region attends to, `1 <= topk <= R` (checked per input). Default: 4.
        side_dwconv: Kernel of the depth-wise `lepe` conv (odd); 0 disables it. Default: 3.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(N, channels, H, W)`, any memory format.
        - Output: `(N, channels, H, W)`, in the input's memory format.
        - Weights (`need_weights=True`): `(N, num_heads, R, rh*rw, topk*rh*rw)`.

    Example:
        ```python
        >>> bra = BiLevelRoutingAttention2d(64, num_heads=4, n_win=4, topk=4)
        >>> bra(torch.randn(2, 64, 13, 15)).shape
        torch.Size([2, 64, 13, 15])

        ```
    """

    _width = "channels"  # the width argument's name in error messages (`dim` in `nchwBRA`)

    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who, width = type(self).__name__, self._width
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = check_int(channels, width, who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if channels % num_heads:
            raise ValueError(f"{who}: {width}={channels} must be divisible by num_heads={num_heads}")
        self.n_win = check_int(n_win, "n_win", who)
        if qk_scale is not None:
            check_float(qk_scale, "qk_scale", who, minimum=0.0)
        self.scale = float(qk_scale or channels**-0.5)
        self.topk = check_int(topk, "topk", who)
        self.side_dwconv = check_int(side_dwconv, "side_dwconv", who, minimum=0)
        if side_dwconv % 2 == 0 and side_dwconv > 0:
            raise ValueError(f"{who}: side_dwconv must be odd (or 0), got {side_dwconv}")
        self.lepe: nn.Conv2d | None = None  # official: a zeros lambda; None pickles, same empty state_dict
        if side_dwconv > 0:
            self.lepe = nn.Conv2d(
                channels, channels, side_dwconv, padding=side_dwconv // 2, groups=channels, **factory
            )
        self.qkv_linear = nn.Conv2d(channels, 3 * channels, kernel_size=1, **factory)
        self.output_linear = nn.Conv2d(channels, channels, kernel_size=1, **factory)

    def extra_repr(self) -> str:
        return (
            f"{self._width}={self.channels}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"
        )

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Apply BRA to the map `x` `(N, channels, H, W)`.

        Args:
            x: The map.
            need_weights: Also return the attention weights `(N, num_heads, R, rh*rw, topk*rh*rw)`
                (computed on the math path). Default: False.

        Returns:
            `out` `(N, channels, H, W)`, or `(out, weights)` with `need_weights`.
        """
        out, attn = self._forward(x, need_weights)
        return (out, attn) if need_weights and attn is not None else out

    def _forward(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        who, c = type(self).__name__, self.channels
        if isinstance(x, Tensor) and x.ndim == 4 and x.shape[1] != c and x.shape[-1] == c:
            raise ValueError(
                f"{who} expects an (N, {self.channels}, H, W) map, got {tuple(x.shape)} whose last dim is "
                f"{self.channels}: for channels-last maps use attnzoo.BiLevelRoutingAttention(layout='nhwc')"
            )
        dims = check_shape(x, who, "N C H W", C=self.channels)
        h, w = dims["H"], dims["W"]
        if min(h, w) < self.n_win:
            raise ValueError(f"{who} expects H and W >= n_win={self.n_win}, got H={h}, W={w}")
        rh, rw = h // self.n_win, w // self.n_win
        n_h, n_w = math.ceil(h / rh), math.ceil(w / rw)
        if self.topk > n_h * n_w:
            raise ValueError(
                f"{who} expects topk={self.topk} <= the number of regions, got {n_h}x{n_w} regions"
            )
        regions, length = n_h * n_w, rh * rw
        pad_b, pad_r = n_h * rh - h, n_w * rw - w
        keep_nchw = x.is_contiguous()  # return the input's memory format
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (N, Hp, Wp, C)
        n = x.shape[0]
        win = to_windows(x, n_h, n_w)  # (N*R, rh*rw, C), the one copy of the input
        qkv = F.linear(win, self.qkv_linear.weight.flatten(1), self.qkv_linear.bias)  # (N*R, rh*rw, 3C)
        count = None
        if pad_b or pad_r:
            # Official: q, k, v are zero-padded *after* the projection, so padded tokens are zeros.
            rows = torch.arange(n_h * rh, device=x.device).view(n_h, 1, rh, 1) >= h
            cols = torch.arange(n_w * rw, device=x.device).view(1, n_w, 1, rw) >= w
            pad = (rows | cols).view(regions, length, 1)  # (R, rh*rw, 1), True on padding
            qkv = qkv.view(n, regions, length, 3 * c).masked_fill(pad, 0.0).view(n * regions, length, 3 * c)
            count = (~pad).sum(1).to(qkv.dtype)  # (R, 1) real tokens per region
        q, k, v = qkv.split([c, c, c], dim=-1)
        # Routing on region means of the real tokens (official: avg_pool2d with ceil_mode), unscaled.
        q_r, k_r = q.detach().sum(1).view(n, regions, c), k.detach().sum(1).view(n, regions, c)
        if count is None:
            q_r, k_r = q_r / length, k_r / length
        else:
            q_r, k_r = q_r / count, k_r / count
        r_idx = (q_r @ k_r.transpose(1, 2)).topk(self.topk, dim=-1).indices  # (N, R, topk)
        out, attn = routed_attention(
            q, k, v, r_idx, num_heads=self.num_heads, scale=self.scale, need_weights=need_weights
        )  # (N*R, rh*rw, C)
        if capturing():  # map capture: the routing, and rows over the routed regions
            record_routing(self, r_idx, regions=(n_h, n_w), region=(rh, rw), size=(h, w))
            record_routed_rows(self, q, k, r_idx, regions=(n_h, n_w), region=(rh, rw), size=(h, w),
                               num_heads=self.num_heads, scale=self.scale)
        # The conv's zero padding equals the zero-padded v, so lepe(padded v), cropped, is lepe(v).
        side = side_conv(self.lepe, v, n, n_h, n_w, rh, rw)  # (N, Hp, Wp, C) or None
        out = merge(out, side, n, n_h, n_w, rh, rw)  # (N, Hp, Wp, C)
        out = F.linear(out[:, :h, :w], self.output_linear.weight.flatten(1), self.output_linear.bias)
        out = out.permute(0, 3, 1, 2)  # (N, C, H, W), channels-last memory
        if keep_nchw:
            out = out.contiguous()
        if attn is not None:
            attn = attn.unflatten(0, (n, n_h * n_w)).transpose(1, 2)  # (N, heads, R, rh*rw, topk*rh*rw)
        return out, attn


@register_seed("bra_nchw", example=Example(
    {"dim": 8, "num_heads": 2, "n_win": 2, "topk": 4}, ((2, 8, 4, 4),), (2, 8, 4, 4),
    free_sizes=(FreeSize(((0, 2),), 2, low=2), FreeSize(((0, 3),), 3, low=2))))
class nchwBRA(BiLevelRoutingAttention2d):  # noqa: N801 (the official class name)
    """BiFormer's official `nchwBRA` (`attnzoo.nchwBRA`, `attnzoo.compat.nchwBRA`).

    The official constructor, state_dict and numbers (those of `BiLevelRoutingAttention2d`, whose
    `channels` is the official `dim`); `forward(x, ret_attn_mask=False)` returns `out`, or the
    official `(out, attn)`. `auto_pad` is accepted and **ignored**, as officially (padding always
    happens); `attn_backend` takes only `'torch'` (the official CUDA backend was never released).

    Shape:
        - Input: `(N, dim, H, W)`; output: the same, in the input's memory format.
        - `attn`: `(N, num_heads, R, rh*rw, topk*rh*rw)` attention weights.

    Example:
        ```python
        >>> from attnzoo.compat import nchwBRA
        >>> bra = nchwBRA(dim=32, num_heads=4, n_win=2, topk=2)
        >>> out, attn = bra(torch.randn(1, 32, 4, 4), ret_attn_mask=True)
        >>> tuple(attn.shape)
        (1, 4, 4, 4, 8)

        ```
    """

    _width = "dim"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 3,
        auto_pad: bool = False,
        attn_backend: str = "torch",
    ) -> None:
        super().__init__(dim, num_heads, n_win, qk_scale, topk, side_dwconv)
        self.dim = dim
        self.auto_pad = bool(auto_pad)  # ignored, as officially
        self.attn_backend = check_choice(attn_backend, ("torch",), "attn_backend", type(self).__name__)

    def forward(  # type: ignore[override]
        self, x: Tensor, ret_attn_mask: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`out`, or with `ret_attn_mask` the official `(out, attn)`."""
        out, attn = self._forward(x, ret_attn_mask)
        return (out, attn) if ret_attn_mask and attn is not None else out
