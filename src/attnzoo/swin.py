"""Swin window attention, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(Liu et al., 2021), arXiv:2103.14030.

:class:`WindowAttention` is the official module (same arguments, parameters ``qkv``, ``proj``,
``relative_position_bias_table``, persistent buffer ``relative_position_index``, same outputs) with
input checks. Around it, the pieces users otherwise copy by hand: :func:`window_partition`,
:func:`window_reverse`, :func:`shifted_window_mask`, and :class:`ShiftedWindowAttention`, which
takes a whole ``(B, H, W, C)`` or ``(B, C, H, W)`` map of any size (the official code requires sizes
divisible by the window).

Fast path: the relative position table is learnable, so its gathered bias requires grad, and
``scaled_dot_product_attention`` then silently runs its generic math path (and for 49-token windows
its fused kernels are slower than plain GEMMs even in inference). :func:`biased_attention` instead
runs a small explicit kernel (a custom autograd function) on the packed qkv projection: the scale
folded into the copy of q, k copied transposed so both score GEMMs run untransposed, the bias (and
shift mask) added in place, one softmax whose output is the only N x N tensor kept for backward,
and a hand-written backward that writes the qkv gradient in the projection's layout and reduces
the bias gradient. With :func:`attnzoo.fused_attn` off it calls :func:`attnzoo.attend`'s math path
(the reference the tests compare against).

Shape letters: B batch, H/W map size, C channels, h heads, d head width, (Wh, Ww) window,
N = Wh*Ww tokens per window, nW windows per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnzoo._checks import check_choice, check_float, check_int, check_shape, check_tensor
from attnzoo._registry import Example, register
from attnzoo.functional import attend, fused_enabled, gather_relative_bias, relative_position_index_2d

__all__ = [
    "ShiftedWindowAttention",
    "WindowAttention",
    "biased_attention",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]


def _pair(value: int | Sequence[int], name: str, who: str, minimum: int = 1) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)  # type: ignore[arg-type]
    if len(pair) != 2:
        raise ValueError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
    return check_int(pair[0], name, who, minimum=minimum), check_int(pair[1], name, who, minimum=minimum)


class _BiasedAttention(torch.autograd.Function):
    """softmax(scale * q k^T + bias) v on packed qkv, keeping one N x N map for backward.

    Layouts are chosen for the CPU GEMMs: q and v are copied to ``(B*h, N, d)``, k to
    ``(B*h, d, N)`` (a transposed second operand runs at about half speed on tiny matrices), the
    scale is folded into the copy of q, and the bias is added in place to the logits.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, scale: float, dropout_p: float) -> Tensor:  # type: ignore[override]
        b, n, _, h, d = qkv.shape
        groups = bias.shape[0] if bias.ndim == 4 else 1
        q = torch.empty((b, h, n, d), dtype=qkv.dtype, device=qkv.device)
        torch.mul(qkv[:, :, 0].transpose(1, 2), scale, out=q)  # (B, h, N, d), scaled
        kt = qkv[:, :, 1].permute(0, 2, 3, 1).contiguous().view(b * h, d, n)  # (B*h, d, N)
        v = qkv[:, :, 2].transpose(1, 2).contiguous().view(b * h, n, d)  # (B*h, N, d)
        q = q.view(b * h, n, d)
        logits = torch.bmm(q, kt)  # (B*h, N, N)
        logits.view(b // groups, groups, h, n, n).add_(bias.view(groups, h, n, n))
        probs = torch.softmax(logits, dim=-1)
        del logits
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(probs, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
        dropped = probs if keep is None else probs * keep / (1.0 - dropout_p)
        out = torch.bmm(dropped, v)  # (B*h, N, d)
        ctx.save_for_backward(q, kt, v, probs, keep)
        ctx.meta = (b, n, h, d, groups, scale, dropout_p, bias.shape)
        return out.view(b, h, n, d).transpose(1, 2).reshape(b, n, h * d)  # (B, N, h*d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, kt, v, probs, keep = ctx.saved_tensors
        b, n, h, d, groups, scale, dropout_p, bias_shape = ctx.meta
        g = grad_out.reshape(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)  # (B*h, N, d)
        grad_qkv = None
        if ctx.needs_input_grad[0]:
            grad_qkv = torch.empty((b, n, 3, h, d), dtype=q.dtype, device=q.device)
            dropped = probs if keep is None else probs * keep / (1.0 - dropout_p)
            grad_v = torch.bmm(dropped.transpose(1, 2), g)  # (B*h, N, d)
            grad_qkv[:, :, 2] = grad_v.view(b, h, n, d).transpose(1, 2)
            del dropped, grad_v
        grad_probs = torch.bmm(g, v.transpose(1, 2))  # (B*h, N, N)
        if keep is not None:
            grad_probs.mul_(keep).mul_(1.0 / (1.0 - dropout_p))
        grad_logits = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        if grad_qkv is not None:
            grad_qkv[:, :, 0] = torch.bmm(grad_logits, kt.transpose(1, 2)).mul_(scale).view(b, h, n, d).transpose(1, 2)
            grad_qkv[:, :, 1] = torch.bmm(grad_logits.transpose(1, 2), q).view(b, h, n, d).transpose(1, 2)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_logits.view(b // groups, groups, h, n, n).sum(0).view(bias_shape)
        return grad_qkv, grad_bias, None, None


def biased_attention(qkv: Tensor, bias: Tensor, *, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Self-attention with an additive bias shared by groups of the batch, from packed q/k/v.

    Equal to :func:`attnzoo.attend` on the unpacked heads with ``bias`` broadcast over the batch.
    With the fused path on (:func:`attnzoo.fused_attn`) and a float32/float64 input, a dedicated
    kernel runs (see the module docstring): on tiny windows it beats both the SDPA kernels and the
    generic math path, in training (where a learnable bias makes SDPA fall back to its math path)
    and in inference. Otherwise (the fused path off, half precision) :func:`attend` runs.

    Args:
        qkv: Packed projections ``(B, N, 3, h, d)`` (any strides).
        bias: Finite additive float bias ``(h, N, N)``, or ``(G, h, N, N)`` with G dividing B and
            batch element ``i`` using group ``i % G`` (Swin's window order: image-major).
        scale: Multiplies the logits.
        dropout_p: Dropout on the attention weights; pass 0.0 in eval mode. Default: 0.0.

    Shape:
        - Output: ``(B, N, h*d)``, heads concatenated.
    """
    b, n, _, h, d = qkv.shape
    if fused_enabled() and qkv.dtype in (torch.float32, torch.float64):
        return _BiasedAttention.apply(qkv, bias.to(qkv.dtype).contiguous(), float(scale), float(dropout_p))
    if bias.ndim == 4:
        bias = bias.expand(b // bias.shape[0], *bias.shape).reshape(b, h, n, n)  # (B, h, N, N)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
    out = attend(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(b, n, h * d)  # type: ignore[union-attr]  # (B, h, N, d) -> (B, N, h*d)


def window_partition(x: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """Cut a ``(B, H, W, C)`` map into non-overlapping windows, image-major then row-major.

    Shape:
        - x: ``(B, H, W, C)`` with ``Wh | H`` and ``Ww | W``.
        - Output: ``(B * nW, Wh, Ww, C)``.
    """
    wh, ww = _pair(window_size, "window_size", "window_partition")
    dims = check_shape(x, "window_partition", "B H W C", floating=False)
    height, width = dims["H"], dims["W"]
    if height % wh or width % ww:
        raise ValueError(f"window_partition expects H, W divisible by the window {(wh, ww)}, got {(height, width)}")
    x = x.reshape(dims["B"], height // wh, wh, width // ww, ww, dims["C"])  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, dims["C"])  # (B*nW, Wh, Ww, C)


def window_reverse(windows: Tensor, window_size: int | Sequence[int], H: int, W: int) -> Tensor:  # noqa: N803
    """Undo :func:`window_partition`: ``(B * nW, Wh, Ww, C)`` windows back to ``(B, H, W, C)``.

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
    example=Example(kwargs={"dim": 8, "window_size": (2, 3), "num_heads": 2}, inputs=((4, 6, 8),), output=(4, 6, 8), channel_dim=-1),
    aliases=("swin_window", "window_attention"),
    uses_attend=True,
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
        self.scale = (check_float(qk_scale, "qk_scale", who) if qk_scale is not None else 0.0) or head_dim**-0.5
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
        bias = gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)  # (h, N, N)
        if mask is not None:
            check_tensor(mask, who, "mask")
            if mask.ndim != 3 or tuple(mask.shape[1:]) != (area, area) or windows % mask.shape[0]:
                raise ValueError(
                    f"{who} expects mask of shape (nW, {area}, {area}) with nW dividing x.shape[0]={windows}, "
                    f"got {tuple(mask.shape)}"
                )
            bias = mask.to(x.dtype)[:, None] + bias  # (nW, h, N, N)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (B*nW, N, 3, h, d)
        out = biased_attention(qkv, bias, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0)
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
        self.shift_size = (wh // 2, ww // 2) if shift_size is None else _pair(shift_size, "shift_size", who, minimum=0)
        if self.shift_size[0] >= wh or self.shift_size[1] >= ww:
            raise ValueError(f"{who}: shift_size must be smaller than window_size {(wh, ww)}, got {self.shift_size}")
        self.layout = check_choice(layout, ("NHWC", "NCHW"), "layout", who)
        self.dim = dim

    def _mask(self, height: int, width: int, padded: tuple[int, int], x: Tensor) -> Tensor | None:
        """The ``(nW, N, N)`` additive mask: shifted-window regions plus padded keys, or None."""
        (hp, wp), (sh, sw) = padded, self.shift_size
        mask = None
        if sh or sw:
            mask = shifted_window_mask(hp, wp, self.window_size, self.shift_size, device=x.device, dtype=x.dtype)
        if (hp, wp) != (height, width):
            rows = (torch.arange(hp, device=x.device) + sh) % hp >= height  # padded rows after the roll
            cols = (torch.arange(wp, device=x.device) + sw) % wp >= width
            pad = (rows[:, None] | cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
            pad = window_partition(pad, self.window_size).reshape(-1, 1, self.window_size[0] * self.window_size[1])
            offset = torch.zeros(pad.shape, device=x.device, dtype=x.dtype).masked_fill_(pad, torch.finfo(x.dtype).min / 2)
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
        x = window_reverse(out.reshape(-1, wh, ww, channels), self.window_size, hp, wp)  # (B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        x = x[:, :height, :width]
        return x.permute(0, 3, 1, 2) if self.layout == "NCHW" else x  # back to the input layout
