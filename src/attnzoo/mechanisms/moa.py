"""MOA: multi-resolution overlapped attention, "Aggregating Global Features into Local Vision
Transformer" (Patel, Bur, Li, Wang, 2022), arXiv:2201.12903 (official code: krushi1992/MOA-transformer,
copied unchanged into fightingcv's `MOATransformer.GlobalAttention`).

The map's channels are reduced by a 1x1 convolution (`dim // reduction`); every non-overlapping
window becomes one query token (its `w * w` reduced pixels flattened) and every window grown by one
pixel on each side, `(w + 2) x (w + 2)` (zero padded at the border), one key/value token. The window
tokens attend to each other with a Swin-style relative position bias over the window grid, so every
window sees a summary of the whole map; the block adds each window's result to its tokens.

- `OverlappedAttention` (registered `moa`): `(B, H, W, C)` in, `(B, H, W, C)` out, every token
  carrying its window's global feature (the broadcast the official block adds to the local features).
- `LegacyOverlappedAttention`: what `attnzoo.convert.from_fightingcv` returns for fightingcv's (and
  the official) `GlobalAttention`: its `forward(x, H, W)` and numbers, including its token order.

Deviations from the official code (which fightingcv copies):
- The official forward reads its `(B, N, C)` tokens as `(B, C, H, W)` with `reshape` and views the
  `(B, D, n)` query and key patch tensors as `(B, n, D)` without a transpose, so query token i mixes
  features of several windows. `OverlappedAttention` transposes (the paper's method: one token per
  window); `LegacyOverlappedAttention` reproduces the views.
- The key `nn.Unfold` has stride 14 hard-coded: the official module runs only with `window_size`
  14 (or a map of one window). Here the stride is `window_size`, the same numbers where it runs.
- The official table is `(2 s - 1)^2` for `s = H // window` (square maps only); here it is
  `(2 gh - 1)(2 gw - 1)` for the `gh x gw` window grid of any `H x W` that the window divides.
- The official module leaves the table at zero (`trunc_normal_` is commented out); so does this one.
- `relative_position_index` is a non-persistent buffer (the converter checks and drops fightingcv's).
- `qk_scale` is not an argument (the converter copies fightingcv's `scale` attribute).
- At least one reduced channel: `max(1, dim // reduction)` (the official `dim // 32` is 0 for dim < 32,
  leaving the projections only their biases; the converter refuses such modules).

Shape letters: B batch, H/W map size, C = `dim`, w window side, (gh, gw) = (H / w, W / w) window
grid, n = gh * gw windows, r = `dim // reduction` reduced channels, h heads, d = C / h.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._fx import fx_leaf
from attnzoo._geometry import Geometry, divisor_window, grid2d, int_pair
from attnzoo._registry import Example, register
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_2d
from attnzoo.kernels.route import plain_module
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["OverlappedAttention", "LegacyOverlappedAttention"]

_PAPER = "Aggregating Global Features into Local Vision Transformer"


def _for_input(geo: Geometry) -> dict[str, Any]:
    """The map's size, the largest window up to 7 dividing it, and a reduction leaving >= 1 channel."""
    h, w = grid2d(geo)
    return {"feat_size": (h, w), "window_size": divisor_window(h, w), "reduction": min(32, geo.channels)}


@register(
    "moa",
    family="global",
    paper=_PAPER,
    year=2022,
    layout="NHWC",
    example=Example(
        kwargs={"dim": 8, "window_size": 2, "num_heads": 2, "reduction": 4, "feat_size": (4, 6)},
        inputs=((2, 4, 6, 8),),
        output=(2, 4, 6, 8),
        channel_dim=-1,
        free_sizes=(),  # the relative position table is made for feat_size
    ),
    aliases=("multi_resolution_overlapped_attention", "overlapped_attention"),
    uses_attend=True,
    for_input=_for_input,
)
class OverlappedAttention(nn.Module):
    """Multi-resolution overlapped attention (MOA, Patel et al., 2022).

    With $r$ the 1x1-reduced map, $P_i$ the $w \\times w$ pixels of window $i$ and $\\bar P_j$ window $j$
    grown by one pixel on each side, flattened:

    $$
    q_i = W_q\\,\\mathrm{vec}(r[P_i]),\\quad [k_j; v_j] = W_{kv}\\,\\mathrm{vec}(r[\\bar P_j]),\\quad
    g_i = W_o \\sum_j \\mathrm{softmax}_j\\big(s\\, q_i^\\top k_j + B_{\\delta(i, j)}\\big)\\, v_j
    $$

    per head, with $s = d^{-1/2}$ and $B$ a learned bias per relative offset $\\delta(i, j)$ on the
    window grid; every token of window $i$ receives $g_i$. Time $O(N C r + n^2 C)$ with $N = HW$,
    $n = N / w^2$, $r = C / \\mathrm{reduction}$ (the patch projections, then attention between windows);
    memory $O(N r + h n^2)$.

    Args:
        dim: Channels C (last axis of the input).
        window_size: Side w of the query windows; must divide H and W. Default: 7.
        num_heads: Number of heads h (must divide `dim`). Default: 8.
        feat_size: Input size `(H, W)` (or one int for both) the relative position table is made
            for (the official `input_resolution`). Default: 14.
        reduction: Channel reduction of the 1x1 convolution before the patches,
            r = max(1, dim // reduction) (the official code fixes 32). Default: 32.
        qkv_bias: Bias in the query and key/value projections. Default: True.
        attn_drop: Dropout on the attention weights. Default: 0.0.
        proj_drop: Dropout after the output projection. Default: 0.0.
        device: Device of the parameters and buffers. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, H, W, C)` with `(H, W) = feat_size`.
        - Output: `(B, H, W, C)`, each window's global feature on all its tokens (`out[:, ::w, ::w]`
          are the `(B, gh, gw, C)` window tokens).
        - Weights (`need_weights=True`): `(B, h, n, n)` between the windows, numbered row-major.

    Example:
        ```python
        >>> moa = OverlappedAttention(64, window_size=7, num_heads=4, feat_size=(14, 21))
        >>> out, weights = moa(torch.randn(2, 14, 21, 64), need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 14, 21, 64]), torch.Size([2, 4, 6, 6]))

        ```
    """

    def __init__(
        self,
        dim: int,
        window_size: int = 7,
        num_heads: int = 8,
        feat_size: int | tuple[int, int] = 14,
        reduction: int = 32,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.window_size = check_int(window_size, "window_size", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)
        self.feat_size = int_pair(feat_size, "feat_size", who)
        for side in self.feat_size:
            if side % self.window_size:
                raise ValueError(f"{who}: feat_size={self.feat_size} must be divisible by window_size="
                                 f"{self.window_size} (the queries are non-overlapping windows)")
        self.reduction = check_int(reduction, "reduction", who)
        self.rd_channels = max(1, dim // self.reduction)  # the official int(dim // 32) may be 0
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.scale = (dim // num_heads) ** -0.5
        self.grid = (self.feat_size[0] // self.window_size, self.feat_size[1] // self.window_size)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        w, rd = self.window_size, self.rd_channels
        # The official keys: pre_conv, relative_position_bias_table, q, kv, proj.
        self.pre_conv = nn.Conv2d(dim, rd, 1, **factory)
        gh, gw = self.grid
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * gh - 1) * (2 * gw - 1), num_heads, **factory)
        )
        index = relative_position_index_2d(self.grid, device=None if device is None else torch.device(device))
        self.register_buffer("relative_position_index", index, persistent=False)  # (n, n)
        self.q = nn.Linear(rd * w * w, dim, bias=qkv_bias, **factory)
        self.kv = nn.Linear(rd * (w + 2) ** 2, 2 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def reset_parameters(self) -> None:
        """The official zero table and the index recomputed (`to_empty` leaves both uninitialised)."""
        nn.init.zeros_(self.relative_position_bias_table)
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        index.copy_(relative_position_index_2d(self.grid, device=index.device))

    def _reduce_tokens(self, x: Tensor) -> Tensor:
        """`pre_conv` of channels-last tokens `x` `(B, H, W, C)` -> `(B, r, H, W)` (a view). A 1x1
        convolution to r = 3 channels is one skinny matrix product; oneDNN's convolution ran it (and its
        backward) several times slower than the product on the tokens' own layout."""
        if not plain_module(self.pre_conv, nn.Conv2d):
            return self.pre_conv(x.permute(0, 3, 1, 2))
        weight = self.pre_conv.weight.flatten(1)  # (r, C)
        return F.linear(x, weight, self.pre_conv.bias).permute(0, 3, 1, 2)  # (B, H, W, r) -> (B, r, H, W)

    def _reduce_map(self, x: Tensor) -> Tensor:
        """`pre_conv` of a contiguous map `x` `(B, C, H, W)` -> `(B, r, H, W)`, as a batched product with
        the (r, C) weight (the same reason as `_reduce_tokens`)."""
        if not plain_module(self.pre_conv, nn.Conv2d):
            return self.pre_conv(x)
        b, c, height, width = x.shape
        weight = self.pre_conv.weight.flatten(1)  # (r, C)
        out = torch.matmul(weight.expand(b, -1, -1), x.reshape(b, c, height * width))  # (B, r, H W)
        if self.pre_conv.bias is not None:
            out = out + self.pre_conv.bias[:, None]
        return out.view(b, -1, height, width)

    # The patch tokens of the reduced map r (B, r, H, W), in the official feature orders.

    def _query_patches(self, r: Tensor) -> Tensor:
        """`(B, n, w*w*r)`: each window's pixels, features ordered (row, column, channel)."""
        b, rd, height, width = r.shape
        w = self.window_size
        r = r.reshape(b, rd, height // w, w, width // w, w)  # (B, r, gh, w, gw, w)
        return r.permute(0, 2, 4, 3, 5, 1).reshape(b, -1, w * w * rd)  # (B, n, w*w*r)

    def _key_patches(self, r: Tensor) -> Tensor:
        """`(B, n, r*(w+2)^2)`: each window grown by one pixel, features ordered (channel, row, column)."""
        w = self.window_size
        return F.unfold(r, w + 2, padding=1, stride=w).transpose(1, 2)  # (B, r(w+2)^2, n) -> (B, n, ...)

    def _windows(self, r: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """The window tokens `(B, n, C)` (and the weights `(B, h, n, n)`) of the reduced map `r`."""
        b, heads = r.shape[0], self.num_heads
        q_in, k_in = self._query_patches(r), self._key_patches(r)
        n, d = q_in.shape[1], self.dim // heads
        q = self.q(q_in).reshape(b, n, heads, d).transpose(1, 2)  # (B, h, n, d)
        kv = self.kv(k_in).reshape(b, n, 2, heads, d).permute(2, 0, 3, 1, 4)  # (2, B, h, n, d)
        k, v = kv.unbind(0)
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        bias = gather_relative_bias(self.relative_position_bias_table, index)  # (h, n, n)
        if capturing():  # map capture: window rows over the window grid
            record_rows(self, q, k, grid=self.grid, bias=bias, scale=self.scale)
        drop = self.attn_drop.p if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = attend(q, k, v, bias=bias, dropout_p=drop, scale=self.scale, need_weights=True)
        else:
            out = attend(q, k, v, bias=bias, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, self.dim)  # (B, h, n, d) -> (B, n, C)
        return self.proj_drop(self.proj(out)), weights

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Every token of `x` `(B, H, W, C)` gets its window's global feature; with `need_weights`,
        also the weights `(B, h, n, n)` between the windows."""
        height, width = self.feat_size
        check_shape(x, type(self).__name__, "B H W C", H=height, W=width, C=self.dim)
        b, (gh, gw), w = x.shape[0], self.grid, self.window_size
        r = self._reduce_tokens(x)  # (B, H, W, C) -> (B, r, H, W)
        out, weights = self._windows(r, need_weights)  # (B, n, C)
        out = out.reshape(b, gh, 1, gw, 1, self.dim).expand(b, gh, w, gw, w, self.dim)  # per token
        out = out.reshape(b, height, width, self.dim)  # (B, gh, w, gw, w, C) -> (B, H, W, C)
        return (out, weights) if need_weights and weights is not None else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"feat_size={self.feat_size}, reduction={self.reduction}, rd_channels={self.rd_channels}")


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class LegacyOverlappedAttention(OverlappedAttention):
    """The official / fightingcv `GlobalAttention`'s numbers: `from_fightingcv` returns this class.

    Its forward is the official `forward(x, H, W)`: the `(B, N, C)` tokens are read as a `(B, C, H, W)`
    map (a reshape, no transpose), and the `(B, D, n)` query and key patch tensors are viewed as
    `(B, n, D)`; the result is the `(B, n, C)` window tokens. Arguments as `OverlappedAttention` (the
    converter builds it); use `OverlappedAttention` for new models.

    Shape:
        - Input: `x` `(B, H * W, C)`, `H`, `W` ints equal to `feat_size`.
        - Output: `(B, n, C)`; with `need_weights=True` also the weights `(B, h, n, n)`.
    """

    def _query_patches(self, r: Tensor) -> Tensor:
        """The official query view: `(B, w*w*r, gh, gw)` read as `(B, n, w*w*r)`."""
        b, rd, height, width = r.shape
        w = self.window_size
        r = r.reshape(b, rd, height // w, w, width // w, w)  # (B, r, gh, w, gw, w)
        return r.permute(0, 3, 5, 1, 2, 4).reshape(b, -1, w * w * rd)  # (B, w, w, r, gh, gw) viewed

    def _key_patches(self, r: Tensor) -> Tensor:
        """The official key view: `nn.Unfold`'s `(B, r(w+2)^2, n)` read as `(B, n, r(w+2)^2)`."""
        b, w = r.shape[0], self.window_size
        patches = F.unfold(r, w + 2, padding=1, stride=w)  # (B, r(w+2)^2, n)
        return patches.reshape(b, -1, patches.shape[1])  # viewed, no transpose

    def forward(  # type: ignore[override]
        self, x: Tensor, H: int, W: int, need_weights: bool = False  # noqa: N803 - the official names
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The official forward: `x` `(B, H * W, C)` -> window tokens `(B, n, C)`."""
        who = type(self).__name__
        if (H, W) != self.feat_size:
            raise ValueError(f"{who} expects H, W equal to its input_resolution {self.feat_size} (the "
                             f"relative position table is made for it), got H={H}, W={W}")
        check_shape(x, who, "B N C", N=H * W, C=self.dim)
        r = self._reduce_map(x.reshape(x.shape[0], self.dim, H, W))  # the official reshape: (B, r, H, W)
        out, weights = self._windows(r, need_weights)
        return (out, weights) if need_weights and weights is not None else out
