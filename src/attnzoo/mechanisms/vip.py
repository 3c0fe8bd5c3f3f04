"""Weighted Permute-MLP, "Vision Permutator: A Permutable MLP-Like Architecture for Visual
Recognition" (Hou et al., 2021), arXiv:2106.12368.

Three linear branches mix the channels-last map: along the channels, along the height and along the
width. For the height branch the C channels are cut into `segment_dim` segments of S = C /
`segment_dim`; the H positions x S channels of one segment form one vector of length H S that a
C x C linear layer mixes, so H (and likewise W) must equal `segment_dim`. A small MLP on the pooled
sum of the three branches gives per-channel softmax weights over the branches. Time $O(B N C^2)$,
memory $O(B N C)$; no attention map between positions.

The branch weights follow the authors' code: `h * a[0] + w * a[1] + c * a[2]`. fightingcv's
`WeightedPermuteMLP` uses `c * a[0] + w * a[1] + h * a[2]` (the same function up to the order of
the reweighting MLP's outputs; `from_fightingcv` reorders them) and puts dropout 0.1 in the
reweighting MLP (the authors' has none; `attn_drop` here).

Shape letters: B batch, H, W height and width, C channels (`dim`), N = H W, S = C / segment_dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_shape
from attnzoo._geometry import Geometry, Unsupported, grid2d
from attnzoo._registry import Example, register
from attnzoo.kernels.mix import weighted_sum
from attnzoo.kernels.reduce import lean_mean
from attnzoo.kernels.relayout import relaid_linear
from attnzoo.maps.capture import capturing, record

__all__ = ["WeightedPermuteMLP"]


def _for_input(geo: Geometry) -> dict[str, Any]:
    """`segment_dim` = the map's side; square maps whose side divides the channels only."""
    height, width = grid2d(geo)
    if height != width or geo.channels % height or geo.channels < 4:
        raise Unsupported(f"needs a square map whose side divides the channels, got {height}x{width} "
                          f"with {geo.channels} channels")
    return {"segment_dim": height}


@register(
    "vip",
    family="vip",
    paper="Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition",
    year=2021,
    layout="NHWC",
    example=Example(kwargs={"dim": 16, "segment_dim": 4}, inputs=((2, 4, 4, 16),), output=(2, 4, 4, 16),
                    channel_dim=-1, free_sizes=()),
    aliases=("weighted_permute_mlp", "permute_mlp"),
    for_input=_for_input,
)
class WeightedPermuteMLP(nn.Module):
    r"""Weighted Permute-MLP (Vision Permutator): channel, height and width mixing, reweighted.

    With $c = x W_c$, $h$ = the height branch (segment-wise $W_h$ over (H, S)), $w$ = the width
    branch, and the branch weights from the spatial mean,
    $a = \mathrm{softmax}_{3}(\mathrm{MLP}(\mathrm{mean}_{H,W}(h + w + c))) \in \mathbb{R}^{3 \times C}$:

    $$
    y = \big(a_0 \odot h + a_1 \odot w + a_2 \odot c\big) W_o
    $$

    Time $O(B N C^2)$, memory $O(B N C)$ with N = H W.

    Args:
        dim: Channels C of the input (last axis); a multiple of `segment_dim`.
        segment_dim: Channel segments; the input's H and W must both equal it. Default: 8.
        qkv_bias: Give the three branch projections a bias. Default: False.
        attn_drop: Dropout inside the reweighting MLP (training only). Default: 0.0.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, segment_dim, segment_dim, C)`.
        - Output: same as x; with `need_weights=True` also the branch weights `(B, 3, C)`
          (height, width, channel; softmax over the 3).

    Example:
        ```python
        >>> vip = WeightedPermuteMLP(64, segment_dim=8)
        >>> x = torch.randn(2, 8, 8, 64)
        >>> out, weights = vip(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 8, 8, 64]), torch.Size([2, 3, 64]))

        ```
    """

    def __init__(
        self,
        dim: int,
        segment_dim: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.segment_dim = check_int(segment_dim, "segment_dim", who)
        if dim % segment_dim:
            raise ValueError(f"{who}: dim={dim} must be a multiple of segment_dim={segment_dim}")
        if dim < 4:
            raise ValueError(f"{who}: dim must be at least 4 (the reweighting MLP has dim // 4 units), "
                             f"got {dim}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.mlp_h = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.mlp_w = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.fc1 = nn.Linear(dim, dim // 4, **factory)  # reweighting MLP
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim // 4, 3 * dim, **factory)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, segment_dim={self.segment_dim}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Mix along C, H and W and reweight; `(out, weights)` with `need_weights`.

        Args:
            x: Feature map `(B, segment_dim, segment_dim, C)`.
            need_weights: Also return the `(B, 3, C)` branch weights. Default: False.
        """
        seg = self.segment_dim
        dims = check_shape(x, type(self).__name__, "B H W C", H=seg, W=seg, C=self.dim)
        batch, height, width, channels = dims["B"], dims["H"], dims["W"], dims["C"]
        s = channels // seg
        segments, shape = (batch, height, width, seg, s), x.shape  # the re-layouts keep shapes, no tensor
        parts = x.reshape(segments)  # (B, H, W, g, S)

        def by_width(t: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, g, W S)
            return t.reshape(segments).transpose(2, 3).reshape(batch, height, seg, width * s)

        def from_width(t: Tensor) -> Tensor:  # (B, H, g, W S) -> (B, H, W, C)
            return t.view(batch, height, seg, width, s).transpose(2, 3).reshape(shape)

        # h and w stay strided views of their projections' outputs (no copy back to (B, H, W, C)):
        # the products below read them in place, and autograd keeps the projections' outputs anyway
        h = parts.permute(0, 2, 3, 1, 4).reshape(batch, width, seg, height * s)  # (B, W, g, H S)
        h = self.mlp_h(h).view(batch, width, seg, height, s).permute(0, 3, 1, 2, 4)  # (B, H, W, g, S) view
        # the width projection keeps x, not its permuted copy, for backward (attnzoo.kernels.relayout:
        # one input-sized tensor fewer at the peak for about 1% of the step; the height branch's 5-D
        # permute measured 2-3%, so that branch keeps its copy)
        w = relaid_linear(x, by_width, from_width, self.mlp_w)  # (B, H, g, W S)
        w = w.view(batch, height, seg, width, s).transpose(2, 3)  # (B, H, W, g, S) view
        c = self.mlp_c(x).view(batch, height, width, seg, s)  # (B, H, W, g, S), contiguous
        # three means, no (B, H, W, C) sum in forward; backward adds one broadcast into each branch's
        # gradient in place (attnzoo.kernels.reduce: no full-size quotient per mean)
        pooled = (lean_mean(c, (1, 2)) + lean_mean(h, (1, 2)) + lean_mean(w, (1, 2))).reshape(batch, channels)
        logits = self.attn_drop(self.fc2(self.attn_drop(self.act(self.fc1(pooled)))))  # (B, 3 C)
        weights = logits.reshape(batch, channels, 3).transpose(1, 2).softmax(1)  # (B, 3, C)
        a = weights.reshape(batch, 3, 1, 1, seg, s)  # (B, 3, 1, 1, g, S)
        # c a_2 + h a_0 + w a_1 summed in place into c's contiguous layout; backward reduces g * branch
        # a few samples at a time instead of writing each full-size product
        mixed = weighted_sum((c, h, w), (a[:, 2], a[:, 0], a[:, 1])).view(x.shape)  # (B, H, W, C)
        out = self.proj_drop(self.proj(mixed))
        if capturing():
            record(self, "branch", weights, branches=("height", "width", "channel"))
        return (out, weights) if need_weights else out
