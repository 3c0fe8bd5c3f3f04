"""Global self-attention on feature maps: SAGAN's spatial block and the seed's channel variant.

Spatial: Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019,
https://arxiv.org/abs/1805.08318. Channel: the seed document's ``Self_Attn_Channel`` (attention
between channels, as in DANet's channel attention module, Fu et al., 2019,
https://arxiv.org/abs/1809.02983, but with 1x1 projections).

Both use unscaled logits (``scale = 1.0``, not ``1/sqrt(d)``), as the paper and the seed do. The
spatial block never builds its ``N x N`` map (N = H*W) unless asked: it runs
:func:`attnzoo.kernels.blocked.global_attention`, which picks a blocked exact kernel (its queries and keys
have ``out_dim`` channels but its values ``in_dim``, which the CPU flash kernel refuses) or SDPA.

Attention maps: ``forward(x, return_attention=True)`` returns ``(output, map)``; or set
``module.capture_attention = True`` and every forward also stores the map, detached, in
``module.last_attention`` (the hook for map-capture tools). Either way the map is materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.blocked import global_attention
from attnzoo.maps.capture import capturing, record_rows, with_map
from attnzoo.mechanisms.non_local import pointwise_tokens

__all__ = ["SpatialSelfAttention", "ChannelSelfAttention", "Self_Attn_Spatial", "Self_Attn_Channel"]


def _fused_pointwise(x: Tensor, convs: list[nn.Conv2d]) -> Tensor:
    """All the 1x1 convolutions of ``convs`` in one call: ``(B, C, H, W) -> (B, sum(C_out), H, W)``."""
    weight = torch.cat([c.weight for c in convs])  # (sum(C_out), C, 1, 1)
    bias = torch.cat([c.bias for c in convs])  # type: ignore[misc]
    return F.conv2d(x, weight, bias)


class SpatialSelfAttention(nn.Module):
    r"""SAGAN self-attention over the H*W positions: :math:`y = \gamma\,\mathrm{softmax}(QK^\top)V + x`.

    ``Q = W_q x``, ``K = W_k x`` have ``out_dim`` channels, ``V = W_v x`` has ``in_dim``; the logits
    are not scaled. ``gamma`` starts at 0, so the block starts as the identity.

    Args:
        in_dim: Input channels C.
        out_dim: Channels of queries and keys d (SAGAN uses C // 8).

    Shape:
        - Input: ``(B, C, H, W)``, any H and W.
        - Output: ``(B, C, H, W)``; with ``return_attention=True`` also the map ``(B, N, N)``,
          N = H*W, row i holding the weights of query position i (row-major ``h*W + w``).

    Example:
        >>> m = SpatialSelfAttention(64, 8)
        >>> m(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
    """

    capture_attention: bool = False
    last_attention: Tensor | None = None

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        who = type(self).__name__
        self.in_dim = check_int(in_dim, "in_dim", who)
        self.out_dim = check_int(out_dim, "out_dim", who)
        self.query_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, c, h, w = check_shape(x, type(self).__name__, "B C H W", C=self.in_dim).values()
        d = self.out_dim
        x_t = x.flatten(2).transpose(1, 2)  # (B, N, C): tokens, one per position
        qkv = pointwise_tokens(x_t, [self.query_conv, self.key_conv, self.value_conv])  # (B, N, 2d + C)
        q, k, v = qkv.split([d, d, c], dim=-1)  # (B, N, d), (B, N, d), (B, N, C)
        want_map = return_attention or self.capture_attention
        res = global_attention(q, k, v, scale=1.0, return_weights=want_map)
        if not torch.jit.is_scripting():
            if capturing():  # map capture: rows of the capture's query points
                record_rows(self, q.unsqueeze(1), k.unsqueeze(1), grid=(h, w), scale=1.0)
        out_t, attn = res if isinstance(res, tuple) else (res, None)
        out = out_t.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        y = torch.addcmul(x, self.gamma, out)  # gamma * out + x
        return with_map(self, y, attn, return_attention)


class ChannelSelfAttention(nn.Module):
    r"""Self-attention between channels: :math:`y = \gamma\,\mathrm{softmax}(QK^\top)V + W_x x`.

    ``Q, K, V, W_x x`` are 1x1 projections to ``out_dim`` channels, each flattened to
    ``(out_dim, N)``; the ``out_dim x out_dim`` logits sum over all N positions and are not scaled
    (so they grow with the image size, as in the seed). ``gamma`` starts at 0.

    Args:
        in_dim: Input channels C.
        out_dim: Channels C1 of the projections and of the output.

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: ``(B, C1, H, W)`` (the input's shape when ``out_dim == in_dim``); with
          ``return_attention=True`` also the map ``(B, C1, C1)``.
    """

    capture_attention: bool = False
    last_attention: Tensor | None = None

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        who = type(self).__name__
        self.in_dim = check_int(in_dim, "in_dim", who)
        self.out_dim = check_int(out_dim, "out_dim", who)
        self.query_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.x_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, _, h, w = check_shape(x, type(self).__name__, "B C H W", C=self.in_dim).values()
        proj = _fused_pointwise(x, [self.query_conv, self.key_conv, self.value_conv, self.x_conv])
        q, k, v, skip = proj.flatten(2).chunk(4, dim=1)  # 4 x (B, C1, N): channels are the tokens
        want_map = return_attention or self.capture_attention
        if not torch.jit.is_scripting():
            if capturing():  # map capture: rows of the channel-to-channel attention
                record_rows(self, q.unsqueeze(1), k.unsqueeze(1), grid=(self.out_dim,), scale=1.0)
        res = global_attention(q, k, v, scale=1.0, return_weights=want_map)
        out, attn = res if isinstance(res, tuple) else (res, None)
        y = torch.addcmul(skip, self.gamma, out).reshape(b, self.out_dim, h, w)  # (B, C1, H, W)
        return with_map(self, y, attn, return_attention)


register(
    "sagan",
    family="global",
    paper="Self-Attention Generative Adversarial Networks",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"in_dim": 8, "out_dim": 2}, inputs=((2, 8, 3, 5),), output=(2, 8, 3, 5)),
    aliases=("spatial_self_attention", "sagan_self_attention"),
    seed_name="Self_Attn_Spatial",
    uses_attend=True,
    for_input=lambda geo: {"out_dim": geo.channels},
)(SpatialSelfAttention)

register(
    "channel_self_attention",
    family="global",
    paper="Channel self-attention (seed; cf. Dual Attention Network for Scene Segmentation)",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"in_dim": 6, "out_dim": 4}, inputs=((2, 6, 3, 5),), output=(2, 4, 3, 5)),
    aliases=("channel_attention_sa",),
    seed_name="Self_Attn_Channel",
    uses_attend=True,
    for_input=lambda geo: {"out_dim": geo.channels},
)(ChannelSelfAttention)


@register_seed("sagan")
class Self_Attn_Spatial(SpatialSelfAttention):  # noqa: N801 (the seed's name)
    """The seed's ``Self_Attn_Spatial(in_dim, out_dim)``: same parameters, returns ``(out, attention)``.

    ``attention`` is the ``(B, N, N)`` map, so this class always takes the math path. State_dict
    keys equal the seed's (``gamma``, ``query_conv``, ``key_conv``, ``value_conv``). The seed names the
    spatial dims (W, H); only their product matters, so any H and W work here as there.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.chanel_in = in_dim  # the seed's attribute name

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return super().forward(x, return_attention=True)  # type: ignore[return-value]


@register_seed("channel_self_attention")
class Self_Attn_Channel(ChannelSelfAttention):  # noqa: N801 (the seed's name)
    """The seed's ``Self_Attn_Channel(in_dim, out_dim)``: same parameters, returns ``(out, attention)``.

    ``attention`` is ``(B, out_dim, out_dim)``. State_dict keys equal the seed's (``gamma``,
    ``query_conv``, ``key_conv``, ``value_conv``, ``x_conv``).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.chanel_in = in_dim  # the seed's attribute name

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return super().forward(x, return_attention=True)  # type: ignore[return-value]
