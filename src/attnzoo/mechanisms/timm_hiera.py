"""timm's Hiera attention (`timm.models.hiera.MaskUnitAttention`, `hiera_tiny_224` ... `hiera_huge_224`):
its constructor, call and state_dict keys, run by `attnzoo.attend`.

Hiera (Ryali et al., 2023, "Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles")
attends within mask units (windows of `window_size` tokens after pooling) in its early stages and globally
later; at a stage change the queries are max-pooled by `q_stride` first. The tokens come "unrolled"
(Hiera's `Unroll`): the `q_stride` positions each pooled query takes its maximum over are the leading
axis of the sequence, and the window is its fastest axis:

$$\\mathrm{out} = W_o\\,\\mathrm{softmax}\\big(\\max_{s} q_s\\, k^\\top / \\sqrt d\\big)\\,v
\\quad\\text{per head (and per mask unit)}$$

Time O(B N^2 C / n_w) and memory O(B h N^2 / n_w) with n_w mask units (1 for global attention); the
SDPA kernels keep the map out of memory.

Shape letters: B batch, N tokens, C = dim, h heads, d head width, n_w mask units, T tokens per unit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_head_widths, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmMaskUnitAttention"]


@register_compat(example=Example({"dim": 8, "dim_out": 8, "heads": 2, "q_stride": 2, "window_size": 2,
                                  "use_mask_unit_attn": True}, ((2, 16, 8),), (2, 8, 8), channel_dim=-1))
class TimmMaskUnitAttention(nn.Module):
    """timm's `hiera.MaskUnitAttention(dim, dim_out, heads, q_stride=1, window_size=0,
    use_mask_unit_attn=False)` (`attnzoo.compat.TimmMaskUnitAttention`): the module docstring gives the
    formula.

    Shape:
        - x: `(B, N, dim)`, Hiera's unrolled tokens (with mask units: N = n_w * q_stride * window_size).
        - Output: `(B, N / q_stride, dim_out)`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        q_stride: int = 1,
        window_size: int = 0,
        use_mask_unit_attn: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.dim_out = check_int(dim_out, "dim_out", who)
        self.heads = check_int(heads, "heads", who)
        self.q_stride = check_int(q_stride, "q_stride", who)
        self.head_dim, _ = check_head_widths(dim_out, heads, None, None, who, None, dim_name="dim_out",
                                             heads_name="heads")
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim_out, **dd)
        self.proj = nn.Linear(dim_out, dim_out, **dd)
        self.use_mask_unit_attn = bool(use_mask_unit_attn)
        least = 1 if self.use_mask_unit_attn else 0
        self.window_size = check_int(window_size, "window_size", who, minimum=least)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, q_stride={self.q_stride}, "
                f"window_size={self.window_size}, use_mask_unit_attn={self.use_mask_unit_attn}")

    def _units(self, tokens: int, who: str) -> int:
        """The number of mask units (1 for global attention); refused where the tokens do not tile them."""
        per_unit = self.q_stride * self.window_size if self.use_mask_unit_attn else self.q_stride
        if tokens % per_unit:  # timm's reshape fails, or groups tokens that belong to no unit
            what = "q_stride * window_size" if self.use_mask_unit_attn else "q_stride"
            raise ValueError(f"{who} expects a token count divisible by {what} = {per_unit}, got N={tokens}")
        return tokens // per_unit if self.use_mask_unit_attn else 1

    def forward(self, x: Tensor) -> Tensor:
        """Mask-unit or global attention over Hiera's unrolled tokens `x` `(B, N, C)`: `(B, N', dim_out)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        units, heads, width = self._units(tokens, who), self.heads, self.head_dim
        qkv = self.qkv(x).reshape(batch, -1, units, 3, heads, width).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)  # (B, h, n_w, T, d) each
        if self.q_stride > 1:  # Hiera's max-pool of the unrolled queries
            q = q.reshape(batch, heads, units, self.q_stride, -1, width).amax(dim=3)
        # windows as more heads: (B, h n_w, T, d); contiguous as timm's, so the fused kernel rounds alike
        q, k, v = (t.reshape(batch, heads * units, -1, width).contiguous() for t in (q, k, v))
        out = attend(q, k, v, scale=self.scale)  # (B, h n_w, T', d)
        if capturing():  # map capture: each unit's rows (units as heads), over its tokens
            record_rows(self, q, k, grid=(q.shape[2],), key_grid=(k.shape[2],), scale=self.scale,
                        units=units)
        out = out.reshape(batch, heads, units, -1, width).transpose(1, 3)  # (B, T', n_w, h, d)
        return self.proj(out.reshape(batch, -1, self.dim_out))
