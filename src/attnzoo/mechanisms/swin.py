"""Swin window attention, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(Liu et al., 2021), arXiv:2103.14030.

:class:`WindowAttention` is the official module (same arguments, parameters ``qkv``, ``proj``,
``relative_position_bias_table``, persistent buffer ``relative_position_index``, same outputs) with
input checks. Around it, the pieces users otherwise copy by hand: :func:`window_partition`,
:func:`window_reverse`, :func:`shifted_window_mask`, and :class:`ShiftedWindowAttention`, which
takes a whole ``(B, H, W, C)`` or ``(B, C, H, W)`` map of any size (the official code requires sizes
divisible by the window).

Fast path: the bias comes from a learnable table, so ``scaled_dot_product_attention`` would silently
run its generic math path; :func:`attnzoo.kernels.biased.biased_attention` runs a dedicated
kernel instead (see there), and :func:`attnzoo.attend`'s math path with ``fused_attn(False)``.

Shape letters: B batch, H/W map size, C channels, h heads, d head width, (Wh, Ww) window,
N = Wh*Ww tokens per window, nW windows per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_float, check_int, check_shape, check_tensor
from attnzoo._geometry import fit_window
from attnzoo._registry import Example, register
from attnzoo.functional import gather_relative_bias, relative_position_index_2d
from attnzoo.kernels.biased import biased_attention
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_packed_rows, windows_to_image

__all__ = [
    "ShiftedWindowAttention",
    "WindowAttention",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]


def _pair(value: int | Sequence[int], name: str, who: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair: tuple[object, ...] = (value, value)
    elif isinstance(value, (tuple, list)):
        pair = tuple(value)
    else:
        kind = type(value).__name__
        raise TypeError(f"{who}: {name} must be an int or a pair of ints, got {kind} {value!r}")
    if len(pair) != 2:
        raise ValueError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
    return check_int(pair[0], name, who, minimum=minimum), check_int(pair[1], name, who, minimum=minimum)


def window_partition(x: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """Cut a ``(B, H, W, C)`` map into non-overlapping windows, image-major then row-major.

    Args:
        x: The map.
        window_size: ``(Wh, Ww)``, or an int for a square window.

    Shape:
        - x: ``(B, H, W, C)`` with ``Wh | H`` and ``Ww | W``.
        - Output: ``(B * nW, Wh, Ww, C)``.
    """
    wh, ww = _pair(window_size, "window_size", "window_partition")
    dims = check_shape(x, "window_partition", "B H W C", floating=False)
    height, width = dims["H"], dims["W"]
    if height % wh or width % ww:
        raise ValueError(
            f"window_partition expects H, W divisible by the window {(wh, ww)}, got {(height, width)}"
        )
    x = x.reshape(dims["B"], height // wh, wh, width // ww, ww, dims["C"])  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, dims["C"])  # (B*nW, Wh, Ww, C)


def window_reverse(windows: Tensor, window_size: int | Sequence[int], H: int, W: int) -> Tensor:  # noqa: N803
    """Undo :func:`window_partition`: ``(B * nW, Wh, Ww, C)`` windows back to ``(B, H, W, C)``.

    Args:
        windows: The windows, in :func:`window_partition` order.
        window_size: ``(Wh, Ww)``, or an int for a square window.
        H: Map height.
        W: Map width.

    Shape:
        - windows: ``(B * nW, Wh, Ww, C)`` with ``nW = (H / Wh) * (W / Ww)``.
        - Output: ``(B, H, W, C)``.
    """
    wh, ww = _pair(window_size, "window_size", "window_reverse")
    dims = check_shape(windows, "window_reverse", "B Wh Ww C", "windows", floating=False, Wh=wh, Ww=ww)
    if H % wh or W % ww or dims["B"] % ((H // wh) * (W // ww)):
        raise ValueError(
            f"window_reverse expects H, W divisible by the window {(wh, ww)} and windows.shape[0] divisible "
            f"by the window count, got H, W = {(H, W)}, windows {tuple(windows.shape)}"
        )
    x = windows.reshape(-1, H // wh, W // ww, wh, ww, dims["C"])  # (B, H/Wh, W/Ww, Wh, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, dims["C"])  # (B, H, W, C)


def shifted_window_mask(
    H: int,  # noqa: N803
    W: int,  # noqa: N803
    window_size: int | Sequence[int],
    shift_size: int | Sequence[int],
    *,
    value: float = -100.0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The additive mask of shifted-window attention (SW-MSA) on an ``H x W`` map rolled by the shift.

    After ``roll(x, (-sh, -sw))`` a window can hold tokens from up to four image regions that were
    not adjacent; a query may attend only to keys of its own region. Regions follow the official
    slicing ``[0, H-Wh), [H-Wh, H-sh), [H-sh, H)`` per axis (the same for W), so for square windows
    this equals the official block's ``attn_mask`` (and ``value=-100`` is the official value).

    Args:
        H: Map height (a multiple of Wh).
        W: Map width (a multiple of Ww).
        window_size: ``Wh`` and ``Ww`` (an int for both).
        shift_size: ``sh`` and ``sw``, each in ``[0, window)``.
        value: Logit offset between different regions. Default: -100.0.
        device: Device of the mask. Default: the default device.
        dtype: Dtype of the mask. Default: the default dtype.

    Shape:
        - Output: ``(nW, N, N)``, windows in :func:`window_partition` order; 0 or ``value``.
    """
    who = "shifted_window_mask"
    wh, ww = _pair(window_size, "window_size", who)
    sh, sw = _pair(shift_size, "shift_size", who, minimum=0)
    if sh >= wh or sw >= ww:
        raise ValueError(f"{who}: shift_size must be smaller than window_size {(wh, ww)}, got {(sh, sw)}")
    if H % wh or W % ww:
        raise ValueError(f"{who} expects H, W divisible by the window {(wh, ww)}, got {(H, W)}")
    rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
    region_h = (rows >= H - wh).long() + (rows >= H - sh).long() * int(sh > 0)  # 0, 1, 2 per row
    region_w = (cols >= W - ww).long() + (cols >= W - sw).long() * int(sw > 0)
    region = (region_h[:, None] * 3 + region_w[None, :])[None, :, :, None]  # (1, H, W, 1)
    ids = window_partition(region, (wh, ww)).reshape(-1, wh * ww)  # (nW, N)
    different = ids[:, None, :] != ids[:, :, None]  # (nW, N, N)
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, value)


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
        channel_dim=-1,
    ),
    aliases=("swin_window", "window_attention"),
    uses_attend=True,
    input_rule="windows",
)
class WindowAttention(nn.Module):
    r"""Window multi-head self-attention with a 2-D relative position bias (Swin's W-MSA / SW-MSA).

    :math:`\mathrm{softmax}(s\,QK^\top + B_{rel} + M)\,V` inside each window, where
    :math:`B_{rel}[h, i, j]` = ``relative_position_bias_table[index[i, j], h]`` with
    ``index = (dh + Wh - 1) * (2Ww - 1) + (dw + Ww - 1)``, ``(dh, dw)`` = position of token i minus
    that of token j, and M the optional shifted-window mask. Compatible with the official module:
    same arguments, state_dict (with the persistent ``relative_position_index`` buffer) and outputs.

    Args:
        dim: Channels C.
        window_size: ``(Wh, Ww)``; an int means a square window (the official class needs a pair).
        num_heads: Heads h; must divide ``dim``.
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale s; None (or 0, as the official ``qk_scale or ...``) means ``d ** -0.5``.
            Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.

    Shape:
        - x: ``(B * nW, N, C)``, windows image-major (the :func:`window_partition` order).
        - mask: ``(nW, N, N)`` additive float (0 / -100 from :func:`shifted_window_mask`), or None.
        - Output: ``(B * nW, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.window_size = _pair(window_size, "window_size", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        head_dim = dim // num_heads
        self.scale = (
            check_float(qk_scale, "qk_scale", who) if qk_scale is not None else 0.0
        ) or head_dim**-0.5
        self.attn_drop = check_float(attn_drop, "attn_drop", who, minimum=0.0, maximum=1.0)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index_2d(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window; ``mask`` is the ``(nW, N, N)`` shifted-window mask or None."""
        who = type(self).__name__
        area = self.window_size[0] * self.window_size[1]
        dims = check_shape(x, who, "B N C", N=area, C=self.dim)
        windows = dims["B"]
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        bias = gather_relative_bias(self.relative_position_bias_table, index)  # (h, N, N)
        if mask is not None:
            check_tensor(mask, who, "mask")
            if mask.ndim != 3 or tuple(mask.shape[1:]) != (area, area) or windows % mask.shape[0]:
                raise ValueError(
                    f"{who} expects mask of shape (nW, {area}, {area}) with nW dividing "
                    f"x.shape[0]={windows}, got {tuple(mask.shape)}"
                )
            bias = mask.to(x.dtype)[:, None] + bias  # (nW, h, N, N)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (B*nW, N, 3, h, d)
        out = biased_attention(
            qkv, bias, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0
        )
        if not torch.jit.is_scripting():
            if capturing():  # map capture: every window's rows (windows are small)
                record_packed_rows(self, qkv, bias, scale=self.scale, grid=self.window_size, all_queries=True)
        return self.proj_drop(self.proj(out))  # (B*nW, N, C)


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
        channel_dim=-1,
    ),
    aliases=("swin", "shifted_window_attention"),
    uses_attend=True,
    for_input=lambda geo: {"shift_size": fit_window(geo) // 2},
)
class ShiftedWindowAttention(nn.Module):
    """(Shifted-)window attention over a whole feature map of any size.

    Pads the map with zeros at the bottom/right to window multiples, rolls it by ``-shift``,
    attends within each window (:class:`WindowAttention`, held as ``attn``, so the keys match a Swin
    block's ``attn.*``) with the shifted-window mask, rolls back and crops. Padded tokens are never
    attended to (their keys get a logit offset of ``finfo.min / 2``), so the result on the real
    tokens does not depend on the padding; Swin's detection code lets zero padding take part
    instead. With sizes divisible by the window this is exactly the official block's attention.
    Windows never shrink to the map size (the official block's rule for small maps).

    Args:
        dim: Channels C.
        window_size: ``(Wh, Ww)`` or an int.
        num_heads: Heads h; must divide ``dim``.
        shift_size: ``(sh, sw)`` or an int, each in ``[0, window)``; 0 gives W-MSA. Default: None,
            half the window (``Wh // 2, Ww // 2``).
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale; None means ``d ** -0.5``. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        layout: ``"NHWC"`` for ``(B, H, W, C)`` input and output, ``"NCHW"`` for ``(B, C, H, W)``.
            Default: ``"NHWC"``.

    Shape:
        - Input: ``(B, H, W, C)`` (NHWC) or ``(B, C, H, W)`` (NCHW), any H, W >= 1.
        - Output: same as the input.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int],
        num_heads: int,
        shift_size: int | Sequence[int] | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        layout: str = "NHWC",
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.window_size = self.attn.window_size
        wh, ww = self.window_size
        self.shift_size = (
            (wh // 2, ww // 2) if shift_size is None else _pair(shift_size, "shift_size", who, minimum=0)
        )
        if self.shift_size[0] >= wh or self.shift_size[1] >= ww:
            raise ValueError(
                f"{who}: shift_size must be smaller than window_size {(wh, ww)}, got {self.shift_size}"
            )
        self.layout = check_choice(layout, ("NHWC", "NCHW"), "layout", who)
        self.dim = dim

    def _mask(self, height: int, width: int, padded: tuple[int, int], x: Tensor) -> Tensor | None:
        """The ``(nW, N, N)`` additive mask: shifted-window regions plus padded keys, or None."""
        (hp, wp), (sh, sw) = padded, self.shift_size
        mask = None
        if sh or sw:
            mask = shifted_window_mask(
                hp, wp, self.window_size, self.shift_size, device=x.device, dtype=x.dtype
            )
        if (hp, wp) != (height, width):
            rows = (torch.arange(hp, device=x.device) + sh) % hp >= height  # padded rows after the roll
            cols = (torch.arange(wp, device=x.device) + sw) % wp >= width
            pad = (rows[:, None] | cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
            pad = window_partition(pad, self.window_size).reshape(
                -1, 1, self.window_size[0] * self.window_size[1]
            )
            offset = torch.zeros(pad.shape, device=x.device, dtype=x.dtype).masked_fill_(
                pad, torch.finfo(x.dtype).min / 2
            )
            mask = offset if mask is None else mask + offset  # (nW, N, N) via (nW, 1, N) keys
            mask = mask.expand(-1, pad.shape[-1], -1)
        return mask

    def forward(self, x: Tensor) -> Tensor:
        """Window attention over the map ``x`` (layout as constructed)."""
        who = type(self).__name__
        if self.layout == "NCHW":
            check_shape(x, who, "B C H W", C=self.dim)
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        else:
            check_shape(x, who, "B H W C", C=self.dim)
        batch, height, width, channels = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
        if (hp, wp) != (height, width):
            x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros at the bottom/right
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        windows = window_partition(x, self.window_size).reshape(-1, wh * ww, channels)  # (B*nW, N, C)
        out = self.attn(windows, mask=self._mask(height, width, (hp, wp), x))
        if not torch.jit.is_scripting():
            if capturing():  # map capture: the window rows become rows over the map
                windows_to_image(self, self.attn, size=(height, width), padded=(hp, wp), window=(wh, ww),
                                 shift=(sh, sw))
        x = window_reverse(out.reshape(-1, wh, ww, channels), self.window_size, hp, wp)  # (B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        x = x[:, :height, :width]
        return x.permute(0, 3, 1, 2) if self.layout == "NCHW" else x  # back to the input layout
