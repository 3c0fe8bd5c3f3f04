"""timm's SAM2 Hiera attention (`timm.models.hieradet_sam2.MultiScaleAttention`, the image encoder of
`sam2_hiera_tiny` ... `sam2_hiera_large`): its constructor, call and state_dict keys, run by
`attnzoo.attend`.

SAM 2's Hiera (Ravi et al., 2024, "SAM 2: Segment Anything in Images and Videos") attends over a
channels-last map (or each of its windows, cut by the block); at a stage change the queries are pooled
by `q_pool` (a max pool) so the map shrinks:

$$\\mathrm{out} = W_o\\,\\mathrm{softmax}\\big(\\mathrm{pool}(q)\\, k^\\top / \\sqrt d\\big)\\,v$$ per head.

Time O(B h N_q N d) and memory O(B h N_q N) (the SDPA kernels keep the map out of memory), N = H W.

Shape letters: B batch, H, W map, C = dim, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from attnzoo._checks import check_head_widths, check_int, check_shape
from attnzoo._geometry import check_conv_fits
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmSam2MultiScaleAttention"]


@register_compat(example=Example({"dim": 8, "dim_out": 8, "num_heads": 2}, ((2, 3, 5, 8),), (2, 3, 5, 8),
                                 channel_dim=-1))
class TimmSam2MultiScaleAttention(nn.Module):
    """timm's `hieradet_sam2.MultiScaleAttention(dim, dim_out, num_heads, q_pool=None)`
    (`attnzoo.compat.TimmSam2MultiScaleAttention`): the module docstring gives the formula. `q_pool` is
    any module that pools an NCHW map (SAM 2 passes an `nn.MaxPool2d`).

    Shape:
        - x: `(B, H, W, dim)`.
        - Output: `(B, H', W', dim_out)`, `(H', W')` the pooled query map.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        q_pool: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.dim_out = check_int(dim_out, "dim_out", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        head_dim, _ = check_head_widths(dim_out, num_heads, None, None, who, None, dim_name="dim_out")
        self.scale = head_dim**-0.5
        if q_pool is not None and not isinstance(q_pool, nn.Module):
            raise TypeError(f"{who}: q_pool must be an nn.Module (SAM 2 passes nn.MaxPool2d) or None, got "
                            f"{type(q_pool).__name__}")
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, 3 * dim_out, **dd)
        self.proj = nn.Linear(dim_out, dim_out, **dd)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_out={self.dim_out}, num_heads={self.num_heads}"

    def forward(self, x: Tensor) -> Tensor:
        """Attention of the (pooled) map's positions over the map `x` `(B, H, W, C)`: `(B, H', W', out)`."""
        dims = check_shape(x, type(self).__name__, "B H W C", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # (B, N, h, d) each
        size = (height, width)
        if isinstance(self.q_pool, (nn.MaxPool2d, nn.AvgPool2d)):  # a map smaller than it: torch fails inside
            pool = self.q_pool
            dilation = _pair(getattr(pool, "dilation", 1))
            check_conv_fits(size, _pair(pool.kernel_size), _pair(pool.padding), dilation, type(self).__name__)
        if self.q_pool is not None:
            pooled = self.q_pool(q.reshape(batch, height, width, -1).permute(0, 3, 1, 2))  # (B, h d, H', W')
            size = (pooled.shape[2], pooled.shape[3])
            q = pooled.permute(0, 2, 3, 1).reshape(batch, size[0] * size[1], self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        out = attend(q, k, v, scale=self.scale)  # (B, h, N', d)
        if capturing():  # map capture: rows of the (pooled) map's query points over the map
            record_rows(self, q, k, grid=size, key_grid=(height, width), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, size[0], size[1], -1))
