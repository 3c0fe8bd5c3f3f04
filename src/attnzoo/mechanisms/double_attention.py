"""A²-Nets: the double attention block (gather, then distribute).

Chen, Kalantidis, Li, Yan, Feng, "A²-Nets: Double Attention Networks", NeurIPS 2018,
https://arxiv.org/abs/1810.11579.

Step 1 (feature gathering) pools the feature map into n global descriptors, each an attention-
weighted sum over all positions (second-order attention pooling); step 2 (feature distribution)
gives every position a softmax mixture of the n descriptors; a 1x1 convolution maps the result back
to C channels.

Deviations: the computation is reassociated (the results are equal up to rounding): the feature
projection A is applied to the gathered descriptors instead of to the whole map (its gathering
weights sum to one over the positions) and the reconstruction convolution is applied to the
descriptors before the distribution, so neither `(B, c_m, H, W)` tensor is built. fightingcv's
`DoubleAttention` calls `F.softmax` without `dim` on `(B, n, H*W)` tensors, which takes the softmax
over the **batch** (with a batch of one every weight is 1): `softmax_over="batch"` reproduces it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_int, check_shape
from attnzoo._registry import Example, register
from attnzoo.maps.capture import capturing, record

__all__ = ["DoubleAttention"]


@register(
    "double_attention",
    family="global",
    paper="A²-Nets: Double Attention Networks",
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)),
    aliases=("a2", "a2net", "DoubleAttention"),
)
class DoubleAttention(nn.Module):
    """Double attention block (A²-Nets, Chen et al., 2018).

    With $A = W_A x$ ($c_m$ channels), $B = W_B x$ and $V = W_V x$ ($c_n$ channels each), N = HW:

    $$
    G = A\\,\\mathrm{softmax}_N(B)^\\top \\in \\mathbb{R}^{c_m \\times c_n},\\qquad
    Z = G\\,\\mathrm{softmax}_{c_n}(V) \\in \\mathbb{R}^{c_m \\times N},\\qquad
    y = W_r Z + b_r .
    $$

    Each of the $c_n$ gathering maps is a softmax over the positions; each position's distribution
    vector is a softmax over the $c_n$ descriptors.

    Args:
        channels: Input channels C.
        reduction: $c_m$ and $c_n$ are `max(C // reduction, 1)` unless given. Default: 4.
        rd_channels: $c_m$, the channels of A and of the descriptors. Default: None.
        num_descriptors: $c_n$, the number of gathered descriptors. Default: None ($c_m$).
        reconstruct: Map $Z$ back to C channels with a 1x1 convolution (else the output has
            $c_m$ channels). Default: True.
        softmax_over: "paper" (as above) or "batch" (fightingcv's: both softmaxes over the batch).
            Default: "paper".
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`, any H and W.
        - Output: `(B, C, H, W)` (`(B, c_m, H, W)` without `reconstruct`).
        - Weights (`need_weights=True`): the gathering maps `(B, c_n, H, W)`, each summing to one
          over the positions (with `softmax_over="batch"`: over the batch).

    Example:
        ```python
        >>> a2 = DoubleAttention(64)  # 16 descriptors of 16 channels
        >>> out, maps = a2(torch.randn(2, 64, 7, 9), need_weights=True)
        >>> out.shape, maps.shape
        (torch.Size([2, 64, 7, 9]), torch.Size([2, 16, 7, 9]))

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        rd_channels: int | None = None,
        num_descriptors: int | None = None,
        *,
        reconstruct: bool = True,
        softmax_over: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        check_int(reduction, "reduction", who)
        c_m = max(channels // reduction, 1) if rd_channels is None else rd_channels
        check_int(c_m, "rd_channels", who)
        c_n = c_m if num_descriptors is None else num_descriptors
        check_int(c_n, "num_descriptors", who)
        self.softmax_over = check_choice(softmax_over, ("paper", "batch"), "softmax_over", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels, self.c_m, self.c_n, self.reconstruct = channels, c_m, c_n, reconstruct
        # fightingcv's names
        self.convA = nn.Conv2d(channels, c_m, 1, **factory)
        self.convB = nn.Conv2d(channels, c_n, 1, **factory)
        self.convV = nn.Conv2d(channels, c_n, 1, **factory)
        self.conv_reconstruct = nn.Conv2d(c_m, channels, 1, **factory) if reconstruct else None

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, rd_channels={self.c_m}, num_descriptors={self.c_n}, "
                f"reconstruct={self.reconstruct}")

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gather and distribute `x` `(B, C, H, W)`; with `need_weights`, also return the gathering
        maps `(B, c_n, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        flat = x.reshape(b, c, h * w)  # (B, C, N)
        weight = torch.cat([self.convB.weight, self.convV.weight])[:, :, 0, 0]  # (2 c_n, C)
        bias = torch.cat([self.convB.bias, self.convV.bias])  # type: ignore[list-item]
        logits = F.conv1d(flat, weight[..., None], bias)  # (B, 2 c_n, N): B and V in one pass
        maps, vectors = logits.split(self.c_n, dim=1)  # 2 x (B, c_n, N)
        paper = self.softmax_over == "paper"
        maps = maps.softmax(-1 if paper else 0)  # over the positions (fightingcv: the batch)
        vectors = vectors.softmax(1 if paper else 0)  # over the descriptors (fightingcv: the batch)
        # G = W_A (x P^T) + b_A (sum_N P): A applied after gathering
        pooled = flat @ maps.transpose(1, 2)  # (B, C, N) @ (B, N, c_n) -> (B, C, c_n)
        w_a, b_a = self.convA.weight[:, :, 0, 0], self.convA.bias  # (c_m, C), (c_m,)
        out_bias = None
        if self.conv_reconstruct is not None:  # W_r G = (W_r W_A)(x P^T) + W_r b_A (sum_N P)
            w_r = self.conv_reconstruct.weight[:, :, 0, 0]  # (C, c_m)
            w_a, b_a, out_bias = w_r @ w_a, w_r @ b_a, self.conv_reconstruct.bias  # type: ignore[operator]
        descriptors = w_a @ pooled  # (B, C_out, c_n)
        if b_a is not None:
            mass = maps.sum(-1, keepdim=True).transpose(1, 2) if not paper else 1.0  # (B, 1, c_n) or 1
            descriptors = descriptors + b_a[:, None] * mass  # (C_out, 1) broadcast
        if capturing():  # map capture: where the descriptors gather from, averaged over them
            record(self, "spatial", maps.mean(1).reshape(b, h, w), grid=(h, w))
        out = descriptors @ vectors  # (B, C_out, c_n) @ (B, c_n, N) -> (B, C_out, N)
        if out_bias is not None:
            out = out + out_bias[:, None]  # (C_out, 1) broadcast over N
        out = out.reshape(b, -1, h, w)  # (B, C_out, N) -> (B, C_out, H, W)
        return (out, maps.reshape(b, self.c_n, h, w)) if need_weights else out
