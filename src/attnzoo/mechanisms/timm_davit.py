"""timm's DaViT attention (`timm.models.davit`): the spatial blocks' `WindowAttention` (self-attention
within each window of tokens) and the channel blocks' `ChannelAttention` and `ChannelAttentionV2`
(each head's channels attend to each other, every token a feature): their constructors, calls `(x)`
and state_dict keys, run by `attnzoo.attend`.

Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022, https://arxiv.org/abs/2204.03645
(V2, with the dynamic scale: Xiao et al., "Florence-2", https://arxiv.org/abs/2311.06242, as timm's
`channel_attn_v2` models).

Window attention: $\\mathrm{softmax}(q k^\\top / \\sqrt d)\\,v$ per head over the `N` tokens of each
window `(B nW, N, C)`, then `proj` (no position bias; DaViT's blocks pad the map with zero tokens to
whole windows, which take part as keys). Channel attention, timm's `ChannelAttention` (the original
DaViT code's naming): with $q, k, v$ of shape `(N, d)` per head, the `d x d` weights
$A = \\mathrm{softmax}(k^\\top v / \\sqrt d)$ mix the query's channels, output $(A\\, q^\\top)^\\top$;
`ChannelAttentionV2`: $A = \\mathrm{softmax}(s\\, q^\\top k)$ mixes the values' channels, output
$(A\\, v^\\top)^\\top$, $s = N^{-1/2}$ (`dynamic_scale`, the default) or $d^{-1/2}$. Both run as
`attend` on the transposed heads `(B, h, d, N)`: `d` "tokens" of width `N`.

`attnzoo.convert.from_timm` converts the three (the same keys, so timm's checkpoint loads with
`strict=True`), and `attnzoo.replace(model, cls)` swaps a whole DaViT's attention with the same
logits; `attnzoo.capture_maps` then records the rows: over each window's tokens, or over each head's
`d` channels.

Heads that do not divide `dim` fail in timm's forward; here the constructor refuses them. Shape letters:
B batch, N tokens, C = dim, h heads, d = C / h, nW windows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmDavitChannelAttention", "TimmDavitChannelAttentionV2", "TimmDavitWindowAttention"]


class _Heads(nn.Module):
    """What the three share: `qkv` and `proj` Linear layers of width `dim` and the split into heads."""

    def _setup(self, dim: int, num_heads: int, qkv_bias: bool, dd: dict[str, Any]) -> None:
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """Queries, keys, values `(B, h, N, d)` each of the tokens `x` `(B, N, C)`, and `(B, N)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v, batch, tokens

    def _merge(self, out: Tensor, batch: int, tokens: int) -> Tensor:
        """The heads `(B, h, N, d)` -> `proj` of `(B, N, C)`."""
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim))


@register_compat(example=Example({"dim": 8, "window_size": (2, 3), "num_heads": 2}, ((2, 6, 8),), (2, 6, 8),
                                 channel_dim=-1))
class TimmDavitWindowAttention(_Heads):
    """timm's `davit.WindowAttention(dim, window_size, num_heads, qkv_bias=True)`
    (`attnzoo.compat.TimmDavitWindowAttention`): the module docstring says what it is; keys `qkv`,
    `proj`.

    $\\mathrm{softmax}(q k^\\top / \\sqrt d)\\,v$ per head over each window's tokens, then `proj`.
    `window_size` is kept (timm's attribute) and names the rows' grid when `N = Wh Ww`; the
    attention takes any `N`, as timm's.

    Shape:
        - x: `(B nW, N, C)`, the windows' tokens row-major.
        - Output: `(B nW, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        window_size: tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
            raise TypeError(f"{who}: window_size must be a pair (Wh, Ww), got {window_size!r}")
        self.window_size = (check_int(window_size[0], "window_size", who),
                            check_int(window_size[1], "window_size", who))
        self._setup(dim, num_heads, qkv_bias, {"device": device, "dtype": dtype})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}"

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention within each window `x` `(B nW, N, C)`: `(B nW, N, C)`."""
        q, k, v, batch, tokens = self._split(x)
        out = attend(q, k, v, scale=self.scale)  # (B nW, h, N, d)
        if capturing():  # map capture: rows of the capture's query points in each window
            wh, ww = self.window_size
            record_rows(self, q, k, grid=(wh, ww) if wh * ww == tokens else (tokens,), scale=self.scale)
        return self._merge(out, batch, tokens)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 6, 8),), (2, 6, 8), channel_dim=-1))
class TimmDavitChannelAttention(_Heads):
    """timm's `davit.ChannelAttention(dim, num_heads=8, qkv_bias=False)`
    (`attnzoo.compat.TimmDavitChannelAttention`): DaViT's channel attention, the module docstring says
    what it is; keys `qkv`, `proj`.

    $(\\mathrm{softmax}(k^\\top v / \\sqrt d)\\, q^\\top)^\\top$ per head, then `proj`. Time
    $O(B N C d)$: linear in the tokens.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(dim, num_heads, qkv_bias, {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        """Channel attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        q, k, v, batch, tokens = self._split(x)
        rows, cols, values = k.transpose(-1, -2), v.transpose(-1, -2), q.transpose(-1, -2)  # (B, h, d, N)
        out = attend(rows, cols, values, scale=self.scale)  # (B, h, d, N): k's channels mix q's
        if capturing():  # map capture: each head's channel rows
            record_rows(self, rows, cols, grid=(self.head_dim,), scale=self.scale, unit="channel")
        return self._merge(out.transpose(-1, -2), batch, tokens)


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 6, 8),), (2, 6, 8), channel_dim=-1))
class TimmDavitChannelAttentionV2(_Heads):
    """timm's `davit.ChannelAttentionV2(dim, num_heads=8, qkv_bias=True, dynamic_scale=True)`
    (`attnzoo.compat.TimmDavitChannelAttentionV2`): the channel attention of timm's `channel_attn_v2`
    DaViTs (Florence-2's vision tower); keys `qkv`, `proj`.

    $(\\mathrm{softmax}(s\\, q^\\top k)\\, v^\\top)^\\top$ per head, $s = N^{-1/2}$ with
    `dynamic_scale`, else $d^{-1/2}$; then `proj`.

    Shape:
        - x: `(B, N, C)`.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        dynamic_scale: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(dim, num_heads, qkv_bias, {"device": device, "dtype": dtype})
        self.groups = self.num_heads  # timm's name for the heads
        self.dynamic_scale = bool(dynamic_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dynamic_scale={self.dynamic_scale}"

    def forward(self, x: Tensor) -> Tensor:
        """Channel attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        q, k, v, batch, tokens = self._split(x)
        scale = tokens**-0.5 if self.dynamic_scale else self.scale
        rows, cols = q.transpose(-1, -2), k.transpose(-1, -2)  # (B, h, d, N)
        if isinstance(scale, Tensor):  # jit.trace gives the token count as a tensor: scale q, as timm does
            rows, scale = rows * torch.as_tensor(tokens, dtype=rows.dtype) ** -0.5, 1.0
        out = attend(rows, cols, v.transpose(-1, -2), scale=scale)  # (B, h, d, N): q's channels mix v's
        if capturing():  # map capture: each head's channel rows
            record_rows(self, rows, cols, grid=(self.head_dim,), scale=scale, unit="channel")
        return self._merge(out.transpose(-1, -2), batch, tokens)
