"""timm's MViT v2 attention (`timm.models.mvitv2.MultiScaleAttention`, `mvitv2_tiny` ... `mvitv2_huge_cls`):
its constructor, call `(x, feat_size) -> (out, q_size)` and state_dict keys, run by `attnzoo.attend`.

MViT v2 (Li et al., 2022, "MViTv2: Improved Multiscale Vision Transformers for Classification and
Detection") pools the queries, keys and values of each head over the map (a depth-wise convolution and a
norm, or an average/max pool), adds decomposed relative position logits along the height and the width of
the pooled maps, and adds the pooled queries back to the output (residual pooling):

$$\\mathrm{out} = W_o\\big(\\mathrm{softmax}(\\tilde q \\tilde k^\\top / \\sqrt d
+ \\tilde q R_h + \\tilde q R_w)\\,\\tilde v + \\tilde q\\big)$$

A class token (`has_cls_token`) is not pooled and takes no position logits.

Time O(B h N_q N_k d) and memory O(B h N_q N_k) (the position logits are a bias of that size), N_q and N_k
the pooled maps' token counts.

Shape letters: B batch, N tokens, H, W map, h heads, d head width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_head_widths, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record, row_weights
from attnzoo.mechanisms.timm_relpos_vit import get_decomposed_rel_pos_bias

__all__ = ["TimmMultiScaleAttention"]


@register_compat(example=Example({"dim": 8, "dim_out": 8, "feat_size": (4, 4), "num_heads": 2,
                                  "kernel_q": (3, 3), "kernel_kv": (3, 3), "stride_q": (2, 2),
                                  "stride_kv": (2, 2)},
                                 ((2, 17, 8),), (2, 5, 8), channel_dim=-1))
class TimmMultiScaleAttention(nn.Module):
    """timm's `mvitv2.MultiScaleAttention(dim, dim_out, feat_size, num_heads=8, qkv_bias=True, mode='conv',
    kernel_q=(1, 1), kernel_kv=(1, 1), stride_q=(1, 1), stride_kv=(1, 1), has_cls_token=True,
    rel_pos_type='spatial', residual_pooling=True, norm_layer=nn.LayerNorm)`
    (`attnzoo.compat.TimmMultiScaleAttention`): the module docstring gives the formula. `mode` is `'conv'`,
    `'avg'` or `'max'` (timm's `'conv_unshared'` fails in this class's forward; its pool-first sibling is
    not converted).

    Shape:
        - x: `(B, N, dim)` with N = H W (+ 1 with the class token); feat_size: `(H, W)` (left out: a
          square map).
        - Output: `(out, q_size)`: out `(B, N_q, dim_out)` and the pooled query map's `[H_q, W_q]`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        feat_size: tuple[int, int],
        num_heads: int = 8,
        qkv_bias: bool = True,
        mode: str = "conv",
        kernel_q: tuple[int, int] = (1, 1),
        kernel_kv: tuple[int, int] = (1, 1),
        stride_q: tuple[int, int] = (1, 1),
        stride_kv: tuple[int, int] = (1, 1),
        has_cls_token: bool = True,
        rel_pos_type: str = "spatial",
        residual_pooling: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.dim_out = check_int(dim_out, "dim_out", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(dim_out, num_heads, None, None, who, None, dim_name="dim_out")
        self.scale = self.head_dim**-0.5
        self.has_cls_token = bool(has_cls_token)
        self.mode = check_choice(mode, ("conv", "avg", "max"), "mode", who)
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim_out, dim_out, **dd)
        kernel_q, kernel_kv = int_pair(kernel_q, "kernel_q", who), int_pair(kernel_kv, "kernel_kv", who)
        stride_q, stride_kv = int_pair(stride_q, "stride_q", who), int_pair(stride_kv, "stride_kv", who)
        self.pool_q, self.norm_q = self._pool(kernel_q, stride_q, norm_layer, dd)
        self.pool_k, self.norm_k = self._pool(kernel_kv, stride_kv, norm_layer, dd)
        self.pool_v, self.norm_v = self._pool(kernel_kv, stride_kv, norm_layer, dd)
        self.rel_pos_type = check_choice(rel_pos_type, ("spatial", "", "none"), "rel_pos_type", who)
        if self.rel_pos_type == "spatial":
            height, width = int_pair(feat_size, "feat_size", who)
            if height != width:  # timm asserts a square map
                raise ValueError(f"{who}: rel_pos_type='spatial' needs a square feat_size, got {feat_size}")
            if height < min(stride_q[1], stride_kv[1]):  # both pooled maps empty: tables of -1 rows
                least = min(stride_q[1], stride_kv[1])  # timm's tables read the strides' last entry
                raise ValueError(f"{who}: feat_size={feat_size} is smaller than stride_q={stride_q} and "
                                 f"stride_kv={stride_kv}; expected a side of at least {least}")
            span = 2 * max(height // stride_q[1], height // stride_kv[1]) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(span, self.head_dim, **dd))
            self.rel_pos_w = nn.Parameter(torch.zeros(span, self.head_dim, **dd))
        self.residual_pooling = bool(residual_pooling)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's truncated-normal relative position tables (the other layers reset themselves)."""
        if self.rel_pos_type == "spatial":
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def _pool(self, kernel: tuple[int, int], stride: tuple[int, int], norm_layer: type[nn.Module],
              dd: dict[str, Any]) -> tuple[nn.Module | None, nn.Module | None]:
        """timm's per-head pooling (none for a 1 x 1 kernel of stride 1) and, in conv mode, its norm."""
        if math.prod(kernel) == 1 and math.prod(stride) == 1:
            return None, None
        padding = (kernel[0] // 2, kernel[1] // 2)
        if self.mode != "conv":
            return (nn.MaxPool2d if self.mode == "max" else nn.AvgPool2d)(kernel, stride, padding), None
        width = self.head_dim
        conv = nn.Conv2d(width, width, kernel, stride=stride, padding=padding, groups=width, bias=False, **dd)
        return conv, norm_layer(width, **dd)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, dim_out={self.dim_out}, num_heads={self.num_heads}, mode={self.mode!r}, "
                f"has_cls_token={self.has_cls_token}, rel_pos_type={self.rel_pos_type!r}")

    def _pooled(self, t: Tensor, size: tuple[int, int], pool: nn.Module | None,
                norm: nn.Module | None) -> tuple[Tensor, tuple[int, int]]:
        """`(B, h, N, d)` pooled over the map (the class token kept aside) and normed: `(B, h, N', d)`."""
        if pool is not None:
            batch, heads, _, width = t.shape
            cls, grid = (t[:, :, :1], t[:, :, 1:]) if self.has_cls_token else (None, t)
            grid = grid.reshape(-1, size[0], size[1], width).permute(0, 3, 1, 2).contiguous()
            grid = pool(grid)  # (B h, d, H', W')
            size = (grid.shape[2], grid.shape[3])
            t = grid.reshape(batch, heads, width, -1).transpose(2, 3)
            t = t if cls is None else torch.cat((cls, t), dim=2)
        return (t if norm is None else norm(t)), size

    def forward(self, x: Tensor, feat_size: list[int] | tuple[int, int] | None = None
                ) -> tuple[Tensor, list[int]]:
        """Pooled multi-head attention over the tokens `x` of a `feat_size` map (left out: a square map):
        `(out, q_size)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        if feat_size is None:
            side = math.isqrt(max(dims["N"] - int(self.has_cls_token), 0))
            feat_size = (side, side)
        size = int_pair(feat_size, "feat_size", who)  # names feat_size for an int, float or tensor
        expected = size[0] * size[1] + int(self.has_cls_token)
        if dims["N"] != expected:  # timm's reshape fails, or pools scrambled tokens
            raise ValueError(f"{who} expects {expected} tokens for feat_size {size} "
                             f"(class token: {self.has_cls_token}), got N={dims['N']}")
        batch = dims["B"]
        qkv = self.qkv(x).reshape(batch, dims["N"], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        q, q_size = self._pooled(q, size, self.pool_q, self.norm_q)
        k, k_size = self._pooled(k, size, self.pool_k, self.norm_k)
        v, _ = self._pooled(v, size, self.pool_v, self.norm_v)
        bias = None
        if self.rel_pos_type == "spatial":
            self._check_tables(q_size, k_size, size)
            lead = int(self.has_cls_token)
            spatial = q[:, :, lead:].flatten(0, 1)  # (B h, q_h q_w, d)
            bias = get_decomposed_rel_pos_bias(spatial, self.rel_pos_h, self.rel_pos_w, q_size, k_size,
                                               resize=False).unflatten(0, q.shape[:2])  # (B, h, N_q', N_k')
            bias = F.pad(bias, (lead, 0, lead, 0))  # the class token's row and column take none
        out = attend(q, k, v, bias=bias, scale=self.scale)  # (B, h, N_q, d)
        if capturing():
            self._record(q, k, bias, q_size, k_size)
        if self.residual_pooling:
            out = out + q
        out = self.proj(out.transpose(1, 2).reshape(batch, -1, self.dim_out))
        return out, [q_size[0], q_size[1]]

    def _check_tables(self, q_size: tuple[int, int], k_size: tuple[int, int], size: tuple[int, int]) -> None:
        """The position tables must span the pooled maps' offsets (timm indexes past them and fails)."""
        for axis, nq, nk, table in ((0, q_size[0], k_size[0], self.rel_pos_h), (1, q_size[1], k_size[1],
                                                                                  self.rel_pos_w)):
            reach = int((nq - 1) * max(nk / nq, 1.0) + (nk - 1) * max(nq / nk, 1.0)) + 1
            if reach > table.shape[0]:
                who = type(self).__name__
                raise ValueError(f"{who}: its position tables ({table.shape[0]} offsets) are made for a "
                                 f"smaller map than feat_size {size} (the pooled maps need {reach} along "
                                 f"axis {axis})")

    def _record(self, q: Tensor, k: Tensor, bias: Tensor | None, q_size: tuple[int, int],
                k_size: tuple[int, int]) -> None:
        """The map's query points' rows over the key map (the class token's share in `meta`)."""
        lead = int(self.has_cls_token)
        rows = None if bias is None else bias[:, :, lead:]
        weights, idx = row_weights(q[:, :, lead:], k, grid=q_size, bias=rows, scale=self.scale)
        record(self, "rows", weights[..., lead:], grid=k_size, queries=idx, query_grid=q_size,
               token_share=weights[..., :lead], note="rows over the map; the class token's share left out")
