"""Temporal self-attention with a learned 1-D relative position bias (the seed-000 ``Attention``).

Attention over the T frames of each token, as in video transformers that factorise space and time
(TimeSformer's divided attention, Bertasius et al., 2021, arXiv:2102.05095), with a bias per head
indexed by the frame offset, Swin's relative position bias reduced to one axis. The class follows
the audio-visual Swin adaptation code of STG-CMA (``kaiw7/STG-CMA``, ``Attention``): same arguments,
parameters ``qkv``/``proj``/``relative_position_bias_table``, persistent buffer ``relative_coords``
and outputs. Differences: bad shapes raise ``ValueError`` (the original fails inside a reshape) and
it runs :func:`attnzoo.kernels.biased.biased_attention` (no generic-path fallback for the learnable
bias); the scale multiplies q before the product instead of the logits after it (equal up to
rounding).

Shape letters: B batch (STG-CMA: batch x spatial tokens), T frames, C channels, h heads, d = C / h.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.functional import gather_relative_bias, relative_position_index_1d
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
        kwargs={"dim": 8, "num_ttokens": 5, "num_heads": 2},
        inputs=((3, 5, 8),),
        output=(3, 5, 8),
        channel_dim=-1,
    ),
    aliases=("temporal_attention", "temporal_relpos"),
    seed_name="Attention",
    uses_attend=True,
    input_rule="frames",
    for_input=lambda geo: {"num_ttokens": geo.spatial[0] if len(geo.spatial) == 3 else geo.tokens},
)
class TemporalAttention(nn.Module):
    r"""Multi-head self-attention over frames with a learned relative temporal bias.

    :math:`\mathrm{softmax}(s\,QK^\top + B)\,V` per head, with
    ``B[h, i, j] = relative_position_bias_table[i - j + T - 1, h]`` (query frame i, key frame j).

    Args:
        dim: Channels C.
        num_ttokens: Frames T; the input length must equal it (the table has ``2T - 1`` rows).
        num_heads: Heads h; must divide ``dim``. Default: 8.
        qkv_bias: Bias in the qkv projection. Default: False.
        qk_scale: Logit scale s; None (or 0) means ``d ** -0.5``. Default: None.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        with_qkv: Project x to q, k, v and project the output; False attends over x itself split
            into heads (q = k = v, no ``qkv``/``proj`` parameters, no output projection).
            Default: True.

    Shape:
        - Input: ``(B, T, C)`` with ``T == num_ttokens``.
        - Output: ``(B, T, C)``.
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
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_ttokens = check_int(num_ttokens, "num_ttokens", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        self.scale = (check_float(qk_scale, "qk_scale", who) if qk_scale is not None else 0.0) or (
            dim // num_heads
        ) ** -0.5
        self.attn_drop = check_float(attn_drop, "attn_drop", who, minimum=0.0, maximum=1.0)
        self.with_qkv = bool(with_qkv)
        if self.with_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(2 * num_ttokens - 1, num_heads))
        self.register_buffer("relative_coords", relative_position_index_1d(num_ttokens).reshape(-1))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the frames of each sequence of ``x`` ``(B, T, C)``."""
        dims = check_shape(x, type(self).__name__, "B T C", T=self.num_ttokens, C=self.dim)
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
        out = biased_attention(
            qkv, bias, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0
        )
        if not torch.jit.is_scripting():
            if capturing():  # map capture: rows of the capture's query frames
                record_packed_rows(self, qkv, bias, scale=self.scale, grid=(frames,))
        if self.with_qkv:  # out: (B, T, C)
            out = self.proj_drop(self.proj(out))
        return out


@register_seed("temporal")
class Attention(TemporalAttention):
    """The seed-000 / STG-CMA ``Attention(dim, num_ttokens, num_heads=8, ...)`` (``attnzoo.compat``).

    The canonical :class:`TemporalAttention` already has the seed's arguments, state_dict keys and
    call convention; this name exists so seed code and checkpoints work unchanged.

    Shape:
        - Input: ``(B, T, C)`` with ``T == num_ttokens``.
        - Output: ``(B, T, C)``.
    """
