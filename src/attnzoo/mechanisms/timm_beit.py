"""timm's BEiT self-attention (`timm.models.beit.Attention`, used by BEiT, BEiT v2 and the BEiT-style
blocks of other timm models): its constructor, call and state_dict keys, run by `attnzoo.attend`.

BEiT differs from ViT's attention in two ways, both kept: the query and value biases are parameters
beside a bias-free `qkv` (the key bias is a zero buffer), and a learned relative position bias over a
`window_size` patch grid is added to the logits, with three extra table rows for the class token
(class to patch, patch to class, class to class). `forward(x, shared_rel_pos_bias=None)` also adds a
bias shared by all blocks (`use_shared_rel_pos_bias` models), as timm's does.

`attnzoo.convert.from_timm` converts timm's module (the same keys, so timm's checkpoint loads with
`strict=True`), `attnzoo.replace(model, timm.models.beit.Attention)` swaps a whole BEiT's attention
with the same logits, and `attnzoo.capture_maps` then records what each head attends to.

Shape letters: B batch, N tokens (1 + Wh Ww with a window), C = dim, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_head_widths, check_int, check_mask, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.swin_windows import set_relative_window

__all__ = ["TimmBeitAttention"]


def relative_position_index(window_size: tuple[int, int]) -> Tensor:
    """BEiT's index `(Wh Ww + 1, Wh Ww + 1)` into its bias table: the 2-D offset between patches, then
    the rows for class to patch, patch to class and class to class (the table's last three)."""
    height, width = window_size
    distances = (2 * height - 1) * (2 * width - 1)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, Wh Ww)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (Wh Ww, Wh Ww, 2)
    index = torch.zeros(height * width + 1, height * width + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + height - 1) * (2 * width - 1) + rel[..., 1] + width - 1
    index[0, :] = distances  # class to patch
    index[:, 0] = distances + 1  # patch to class
    index[0, 0] = distances + 2  # class to class
    return index


@register_compat(example=Example({"dim": 8, "num_heads": 2, "window_size": (2, 2)}, ((2, 5, 8),), (2, 5, 8),
                                 channel_dim=-1))
class TimmBeitAttention(nn.Module):
    """timm's `beit.Attention(dim, num_heads=8, qkv_bias=False, qkv_bias_separate=False, attn_drop=0.,
    proj_drop=0., window_size=None, attn_head_dim=None)` (`attnzoo.compat.TimmBeitAttention`): the
    module docstring says what it is.

    $\\mathrm{softmax}(q k^\\top / \\sqrt d + B_{rel} + B_{shared})\\,v$ per head, then `proj`.

    Shape:
        - x: `(B, N, C)`, N = 1 + Wh Ww with a `window_size`; shared_rel_pos_bias: broadcastable to
          `(B, h, N, N)`, or None.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: tuple[int, int] | None = None,
        attn_head_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(dim, num_heads, attn_head_dim, None, who, "attn_head_dim")
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_bias_separate = bool(qkv_bias_separate)  # the same sum either way; kept for timm's repr
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd)) if qkv_bias else None
        k_bias = torch.zeros(self.attn_dim, **dd) if qkv_bias else None  # timm's: a zero buffer
        self.register_buffer("k_bias", k_bias, persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd)) if qkv_bias else None
        self.window_size: tuple[int, int] | None = None
        table, index = None, None
        if window_size:
            if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
                raise TypeError(f"{who}: window_size must be a pair (Wh, Ww) or None, got {window_size!r}")
            self.window_size = (check_int(window_size[0], "window_size", who),
                                check_int(window_size[1], "window_size", who))
            rows = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
            table = nn.Parameter(torch.zeros(rows, self.num_heads, **dd))  # (rows, h)
            index = relative_position_index(self.window_size).to(device)  # type: ignore[arg-type]
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", index, persistent=False)
        self.proj = nn.Linear(self.attn_dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def reset_parameters(self) -> None:
        """timm's start: zero q/k/v biases and table, the index recomputed (`to_empty` leaves the
        buffers uninitialised); the linear maps reset themselves."""
        for name in ("q_bias", "k_bias", "v_bias", "relative_position_bias_table"):
            if getattr(self, name) is not None:
                nn.init.zeros_(getattr(self, name))
        index = self.relative_position_index
        if isinstance(index, Tensor) and self.window_size is not None:
            index.copy_(relative_position_index(self.window_size).to(index.device))

    def set_window_size(self, window_size: tuple[int, int]) -> None:
        """timm's (its `set_input_size` calls it): the table resized as timm's (the class token's three
        rows kept), the index recomputed; nothing without a window, as in timm."""
        if self.window_size is not None:
            set_relative_window(self, window_size, relative_position_index, extra_rows=3)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}")

    def _rel_pos_bias(self) -> Tensor | None:
        """The learned relative position bias `(1, h, N, N)`, or None without a window."""
        if self.relative_position_bias_table is None:
            return None
        index: Tensor = self.relative_position_index  # type: ignore[assignment]
        bias = self.relative_position_bias_table[index.flatten()].view(*index.shape, -1)  # (N, N, h)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        """Self-attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        who = type(self).__name__
        if self.window_size is None:
            dims = check_shape(x, who, "B N C", C=self.dim)
        else:  # the class token and the window's patches
            dims = check_shape(x, who, "B N C", C=self.dim, N=self.window_size[0] * self.window_size[1] + 1)
        batch, tokens = dims["B"], dims["N"]
        bias = self._rel_pos_bias()
        if shared_rel_pos_bias is not None:  # timm's RelativePositionBias gives (h, N, N)
            full = (batch, self.num_heads, tokens, tokens)
            check_mask(shared_rel_pos_bias, full, who, "shared_rel_pos_bias")
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        qkv_bias = None
        if self.q_bias is not None and self.v_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))  # k: no bias
        qkv = nn.functional.linear(x, self.qkv.weight, qkv_bias)  # (B, N, 3 h d)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, bias=bias, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(tokens,), bias=bias, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)))
