"""timm's Swin V2 window attention (`timm.models.swin_transformer_v2.WindowAttention`): its call on
windows, its constructor and state_dict keys, attnzoo's cosine window attention inside.

`TimmWindowAttentionV2` is `attnzoo.ShiftedWindowAttentionV2` (same parameters and keys: `qkv`,
`q_bias`, `v_bias`, `logit_scale`, `cpb_mlp`, `proj`; the coordinate table and index are
non-persistent buffers, as in timm) called as timm's block calls its attention: on windows already
partitioned (and shifted), with timm's additive float mask of the shifted-window regions
`(nW, N, N)` (0 and -100). `attnzoo.convert.from_timm` converts timm's module to it, so
`attnzoo.replace(model, timm.models.swin_transformer_v2.WindowAttention)` swaps a whole timm Swin V2
with the same logits.

Shape letters: B' windows of all images (B * nW), N = Wh * Ww tokens per window, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo._checks import check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._order import follow_order
from attnzoo.mechanisms.swin_v2 import (
    ShiftedWindowAttentionV2,
    cosine_window_attention,
)

__all__ = ["TimmWindowAttentionV2", "window_mask"]


def window_mask(mask: object, windows: int, n: int, dtype: torch.dtype, who: str) -> Tensor | None:
    """timm's additive float mask of the shifted-window regions `(nW, N, N)` (0 and -100) as `attend`'s
    `(B', 1, N, N)` for `windows` = B' windows of N tokens (nW dividing B'), or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or not mask.is_floating_point() or mask.dim() != 3:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{who} expects mask to be a float tensor (nW, N, N) added to the logits "
                        f"(timm's 0 / -100), got {got}")
    if mask.shape[1:] != (n, n) or windows % mask.shape[0]:
        raise ValueError(f"{who} expects mask of shape (nW, {n}, {n}) with nW dividing the "
                         f"{windows} windows of x, got {tuple(mask.shape)}")
    per_image = mask.to(dtype)[None].expand(windows // mask.shape[0], -1, -1, -1)  # (B, nW, N, N)
    return per_image.reshape(windows, 1, n, n)  # (B', 1, N, N)


@register_compat(example=Example({"dim": 8, "window_size": (2, 3), "num_heads": 2}, ((4, 6, 8),), (4, 6, 8),
                                 channel_dim=-1))
class TimmWindowAttentionV2(ShiftedWindowAttentionV2):
    """timm's Swin V2 `WindowAttention(dim, window_size, num_heads, qkv_bias=True,
    qkv_bias_separate=False, attn_drop=0., proj_drop=0., pretrained_window_size=(0, 0))`
    (`attnzoo.compat.TimmWindowAttentionV2`): the module docstring says what it is.

    `qkv_bias_separate` (timm adds the bias after the projection instead of inside it) changes
    nothing but rounding and is kept as an attribute. A window size given as an int is taken as
    square (timm expects a pair).

    Shape:
        - x: `(B', N, C)` windows; mask: float `(nW, N, N)` added to the logits of every image's
          windows (nW dividing B'), or None.
        - Output: `(B', N, C)`.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int],
        num_heads: int,
        qkv_bias: bool = True,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int | Sequence[int] = (0, 0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            dim, window_size, num_heads, shift_size=0, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=proj_drop, pretrained_window_size=pretrained_window_size, device=device, dtype=dtype,
        )
        self.qkv_bias_separate = bool(qkv_bias_separate)
        # timm's order of parameters (an optimizer state saved with timm's module indexes by it)
        follow_order(self, ("logit_scale", "q_bias", "v_bias"), ("cpb_mlp", "qkv", "attn_drop", "proj"))

    def set_window_size(self, window_size: int | Sequence[int]) -> None:
        """A new window (timm's `set_input_size` calls it): the coordinate table and index follow."""
        self.window_size = int_pair(window_size, "window_size", type(self).__name__)
        table: Tensor = self.relative_coords_table  # type: ignore[assignment]  # a registered buffer
        self._position_buffers(table.device, table.dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Cosine attention inside each window of `x` `(B', N, C)`, timm's mask added: `(B', N, C)`."""
        who = type(self).__name__
        n = self.window_size[0] * self.window_size[1]
        windows = check_shape(x, who, "B N C", N=n, C=self.dim)["B"]
        attn_mask = window_mask(mask, windows, n, x.dtype, who)
        qkv_bias = None
        if self.q_bias is not None and self.v_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B', N, 3C)
        qkv = qkv.unflatten(-1, (3, self.num_heads, -1))  # (B', N, 3, h, d)
        capture = capturing()
        out, weights = cosine_window_attention(  # out: (B', N, C)
            qkv, self.logit_scale, self.position_bias(), attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0, need_weights=capture,
        )
        if capture and weights is not None:
            queries = torch.arange(n, device=x.device)
            record(self, "rows", weights.detach(), grid=self.window_size, queries=queries,
                   query_grid=self.window_size)
        out = self.proj_drop(self.proj(out))
        return out
