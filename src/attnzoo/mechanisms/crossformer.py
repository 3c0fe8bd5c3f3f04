"""CrossFormer's long/short distance attention (LSDA) with a dynamic position bias, "CrossFormer: A Versatile
Vision Transformer Hinging on Cross-scale Attention" (Wang et al., ICLR 2022), arXiv:2108.00154; official
code cheerss/CrossFormer (`models/crossformer.py`).

- `CrossFormerAttention` (registered `crossformer`): LSDA over a whole `(B, H, W, C)` map. Short distance
  attention (SDA) groups adjacent `G x G` tokens; long distance attention (LDA) groups the tokens sampled
  at interval I inside each `GI x GI` region. The map is zero-padded at the bottom/right up to multiples
  of G (SDA) or G*I (LDA) and padded keys are masked, as the official `CrossFormerBlock` does; maps no
  larger than G on a side use SDA with `G = min(H, W)` (its small-map rule).
- `CrossFormerGroupAttention`: the official `Attention(dim, group_size, num_heads, ...)` on tokens already
  grouped, `(B * nG, N, C)`: the official keys (`qkv`, `pos.*`, `proj`), `forward(x, mask, need_weights)`.
- `DynamicPosBias`: the DPB MLP mapping a relative offset `(dh, dw)` to one bias per head.

Deviations (docs/mechanisms/crossformer.md): the official `biases` and `relative_position_index` are
recomputed from the group size (a checkpoint with them loads: checked, dropped); padded keys get
`finfo.min / 2`, not `-1e6` (finite in half precision); the DPB is `dim // 16` wide as the official
code, but at least 1 (the official one is 0 wide below dim 16: a constant per head, ignored).

Shape letters: B batch, H/W map size, C channels, h heads, d head width, G group side, I interval,
N tokens per group (G*G, or any N without the position bias), nG groups per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import (
    check_choice,
    check_divisible,
    check_dropout,
    check_float,
    check_int,
    check_shape,
    check_tensor,
    checked,
)
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, FreeSize, register
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_2d
from attnzoo.kernels.biased import biased_attention
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_packed_rows
from attnzoo.mechanisms.crossformer_groups import (
    group_partition,
    group_reverse,
    groups_to_image,
    relative_offsets,
)

__all__ = ["CrossFormerAttention", "CrossFormerGroupAttention", "DynamicPosBias", "group_partition",
           "group_reverse", "relative_offsets"]

_DERIVED = ("biases", "relative_position_index")  # the official buffers, derived from the group size


class DynamicPosBias(nn.Module):
    """CrossFormer's dynamic position bias: an MLP from a relative offset `(dh, dw)` to one bias per head,
    `Linear(2, D)`, then twice `LayerNorm, ReLU, Linear(D, D)`, then `LayerNorm, ReLU, Linear(D, h)`
    (the official module with `residual=False`, the only setting its attention uses).

    Args:
        pos_dim: Hidden width D.
        num_heads: Heads h.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(T, 2)` offsets. Output: `(T, h)`.
    """

    def __init__(self, pos_dim: int, num_heads: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.pos_dim, self.num_heads = pos_dim, num_heads
        self.pos_proj = nn.Linear(2, pos_dim, **factory)

        def layer(width: int) -> nn.Sequential:
            norm = nn.LayerNorm(pos_dim, **factory)
            return nn.Sequential(norm, nn.ReLU(), nn.Linear(pos_dim, width, **factory))

        self.pos1, self.pos2, self.pos3 = layer(pos_dim), layer(pos_dim), layer(num_heads)

    def forward(self, offsets: Tensor) -> Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))  # (T, h)


@checked  # the shared option and input checks, as registered classes get
class CrossFormerGroupAttention(nn.Module):
    r"""Multi-head self-attention inside each group with CrossFormer's dynamic position bias.

    $\mathrm{softmax}(s\,QK^\top + B + M)\,V$ per group, $B[h, i, j] = \mathrm{DPB}(p_i - p_j)_h$ with
    $p_i$ the `(row, column)` of token i in the group and M the optional additive mask.

    The official `Attention(dim, group_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop,
    position_bias)` with its parameter names (`qkv`, `pos.pos_proj`, `pos.pos1.0`, ..., `proj`);
    the official buffers `biases` and `relative_position_index` are not kept (they follow from the
    group size), and a state_dict that has them (fightingcv's) loads with `strict=True` after they
    are checked. `attnzoo.convert.from_fightingcv` converts fightingcv's module to this one.

    Args:
        dim: Channels C.
        group_size: `(Gh, Gw)`, or an int for a square group. Default: 7.
        num_heads: Heads h; must divide `dim`. Default: 8.
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale s; None (or 0, as the official `qk_scale or ...`) means `d ** -0.5`.
            Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        position_bias: Add the dynamic position bias; its hidden width is `max(dim // 16, 1)`.
            Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B * nG, Gh*Gw, C)` (any N without `position_bias`), groups image-major.
        - mask: `(nG, N, N)` additive float, or None.
        - Output: like x; with `need_weights=True`, `(output, weights)`, weights `(B * nG, h, N, N)`.

    Example:
        ```python
        >>> attn = CrossFormerGroupAttention(32, (4, 4), 2)
        >>> attn(torch.randn(6, 16, 32)).shape
        torch.Size([6, 16, 32])

        ```
    """

    def __init__(
        self,
        dim: int,
        group_size: int | Sequence[int] = 7,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position_bias: bool = True,
        *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.group_size = int_pair(group_size, "group_size", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)
        scale = check_float(qk_scale, "qk_scale", who) if qk_scale is not None else 0.0
        self.scale = scale or (dim // num_heads) ** -0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.position_bias = bool(position_bias)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if self.position_bias:
            self.pos = DynamicPosBias(max(dim // 16, 1), num_heads, **factory)  # official: dim // 16
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # fightingcv's module saves the derived buffers; accept them when they fit this group size. Below
        # dim 16 its bias MLP is 0 wide (a constant per head, which the softmax ignores): such a checkpoint
        # loads into `position_bias=False`, what from_fightingcv makes of that module.
        zero_wide = state_dict.get(prefix + "pos.pos_proj.weight")
        flat = not self.position_bias and zero_wide is not None and zero_wide.numel() == 0
        for key in [k for k in state_dict if flat and k.startswith(prefix + "pos.")]:
            del state_dict[key]
        for name in _DERIVED:
            key = prefix + name
            if key not in state_dict:
                continue
            given = state_dict.pop(key)
            if not self.position_bias:
                unexpected_keys.extend([] if flat else [key])
                continue
            device = None if given.device.type == "meta" else given.device
            own = (relative_offsets(self.group_size, device, given.dtype) if name == "biases"
                   else relative_position_index_2d(self.group_size, device))
            same = given.shape == own.shape and (device is None or torch.equal(given, own))
            if not same:
                error_msgs.append(f"{key}: the checkpoint's {name} {tuple(given.shape)} is not the one of a "
                                  f"{self.group_size} group; was it saved for another group_size?")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def relative_position_bias(self, group: tuple[int, int] | None = None) -> Tensor | None:
        """The dynamic position bias of a `(Gh, Gw)` group (default: `group_size`), or None without one.

        Shape:
            - Output: `(h, N, N)`.
        """
        if not self.position_bias:
            return None
        group = self.group_size if group is None else group
        weight = self.pos.pos_proj.weight
        table = self.pos(relative_offsets(group, weight.device, weight.dtype))  # (T, h)
        return gather_relative_bias(table, relative_position_index_2d(group, weight.device))  # (h, N, N)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within each group.

        Args:
            x: Groups `(B * nG, N, C)`; N = Gh * Gw, or any N without `position_bias`.
            mask: Additive float mask `(nG, N, N)` (0 / large negative), or None. Default: None.
            need_weights: Also return the weights `(B * nG, h, N, N)`. Default: False.

        Returns:
            The output `(B * nG, N, C)`, or `(output, weights)` with `need_weights`.
        """
        who, group = type(self).__name__, self.group_size
        area = group[0] * group[1]
        # without the position bias nothing reads the group: any N runs, as in the official attention
        dims = (check_shape(x, who, "B N C", N=area, C=self.dim) if self.position_bias
                else check_shape(x, who, "B N C", C=self.dim))
        n, group = dims["N"], (group if dims["N"] == area else (1, dims["N"]))
        bias = self.relative_position_bias()  # (h, N, N) or None
        if mask is not None:
            check_tensor(mask, who, "mask")
            if mask.ndim != 3 or tuple(mask.shape[1:]) != (n, n) or dims["B"] % mask.shape[0]:
                raise ValueError(f"{who} expects mask of shape (nG, {n}, {n}) with nG dividing "
                                 f"x.shape[0]={dims['B']}, got {tuple(mask.shape)}")
            bias = mask.to(x.dtype)[:, None] + (0.0 if bias is None else bias)  # (nG, h or 1, N, N)
        return self._attend(x, bias, group, need_weights)

    def _attend(
        self, x: Tensor, bias: Tensor | None, group: tuple[int, int], need_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attention of checked groups `(B*nG, N, C)` with bias `(h, N, N)`, `(nG, h or 1, N, N)` or None."""
        heads = self.num_heads
        qkv = self.qkv(x).unflatten(-1, (3, heads, -1))  # (B*nG, N, 3, h, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if bias is not None and bias.ndim == 4 and bias.shape[1] != heads:
            bias = bias.expand(-1, heads, -1, -1)  # (nG, h, N, N)
        weights = None
        if need_weights or bias is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nG, h, N, d)
            if bias is not None and bias.ndim == 4:  # group i of the batch uses bias i % nG
                bias = bias.repeat(x.shape[0] // bias.shape[0], 1, 1, 1)  # (B*nG, h, N, N)
            result = attend(
                q, k, v, bias=bias, scale=self.scale, dropout_p=dropout_p, need_weights=need_weights
            )
            out, weights = result if isinstance(result, tuple) else (result, None)  # (B*nG, h, N, d)
            out = out.transpose(1, 2).flatten(2)  # (B*nG, h, N, d) -> (B*nG, N, C)
        else:
            out = biased_attention(qkv, bias, scale=self.scale, dropout_p=dropout_p)  # (B*nG, N, C)
        if capturing():  # map capture: every group's rows (groups are small)
            record_packed_rows(self, qkv, bias, scale=self.scale, grid=group, all_queries=True)
        out = self.proj_drop(self.proj(out))  # (B*nG, N, C)
        return out if weights is None else (out, weights)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, group_size={self.group_size}, num_heads={self.num_heads}"


@register(
    "crossformer",
    family="transformer",
    paper="CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention",
    year=2022,
    layout="NHWC",
    example=Example(
        kwargs={"dim": 32, "num_heads": 2, "group_size": 2, "interval": 2, "distance": "long"},
        inputs=((2, 5, 7, 32),),
        output=(2, 5, 7, 32),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1), FreeSize(((0, 2),), 2)),
    ),
    aliases=("lsda", "long_short_distance_attention", "crossformer_attention"),
    uses_attend=True,
)
class CrossFormerAttention(nn.Module):
    r"""CrossFormer's long/short distance attention (LSDA) over a `(B, H, W, C)` map.

    The map is cut into groups of $G \times G$ tokens and self-attention with the dynamic position
    bias runs in each group (`CrossFormerGroupAttention`, held as `attn`, so the keys match a
    CrossFormer block's `attn.*`):

    - `distance="short"` (SDA): each group is a $G \times G$ patch of adjacent tokens;
    - `distance="long"` (LDA): inside each $GI \times GI$ region the tokens $I$ apart form a group,
      $I^2$ groups per region (a region the size of the map is the paper's LDA).

    $$
    \mathrm{LSDA}(X) = \mathrm{proj}\Big(\mathrm{softmax}\big(s\,Q_gK_g^\top + B + M\big)V_g\Big),
    \qquad B[h, i, j] = \mathrm{DPB}(p_i - p_j)_h
    $$

    The map is zero-padded at the bottom/right to multiples of G (SDA) or $GI$ (LDA) and padded keys
    get a logit offset of `finfo.min / 2` (the official block's mask, which adds -1e6), so real tokens
    never attend to padding; the output is cropped back. A map with `min(H, W) <= G` uses SDA with
    `G = min(H, W)` (the official block's rule); the bias MLP gives the bias of any group size.

    Args:
        dim: Channels C.
        num_heads: Heads h; must divide `dim`. Default: 8.
        group_size: Group side G. Default: 7.
        interval: Sampling interval I of LDA, an int or `(Ih, Iw)`; unused by SDA. Default: 8.
        distance: `"short"` (SDA) or `"long"` (LDA). Default: `"short"`.
        qkv_bias: Bias in the qkv projection. Default: True.
        qk_scale: Logit scale s; None (or 0) means `d ** -0.5`. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        position_bias: Add the dynamic position bias (an MLP `max(dim // 16, 1)` wide). Default: True.
        device: Device of the parameters. Default: None (the default device).
        dtype: dtype of the parameters. Default: None (the default dtype).

    Shape:
        - Input: `(B, H, W, C)`, any H, W >= 1.
        - Output: `(B, H, W, C)`; with `need_weights=True`, `(output, weights)` with the group weights
          `(B * nG, h, N, N)` of the padded map (groups in `group_partition` order, N the tokens of
          the group used on this map; padded keys get weight 0). `attnzoo.capture_maps` gives
          rows over the map instead.

    Example:
        ```python
        >>> lda = CrossFormerAttention(64, num_heads=2, group_size=4, interval=2, distance="long")
        >>> lda(torch.randn(2, 14, 15, 64)).shape  # padded to 16 x 16: 4 regions of 8 x 8
        torch.Size([2, 14, 15, 64])

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        group_size: int = 7,
        interval: int | Sequence[int] = 8,
        distance: str = "short",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position_bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.group_size = check_int(group_size, "group_size", who)
        self.interval = int_pair(interval, "interval", who)
        self.distance = check_choice(distance, ("short", "long"), "distance", who)
        self.attn = CrossFormerGroupAttention(dim, group_size, num_heads, qkv_bias, qk_scale, attn_drop,
                                              proj_drop, position_bias, device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads

    def extra_repr(self) -> str:
        return f"interval={self.interval}, distance={self.distance!r}"  # `attn` shows the rest

    def geometry(self, size: Sequence[int]) -> tuple[int, tuple[int, int]]:
        """The group side and interval used on an `(H, W)` map: `(G, (Ih, Iw))`, interval `(1, 1)` for SDA."""
        side = min(size)
        if side <= self.group_size:  # the official small-map rule
            return side, (1, 1)
        return self.group_size, self.interval if self.distance == "long" else (1, 1)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """LSDA over the map `x`.

        Args:
            x: The map `(B, H, W, C)`.
            need_weights: Also return the group weights (see Shape). Default: False.

        Returns:
            The output map, or `(output, weights)` with `need_weights`.
        """
        check_shape(x, type(self).__name__, "B H W C", C=self.dim)
        _, height, width, channels = x.shape
        g, (ih, iw) = self.geometry((height, width))
        hp, wp = -(-height // (g * ih)) * g * ih, -(-width // (g * iw)) * g * iw
        if (hp, wp) != (height, width):
            x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros at the bottom/right: (B, Hp, Wp, C)
        groups = group_partition(x, (g, g), (ih, iw))  # (B*nG, N, C)
        bias = self.attn.relative_position_bias((g, g))  # (h, N, N) or None
        if (hp, wp) != (height, width):
            pad = torch.ones(hp, wp, dtype=torch.bool, device=x.device)
            pad[:height, :width] = False
            pad = group_partition(pad[None, :, :, None], (g, g), (ih, iw))  # (nG, N, 1): padded tokens
            offset = torch.zeros(pad.shape, device=x.device, dtype=x.dtype)
            offset = offset.masked_fill(pad, torch.finfo(x.dtype).min / 2)  # (nG, N, 1)
            offset = offset.transpose(1, 2)[:, None]  # (nG, 1, 1, N): per key
            bias = offset if bias is None else offset + bias  # (nG, h or 1, N, N) via keys
            bias = bias.expand(-1, -1, g * g, -1)  # (nG, h or 1, N, N)
        result = self.attn._attend(groups, bias, (g, g), need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():  # map capture: the group rows become rows over the map
            groups_to_image(self, self.attn, (height, width), (hp, wp), g, (ih, iw))
        x = group_reverse(out, (g, g), (ih, iw), (hp, wp))[:, :height, :width]  # (B, H, W, C)
        return x if weights is None else (x, weights)
