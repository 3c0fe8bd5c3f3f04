"""Outlook attention, "VOLO: Vision Outlooker for Visual Recognition" (Yuan et al., 2021),
arXiv:2106.13112.

Each (strided) position predicts, from its own feature alone, a $k^2 \\times k^2$ attention matrix per
head that mixes the values of its $k \\times k$ neighbourhood; the overlapping outputs are folded back
(summed) onto the map. No query-key product: time $O(B N C k^2 + B N' h k^4)$, memory
$O(B N C k^2 + B N' h k^4)$ with N' = ceil(H / s) ceil(W / s) window centres. No N x N map exists.

fightingcv's `OutlookAttention` builds `nn.Unfold(kernel_size, padding, stride)` positionally, which is
`Unfold(kernel_size, dilation=padding, padding=stride)`: it runs (and then equals VOLO) only for
`kernel_size=3, padding=1, stride=1`, the defaults, and fails with a shape error otherwise. It also uses
its `attn_drop` (default 0.1) for the projection dropout. This class follows VOLO's code (timm's
`OutlookAttention`): unfold with the given padding and stride, separate `attn_drop` and `proj_drop`
(default 0).

Shape letters: B batch, H, W height and width, C channels (`dim`), h heads, d = C / h, k kernel size,
s stride, N = H W.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.softmax import short_softmax
from attnzoo.maps.capture import capturing, query_indices, record
from attnzoo.maps.records import _scatter_rows

__all__ = ["OutlookAttention"]


@register(
    "outlook",
    family="outlook",
    paper="VOLO: Vision Outlooker for Visual Recognition",
    year=2021,
    layout="NHWC",
    example=Example(kwargs={"dim": 16, "num_heads": 2}, inputs=((2, 5, 7, 16),), output=(2, 5, 7, 16),
                    channel_dim=-1),
    aliases=("outlook_attention", "volo"),
)
class OutlookAttention(nn.Module):
    r"""Outlook attention (VOLO): per-position predicted weights over a $k \times k$ neighbourhood.

    For each window centre u (every s-th position, features average-pooled over s x s), a linear map
    predicts $A_u = \mathrm{softmax}(d^{-1/2}\,W_a \bar x_u) \in \mathbb{R}^{h \times k^2 \times k^2}$;
    with $V_{\Delta_u}$ the $k^2$ values $W_v x$ of u's window (zero padded),

    $$
    y = W_o\,\mathrm{Fold}\Big(\big\{A_u V_{\Delta_u}\big\}_u\Big)
    $$

    where Fold sums each window's $k^2$ outputs back onto their positions. Time and memory
    $O(B N C k^2 + B N' h k^4)$ with N' = ceil(H/s) ceil(W/s) centres; no N x N map is built.

    Args:
        dim: Channels C of the input (last axis).
        num_heads: Heads h; must divide `dim`. Default: 1.
        kernel_size: Window size k. Default: 3.
        padding: Zero padding of the windows. Default: None (`kernel_size // 2`).
        stride: Step s between window centres. Default: 1.
        qkv_bias: Give the value projection a bias. Default: False.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, H, W, C)`; the windows must tile the map: `(H + 2 padding - k) // s + 1 == ceil(H / s)`,
          likewise for W (always true for odd k with the default padding).
        - Output: `(B, H, W, C)`; with `need_weights=True` also the weights
          `(B, h, ceil(H/s) ceil(W/s), k^2, k^2)`.

    Example:
        ```python
        >>> outlook = OutlookAttention(64, num_heads=2, stride=2)
        >>> x = torch.randn(2, 9, 11, 64)
        >>> out, weights = outlook(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 9, 11, 64]), torch.Size([2, 2, 30, 9, 9]))

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        kernel_size: int = 3,
        padding: int | None = None,
        stride: int = 1,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        self.head_dim = dim // num_heads
        self.kernel_size = check_int(kernel_size, "kernel_size", who)
        self.padding = check_int(kernel_size // 2 if padding is None else padding, "padding", who, minimum=0)
        self.stride = check_int(stride, "stride", who)
        self.scale = self.head_dim**-0.5
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.attn = nn.Linear(dim, kernel_size**4 * num_heads, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, stride={self.stride}")

    def _record(self, weights: Tensor, size: tuple[int, int], centres: tuple[int, int]) -> None:
        """Rows of the capture's query pixels over the map: the weights with which the windows that
        cover a pixel mix their values into its output, averaged over those windows (Fold sums them);
        zero-padded keys are left out."""
        (height, width), (h, w) = size, centres
        k, s, p = self.kernel_size, self.stride, self.padding
        idx = query_indices(size, weights.device)
        i = torch.arange(k, device=weights.device)
        uy, ux = (idx[:, None] // width + p - i), (idx[:, None] % width + p - i)  # (Q, k): window starts
        ok_y, ok_x = (uy % s == 0) & (uy >= 0) & (uy < h * s), (ux % s == 0) & (ux >= 0) & (ux < w * s)
        uy, ux = (uy // s).clamp(0, h - 1), (ux // s).clamp(0, w - 1)
        valid = (ok_y[:, :, None] & ok_x[:, None, :]).to(weights.dtype)  # (Q, k, k): windows covering it
        windows = uy[:, :, None] * w + ux[:, None, :]  # (Q, k, k)
        with torch.no_grad():
            rows = weights[:, :, windows, i[:, None] * k + i]  # (B, h, Q, k, k, k^2): the pixel's row
            rows = rows * (valid / valid.sum(dim=(1, 2), keepdim=True))[..., None]
        j = torch.arange(k * k, device=weights.device)  # the window's keys, row-major
        ky = s * uy[:, :, None, None] - p + j // k  # (Q, k, 1, k^2)
        kx = s * ux[:, None, :, None] - p + j % k  # (Q, 1, k, k^2)
        inside = (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        target = torch.where(inside, ky * width + kx, height * width)  # (Q, k, k, k^2); padding dropped
        rows = _scatter_rows(rows.flatten(3), target.reshape(1, len(idx), -1), height * width)
        record(self, "rows", rows, grid=size, queries=idx, query_grid=size, kernel=k,
               note="weights on the values, mean over the k x k windows covering the query")

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Mix each window's values with predicted weights; `(out, weights)` with `need_weights`.

        Args:
            x: Feature map `(B, H, W, C)`.
            need_weights: Also return the `(B, h, N', k^2, k^2)` weights. Default: False.
        """
        who = type(self).__name__
        dims = check_shape(x, who, "B H W C", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        k, s, p, heads = self.kernel_size, self.stride, self.padding, self.num_heads
        h, w = math.ceil(height / s), math.ceil(width / s)
        for name, size, centres in (("H", height, h), ("W", width, w)):
            if (size + 2 * p - k) // s + 1 != centres:
                raise ValueError(
                    f"{who} (kernel_size={k}, padding={p}, stride={s}) expects windows that tile the map: "
                    f"(x.{name} + 2 * padding - kernel_size) // stride + 1 == ceil(x.{name} / stride), "
                    f"got {name}={size}"
                )
        v = self.v(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        v = F.unfold(v, k, padding=p, stride=s)  # (B, C k^2, h w)
        v = v.reshape(batch, heads, self.head_dim, k * k, h * w).permute(0, 1, 4, 3, 2)  # (B, h, hw, k^2, d)
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True) if s > 1 else x.permute(0, 3, 1, 2)
        logits = self.attn(pooled.permute(0, 2, 3, 1))  # (B, h', w', h k^4)
        logits = logits.reshape(batch, h * w, heads, k * k, k * k).transpose(1, 2)  # (B, h, hw, k^2, k^2)
        weights = short_softmax(logits * self.scale)  # over the k*k neighbours: torch's is slow there
        del logits  # not kept for backward: freed now, not at the end of forward
        if capturing():
            self._record(weights, (height, width), (h, w))
        out = self.attn_drop(weights) @ v  # (B, h, hw, k^2, d)
        del v  # the k^2-fold unfolded values; the product keeps its own contiguous copy for backward
        out = out.permute(0, 1, 4, 3, 2).reshape(batch, self.dim * k * k, h * w)  # (B, C k^2, hw)
        out = F.fold(out, (height, width), k, padding=p, stride=s)  # (B, C, H, W): windows summed
        out = self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))  # (B, H, W, C)
        return (out, weights) if need_weights else out
