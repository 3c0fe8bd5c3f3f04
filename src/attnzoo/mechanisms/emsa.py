"""Efficient multi-head self-attention (EMSA), "ResT: An Efficient Transformer for Visual Recognition"
(Zhang and Yang, 2021), arXiv:2105.13677.

The tokens of an H x W map attend to a spatially reduced copy of themselves: a depth-wise convolution
(kernel r + 1, stride r, padding r // 2) and a LayerNorm shrink the keys/values to $N' \\approx N / r^2$
tokens. With more than one head, the $h$ attention maps are mixed by a 1 x 1 convolution across heads,
then softmax-ed and instance-normalised (the paper's "transform"); with one head (or the transform
off), plain softmax.

Deviations from fightingcv's `EMSA`: self-attention only (fightingcv takes `queries, keys, values` but
ignores keys and values when `ratio > 1`); its `attention_mask` is applied *after* the normalisation
with $-\\infty$ (every masked entry turns the output into $\\pm\\infty$/NaN) and is not offered here,
nor is its multiplicative `attention_weights`. On a 1 x 1 map with the transform, fightingcv's
`nn.InstanceNorm2d` raises (one element); the instance norm here gives 0 there. The map size is given
per call (`size=(H, W)`, like ResT's `forward(x, H, W)`), not fixed in the constructor.

Shape letters: B batch, N = H W tokens, C channels (`dim`), h heads, d head width, N' reduced tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_head_widths, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["EMSA"]


def _instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Instance norm over the last two dims without affine (`nn.InstanceNorm2d(h)`), also for a
    single element (torch's refuses one: here it gives 0)."""
    if x.shape[-2] * x.shape[-1] > 1:  # torch's fused kernel: one pass forward, one backward
        return F.instance_norm(x, eps=eps)  # (B, h, N, N'): each (b, h) map normalised
    var, mean = torch.var_mean(x, dim=(-2, -1), correction=0, keepdim=True)  # (B, h, 1, 1) each
    return (x - mean) * torch.rsqrt(var + eps)


def _mix_heads(conv: nn.Conv2d, attn: Tensor) -> Tensor:
    """The 1x1 convolution across heads as one batched product: `(h, h) @ (B, h, N*N')` (+ bias).

    The same numbers as `conv(attn)`; oneDNN's convolution takes tens of milliseconds for this
    h x h mix of (B, h, N, N') maps (h = 2: 20 ms forward, 30 ms backward at ResT's stage 2).
    """
    b, h = attn.shape[0], attn.shape[1]
    flat = attn.reshape(b, h, -1)  # (B, h, N, N') -> (B, h, N*N')
    weight = conv.weight.view(h, h).expand(b, h, h)  # (h, h, 1, 1) -> (B, h, h)
    if conv.bias is None:
        return torch.bmm(weight, flat).view_as(attn)
    return torch.baddbmm(conv.bias.view(h, 1), weight, flat).view_as(attn)  # bias broadcast over N*N'


@register(
    "emsa",
    family="emsa",
    paper="ResT: An Efficient Transformer for Visual Recognition",
    year=2021,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "sr_ratio": 2},
        inputs=((2, 9, 8),),
        output=(2, 9, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 0),), 0),),
    ),
    aliases=("efficient_multi_head_self_attention", "rest"),
    for_input=lambda geo: {"feat_size": tuple(geo.spatial)} if len(geo.spatial) == 2 else {},
)
class EMSA(nn.Module):
    r"""ResT's efficient multi-head self-attention over the tokens of an H x W map.

    $$
    \hat X = \mathrm{LN}(\mathrm{DWConv}_{r}(X)), \qquad
    A = \mathrm{IN}(\mathrm{softmax}(\mathrm{Conv}_{1\times1}(Q \hat K^\top / \sqrt{d}))), \qquad
    Y = W_o\,\mathrm{concat}_h(A \hat V)
    $$

    with $Q = X W_q$, $\hat K = \hat X W_k$, $\hat V = \hat X W_v$; the 1 x 1 convolution mixes the h
    heads, IN is an instance norm over each head's $N \times N'$ map (no affine). Without the
    transform (`apply_transform=False` or one head) $A = \mathrm{softmax}(Q\hat K^\top/\sqrt d)$;
    with `sr_ratio=1`, $\hat X = X$. Time $O(B N N' h (d + d_v) + B N C h (d + d_v))$, memory
    $O(B h N N' + B N C)$ with $N' = H' W' \approx N / r^2$,
    $H' = \lfloor (H + 2\lfloor r/2 \rfloor - r - 1) / r \rfloor + 1$ (likewise W').

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h. Default: 8.
        head_dim: Query/key head width d (fightingcv's `d_k`). Default: None (`dim // num_heads`,
            which then must divide).
        value_head_dim: Value head width (fightingcv's `d_v`). Default: None (`head_dim`).
        sr_ratio: Spatial reduction r of the keys/values (fightingcv's `ratio`); 1 for none.
            Default: 1.
        apply_transform: Mix the heads' maps (1 x 1 conv, softmax, instance norm); only with more
            than one head. Default: True.
        qkv_bias: Biases on the query/key/value projections. Default: True.
        attn_drop: Dropout on the attention map (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        feat_size: The map size `(H, W)` (or one int for a square) when a call gives no `size`
            (fightingcv's `H`, `W`). Default: None (a square map).
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, N, C)` with N = H W; `size=(H, W)` (default: `feat_size`, else a square map).
        - Output: `(B, N, C)`; with `need_weights=True` also the map `(B, h, N, N')`.

    Example:
        ```python
        >>> attn = EMSA(64, num_heads=4, sr_ratio=2)
        >>> x = torch.randn(2, 7 * 5, 64)
        >>> attn(x, size=(7, 5)).shape
        torch.Size([2, 35, 64])
        >>> attn(x, need_weights=True, size=(7, 5))[1].shape
        torch.Size([2, 4, 35, 12])

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        sr_ratio: int = 1,
        apply_transform: bool = True,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        feat_size: int | tuple[int, int] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.feat_size = None if feat_size is None else int_pair(feat_size, "feat_size", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, self.value_head_dim = check_head_widths(dim, num_heads, head_dim, value_head_dim, who)
        self.sr_ratio = check_int(sr_ratio, "sr_ratio", who)
        self.apply_transform = apply_transform and num_heads > 1
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        qk, vw = num_heads * self.head_dim, num_heads * self.value_head_dim
        self.q = nn.Linear(dim, qk, bias=qkv_bias, **factory)
        self.k = nn.Linear(dim, qk, bias=qkv_bias, **factory)
        self.v = nn.Linear(dim, vw, bias=qkv_bias, **factory)
        self.proj = nn.Linear(vw, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        if sr_ratio > 1:
            r = sr_ratio
            self.sr = nn.Conv2d(dim, dim, r + 1, stride=r, padding=r // 2, groups=dim, **factory)
            self.sr_norm = nn.LayerNorm(dim, **factory)
        if self.apply_transform:
            self.transform = nn.Conv2d(num_heads, num_heads, 1, **factory)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"value_head_dim={self.value_head_dim}, sr_ratio={self.sr_ratio}, "
                f"apply_transform={self.apply_transform}")

    def _size(self, length: int, size: tuple[int, int] | None) -> tuple[int, int]:
        who = type(self).__name__
        if size is None and self.feat_size is not None and self.feat_size[0] * self.feat_size[1] == length:
            return self.feat_size
        if size is None:
            # Dynamo cannot trace math.isqrt of the SymInt that N is under torch.compile with dynamic
            # shapes (a graph break, an error with fullgraph=True); math.sqrt it can, and that is exact on
            # the square of any side below 2**26, which the check below confirms.
            side = int(math.sqrt(length)) if torch.compiler.is_compiling() else math.isqrt(length)
            if side * side != length:
                raise ValueError(
                    f"{who} expects size=(H, W) for x with N={length} tokens (not a square, "
                    f"feat_size={self.feat_size})"
                )
            return side, side
        height, width = int_pair(size, "size", who)
        if height * width != length:
            raise ValueError(f"{who} expects size=(H, W) with H*W = N={length}, got {(height, width)}")
        return height, width

    def forward(
        self, x: Tensor, need_weights: bool = False, *, size: tuple[int, int] | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Self-attention over the map's tokens; `(out, weights)` with `need_weights`.

        Args:
            x: Tokens `(B, N, C)` of an H x W map, row-major.
            need_weights: Also return the `(B, h, N, N')` map. Default: False.
            size: The map size `(H, W)`. Default: None (`feat_size` if it has N tokens, else a
                square map).
        """
        dims = check_shape(x, type(self).__name__, "B N C", "x", C=self.dim)
        return self._attention(x, x, x, self._size(dims["N"], size), need_weights)

    def _attention(
        self, x: Tensor, keys: Tensor, values: Tensor, grid: tuple[int, int], need_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Queries from `x` `(B, N, C)` on the `grid` map; keys and values from `keys` and `values`
        `(B, N_k, C)` without reduction (fightingcv's call projects them separately), else from the reduced
        map of `x`. The canonical forward passes `x` three times."""
        height, width = grid
        h = self.num_heads
        q = self.q(x).unflatten(-1, (h, self.head_dim)).transpose(1, 2)  # (B, h, N, d)
        k_in, v_in = keys, values
        key_grid = (height, width) if keys.shape[1] == height * width else (1, keys.shape[1])
        if self.sr_ratio > 1:
            grid_map = x.transpose(1, 2).unflatten(-1, (height, width))  # (B, C, H, W)
            reduced = self.sr(grid_map)  # (B, C, H', W')
            key_grid = (reduced.shape[2], reduced.shape[3])
            k_in = v_in = self.sr_norm(reduced.flatten(2).transpose(1, 2))  # (B, N', C)
        k = self.k(k_in).unflatten(-1, (h, self.head_dim)).transpose(1, 2)  # (B, h, N', d)
        v = self.v(v_in).unflatten(-1, (h, self.value_head_dim)).transpose(1, 2)  # (B, h, N', dv)
        attn = q @ k.transpose(-2, -1) / self.head_dim**0.5  # (B, h, N, N')
        if self.apply_transform:
            attn = _instance_norm(_mix_heads(self.transform, attn).softmax(dim=-1))  # mix heads, softmax, IN
        else:
            attn = attn.softmax(dim=-1)
        if capturing():  # the rows of the capture's queries over the (reduced) key grid
            idx = query_indices((height, width), x.device)
            note = "after head mixing and instance norm, signed" if self.apply_transform else None
            record(self, "rows", attn[:, :, idx], grid=key_grid, queries=idx, query_grid=(height, width),
                   **({"note": note} if note else {}))
        out = self.attn_drop(attn) @ v  # (B, h, N, dv)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))  # (B, N, h dv) -> (B, N, C)
        return (out, attn) if need_weights else out
