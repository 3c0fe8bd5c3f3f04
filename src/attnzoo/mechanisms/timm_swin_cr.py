"""timm's Swin V2 "CR" window attention (`timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention`,
Christoph Reich's Swin V2 in timm): its constructor, call on windows and state_dict keys, attnzoo's
scaled cosine window attention inside.

Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022,
https://arxiv.org/abs/2111.09883.

The CR variant differs from timm's other Swin V2 (`attnzoo.compat.TimmWindowAttentionV2`) in its
position bias: a two-layer meta network `meta_mlp` (ReLU, with dropout 0.125 after the first layer in
training, timm's choice) maps the log-spaced offsets $\\mathrm{sign}(\\Delta) \\log(1 + |\\Delta|)$ of every
query-key pair straight to one bias per head, without V2's `16 sigmoid` squashing; and all of `qkv`
has a bias. `attnzoo.convert.from_timm` converts timm's module (the same keys, so timm's checkpoint
loads with `strict=True`; its meta network is copied as it is), and `attnzoo.replace` swaps a whole
`SwinTransformerV2Cr` with the same logits, dropout draws included.

Shape letters: B' windows of all images (B nW), N = Wh Ww tokens per window, C channels, h heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms.swin_v2 import cosine_window_attention
from attnzoo.mechanisms.swin_v2_timm import window_mask

__all__ = ["TimmWindowMultiHeadAttention"]

# timm's FIXME-marked dropout inside the meta network (`Mlp(..., drop=(0.125, 0.))`)
_META_DROP = 0.125


class _MetaMlp(nn.Module):
    """timm's `Mlp(2, hidden, heads, act_layer=nn.ReLU, drop=(0.125, 0.))`: the same keys (`fc1`, `fc2`)
    and the same calls, so one seed gives one dropout mask."""

    def __init__(self, hidden: int, heads: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, hidden, **dd)
        self.act = nn.ReLU()
        self.drop1 = nn.Dropout(_META_DROP)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, heads, **dd)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def log_offsets(
    window: tuple[int, int], device: torch.device | str | None, dtype: torch.dtype | None
) -> Tensor:
    """`sign(d) log(1 + |d|)` of the (dy, dx) offset of every pair of the window's tokens `(N N, 2)`,
    computed in float32 and cast, as timm's `_make_pair_wise_relative_positions`."""
    rows, cols = torch.meshgrid(torch.arange(window[0], dtype=torch.float32, device=device),
                                torch.arange(window[1], dtype=torch.float32, device=device), indexing="ij")
    coords = torch.stack([rows, cols]).flatten(1)  # (2, N)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2)  # (N N, 2)
    # log(1 + |d|), not log1p: timm's float32 rounding, so the table is timm's to the last bit
    return (torch.sign(offsets) * torch.log(1.0 + offsets.abs())).to(dtype or torch.get_default_dtype())


@register_compat(example=Example({"dim": 8, "num_heads": 2, "window_size": (2, 3)}, ((4, 6, 8),), (4, 6, 8),
                                 channel_dim=-1))
class TimmWindowMultiHeadAttention(nn.Module):
    """timm's `swin_transformer_v2_cr.WindowMultiHeadAttention(dim, num_heads, window_size,
    drop_attn=0., drop_proj=0., meta_hidden_dim=384, sequential_attn=False)`
    (`attnzoo.compat.TimmWindowMultiHeadAttention`): the module docstring says what it is.

    $\\mathrm{softmax}(\\tau_h \\cos(q, k) + \\mathrm{MLP}(\\log\\Delta)_h + M)\\,v$ per window and head,
    $\\tau_h = \\exp(\\min(\\theta_h, \\log 100))$, then `proj`. `sequential_attn` is kept as an attribute
    (timm's forward does not read it).

    Shape:
        - x: `(B', N, C)` windows; mask: float `(nW, N, N)` added to the logits of every image's
          windows (nW dividing B'), or None.
        - Output: `(B', N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int],
        drop_attn: float = 0.0,
        drop_proj: float = 0.0,
        meta_hidden_dim: int = 384,
        sequential_attn: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)
        self.window_size = int_pair(window_size, "window_size", who)
        self.sequential_attn = bool(sequential_attn)
        self.attn_drop = check_dropout(drop_attn, "drop_attn", who)
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(drop_proj, "drop_proj", who)
        self.meta_mlp = _MetaMlp(check_int(meta_hidden_dim, "meta_hidden_dim", who), num_heads, dd)
        self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(10.0), **dd))  # timm's start
        self.register_buffer("relative_coordinates_log", log_offsets(self.window_size, device, dtype),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"

    def set_window_size(self, window_size: int | Sequence[int]) -> None:
        """A new window (timm's `set_input_size` calls it): the offsets follow."""
        self.window_size = int_pair(window_size, "window_size", type(self).__name__)
        self.init_non_persistent_buffers()

    def reset_parameters(self) -> None:
        """timm's start: the logit scale at log 10, the offsets recomputed (the children reset themselves)."""
        nn.init.constant_(self.logit_scale, math.log(10.0))
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Refill the offset table (timm's hook, called after a meta-device build)."""
        old = self.get_buffer("relative_coordinates_log")
        self.register_buffer("relative_coordinates_log", log_offsets(self.window_size, old.device, old.dtype),
                             persistent=False)

    def position_bias(self) -> Tensor:
        """The meta network's bias `(h, N, N)` (stochastic in training: the network's dropout)."""
        n = self.window_size[0] * self.window_size[1]
        return self.meta_mlp(self.relative_coordinates_log).transpose(0, 1).reshape(self.num_heads, n, n)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Cosine attention inside each window of `x` `(B', N, C)`, timm's mask added: `(B', N, C)`."""
        who = type(self).__name__
        n = self.window_size[0] * self.window_size[1]
        windows = check_shape(x, who, "B N C", N=n, C=self.dim)["B"]
        attn_mask = window_mask(mask, windows, n, x.dtype, who)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (B', N, 3, h, d)
        bias = self.position_bias()  # before the attention's dropout: timm's order of draws
        capture = capturing()
        out, weights = cosine_window_attention(  # out: (B', N, C)
            qkv, self.logit_scale.view(-1, 1, 1), bias, attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0, need_weights=capture,
        )
        if capture and weights is not None:
            queries = torch.arange(n, device=x.device)
            record(self, "rows", weights.detach(), grid=self.window_size, queries=queries,
                   query_grid=self.window_size)
        return self.proj_drop(self.proj(out))
