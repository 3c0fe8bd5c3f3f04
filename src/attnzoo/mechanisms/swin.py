"""Swin window attention, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(Liu et al., 2021), arXiv:2103.14030.

- `WindowAttention` (registered `window`): window attention with Swin's 2-D relative position bias,
  on windows already cut from a map. Parameters `qkv`, `proj`, `relative_position_bias_table` as
  the official module and timm's; `relative_position_index` is a non-persistent buffer (as timm's),
  and a state_dict that carries it (the official module's) loads too: the key is checked against
  the computed index and dropped.
- `attnzoo.mechanisms.swin_official.OfficialWindowAttention`, exported as
  `attnzoo.compat.WindowAttention`: the official signature, forward and state_dict keys.
- `ShiftedWindowAttention` (registered `shifted_window`): a whole `(B, H, W, C)` or `(B, C, H, W)` map
  of any size (the official code requires sizes divisible by the window), with Swin's small-map
  rule (`small_map_window`).
- `window_partition`, `window_reverse`, `shifted_window_mask`, `small_map_window`: from
  `attnzoo.mechanisms.swin_windows`, re-exported here.

Fast path: the bias comes from a learnable table, so `scaled_dot_product_attention` would silently
run its generic math path; `attnzoo.kernels.biased.biased_attention` runs a dedicated kernel instead
(see there), and `attnzoo.attend`'s math path with `fused_attn(False)` or `need_weights=True`.

Shape letters: B batch, H/W map size, C channels, h heads, d head width, (Wh, Ww) window,
N = Wh*Ww tokens per window, nW windows per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import (
    check_choice,
    check_divisible,
    check_dropout,
    check_float,
    check_int,
    check_shape,
    check_tensor,
)
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, FreeSize, register
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_2d
from attnzoo.kernels.biased import biased_attention
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_packed_rows, windows_to_image
from attnzoo.mechanisms.swin_windows import (
    check_saved_index,
    map_window_mask,
    set_relative_window,
    shifted_window_mask,
    small_map_window,
    window_partition,
    window_reverse,
)

__all__ = [
    "ShiftedWindowAttention",
    "WindowAttention",
    "shifted_window_mask",
    "small_map_window",
    "window_partition",
    "window_reverse",
]

_INDEX = "relative_position_index"


@register(
    "window",
    family="transformer",
    paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
    year=2021,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "window_size": (2, 3), "num_heads": 2},
        inputs=((4, 6, 8),),
        output=(4, 6, 8),
        channel_dim=-1,free_sizes=()),
    aliases=("swin_window", "window_attention"),
    uses_attend=True,
    input_rule="windows",
)
class WindowAttention(nn.Module):
    r"""Window multi-head self-attention with a 2-D relative position bias (Swin's W-MSA / SW-MSA).

    $\mathrm{softmax}(s\,QK^\top + B_{rel} + M)\,V$ inside each window, where
    $B_{rel}[h, i, j]$ = `relative_position_bias_table[index[i, j], h]` with
    `index = (dh + Wh - 1) * (2Ww - 1) + (dw + Ww - 1)`, `(dh, dw)` = position of token i minus
    that of token j, and M the optional shifted-window mask.

    Checkpoints: the official module's state_dict (with `relative_position_index`) and timm's
    (without it, timm's buffer is non-persistent) both load with `strict=True`; a
    `relative_position_index` that differs from the computed one raises a `RuntimeError`. This
    module's own state_dict has no index (use `attnzoo.compat.WindowAttention` for the official
    keys).

    Args:
        dim: Channels C.
        window_size: `(Wh, Ww)`; an int means a square window (the official class needs a pair).
            Default: 7.
        num_heads: Heads h; must divide `dim`. Default: 8.
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale s; None (or 0, as the official `qk_scale or ...`) means `d ** -0.5`.
            Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        device: Device of the parameters and the index buffer. Default: None (the default device).
        dtype: dtype of the parameters. Default: None (the default dtype).

    Shape:
        - x: `(B * nW, N, C)`, windows image-major (the `window_partition` order).
        - mask: `(nW, N, N)` additive float (0 / -100 from `shifted_window_mask`), or None.
        - Output: `(B * nW, N, C)`; with `need_weights=True`, `(output, weights)` with weights
          `(B * nW, h, N, N)`.

    Example:
        ```python
        >>> attn = WindowAttention(96, 7, 3)
        >>> windows = torch.randn(16, 49, 96)  # 4 windows of 7 x 7 from each of 4 maps
        >>> attn(windows).shape
        torch.Size([16, 49, 96])

        ```
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int] = 7,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.window_size = int_pair(window_size, "window_size", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)
        head_dim = dim // num_heads
        self.scale = (
            check_float(qk_scale, "qk_scale", who) if qk_scale is not None else 0.0
        ) or head_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads, **factory)
        )
        index = relative_position_index_2d(self.window_size, device=device)  # (N, N)
        self.register_buffer(_INDEX, index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"

    def reset_parameters(self) -> None:
        """Swin's truncated-normal table and the index recomputed (`to_empty` leaves both uninitialised)."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        index.copy_(relative_position_index_2d(self.window_size, device=index.device))

    def set_window_size(self, window_size: int | Sequence[int]) -> None:
        """timm's (its `set_input_size` calls it): the table resized as timm's, the index recomputed."""
        set_relative_window(self, window_size, relative_position_index_2d)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        check_saved_index(self, state_dict, prefix, error_msgs)  # the official checkpoint's index
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def relative_position_bias(self, window: tuple[int, int] | None = None) -> Tensor:
        """The relative position bias of a window, by default the module's.

        A smaller window (Swin's small-map rule, see `ShiftedWindowAttention`) takes the entries of
        its own offsets from this table: `(dh, dw)` has the same bias as in the full window, so the
        result equals that of a module built for the smaller window whose table is the central
        `(2Wh'-1) x (2Ww'-1)` block of this one.

        Args:
            window: `(Wh', Ww')` no larger than `window_size`. Default: None, `window_size`.

        Shape:
            - Output: `(h, N', N')` with `N' = Wh' * Ww'`.
        """
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        if window is not None and tuple(window) != self.window_size:
            (wh, ww), (sh, sw) = self.window_size, window
            if not (0 < sh <= wh and 0 < sw <= ww):
                raise ValueError(
                    f"{type(self).__name__}.relative_position_bias expects a window within "
                    f"{self.window_size}, got {tuple(window)}"
                )
            rows, cols = torch.arange(sh, device=index.device), torch.arange(sw, device=index.device)
            tokens = (rows[:, None] * ww + cols[None, :]).flatten()  # (N',): the smaller window, row-major
            index = index[tokens][:, tokens]  # (N', N')
        return gather_relative_bias(self.relative_position_bias_table, index)  # (h, N', N')

    def forward(
        self, x: Tensor, mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within each window; `mask` is the `(nW, N, N)` shifted-window mask or None.

        Args:
            x: Windows `(B * nW, N, C)`.
            mask: Additive float mask `(nW, N, N)`, or None. Default: None.
            need_weights: Also return the weights `(B * nW, h, N, N)` (runs the math path).
                Default: False.

        Returns:
            The output `(B * nW, N, C)`, or `(output, weights)` with `need_weights`.
        """
        who = type(self).__name__
        area = self.window_size[0] * self.window_size[1]
        dims = check_shape(x, who, "B N C", N=area, C=self.dim)
        bias = self.relative_position_bias()  # (h, N, N)
        if mask is not None:
            check_tensor(mask, who, "mask")
            if mask.ndim != 3 or tuple(mask.shape[1:]) != (area, area) or dims["B"] % mask.shape[0]:
                raise ValueError(
                    f"{who} expects mask of shape (nW, {area}, {area}) with nW dividing "
                    f"x.shape[0]={dims['B']}, got {tuple(mask.shape)}"
                )
            bias = mask.to(x.dtype)[:, None] + bias  # (nW, h, N, N)
        return self._attend(x, bias, self.window_size, need_weights)

    def _attend(
        self, x: Tensor, bias: Tensor, window: tuple[int, int], need_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attention of checked windows `(B*nW, N, C)` with bias `(h, N, N)` or `(nW, h, N, N)`."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (B*nW, N, 3, h, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        weights = None
        if need_weights:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nW, h, N, d)
            if bias.ndim == 4:  # window i of the batch uses mask i % nW (image-major order)
                bias = bias.repeat(x.shape[0] // bias.shape[0], 1, 1, 1)  # (B*nW, h, N, N)
            out, weights = attend(
                q, k, v, bias=bias, scale=self.scale, dropout_p=dropout_p, need_weights=True
            )  # (B*nW, h, N, d), (B*nW, h, N, N)
            out = out.transpose(1, 2).flatten(2)  # (B*nW, h, N, d) -> (B*nW, N, C)
        else:
            out = biased_attention(qkv, bias, scale=self.scale, dropout_p=dropout_p)  # (B*nW, N, C)
        if capturing():  # map capture: every window's rows (windows are small)
            record_packed_rows(self, qkv, bias, scale=self.scale, grid=window, all_queries=True)
        out = self.proj_drop(self.proj(out))  # (B*nW, N, C)
        return out if weights is None else (out, weights)


@register(
    "shifted_window",
    family="transformer",
    paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
    year=2021,
    layout="NHWC",
    example=Example(
        kwargs={"dim": 8, "window_size": (2, 3), "num_heads": 2, "shift_size": (1, 1)},
        inputs=((2, 5, 7, 8),),
        output=(2, 5, 7, 8),
        channel_dim=-1,free_sizes=(FreeSize(((0, 1),), 1), FreeSize(((0, 2),), 2))),
    aliases=("swin", "shifted_window_attention"),
    uses_attend=True,
)
class ShiftedWindowAttention(nn.Module):
    """(Shifted-)window attention over a whole feature map of any size.

    Pads the map with zeros at the bottom/right to window multiples, rolls it by `-shift`, attends
    within each window (`WindowAttention`, held as `attn`, so the keys match a Swin block's
    `attn.*`) with the shifted-window mask, rolls back and crops. Padded tokens are never attended
    to (their keys get a logit offset of `finfo.min / 2`), so the result on the real tokens does not
    depend on the padding; Swin's detection code and torchvision let zero padding take part instead.
    With sizes divisible by the window this is exactly the official block's attention.

    Small maps (Swin's rule, per dimension, as timm's block; see `small_map_window`): along a
    dimension where the map is no larger than the window, the window shrinks to the map and the
    shift is 0. The clipped window takes the bias of its offsets from the full table (see
    `WindowAttention.relative_position_bias`): the official and timm blocks build their module
    for the clipped window, whose `(2Wh'-1) x (2Ww'-1)` table is the central block of this one;
    torchvision pads up to the full window and indexes the full table, the same entries.

    Args:
        dim: Channels C.
        window_size: `(Wh, Ww)` or an int. Default: 7.
        num_heads: Heads h; must divide `dim`. Default: 8.
        shift_size: `(sh, sw)` or an int, each in `[0, window)`; 0 gives W-MSA. Default: None,
            half the window (`Wh // 2, Ww // 2`).
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale; None means `d ** -0.5`. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        layout: `"NHWC"` for `(B, H, W, C)` input and output, `"NCHW"` for `(B, C, H, W)`.
            Default: `"NHWC"`.
        device: Device of the parameters and buffers. Default: None (the default device).
        dtype: dtype of the parameters. Default: None (the default dtype).

    Shape:
        - Input: `(B, H, W, C)` (NHWC) or `(B, C, H, W)` (NCHW), any H, W >= 1.
        - Output: same as the input; with `need_weights=True`, `(output, weights)` with the window
          weights `(B * nW, h, N, N)` of the rolled, padded map (windows in `window_partition`
          order, N the tokens of the window used on this map; padded keys get weight 0).
          `attnzoo.capture_maps` gives rows over the map instead.

    Example:
        ```python
        >>> swin = ShiftedWindowAttention(96, 7, 3)
        >>> swin(torch.randn(2, 20, 30, 96)).shape  # padded to 21 x 35, cropped back
        torch.Size([2, 20, 30, 96])

        ```
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int] = 7,
        num_heads: int = 8,
        shift_size: int | Sequence[int] | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        layout: str = "NHWC",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, device=device, dtype=dtype
        )
        self.window_size = self.attn.window_size
        wh, ww = self.window_size
        self.shift_size = ((wh // 2, ww // 2) if shift_size is None
                           else int_pair(shift_size, "shift_size", who, minimum=0))
        if self.shift_size[0] >= wh or self.shift_size[1] >= ww:
            raise ValueError(
                f"{who}: shift_size must be smaller than window_size {(wh, ww)}, got {self.shift_size}"
            )
        self.layout = check_choice(layout, ("NHWC", "NCHW"), "layout", who)
        self.dim = dim

    def extra_repr(self) -> str:
        return f"shift_size={self.shift_size}, layout={self.layout!r}"  # `attn` shows the rest

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Window attention over the map `x` (layout as constructed).

        Args:
            x: The map, `(B, H, W, C)` or `(B, C, H, W)`.
            need_weights: Also return the window weights (see Shape). Default: False.

        Returns:
            The output map, or `(output, weights)` with `need_weights`.
        """
        who = type(self).__name__
        if self.layout == "NCHW":
            check_shape(x, who, "B C H W", C=self.dim)
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        else:
            check_shape(x, who, "B H W C", C=self.dim)
        batch, height, width, channels = x.shape
        (wh, ww), (sh, sw) = small_map_window((height, width), self.window_size, self.shift_size)
        hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
        if (hp, wp) != (height, width):
            x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros at the bottom/right: (B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        windows = window_partition(x, (wh, ww)).reshape(-1, wh * ww, channels)  # (B*nW, N, C)
        bias = self.attn.relative_position_bias((wh, ww))  # (h, N, N)
        mask = map_window_mask((height, width), (wh, ww), (sh, sw), device=x.device, dtype=x.dtype)
        if mask is not None:
            bias = mask[:, None] + bias  # (nW, h, N, N)
        result = self.attn._attend(windows, bias, (wh, ww), need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():  # map capture: the window rows become rows over the map
            windows_to_image(self, self.attn, size=(height, width), padded=(hp, wp), window=(wh, ww),
                             shift=(sh, sw))
        x = window_reverse(out.reshape(-1, wh, ww, channels), (wh, ww), hp, wp)  # (B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        x = x[:, :height, :width]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2) if self.layout == "NCHW" else x  # back to the input layout
        return x if weights is None else (x, weights)
