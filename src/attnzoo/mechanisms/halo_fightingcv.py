"""Halo attention as fightingcv-attention ships it (`fightingcv_attention.attention.HaloAttention`,
External-Attention-pytorch, after lucidrains' halonet-pytorch): what `attnzoo.convert.from_fightingcv`
returns for it.

Vaswani, Ramachandran, Srinivas, Parmar, Hechtman, Shlens, "Scaling Local Self-Attention for
Parameter Efficient Visual Backbones", CVPR 2021, https://arxiv.org/abs/2103.12731.

`FightingcvHaloAttention` is `attnzoo.HaloAttention` (same blocks, windows, relative tables and
state_dict keys) with fightingcv's numbers. Its differences from the paper (and from the canonical
class, which follows the paper and timm):

- The padding mask is inverted. fightingcv unfolds a map of ones like the keys and fills the logits
  where it is *one*, the real keys, with `-finfo(dtype).max`, keeping the zero padding. A block whose
  window lies inside the map therefore has every logit equal and averages the values of its window
  uniformly (queries, keys and the relative tables play no part); a block touching the border puts all
  its weight on the padding, whose values are zero, and returns only the output projection's bias.
  No gradient reaches the queries, keys or tables (the logits are overwritten); the input gradient
  flows through the values of the inside blocks only. This class reproduces it (the logits are
  overwritten the same way); the masking fightingcv meant is `HaloAttention(mask_padding=True)`.
- An output projection `proj` (1x1 convolution with bias, fightingcv's `to_out` Linear) maps the
  `num_heads * head_dim` attention width back to `channels`; the paper (and timm) has none.
- The values are `head_dim` wide per head, like the queries and keys; the relative logits use the
  scaled queries (`scale_pos_embed=True`); the q, k, v projections have no bias; stride is 1.
- Initialisation as fightingcv: `nn.Linear`'s default for the projections, normal tables of std
  `head_dim ** -0.5`.

fightingcv's per-block `nn.Linear` layers become 1x1 convolutions (the same numbers); its `to_kv`
rows (all keys, then all values) are regrouped per head as the canonical `kv` (keys, values of head
0, then of head 1, ...). Where fightingcv asserts (`halo_size` 0; H or W no multiple of `block_size`;
input channels other than `dim`) this class raises `ValueError` (`halo_size=0` is accepted here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int
from attnzoo._fx import fx_leaf
from attnzoo.mechanisms.halo import HaloAttention

__all__ = ["FightingcvHaloAttention"]


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class FightingcvHaloAttention(HaloAttention):
    """`HaloAttention` with fightingcv's inverted padding mask and output projection (module
    docstring); `attnzoo.convert.from_fightingcv` builds it. Use `HaloAttention` for new models.

    Args:
        channels: Input and output channels C (fightingcv's `dim`).
        num_heads: Number of heads h (fightingcv's `heads`). Default: 8.
        head_dim: Query, key and value width d per head (fightingcv's `dim_head`). Default: 64.
        block_size: Side b of the query blocks. Default: 8.
        halo_size: Rows and columns each window adds around its block. Default: 3.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, H and W multiples of `block_size`.
        - Output: `(B, C, H, W)`.
        - Weights (`need_weights=True`): `(B, h, n_blocks, b^2, w^2)`, before the projection.

    Example:
        ```python
        >>> attn = FightingcvHaloAttention(16, num_heads=2, head_dim=4, block_size=2, halo_size=1)
        >>> attn(torch.randn(1, 16, 6, 4)).shape
        torch.Size([1, 16, 6, 4])

        ```
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        head_dim: int = 64,
        block_size: int = 8,
        halo_size: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        inner = check_int(num_heads, "num_heads", who) * check_int(head_dim, "head_dim", who)
        super().__init__(
            channels,
            out_channels=inner,
            num_heads=num_heads,
            head_dim=head_dim,
            block_size=block_size,
            halo_size=halo_size,
            scale_pos_embed=True,
            device=device,
            dtype=dtype,
        )
        self.proj = nn.Conv2d(inner, channels, 1, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """fightingcv's initialisation: `nn.Linear`'s default, tables normal of std $d^{-1/2}$."""
        for conv in (self.q, self.kv):
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))  # nn.Linear's default
        nn.init.normal_(self.pos_embed.height_rel, std=self.scale)
        nn.init.normal_(self.pos_embed.width_rel, std=self.scale)
        if isinstance(getattr(self, "proj", None), nn.Conv2d):
            self.proj.reset_parameters()

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """fightingcv's forward on `x` `(B, C, H, W)`; with `need_weights`, also its weights."""
        result = super().forward(x, need_weights)
        y, weights = result if isinstance(result, tuple) else (result, None)
        out = self.proj(y)  # (B, C, H, W)
        return out if weights is None else (out, weights)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, size: tuple[int, int], need_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """fightingcv's attention: the logits of the real keys are overwritten with the most negative
        number (its inverted mask), the padding keys keep theirs."""
        real = self._real_keys_per_head(size, q.device)  # (h*nb, 1, S)
        logits = (q * self.scale) @ k.transpose(-2, -1) + bias  # (B, h*nb, L, S)
        logits = logits.masked_fill(real, -torch.finfo(logits.dtype).max)
        weights = logits.softmax(dim=-1)  # (B, h*nb, L, S)
        out = weights @ v  # (B, h*nb, L, e)
        return (out, weights) if need_weights else out
