"""Temporal self-attention with a learned 1-D relative position bias (the seed-000 `Attention`).

Attention over the T frames of each token, as in video transformers that factorise space and time
(TimeSformer's divided attention, Bertasius et al., 2021, arXiv:2102.05095), with a bias per head
indexed by the frame offset, Swin's relative position bias reduced to one axis. The class follows
the audio-visual Swin adaptation code of STG-CMA (`kaiw7/STG-CMA`, `Attention`): same arguments,
parameters `qkv`/`proj`/`relative_position_bias_table`, persistent buffer `relative_coords`
and outputs (the canonical class calls the frame count `num_frames`, the original `num_ttokens`).
Differences: bad shapes raise `ValueError` (the original fails inside a reshape) and
it runs `attnzoo.kernels.biased.biased_attention` (no generic-path fallback for the learnable
bias); the scale multiplies q before the product instead of the logits after it (equal up to
rounding).

Shape letters: B batch (STG-CMA: batch x spatial tokens), T frames, C channels, h heads, d = C / h.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_dropout, check_float, check_int, check_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_1d
from attnzoo.kernels.biased import biased_attention
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_packed_rows

__all__ = ["Attention", "TemporalAttention"]


@register(
    "temporal",
    family="transformer",
    paper=(
        "Towards Efficient Audio-Visual Learners via Empowering Pre-trained Vision Transformers "
        "with Cross-Modal Adaptation"
    ),
    year=2024,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "num_frames": 5, "num_heads": 2},
        inputs=((3, 5, 8),),
        output=(3, 5, 8),
        channel_dim=-1,free_sizes=()),
    aliases=("temporal_attention", "temporal_relpos"),
    seed_name="Attention",
    uses_attend=True,
    input_rule="frames",
    for_input=lambda geo: {"num_frames": geo.spatial[0] if len(geo.spatial) == 3 else geo.tokens},
)
class TemporalAttention(nn.Module):
    r"""Multi-head self-attention over frames with a learned relative temporal bias.

    $\mathrm{softmax}(s\,QK^\top + B)\,V$ per head, with
    `B[h, i, j] = relative_position_bias_table[i - j + T - 1, h]` (query frame i, key frame j).

    Args:
        dim: Channels C.
        num_frames: Frames T (the seed's `num_ttokens`); the input length must equal it (the table
            has `2T - 1` rows). Default: 8.
        num_heads: Heads h; must divide `dim`. Default: 8.
        qkv_bias: Bias in the qkv projection. Default: False.
        qk_scale: Logit scale s; None (or 0) means `d ** -0.5`. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        with_qkv: Project x to q, k, v and project the output; False attends over x itself split
            into heads (q = k = v, no `qkv`/`proj` parameters, no output projection).
            Default: True.
        device: Device of the parameters and the index buffer. Default: None (the default device).
        dtype: dtype of the parameters. Default: None (the default dtype).

    Shape:
        - Input: `(B, T, C)` with `T == num_frames`.
        - Output: `(B, T, C)`; with `need_weights=True`, `(output, weights)` with weights
          `(B, h, T, T)`.

    Example:
        ```python
        >>> attn = TemporalAttention(96, num_frames=8, num_heads=4)
        >>> x = torch.randn(2 * 14 * 14, 8, 96)  # every position of 2 clips, along 8 frames
        >>> out, weights = attn(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([392, 8, 96]), torch.Size([392, 4, 8, 8]))

        ```
    """

    def __init__(
        self,
        dim: int,
        num_frames: int = 8,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        with_qkv: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_frames = check_int(num_frames, "num_frames", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)
        self.scale = (check_float(qk_scale, "qk_scale", who) if qk_scale is not None else 0.0) or (
            dim // num_heads
        ) ** -0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.with_qkv = bool(with_qkv)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if self.with_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
            self.proj = nn.Linear(dim, dim, **factory)
            self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        table = torch.zeros(2 * num_frames - 1, num_heads, **factory)  # (2T - 1, h)
        self.relative_position_bias_table = nn.Parameter(table)
        where = None if device is None else torch.device(device)
        coords = relative_position_index_1d(num_frames, device=where).reshape(-1)  # (T*T,)
        self.register_buffer("relative_coords", coords)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_frames={self.num_frames}, num_heads={self.num_heads}"

    def reset_parameters(self) -> None:
        """The truncated-normal table and the frame offsets recomputed (`to_empty` leaves both
        uninitialised); the linear maps reset themselves."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords: Tensor = self.relative_coords  # type: ignore[assignment]  # a registered buffer
        coords.copy_(relative_position_index_1d(self.num_frames, device=coords.device).reshape(-1))

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the frames of each sequence of `x`.

        Args:
            x: Frames `(B, T, C)`.
            need_weights: Also return the weights `(B, h, T, T)` (runs the math path).
                Default: False.

        Returns:
            The output `(B, T, C)`, or `(output, weights)` with `need_weights`.
        """
        dims = check_shape(x, type(self).__name__, "B T C", T=self.num_frames, C=self.dim)
        batch, frames = dims["B"], dims["T"]
        coords: Tensor = self.relative_coords  # type: ignore[assignment]  # a registered buffer
        index = coords.view(frames, frames)  # (T, T): query i, key j
        bias = gather_relative_bias(self.relative_position_bias_table, index)  # (h, T, T)
        if self.with_qkv:
            qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (B, T, 3, h, d)
        else:  # q = k = v = x split into heads
            qkv = x.unflatten(-1, (1, self.num_heads, -1)).expand(
                batch, frames, 3, self.num_heads, -1
            )  # (B, T, 3, h, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        weights = None
        if need_weights:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, d)
            out, weights = attend(
                q, k, v, bias=bias, scale=self.scale, dropout_p=dropout_p, need_weights=True
            )  # (B, h, T, d), (B, h, T, T)
            out = out.transpose(1, 2).flatten(2)  # (B, T, C)
        else:
            out = biased_attention(qkv, bias, scale=self.scale, dropout_p=dropout_p)  # (B, T, C)
        if capturing():  # map capture: rows of the capture's query frames
            record_packed_rows(self, qkv, bias, scale=self.scale, grid=(frames,))
        if self.with_qkv:  # out: (B, T, C)
            out = self.proj_drop(self.proj(out))
        return out if weights is None else (out, weights)


@register_seed("temporal", example=Example({"dim": 8, "num_ttokens": 5, "num_heads": 2}, ((3, 5, 8),),
                                           (3, 5, 8), channel_dim=-1))
class Attention(TemporalAttention):
    """The seed-000 / STG-CMA `Attention(dim, num_ttokens, num_heads=8, ...)` (`attnzoo.compat`).

    The seed's signature, state_dict keys (`qkv`, `proj`, `relative_position_bias_table`,
    persistent `relative_coords`) and call convention `forward(x)`; the canonical
    `TemporalAttention` calls `num_ttokens` `num_frames` and has the same state_dict.

    Args:
        dim: Channels C.
        num_ttokens: Frames T; the input length must equal it.
        num_heads: Heads h; must divide `dim`. Default: 8.
        qkv_bias: Bias in the qkv projection. Default: False.
        qk_scale: Logit scale; None (or 0) means `d ** -0.5`. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        with_qkv: Project to q, k, v and project the output. Default: True.

    Shape:
        - Input: `(B, T, C)` with `T == num_ttokens`.
        - Output: `(B, T, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_ttokens: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        with_qkv: bool = True,
    ) -> None:
        check_int(num_ttokens, "num_ttokens", type(self).__name__)  # the seed's name in the message
        super().__init__(dim, num_ttokens, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, with_qkv)
        self.num_ttokens = num_ttokens

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Attend over the frames of `x` `(B, T, C)`; returns the output alone, as the seed."""
        return cast(Tensor, super().forward(x))
