"""timm's cascaded group attention of Microsoft's EfficientViT (`timm.models.efficientvit_msra.
CascadedGroupAttention`, inside the `LocalWindowAttention` of `efficientvit_m0` ... `efficientvit_m5`): its
constructor, call, `set_resolution` and state_dict keys, run by `attnzoo.attend`.

EfficientViT (Liu et al., 2023, "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group
Attention") gives each head one split of the channels instead of all of them, and feeds each head's output
into the next head's input (a cascade, so later heads refine earlier ones):

$$f_1 = x_1, \\quad f_i = x_i + \\mathrm{head}_{i-1}, \\quad
\\mathrm{head}_i = \\mathrm{softmax}(\\mathrm{dw}(q_i)^\\top k_i / \\sqrt{d_k} + B_i)\\, v_i$$

with `q_i, k_i, v_i` a 1x1 convolution (and BatchNorm) of `f_i`, a depth-wise convolution on the queries and
LeViT's learned bias `B_i` over the `|dy|, |dx|` offsets of a `resolution x resolution` window; then ReLU
and a 1x1 projection of all heads.

Time O(B h N^2 (d_k + d_v)) and memory O(B N^2) per head (the heads run one after the other), N = H W.

Shape letters: B batch, C = dim, H = W = resolution, N = H W, h heads, d_k key width, d_v value width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_levit import ConvBn, OffsetBiasAttention, offset_index, val_width

__all__ = ["TimmCascadedGroupAttention"]


@register_compat(example=Example({"dim": 8, "key_dim": 2, "num_heads": 2, "attn_ratio": 2, "resolution": 3,
                                  "kernels": (3, 3)}, ((2, 8, 3, 3),), (2, 8, 3, 3)))
class TimmCascadedGroupAttention(OffsetBiasAttention):
    """timm's `CascadedGroupAttention(dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
    kernels=(5, 5, 5, 5))` (`attnzoo.compat.TimmCascadedGroupAttention`): the module docstring gives the
    formula. The bias is gathered on every call (timm caches it per device in eval mode; the numbers are
    the same).

    Shape:
        - x: `(B, dim, resolution, resolution)`.
        - Output: `(B, dim, resolution, resolution)`.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int = 14,
        kernels: Sequence[int] = (5, 5, 5, 5),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.scale = key_dim**-0.5
        self.val_dim = val_width(key_dim, attn_ratio, who)
        self.attn_ratio = attn_ratio
        if num_heads > 1 and self.val_dim != dim // num_heads:  # each head's output joins the next split
            raise ValueError(f"{who}: the value width int(attn_ratio * key_dim) = {self.val_dim} must equal "
                             f"dim // num_heads = {dim // num_heads} (the cascade adds each head's output to "
                             f"the next head's channels; timm's forward fails)")
        if not isinstance(kernels, (tuple, list)):
            raise TypeError(f"{who}: kernels must be a tuple of ints (one per head), got "
                            f"{type(kernels).__name__} {kernels!r}")
        odd = all(check_int(k, "kernels", who) % 2 for k in kernels[:num_heads])
        if len(kernels) < num_heads or not odd:
            raise ValueError(f"{who}: kernels must give an odd size for each of the {num_heads} heads, "
                             f"got {tuple(kernels)}")
        width = 2 * key_dim + self.val_dim
        self.qkvs = nn.ModuleList(ConvBn(dim // num_heads, width, bias=False, **dd) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvBn(key_dim, key_dim, k, groups=key_dim, bias=False, **dd)
                                 for k in kernels[:num_heads])
        out = ConvBn(self.val_dim * num_heads, dim, bias=False, bn_weight_init=0, **dd)
        self.proj = nn.Sequential(nn.ReLU(), out)
        self.resolution = check_int(resolution, "resolution", who)  # an int: timm's window wrapper reads it
        self._bias_table(num_heads, (self.resolution, self.resolution), 1, False, dd)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, key_dim={self.key_dim}, num_heads={self.num_heads}, "
                f"val_dim={self.val_dim}, resolution={self.resolution}")

    def set_resolution(self, resolution: int) -> None:
        """timm's `set_resolution`: resize the bias table (bicubic, antialiased, in float32) and the index."""
        side = check_int(resolution, "resolution", type(self).__name__)
        if side == self.resolution:
            return
        table = self.attention_biases
        grid = table.detach().float().view(1, self.num_heads, self.resolution, self.resolution)
        resized = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True)
        self.attention_biases = nn.Parameter(resized.view(self.num_heads, side * side).to(table.dtype),
                                             requires_grad=table.requires_grad)
        self.resolution, self.bias_grid = side, (side, side)
        self.register_buffer("attention_bias_idxs", offset_index(self.bias_grid, 1, table.device),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Cascaded group attention over the window `x` `(B, C, H, W)`: `(B, C, H, W)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B C H W", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        if (height, width) != (self.resolution, self.resolution):  # the bias is made for one window size
            side = self.resolution
            raise ValueError(f"{who} expects windows of {side} x {side} (resolution), got {height} x {width}")
        bias = self.get_attention_biases()  # (h, N, N)
        inputs = x.chunk(self.num_heads, dim=1)
        outputs = []
        feat = inputs[0]
        for head, (qkv, dw) in enumerate(zip(self.qkvs, self.dws, strict=True)):
            if head > 0:
                feat = feat + inputs[head]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (dw(q), k, v))  # (B, 1, N, d)
            out = attend(q, k, v, bias=bias[head][None, None], scale=self.scale)  # (B, 1, N, d_v)
            if capturing():  # map capture: this head's rows of the capture's query points
                record_rows(self, q, k, grid=(height, width), bias=bias[head][None, None], scale=self.scale,
                            head=head)
            feat = out.squeeze(1).transpose(1, 2).reshape(batch, self.val_dim, height, width)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, dim=1))
