"""Deformable attention with the coordinates of DAT's first release, as fightingcv-attention ships it
(`fightingcv_attention.attention.DAT.DAttentionBaseline`, LeapLabTHU/DAT before its DAT++ update).

Xia, Pan, Song, Li, Huang, "Vision Transformer with Deformable Attention", CVPR 2022,
https://arxiv.org/abs/2201.00520.

`FightingcvDeformableAttention` is `attnzoo.DeformableAttention` (same constructor, state_dict keys and
computation) with that release's coordinates, so `attnzoo.convert.from_fightingcv` reproduces its numbers:

- Reference and query points at $(j + 0.5) / n \\cdot 2 - 1$, cell centres of a $[-1, 1]$ square, but
  sampled with `align_corners=True`, where $\\pm 1$ are the outer pixel centres: with `stride=1` a key
  lands $(j + 0.5)(n - 1)/n$ pixels from the left, not on pixel j, so even zero offsets blur the map.
- The relative bias table (`2H - 1` entries per side) is read at half the query-to-key displacement in
  those coordinates: a displacement of $\\delta$ pixels reads entry $(H - 1)(1 + \\delta / H)$ instead of
  $H - 1 + \\delta$.
- Offsets are bounded by `offset_range_factor / n` (n the grid side), a float32 constant; a factor of 0
  leaves them unbounded (`> 0` decides the bound, `>= 0` the clamping), and a negative factor squashes
  the points with `tanh(reference + offset)` instead of clamping them.
- The default position table fixes the input size: fightingcv reshapes it to the input's `2H - 1`
  (it raises, or reads a scrambled table, for other sizes); this class raises `ValueError`.

fightingcv crashes with `no_off=True` (`Tensor.fill` does not exist) and with `fixed_pe=True`
(`self.n_sample` is never set), so the converter refuses them; the canonical class runs both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.mechanisms._deformable import grid_points
from attnzoo.mechanisms.deformable import DeformableAttention

__all__ = ["FightingcvDeformableAttention"]


def _centres(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`(j + 0.5) / n * 2 - 1`, computed in fightingcv's order of operations."""
    return torch.linspace(0.5, n - 0.5, n, dtype=dtype, device=device).div_(n).mul_(2).sub_(1)


class FightingcvDeformableAttention(DeformableAttention):
    """`DeformableAttention` with the coordinates of fightingcv's `DAttentionBaseline` (module
    docstring); `attnzoo.convert.from_fightingcv` builds it. Arguments as `DeformableAttention`.

    Shape:
        - Input: `(B, C, H, W)`, `(H, W) = feat_size` with the default position table.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): `(B, h, H*W, H_k*W_k)`.
    """

    def _reference(self, hk: int, wk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return grid_points(_centres(hk, dtype, device), _centres(wk, dtype, device))

    def _query_points(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._reference(height, width, dtype, device).reshape(height * width, 2)

    def _move(self, reference: Tensor, offset: Tensor) -> Tensor:
        hk, wk = reference.shape[:2]
        factor = self.offset_range_factor
        if factor > 0:
            bound = torch.tensor([1.0 / wk, 1.0 / hk], device=offset.device)  # the default dtype, as theirs
            offset = offset.tanh().mul(bound.to(offset.dtype)).mul(factor)
        if factor >= 0:
            return offset + reference
        return (offset + reference).tanh()

    def _check_size(self, height: int, width: int) -> None:
        super()._check_size(height, width)
        if self.use_pe and not (self.dwc_pe or self.fixed_pe) and (height, width) != self.feat_size:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (B, {self.channels}, {self.feat_size[0]}, "
                f"{self.feat_size[1]}) (feat_size: fightingcv's table fixes the input size), "
                f"got H={height}, W={width}"
            )
