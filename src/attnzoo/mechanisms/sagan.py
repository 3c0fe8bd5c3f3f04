r"""Global self-attention on feature maps: SAGAN's spatial block and the seed's channel variant.

Spatial: Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019,
https://arxiv.org/abs/1805.08318. Channel: the seed document's `Self_Attn_Channel` (attention
between channels, as in DANet's channel attention module, Fu et al., 2019,
https://arxiv.org/abs/1809.02983, but with 1x1 projections).

Both use unscaled logits (scale 1, not $1/\sqrt{d}$), as the paper and the seed do. The spatial block
never builds its $N \times N$ map (N = H*W) unless asked: it runs
`attnzoo.kernels.blocked.global_attention`, which picks a blocked exact kernel (its queries and keys
have `rd_channels` channels but its values C, which the CPU flash kernel refuses) or SDPA.

Attention maps: `forward(x, need_weights=True)` returns `(output, map)` (the map is then
materialised); `attnzoo.capture_maps` records rows of it without changing any call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._registry import Example, register, register_seed
from attnzoo.kernels.blocked import global_attention
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.non_local import pointwise_tokens

__all__ = ["SpatialSelfAttention", "ChannelSelfAttention", "Self_Attn_Spatial", "Self_Attn_Channel"]


def _fused_pointwise(x: Tensor, convs: list[nn.Conv2d]) -> Tensor:
    """All the 1x1 convolutions of `convs` in one call: `(B, C, H, W) -> (B, sum(C_out), H, W)`."""
    weight = torch.cat([c.weight for c in convs])  # (sum(C_out), C, 1, 1)
    bias = torch.cat([c.bias for c in convs])  # type: ignore[misc]
    return F.conv2d(x, weight, bias)


def _qk_width(channels: int, reduction: int, rd_channels: int | None, who: str) -> int:
    """`rd_channels`, else `max(channels // reduction, 1)`, each checked under its own name."""
    reduction = check_int(reduction, "reduction", who)
    if rd_channels is None:
        return max(channels // reduction, 1)
    return check_int(rd_channels, "rd_channels", who)


class SpatialSelfAttention(nn.Module):
    r"""SAGAN self-attention over the H*W positions: $y = \gamma\,\mathrm{softmax}(QK^\top)V + x$.

    $Q = W_q x$ and $K = W_k x$ have `rd_channels` channels (the paper's C/8), $V = W_v x$ has C;
    the logits are not scaled. `gamma` starts at 0, so the block starts as the identity.

    Args:
        channels: Input channels C (the seed's `in_dim`).
        rd_channels: Channels d of queries and keys (the seed's `out_dim`, in the same place).
            Default: None, `max(C // reduction, 1)`.
        reduction: Queries and keys have `max(C // reduction, 1)` channels unless `rd_channels` is
            given. Default: 8 (the paper's C/8).
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)`; with `need_weights=True` also the map `(B, N, N)`, N = H*W, row i
          holding the weights of query position i (row-major `h*W + w`).

    Example:
        ```python
        >>> m = SpatialSelfAttention(64)  # queries and keys of 64 // 8 = 8 channels
        >>> m(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
        >>> m(torch.randn(2, 64, 4, 4), need_weights=True)[1].shape
        torch.Size([2, 16, 16])

        ```
    """

    def __init__(
        self, channels: int, rd_channels: int | None = None, reduction: int = 8, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels = c = check_int(channels, "channels", who)
        self.rd_channels = d = _qk_width(c, reduction, rd_channels, who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_conv = nn.Conv2d(c, d, kernel_size=1, **factory)
        self.key_conv = nn.Conv2d(c, d, kernel_size=1, **factory)
        self.value_conv = nn.Conv2d(c, c, kernel_size=1, **factory)
        self.gamma = nn.Parameter(torch.zeros(1, **factory))

    def reset_parameters(self) -> None:
        """`gamma` back to 0, so the block starts as the identity (the convolutions reset themselves)."""
        nn.init.zeros_(self.gamma)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the positions of `x` `(B, C, H, W)`; with `need_weights`, also the `(B, N, N)` map."""
        b, c, h, w = check_shape(x, type(self).__name__, "B C H W", C=self.channels).values()
        d = self.rd_channels
        x_t = x.flatten(2).transpose(1, 2)  # (B, N, C): tokens, one per position
        qkv = pointwise_tokens(x_t, [self.query_conv, self.key_conv, self.value_conv])  # (B, N, 2d + C)
        q, k, v = qkv.split([d, d, c], dim=-1)  # (B, N, d), (B, N, d), (B, N, C)
        res = global_attention(q, k, v, scale=1.0, need_weights=need_weights)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q.unsqueeze(1), k.unsqueeze(1), grid=(h, w), scale=1.0)
        out_t, attn = res if isinstance(res, tuple) else (res, None)
        out = out_t.transpose(1, 2).reshape(b, c, h, w)  # (B, N, C) -> (B, C, H, W)
        y = torch.addcmul(x, self.gamma, out)  # gamma * out + x
        return (y, attn) if attn is not None else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}"


class ChannelSelfAttention(nn.Module):
    r"""Self-attention between channels: $y = \gamma\,\mathrm{softmax}(QK^\top)V + W_x x$.

    $Q, K, V, W_x x$ are 1x1 projections to `out_channels` channels C1, each flattened to `(C1, N)`;
    the $C_1 \times C_1$ logits sum over all N positions and are not scaled (so they grow with the
    image size, as in the seed). `gamma` starts at 0, so the block starts as the projection $W_x x$.

    Args:
        channels: Input channels C (the seed's `in_dim`).
        out_channels: Channels C1 of the projections and of the output (the seed's `out_dim`).
            Default: None, C.
        device: Where the parameters are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters. Default: None (torch's default).

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: `(B, C1, H, W)` (the input's shape by default); with `need_weights=True` also the
          map `(B, C1, C1)`.

    Example:
        ```python
        >>> m = ChannelSelfAttention(16, out_channels=8)
        >>> y, weights = m(torch.randn(2, 16, 5, 5), need_weights=True)
        >>> y.shape, weights.shape
        (torch.Size([2, 8, 5, 5]), torch.Size([2, 8, 8]))

        ```
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels = c = check_int(channels, "channels", who)
        self.out_channels = c1 = c if out_channels is None else check_int(out_channels, "out_channels", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_conv = nn.Conv2d(c, c1, kernel_size=1, **factory)
        self.key_conv = nn.Conv2d(c, c1, kernel_size=1, **factory)
        self.value_conv = nn.Conv2d(c, c1, kernel_size=1, **factory)
        self.x_conv = nn.Conv2d(c, c1, kernel_size=1, **factory)
        self.gamma = nn.Parameter(torch.zeros(1, **factory))

    def reset_parameters(self) -> None:
        """`gamma` back to 0, so the block starts as the identity (the convolutions reset themselves)."""
        nn.init.zeros_(self.gamma)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend between the channels of `x` `(B, C, H, W)`; with `need_weights`, also the map."""
        b, _, h, w = check_shape(x, type(self).__name__, "B C H W", C=self.channels).values()
        proj = _fused_pointwise(x, [self.query_conv, self.key_conv, self.value_conv, self.x_conv])
        q, k, v, skip = proj.flatten(2).chunk(4, dim=1)  # 4 x (B, C1, N): channels are the tokens
        if capturing():  # map capture: rows of the channel-to-channel attention
            record_rows(self, q.unsqueeze(1), k.unsqueeze(1), grid=(self.out_channels,), scale=1.0,
                        unit="channel")
        res = global_attention(q, k, v, scale=1.0, need_weights=need_weights)
        out, attn = res if isinstance(res, tuple) else (res, None)
        y = torch.addcmul(skip, self.gamma, out).reshape(b, self.out_channels, h, w)  # (B, C1, H, W)
        return (y, attn) if attn is not None else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out_channels={self.out_channels}"


register(
    "sagan",
    family="global",
    paper="Self-Attention Generative Adversarial Networks",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "rd_channels": 2}, inputs=((2, 8, 3, 5),), output=(2, 8, 3, 5)),
    aliases=("spatial_self_attention", "sagan_self_attention"),
    seed_name="Self_Attn_Spatial",
    uses_attend=True,
)(SpatialSelfAttention)

register(
    "channel_self_attention",
    family="global",
    paper="Channel self-attention (seed; cf. Dual Attention Network for Scene Segmentation)",
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 6, "out_channels": 4}, inputs=((2, 6, 3, 5),), output=(2, 4, 3, 5)),
    aliases=("channel_attention_sa",),
    seed_name="Self_Attn_Channel",
    uses_attend=True,
)(ChannelSelfAttention)


@register_seed("sagan", example=Example({"in_dim": 8, "out_dim": 8}, ((2, 8, 3, 5),), (2, 8, 3, 5)))
class Self_Attn_Spatial(SpatialSelfAttention):  # noqa: N801 (the seed's name)
    """The seed's `Self_Attn_Spatial(in_dim, out_dim)`: same parameters, returns `(out, attention)`.

    `in_dim` is `SpatialSelfAttention`'s `channels`, `out_dim` its `rd_channels`. `attention` is the
    `(B, N, N)` map, so this class always takes the math path. State_dict keys equal the seed's
    (`gamma`, `query_conv`, `key_conv`, `value_conv`). The seed names the spatial dims (W, H); only
    their product matters, so any H and W work here as there.

    Args:
        in_dim: Input channels C.
        out_dim: Channels of queries and keys.

    Shape:
        - Input: `(B, C, H, W)`; output: `((B, C, H, W), (B, N, N))`, N = H*W.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        who = type(self).__name__
        check_int(in_dim, "in_dim", who)  # the seed's names in the messages
        check_int(out_dim, "out_dim", who)
        super().__init__(in_dim, rd_channels=out_dim)
        self.chanel_in, self.out_dim = in_dim, out_dim  # the seed's attributes; its forward reads out_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """`(output, attention)` as the seed returns them."""
        return super().forward(x, need_weights=True)  # type: ignore[return-value]


@register_seed("channel_self_attention",
               example=Example({"in_dim": 6, "out_dim": 4}, ((2, 6, 3, 5),), (2, 4, 3, 5)))
class Self_Attn_Channel(ChannelSelfAttention):  # noqa: N801 (the seed's name)
    """The seed's `Self_Attn_Channel(in_dim, out_dim)`: same parameters, returns `(out, attention)`.

    `in_dim` is `ChannelSelfAttention`'s `channels`, `out_dim` its `out_channels`. `attention` is
    `(B, out_dim, out_dim)`. State_dict keys equal the seed's (`gamma`, `query_conv`, `key_conv`,
    `value_conv`, `x_conv`).

    Args:
        in_dim: Input channels C.
        out_dim: Channels C1 of the projections and of the output.

    Shape:
        - Input: `(B, C, H, W)`; output: `((B, C1, H, W), (B, C1, C1))`.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        who = type(self).__name__
        check_int(in_dim, "in_dim", who)  # the seed's names in the messages
        check_int(out_dim, "out_dim", who)
        super().__init__(in_dim, out_dim)
        self.chanel_in, self.out_dim = in_dim, out_dim  # the seed's attributes; its forward reads out_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """`(output, attention)` as the seed returns them."""
        return super().forward(x, need_weights=True)  # type: ignore[return-value]
