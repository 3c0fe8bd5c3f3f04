"""Swin's official `WindowAttention`, kept exactly for its checkpoints (`attnzoo.compat.WindowAttention`).

microsoft/Swin-Transformer `models/swin_transformer.py:WindowAttention`: the canonical
`attnzoo.WindowAttention` with the official signature, forward and state_dict keys.

Shape letters: B batch, C channels, N tokens per window, nW windows per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor

from attnzoo._registry import Example, register_compat
from attnzoo.mechanisms.swin import WindowAttention

__all__ = ["OfficialWindowAttention"]


@register_compat(example=Example({"dim": 8, "window_size": 4, "num_heads": 2}, ((4, 16, 8),), (4, 16, 8),
                                 channel_dim=-1))
class OfficialWindowAttention(WindowAttention):
    """Swin's official `WindowAttention(dim, window_size, num_heads, ...)` (`attnzoo.compat.WindowAttention`).

    The official signature (no defaults for `window_size` and `num_heads`), `forward(x, mask=None)`
    returning the output alone, and the official state_dict keys exactly: `relative_position_index`
    is a persistent buffer, so a state_dict without it (timm's) fails a strict load here, as it
    does in the official module (the canonical `attnzoo.WindowAttention` loads both).

    Args:
        dim: Channels C.
        window_size: `(Wh, Ww)`, or an int for a square window.
        num_heads: Heads h; must divide `dim`.
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale; None (or 0) means `d ** -0.5`. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.

    Shape:
        - x: `(B * nW, N, C)`; mask: `(nW, N, N)` or None.
        - Output: `(B * nW, N, C)`.
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
        super().__init__(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        # Re-registered persistent: the official state_dict's keys and order.
        index = cast(Tensor, self.relative_position_index)
        self.register_buffer("relative_position_index", index, persistent=True)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Attend within each window `(B * nW, N, C)`; `mask` is `(nW, N, N)` or None."""
        return cast(Tensor, super().forward(x, mask))  # need_weights=False: one tensor
