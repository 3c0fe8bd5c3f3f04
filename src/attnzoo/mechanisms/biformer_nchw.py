"""BiFormer's NCHW refactor of Bi-Level Routing Attention (``ops/bra_nchw.py``), arXiv:2303.08810.

Official code: ``rayleizhu/BiFormer`` ``ops/bra_nchw.py`` with ``ops/torch/rrsda.py``. It is the same
idea as :class:`attnzoo.BiLevelRoutingAttention` with fewer options, 1x1 convolutions for the
projections (``qkv_linear``, ``output_linear``) and its own region and padding rules, so its
numbers differ from the legacy module whenever H or W is not a multiple of ``n_win`` (the official
docstring says so too). :class:`nchwBRA` reproduces them exactly; the fast path is shared with the
legacy module (one ``index_select`` of the routed regions, then :func:`attnzoo.attend`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_float, check_int, check_shape
from attnzoo._geometry import num_windows
from attnzoo._registry import Example, register, register_seed
from attnzoo.maps.capture import capturing, record
from attnzoo.maps.records import record_routed_rows
from attnzoo.mechanisms.biformer import _merge, _routed_attention, _side_conv, _to_windows

__all__ = ["nchwBRA"]


@register_seed("bra_nchw")  # the official class is the canonical one: create("nchwBRA") builds it too
@register(
    "bra_nchw",
    family="biformer",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (NCHW refactor)",
    year=2023,
    layout="NCHW",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "n_win": 2, "topk": 4}, inputs=((2, 8, 4, 4),), output=(2, 8, 4, 4)
    ),
    seed_name="nchwBRA",
    uses_attend=True,
    for_input=lambda geo: {"n_win": num_windows(geo), "auto_pad": True},
)
class nchwBRA(nn.Module):  # noqa: N801 (the official class name)
    r"""BiFormer's NCHW Bi-Level Routing Attention (``attnzoo.compat.nchwBRA``), equal to the official.

    Algorithm (``(rh, rw) = (H // n_win, W // n_win)``, a **floor**):

    1. ``q, k, v = qkv_linear(x).chunk(3)``: a 1x1 convolution ``dim -> 3*dim``.
    2. Regions of ``rh x rw`` tokens; the last row/column of regions may be partial, so there
       are ``R = ceil(H/rh) * ceil(W/rw)`` regions, which can exceed ``n_win**2`` (13x15 with
       ``n_win=4`` gives 25).
    3. Routing: region means of q and k (``avg_pool2d`` with ``ceil_mode``: partial regions
       average their real tokens only), logits ``q_r @ k_r^T`` ``(N, R, R)`` **unscaled**, no
       softmax; the ``topk`` largest per row give ``r_idx``; all heads share it (hard routing).
    4. q, k, v are zero-padded **after** the projection to whole regions. Padded keys are zero
       vectors (logit 0) and are **not masked**; padded values are 0.
    5. Each region's tokens attend, per head, to the ``topk * rh*rw`` tokens of its routed regions:
       ``softmax(scale * q k^T) v`` with ``scale = qk_scale or dim ** -0.5`` (the **full** channel
       dim, "to be consistent with old models").
    6. Crop, add ``lepe(v)`` (depth-wise conv of the un-padded v), then ``output_linear`` (1x1).

    Args:
        dim: Channels C of the input and output.
        num_heads: Heads; ``dim`` must be divisible by it. Default: 8.
        n_win: Sets the region size ``(H // n_win, W // n_win)``; H and W must be ``>= n_win``.
            Default: 7.
        qk_scale: Logit scale; None or 0 give ``dim ** -0.5``. Default: None.
        topk: Regions each region attends to, ``1 <= topk <= R`` (checked per input). Default: 4.
        side_dwconv: Kernel of the depth-wise ``lepe`` conv (odd); 0 disables it. Default: 3.
        auto_pad: Accepted and **ignored**, as officially (padding always happens). Default: False.
        attn_backend: Only ``'torch'`` (the official CUDA backend was never released). Default: ``'torch'``.

    Shape:
        - Input: ``(N, dim, H, W)``, any memory format.
        - Output: ``(N, dim, H, W)``, in the input's memory format.
    """

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
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        self.n_win = check_int(n_win, "n_win", who)
        if qk_scale is not None:
            check_float(qk_scale, "qk_scale", who, minimum=0.0)
        self.scale = float(qk_scale or dim**-0.5)
        self.topk = check_int(topk, "topk", who)
        check_int(side_dwconv, "side_dwconv", who, minimum=0)
        if side_dwconv % 2 == 0 and side_dwconv > 0:
            raise ValueError(f"{who}: side_dwconv must be odd (or 0), got {side_dwconv}")
        self.auto_pad = bool(auto_pad)  # ignored, as officially
        self.attn_backend = check_choice(attn_backend, ("torch",), "attn_backend", who)
        self.lepe: nn.Conv2d | None = None  # official: a zeros lambda; None pickles, same empty state_dict
        if side_dwconv > 0:
            self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, kernel_size=1)
        self.output_linear = nn.Conv2d(dim, dim, kernel_size=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"

    def forward(self, x: Tensor, ret_attn_mask: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``out``, or with ``ret_attn_mask`` the official ``(out, attn)``.

        Shape:
            - ``attn``: ``(N, num_heads, R, rh*rw, topk*rh*rw)`` attention weights.
        """
        who = type(self).__name__
        if isinstance(x, Tensor) and x.ndim == 4 and x.shape[1] != self.dim and x.shape[-1] == self.dim:
            raise ValueError(
                f"{who} expects an (N, {self.dim}, H, W) map, got {tuple(x.shape)} whose last dim is "
                f"{self.dim}: for channels-last maps use BiLevelRoutingAttention(layout='nhwc')"
            )
        dims = check_shape(x, who, "N C H W", C=self.dim)
        h, w, c = dims["H"], dims["W"], self.dim
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
        win = _to_windows(x, n_h, n_w)  # (N*R, rh*rw, C), the one copy of the input
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
        out, attn = _routed_attention(
            q, k, v, r_idx, num_heads=self.num_heads, scale=self.scale, need_weights=ret_attn_mask
        )  # (N*R, rh*rw, C)
        if not torch.jit.is_scripting():
            if capturing():  # map capture: the routing, and rows over the routed regions
                record(self, "routing", r_idx, grid=(n_h, n_w))
                record_routed_rows(self, q, k, r_idx, regions=(n_h, n_w), region=(rh, rw), size=(h, w),
                                   num_heads=self.num_heads, scale=self.scale)
        # The conv's zero padding equals the zero-padded v, so lepe(padded v), cropped, is lepe(v).
        side = _side_conv(self.lepe, v, n, n_h, n_w, rh, rw)  # (N, Hp, Wp, C) or None
        out = _merge(out, side, n, n_h, n_w, rh, rw)  # (N, Hp, Wp, C)
        out = F.linear(out[:, :h, :w], self.output_linear.weight.flatten(1), self.output_linear.bias)
        out = out.permute(0, 3, 1, 2)  # (N, C, H, W), channels-last memory
        if keep_nchw:
            out = out.contiguous()
        if ret_attn_mask and attn is not None:
            attn = attn.unflatten(0, (n, n_h * n_w)).transpose(1, 2)  # (N, heads, R, rh*rw, topk*rh*rw)
            return out, attn
        return out
