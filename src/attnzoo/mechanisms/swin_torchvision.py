"""torchvision's Swin attention modules with torchvision's signatures, state_dict keys and numbers,
run by `attnzoo.attend`: exported as `attnzoo.compat.ShiftedWindowAttention` (Swin V1) and
`attnzoo.compat.ShiftedWindowAttentionV2` (Swin V2). `attnzoo.convert.from_torchvision` converts
torchvision's modules to these with the same weights.

What torchvision's `shifted_window_attention` does, reproduced here:

- the `(B, H, W, C)` map is padded with zeros at the bottom/right to window multiples; the zero
  tokens take part in the attention (they are not masked);
- along a side where the padded map is a single window (`window >= padded side`) the shift is
  dropped; the window is never clipped;
- with a shift, keys of other regions get -100 added to their logits (not a full mask);
- V1: logits `q k^T / sqrt(d)` plus a bias gathered from `relative_position_bias_table` by the flat
  `relative_position_index` buffer;
- V2: cosine logits times `exp(min(logit_scale, log 100))`, the bias `16 sigmoid(cpb_mlp(...))`
  over `relative_coords_table`, and the k third of `qkv.bias` zeroed in every forward.

Differences: errors are ValueError/TypeError naming the argument; `shift_size` must lie in
`[0, window)` (torchvision does not check it); a window side of 1 gives V2 finite coordinates
(torchvision divides 0 by 0 there, and every output is NaN); with dropout in training mode the
random draws differ from torchvision's (the numbers agree with dropout 0 or in eval mode).

Shape letters: B batch, H/W map size, C channels, h heads, N = Wh*Ww tokens per window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_2d
from attnzoo.maps.capture import capturing
from attnzoo.mechanisms.swin_v2 import (
    CPB_HIDDEN,
    cosine_window_attention,
    log_spaced_coords,
    partition_windows,
    record_windows,
    region_ids,
    reverse_windows,
)

__all__ = ["TorchvisionShiftedWindowAttention", "TorchvisionShiftedWindowAttentionV2"]


def _pair_list(value: Sequence[int], name: str, who: str, minimum: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{who}: {name} must be a list of 2 ints, got {value!r}")
    return [check_int(v, name, who, minimum=minimum) for v in value]


@register_compat(example=Example({"dim": 8, "window_size": [4, 4], "shift_size": [2, 2], "num_heads": 2},
                                 ((2, 8, 8, 8),), (2, 8, 8, 8), channel_dim=-1))
class TorchvisionShiftedWindowAttention(nn.Module):
    """torchvision's `ShiftedWindowAttention` (Swin V1): same arguments, state_dict and outputs.

    Exported as `attnzoo.compat.ShiftedWindowAttention`; the canonical Swin module is
    `attnzoo.ShiftedWindowAttention`, which masks padded keys and follows the official small-map rule.

    Args:
        dim: Channels C.
        window_size: `[Wh, Ww]`.
        shift_size: `[sh, sw]`, each in `[0, window)`.
        num_heads: Heads h; must divide `dim`.
        qkv_bias: Bias in the qkv projection. Default: True.
        proj_bias: Bias in the output projection. Default: True.
        attention_dropout: Dropout on the attention weights (training only). Default: 0.0.
        dropout: Dropout on the output (training only). Default: 0.0.

    Shape:
        - Input: `(B, H, W, C)`, any H, W >= 1.
        - Output: `(B, H, W, C)`.
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        check_int(dim, "dim", who)
        self.window_size = _pair_list(window_size, "window_size", who, 1)
        self.shift_size = _pair_list(shift_size, "shift_size", who, 0)
        if any(s >= w for s, w in zip(self.shift_size, self.window_size, strict=True)):
            raise ValueError(
                f"{who}: shift_size must be smaller than window_size {window_size}, got {shift_size}"
            )
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        self.attention_dropout = check_float(
            attention_dropout, "attention_dropout", who, minimum=0.0, maximum=1.0
        )
        self.dropout = check_float(dropout, "dropout", who, minimum=0.0, maximum=1.0)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self._define_position_bias(factory)
        index = relative_position_index_2d((self.window_size[0], self.window_size[1])).to(device)
        self.register_buffer("relative_position_index", index.flatten())  # (N*N,), as torchvision's

    def reset_parameters(self) -> None:
        """torchvision's start of the position bias, and the index recomputed (`to_empty` leaves both
        uninitialised); the linear maps reset themselves."""
        self._reset_position_bias()
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        wh, ww = self.window_size
        index.copy_(relative_position_index_2d((wh, ww), device=index.device).flatten())

    def _reset_position_bias(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _define_position_bias(self, factory: dict[str, Any]) -> None:
        wh, ww = self.window_size
        table = torch.zeros((2 * wh - 1) * (2 * ww - 1), self.num_heads, **factory)
        self.relative_position_bias_table = nn.Parameter(table)
        if table.device.type != "meta":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _bias_table(self) -> Tensor:
        return self.relative_position_bias_table

    def get_relative_position_bias(self) -> Tensor:
        """The position bias as torchvision's method returns it, `(1, h, N, N)`."""
        area = self.window_size[0] * self.window_size[1]
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        return gather_relative_bias(self._bias_table(), index.reshape(area, area))[None]  # (1, h, N, N)

    def _attention(self, qkv: Tensor, bias: Tensor, mask: Tensor | None, dropout_p: float,
                   need_weights: bool) -> tuple[Tensor, Tensor | None]:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, h, N, d) each
        if need_weights:
            out, weights = attend(q, k, v, bias=bias, mask=mask, dropout_p=dropout_p, need_weights=True)
        else:
            out, weights = attend(q, k, v, bias=bias, mask=mask, dropout_p=dropout_p), None
        return out.transpose(1, 2).flatten(2), weights  # (B*nW, N, C)

    def _qkv_bias(self) -> Tensor | None:
        return self.qkv.bias

    def forward(self, x: Tensor) -> Tensor:
        """Window attention over the map `x` `(B, H, W, C)`, as torchvision computes it."""
        who = type(self).__name__
        dims = check_shape(x, who, "B H W C", C=self.qkv.in_features)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        wh, ww = self.window_size
        hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
        shift = (self.shift_size[0] if wh < hp else 0, self.shift_size[1] if ww < wp else 0)
        x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros at the bottom/right, not masked
        if shift != (0, 0):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = partition_windows(x, (wh, ww))  # (B*nW, N, C)
        qkv = F.linear(windows, self.qkv.weight, self._qkv_bias()).unflatten(-1, (3, self.num_heads, -1))
        mask = None
        if shift != (0, 0):  # -100 between regions, as torchvision adds it
            ids = region_ids((hp, wp), (wh, ww), shift, x.device)  # (nW, N)
            other = ids[:, None, :, None] != ids[:, None, None, :]  # (nW, 1, N, N) query x key
            offset = torch.zeros(other.shape, dtype=x.dtype, device=x.device).masked_fill(other, -100.0)
            mask = offset[None].expand(batch, -1, -1, -1, -1).flatten(0, 1)  # (B*nW, 1, N, N)
        capture = False
        capture = capturing()
        out, weights = self._attention(
            qkv, self.get_relative_position_bias()[0], mask,
            self.attention_dropout if self.training else 0.0, capture,
        )
        if capture and weights is not None:
            record_windows(self, weights, (height, width), (hp, wp), (wh, ww), shift)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        out = reverse_windows(out, (wh, ww), (hp, wp))  # (B, Hp, Wp, C)
        if shift != (0, 0):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :height, :width].contiguous()


@register_compat(example=Example({"dim": 8, "window_size": [4, 4], "shift_size": [2, 2], "num_heads": 2},
                                 ((2, 8, 8, 8),), (2, 8, 8, 8), channel_dim=-1))
class TorchvisionShiftedWindowAttentionV2(TorchvisionShiftedWindowAttention):
    """torchvision's `ShiftedWindowAttentionV2` (Swin V2): same arguments, state_dict and outputs.

    Exported as `attnzoo.compat.ShiftedWindowAttentionV2`; the canonical Swin V2 module is
    `attnzoo.ShiftedWindowAttentionV2` (registered `swin_v2_window`), which masks padded keys and
    blocks other shifted-window regions completely.

    Args:
        dim: Channels C.
        window_size: `[Wh, Ww]`.
        shift_size: `[sh, sw]`, each in `[0, window)`.
        num_heads: Heads h; must divide `dim`.
        qkv_bias: Bias in the qkv projection (its k third stays zero). Default: True.
        proj_bias: Bias in the output projection. Default: True.
        attention_dropout: Dropout on the attention weights (training only). Default: 0.0.
        dropout: Dropout on the output (training only). Default: 0.0.

    Shape:
        - Input: `(B, H, W, C)`, any H, W >= 1.
        - Output: `(B, H, W, C)`.
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, window_size, shift_size, num_heads, qkv_bias, proj_bias, attention_dropout,
                         dropout, device=device, dtype=dtype)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0), **factory))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN, **factory), nn.ReLU(inplace=True),
            nn.Linear(CPB_HIDDEN, num_heads, bias=False, **factory),
        )
        if self.qkv.bias is not None and self.qkv.bias.device.type != "meta":
            with torch.no_grad():
                self.qkv.bias[dim : 2 * dim].zero_()

    def _define_position_bias(self, factory: dict[str, Any]) -> None:
        wh, ww = self.window_size
        # Offsets divided by window - 1 (by 1 for a window of 1, where torchvision divides 0 by 0).
        self.register_buffer("relative_coords_table", log_spaced_coords((wh, ww), (wh, ww), **factory))

    def _reset_position_bias(self) -> None:
        """The logit scale at log 10, the coordinate table recomputed and the keys' bias zero (after
        the Linear's own reset), as torchvision builds them."""
        nn.init.constant_(self.logit_scale, math.log(10.0))
        table: Tensor = self.relative_coords_table  # type: ignore[assignment]  # a registered buffer
        wh, ww = self.window_size
        table.copy_(log_spaced_coords((wh, ww), (wh, ww), device=table.device, dtype=table.dtype))
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias[self.qkv.in_features : 2 * self.qkv.in_features])

    def _bias_table(self) -> Tensor:
        return self.cpb_mlp(self.relative_coords_table).reshape(-1, self.num_heads)  # (T, h)

    def get_relative_position_bias(self) -> Tensor:
        """The position bias as torchvision's method returns it, `16 sigmoid(...)`, `(1, h, N, N)`."""
        return 16 * torch.sigmoid(super().get_relative_position_bias())

    def _qkv_bias(self) -> Tensor | None:
        bias = self.qkv.bias
        if bias is None:
            return None
        third = bias.shape[0] // 3
        return torch.cat((bias[:third], torch.zeros_like(bias[third : 2 * third]), bias[2 * third :]))

    def _attention(self, qkv: Tensor, bias: Tensor, mask: Tensor | None, dropout_p: float,
                   need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return cosine_window_attention(qkv, self.logit_scale, bias, mask, dropout_p=dropout_p,
                                       need_weights=need_weights)
