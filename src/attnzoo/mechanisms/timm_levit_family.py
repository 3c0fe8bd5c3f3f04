"""LeViT's attention bias in two other timm models: TinyViT's `timm.models.tiny_vit.Attention` and
EfficientFormer's (v1) `timm.models.efficientformer.Attention`, with their constructors, calls and
state_dict keys, run by `attnzoo.attend`.

Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022,
https://arxiv.org/abs/2207.10666; Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed",
NeurIPS 2022, https://arxiv.org/abs/2206.01191.

Both add LeViT's learned bias per head and per 2-D offset (`attnzoo.mechanisms.timm_levit`): for
queries and keys of the `(H, W)` `resolution` map, `attention_biases[head, |y - y'| W + |x - x'|]`,
read through `attention_bias_idxs` `(N, N)`. Queries and keys are `key_dim` wide per head, values
`val_dim = int(attn_ratio key_dim)`; `qkv` and `proj` are plain Linears with biases. TinyViT
normalizes the tokens first (`norm`, a LayerNorm) and runs on windows of `resolution`; its index is
non-persistent. EfficientFormer's index is a persistent buffer (in its checkpoints). As for LeViT,
the bias is gathered on every call rather than cached in eval mode (timm's cache goes stale when
`attention_biases` changes in eval mode and keeps the gather's graph); the numbers are timm's.

`attnzoo.convert.from_timm` converts both (the same keys, so timm's checkpoints load with
`strict=True`), `attnzoo.replace(model, cls)` swaps a whole TinyViT or EfficientFormer with the same
logits, and `attnzoo.capture_maps` records the rows, the bias included. Shape letters: B batch
(windows included), (H, W) = resolution, N = H W tokens, C = dim, h heads, kd = key_dim, vd = val_dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_levit import OffsetBiasAttention, val_width

__all__ = ["TimmTinyVitAttention", "TimmEfficientFormerAttention"]


class _PlainOffsetBias(OffsetBiasAttention):
    """Linear `qkv` (per head: q, k, v), the offset bias, Linear `proj`; TinyViT adds `norm` first."""

    norm: nn.Module | None

    def _build(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: object,
               persistent: bool, norm: bool, dd: dict[str, Any]) -> None:
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.key_dim = check_int(key_dim, "key_dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.scale = key_dim**-0.5
        self.attn_ratio = attn_ratio
        self.val_dim = val_width(key_dim, attn_ratio, who)
        self.val_attn_dim = self.val_dim * num_heads
        grid = int_pair(resolution, "resolution", who)
        self.norm = nn.LayerNorm(dim, **dd) if norm else None
        self.qkv = nn.Linear(dim, num_heads * (self.val_dim + 2 * key_dim), **dd)
        self.proj = nn.Linear(self.val_attn_dim, dim, **dd)
        self.resolution = grid
        self._bias_table(self.num_heads, grid, 1, persistent, dd)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, key_dim={self.key_dim}, num_heads={self.num_heads}, "
                f"val_dim={self.val_dim}, resolution={self.resolution}")

    def _attention(self, x: Tensor) -> Tensor:
        who = type(self).__name__
        tokens = self.resolution[0] * self.resolution[1]
        batch = check_shape(x, who, "B N C", C=self.dim, N=tokens)["B"]
        bias = self.get_attention_biases()  # (h, N, N)
        if self.norm is not None:
            x = self.norm(x)
        qkv = self.qkv(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)  # (B, h, N, 2 kd + vd)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
        out = attend(q, k, v, bias=bias, scale=self.scale)  # (B, h, N, vd)
        if capturing():  # map capture: rows of the capture's query points, the bias included
            record_rows(self, q, k, grid=self.resolution, bias=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.val_attn_dim))


@register_compat(example=Example({"dim": 8, "key_dim": 4, "num_heads": 2, "attn_ratio": 2,
                                  "resolution": (3, 3)}, ((2, 9, 8),), (2, 9, 8), channel_dim=-1))
class TimmTinyVitAttention(_PlainOffsetBias):
    """timm's `tiny_vit.Attention(dim, key_dim, num_heads=8, attn_ratio=4, resolution=(14, 14))`
    (`attnzoo.compat.TimmTinyVitAttention`): the module docstring says what it is; keys
    `attention_biases`, `norm`, `qkv`, `proj`.

    $\\mathrm{softmax}(q k^\\top / \\sqrt{kd} + B_h[|\\Delta y| W + |\\Delta x|])\\,v$ per head with
    $[q, k, v] = \\mathrm{qkv}(\\mathrm{LN}(x))$, then `proj`. Time $O(B N^2 h (kd + vd))$.

    timm asserts `resolution` is a tuple; an int `r` here means `(r, r)`.

    Shape:
        - x: `(B, N, C)`, N = H W (a window's tokens, row-major).
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int | tuple[int, int] = (14, 14),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._build(dim, key_dim, num_heads, attn_ratio, resolution, False, True,
                    {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the `resolution` map's tokens `x` `(B, N, C)`: `(B, N, C)`."""
        return self._attention(x)


@register_compat(example=Example({"dim": 8, "key_dim": 4, "num_heads": 2, "attn_ratio": 2, "resolution": 3},
                                 ((2, 9, 8),), (2, 9, 8), channel_dim=-1))
class TimmEfficientFormerAttention(_PlainOffsetBias):
    """timm's `efficientformer.Attention(dim=384, key_dim=32, num_heads=8, attn_ratio=4, resolution=7)`
    (`attnzoo.compat.TimmEfficientFormerAttention`), EfficientFormer v1's: the module docstring says
    what it is; keys `attention_biases`, `attention_bias_idxs` (persistent, as timm's), `qkv`, `proj`.

    $\\mathrm{softmax}(q k^\\top / \\sqrt{kd} + B_h[|\\Delta y| W + |\\Delta x|])\\,v$ per head with
    $[q, k, v] = \\mathrm{qkv}(x)$, then `proj`. Time $O(B N^2 h (kd + vd))$.

    Shape:
        - x: `(B, N, C)`, N = H W, the map's tokens row-major.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int = 384,
        key_dim: int = 32,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: int | tuple[int, int] = 7,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._build(dim, key_dim, num_heads, attn_ratio, resolution, True, False,
                    {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the `resolution` map's tokens `x` `(B, N, C)`: `(B, N, C)`."""
        return self._attention(x)
