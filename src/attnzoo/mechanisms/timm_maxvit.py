"""timm's MaxViT / CoAtNet attention (`timm.models.maxxvit`): `Attention2d` (NCHW maps, 1x1
convolution `qkv` and `proj`; CoAtNet's transformer blocks and MaxViT's `use_nchw_attn` partitions)
and `AttentionCl` (channels-last windows `(B, H, W, C)`, Linear `qkv` and `proj`; MaxViT's window
and grid partitions): their constructors, calls `(x, shared_rel_pos=None)` and state_dict keys, run by
`attnzoo.attend`.

Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022, https://arxiv.org/abs/2204.01697;
Dai et al., "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021,
https://arxiv.org/abs/2106.04803.

Multi-head self-attention over the `N` tokens of `x` with heads of a fixed width `dim_head`:
$\\mathrm{softmax}(q k^\\top / \\sqrt{d} + B)\\,v$ per head, then `proj`. The attention width is
`dim_out` or `dim` (`expand_first`: whether the expansion to `dim_out` happens in `qkv` or in
`proj`), `h = width / dim_head` heads. `qkv`'s `3 h d` output channels are laid out per head
(`head_first=True`: `[q_1 k_1 v_1 q_2 k_2 v_2 ...]`, timm's own models) or per projection
(`head_first=False`: `[q_1 q_2 ... k_1 k_2 ... v_1 v_2 ...]`, the TensorFlow MaxViT weights).

The bias `B` is that of the `rel_pos` submodule (timm's `RelPosBias`, `RelPosMlp` or `RelPosBiasTf`
from `timm.layers.pos_embed_rel`, built by `rel_pos_cls(num_heads=h)` as timm does; its
`get_bias()` gives `(1, h, N, N)` or `(h, N, N)` for its window), else `shared_rel_pos`, else none.
This is timm's default (fused) path: `rel_pos` wins and `shared_rel_pos` is then ignored. timm's
other path (`fused_attn=False`) calls `rel_pos(attn, shared_rel_pos=...)` instead, which for all
three classes also adds `get_bias()` and ignores `shared_rel_pos`, so the two agree, dropout draws
included on the CPU. They differ for a bool `shared_rel_pos`: the fused path (and this class) takes
it as a mask (True = may attend), the other path adds it as 0/1. `RelPosMlp`'s hidden dropout (p =
0.125 in training) draws before the attention's, as in timm.

`attnzoo.convert.from_timm` converts timm's modules (`rel_pos` deep-copied, the same keys, so timm's
checkpoint loads with `strict=True`; a `rel_pos` other than timm's three is refused there, while
`rel_pos_cls` here may build any module with a `get_bias()`), and `attnzoo.replace(model, cls)`
swaps a whole MaxViT or CoAtNet's attention with the same logits; `attnzoo.capture_maps` then
records the rows over the tokens of each call (MaxViT's partitions: one row set per window or grid
cell, in the batch).

timm's `Attention2d` does not check that `dim_head` divides its width: it then mixes positions and
channels into wrong "tokens" (even maps) or fails (odd ones). Here both classes refuse it.

Shape letters: B batch, C = dim, (H, W) the map, N tokens, h heads, d = dim_head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_mask, check_shape, check_tensor
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmMaxxvitAttention2d", "TimmMaxxvitAttentionCl"]


class _MaxxvitAttention(nn.Module):
    """What `Attention2d` and `AttentionCl` share: options, the bias rule and the attention."""

    def _setup(self, dim: int, dim_out: int | None, dim_head: int, expand_first: bool, head_first: bool,
               attn_drop: float, proj_drop: float, expand_if_wider: bool) -> tuple[int, int, int]:
        """Check the options and set the attributes; `(dim, dim_out, attention width)`."""
        who = type(self).__name__
        dim = check_int(dim, "dim", who)
        dim_out = dim if dim_out is None or dim_out == 0 else check_int(dim_out, "dim_out", who)
        self.dim_head = check_int(dim_head, "dim_head", who)
        self.expand_first = bool(expand_first)
        # AttentionCl expands in qkv only when dim_out is wider; Attention2d whenever expand_first
        expand = self.expand_first and (dim_out > dim or not expand_if_wider)
        dim_attn = dim_out if expand else dim
        if dim_attn % self.dim_head:
            raise ValueError(f"{who}: the attention width {dim_attn} ({'dim_out' if expand else 'dim'}) must "
                             f"be divisible by dim_head={self.dim_head}")
        self.dim, self.dim_out, self.dim_attn = dim, dim_out, dim_attn
        self.num_heads = dim_attn // self.dim_head
        self.head_first = bool(head_first)
        self.scale = self.dim_head**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        return dim, dim_out, dim_attn

    def _rel_pos(self, rel_pos_cls: Callable[..., nn.Module] | None, dd: dict[str, Any]) -> None:
        """`rel_pos` between `qkv` and `proj` (timm's order of parameters), also when None: the converter
        puts timm's module there."""
        self.register_module("rel_pos", rel_pos_cls(num_heads=self.num_heads, **dd) if rel_pos_cls else None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, dim_out={self.dim_out}, dim_head={self.dim_head}, "
                f"num_heads={self.num_heads}, expand_first={self.expand_first}, head_first={self.head_first}")

    def _split(self, qkv: Tensor, batch: int, tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """`qkv`'s output `(B, N, 3 h d)` -> queries, keys, values `(B, h, N, d)` each."""
        if self.head_first:  # [q_1 k_1 v_1 q_2 ...]
            parts = qkv.reshape(batch, tokens, self.num_heads, 3, self.dim_head).permute(3, 0, 2, 1, 4)
        else:  # [q_1 q_2 ... k_1 ... v_1 ...]
            parts = qkv.reshape(batch, tokens, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = parts.unbind(0)
        return q, k, v

    def _terms(
        self, shared_rel_pos: Tensor | None, batch: int, tokens: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """`(bias, mask)` for `attend` by timm's rule, checked before any projection runs."""
        who = type(self).__name__
        target = (batch, self.num_heads, tokens, tokens)
        bias = mask = None
        rel_pos: Any = self.rel_pos  # timm's RelPosBias, RelPosMlp, RelPosBiasTf (or any with get_bias())
        if rel_pos is not None:  # timm's fused path: rel_pos wins, shared_rel_pos is ignored
            bias = rel_pos.get_bias()  # RelPosMlp's dropout draws here, before the attention's, as timm's
            check_tensor(bias, who, "rel_pos.get_bias()")
            check_mask(bias, target, who, "rel_pos.get_bias() (its window's bias, for the N tokens of x)")
        elif shared_rel_pos is not None:
            check_mask(shared_rel_pos, target, who, "shared_rel_pos")
            if shared_rel_pos.dtype == torch.bool:  # SDPA's mask, as timm's fused path passes it
                mask = shared_rel_pos
            else:
                bias = shared_rel_pos
        return bias, mask

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
                grid: tuple[int, ...]) -> Tensor:
        """The heads' outputs `(B, h, N, d)`."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, bias=bias, mask=mask, dropout_p=dropout_p, scale=self.scale)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=grid, bias=bias, mask=mask, scale=self.scale)
        return out


@register_compat(example=Example({"dim": 8, "dim_head": 4}, ((2, 8, 3, 5),), (2, 8, 3, 5)))
class TimmMaxxvitAttention2d(_MaxxvitAttention):
    """timm's `maxxvit.Attention2d(dim, dim_out=None, dim_head=32, bias=True, expand_first=True,
    head_first=True, rel_pos_cls=None, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmMaxxvitAttention2d`): the module docstring says what it is; keys `qkv`,
    `proj` (1x1 convolutions) and `rel_pos`'s.

    $\\mathrm{softmax}(q k^\\top / \\sqrt d + B)\\,v$ per head over the `H W` positions, then `proj`;
    the width is `dim_out` with `expand_first`, else `dim`. Time $O(B (H W)^2 \\cdot \\text{width})$.

    Shape:
        - x: `(B, C, H, W)`; shared_rel_pos: float (added) or bool (True = may attend), broadcastable to
          `(B, h, H W, H W)`, or None (ignored when `rel_pos` is set, as in timm).
        - Output: `(B, dim_out, H, W)`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        dim_head: int = 32,
        bias: bool = True,
        expand_first: bool = True,
        head_first: bool = True,
        rel_pos_cls: Callable[..., nn.Module] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        dim, dim_out, dim_attn = self._setup(dim, dim_out, dim_head, expand_first, head_first, attn_drop,
                                             proj_drop, expand_if_wider=False)
        self.qkv = nn.Conv2d(dim, dim_attn * 3, 1, bias=bias, **dd)
        self._rel_pos(rel_pos_cls, dd)
        self.proj = nn.Conv2d(dim_attn, dim_out, 1, bias=bias, **dd)

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:
        """Self-attention over the positions of the map `x` `(B, C, H, W)`: `(B, dim_out, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        tokens = height * width
        bias, mask = self._terms(shared_rel_pos, batch, tokens)
        qkv = self.qkv(x).flatten(2).transpose(1, 2)  # (B, N, 3 h d)
        q, k, v = self._split(qkv, batch, tokens)
        out = self._attend(q, k, v, bias, mask, (height, width))  # (B, h, N, d)
        out = out.transpose(-1, -2).reshape(batch, self.dim_attn, height, width)  # channels h-major
        return self.proj_drop(self.proj(out))


@register_compat(example=Example({"dim": 8, "dim_head": 4}, ((2, 3, 5, 8),), (2, 3, 5, 8), channel_dim=-1))
class TimmMaxxvitAttentionCl(_MaxxvitAttention):
    """timm's `maxxvit.AttentionCl(dim, dim_out=None, dim_head=32, bias=True, expand_first=True,
    head_first=True, rel_pos_cls=None, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmMaxxvitAttentionCl`): the module docstring says what it is; keys `qkv`,
    `proj` (Linear) and `rel_pos`'s.

    $\\mathrm{softmax}(q k^\\top / \\sqrt d + B)\\,v$ per head over the `H W` tokens of each window,
    then `proj`; the width is `dim_out` when `expand_first` and `dim_out > dim`, else `dim`.

    timm's takes `(B, ..., C)` with any number of token dimensions; this class takes MaxViT's 4-D
    windows (or grid cells) `(B, H, W, C)` only (tokens `(B, N, C)` go in as `x.unsqueeze(1)`), so
    that a tensor of the wrong rank is an error rather than a differently batched input.

    Shape:
        - x: `(B, H, W, C)`, N = H W tokens (MaxViT: `(B nW, Wh, Ww, C)`); shared_rel_pos: float (added)
          or bool (True = may attend), broadcastable to `(B, h, N, N)`, or None (ignored when
          `rel_pos` is set, as in timm).
        - Output: `(B, H, W, dim_out)`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        dim_head: int = 32,
        bias: bool = True,
        expand_first: bool = True,
        head_first: bool = True,
        rel_pos_cls: Callable[..., nn.Module] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        dim, dim_out, dim_attn = self._setup(dim, dim_out, dim_head, expand_first, head_first, attn_drop,
                                             proj_drop, expand_if_wider=True)
        self.qkv = nn.Linear(dim, dim_attn * 3, bias=bias, **dd)
        self._rel_pos(rel_pos_cls, dd)
        self.proj = nn.Linear(dim_attn, dim_out, bias=bias, **dd)

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:
        """Self-attention over the tokens of the windows `x` `(B, H, W, C)`: `(B, H, W, dim_out)`."""
        who = type(self).__name__
        if isinstance(x, Tensor) and x.ndim != 4:  # timm's takes any token dimensions; say how
            raise ValueError(f"{who} expects x of shape (B, H, W, {self.dim}) (4-D, MaxViT's windows), got "
                             f"{tuple(x.shape)} ({x.ndim}-D); tokens (B, N, C) go in as x.unsqueeze(1)")
        dims = check_shape(x, who, "B H W C", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        tokens = height * width
        bias, mask = self._terms(shared_rel_pos, batch, tokens)
        q, k, v = self._split(self.qkv(x).reshape(batch, tokens, -1), batch, tokens)
        out = self._attend(q, k, v, bias, mask, (height, width))  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(batch, height, width, self.dim_attn)
        return self.proj_drop(self.proj(out))
