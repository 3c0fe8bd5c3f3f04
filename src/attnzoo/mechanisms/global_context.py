"""Global context (GC) block: attention-pooled context, transformed, fused into every position.

Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
ICCV Workshops 2019, https://arxiv.org/abs/1904.11492.

A 1x1 convolution and a softmax over H*W give one spatial weighting shared by all queries (the
paper's simplified non-local block); the weighted sum of the map is a context vector per channel,
passed through a bottleneck ``fc1 -> LayerNorm -> act -> fc2`` and fused into every position by
addition (the paper's best, ``gca``) and/or as a sigmoid channel gate (timm's default, ``gc``).
Both registered forms are timm's ``GlobalContext`` as ``create_attn`` builds them, with its
state_dict keys. Deviations: timm's ``init_last_zero`` (stored, never used) is dropped; turning off
both fusions (timm: an identity with unused weights) raises ``ValueError``. The official GCNet
``ContextBlock`` (xvjiarui/GCNet) normalises with ``LayerNorm([r, 1, 1])``, eps 1e-5, where timm (and
this class) use 1e-6; set ``norm.eps = 1e-5`` on ``mlp_add`` / ``mlp_scale`` for its numbers (its keys
``channel_add_conv.{0,1,3}`` / ``channel_mul_conv.*`` map to ``fc1``, ``norm`` (weight flattened),
``fc2``; ``conv_mask`` to ``conv_attn``; ``pooling_type='avg'`` is ``use_attn=False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_shape
from attnzoo._registry import Example, register
from attnzoo.kernels.reduce import lean_mean
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import check_layer, hidden_channels

__all__ = ["GlobalContext", "GlobalContextAdd", "ContextMlp"]

_PAPER = "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond"


class ContextMlp(nn.Module):
    """The context transform ``fc2(act(LayerNorm(fc1(c))))`` on context vectors `(B, C)`.

    1x1 convolutions and a LayerNorm over the hidden channels, under timm's ``ConvMlp`` keys
    (``fc1``, ``norm``, ``fc2``), applied to the vector directly (same numbers).
    """

    def __init__(
        self, channels: int, hidden: int, act_layer: type[nn.Module], factory: dict[str, Any]
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, **factory)
        self.norm = nn.LayerNorm(hidden, eps=1e-6, **factory)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, 1, **factory)

    def forward(self, context: Tensor) -> Tensor:
        hidden = F.linear(context, self.fc1.weight.flatten(1), self.fc1.bias)  # (B, C) -> (B, r)
        hidden = self.act(self.norm(hidden))
        return F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias)  # (B, r) -> (B, C)


@register(
    "gc",
    family="gating",
    paper=_PAPER,
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("global_context",),
)
class GlobalContext(nn.Module):
    """Global context block (Cao et al., 2019), fused by scaling (timm's default, `create_attn("gc")`).

    With attention weights $a = \\mathrm{softmax}_{HW}(w_k^\\top x + b_k)$ (or uniform without
    `use_attn`), the context $c = \\sum_{h,w} a_{h,w}\\, x_{:,h,w}$ is transformed by
    $T(c) = W_2\\,\\phi(\\mathrm{LN}(W_1 c))$ and fused:

    $$
    y = x \\odot \\sigma\\big(T_{scale}(c)\\big) + T_{add}(c)
    $$

    where each term is present only when its fusion (`fuse_scale`, `fuse_add`) is on.

    Args:
        channels: Number of input channels C.
        reduction: The hidden width is `C / reduction` rounded to a multiple of `rd_divisor`.
            Default: 8 (timm's `rd_ratio=1/8`).
        rd_channels: Hidden width, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 1.
        use_attn: Pool with the learned softmax weights; False pools with the mean (as SE).
            Default: True.
        fuse_add: Add the transformed context to every position (the paper's fusion). Default: False.
        fuse_scale: Rescale the channels by the sigmoid of a transformed context. Default: True.
        act_layer: Activation class of the transforms. Default: `nn.ReLU`.
        gate_layer: Gate activation class of the scale fusion. Default: `nn.Sigmoid`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape.
        - Weights (`need_weights=True`): the pooling weights `(B, H, W)` (uniform without `use_attn`).

    Example:
        ```python
        >>> gc = GlobalContext(64)
        >>> gc(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 8,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        use_attn: bool = True,
        fuse_add: bool = False,
        fuse_scale: bool = True,
        *,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        hidden = hidden_channels(channels, reduction, rd_channels, rd_divisor, who)
        check_layer(act_layer, "act_layer", who)
        check_layer(gate_layer, "gate_layer", who)
        if not (fuse_add or fuse_scale):
            raise ValueError(f"{who}: at least one of fuse_add and fuse_scale must be True, got both False")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels, self.rd_channels = channels, hidden
        self.conv_attn = nn.Conv2d(channels, 1, 1, **factory) if use_attn else None
        self.mlp_add = ContextMlp(channels, hidden, act_layer, factory) if fuse_add else None
        self.mlp_scale = ContextMlp(channels, hidden, act_layer, factory) if fuse_scale else None
        self.gate = gate_layer()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: He-normal attention logits, a zero last layer in the add transform
        (the block starts as an identity plus a bias), PyTorch's defaults elsewhere."""
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        if self.mlp_add is not None:
            nn.init.zeros_(self.mlp_add.fc2.weight)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Fuse the global context into `x` `(B, C, H, W)`; with `need_weights`, also return the
        pooling weights `(B, H, W)`."""
        sizes = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        batch, height, width = sizes["B"], sizes["H"], sizes["W"]
        if self.conv_attn is not None:
            # Batched GEMMs on the (B, C, H*W) view: no copy of x (einsum's "bchw,c" permutes x to
            # channels-last first, a full extra pass in forward and backward).
            flat = x.reshape(batch, self.channels, height * width)  # (B, C, N), a view when contiguous
            weight = self.conv_attn.weight.view(1, 1, self.channels).expand(batch, 1, self.channels)
            logits = torch.bmm(weight, flat)  # (B, 1, N)
            if self.conv_attn.bias is not None:
                logits = logits + self.conv_attn.bias
            attn = logits.softmax(-1)  # (B, 1, N): softmax over H*W
            context = torch.bmm(flat, attn.transpose(1, 2)).view(batch, self.channels)  # (B, C)
            attn = attn.view(batch, height, width)  # (B, H, W)
            if capturing():  # map capture: the pooling weights
                record(self, "spatial", attn, grid=(height, width))
        else:
            context = lean_mean(x, (2, 3))  # (B, C)
            attn = x.new_full((batch, height, width), 1.0 / (height * width))  # (tiny) uniform weights
        if self.mlp_scale is not None:
            gate = self.gate(self.mlp_scale(context))[:, :, None, None]  # (B, C, 1, 1)
            out = x * gate if self.mlp_add is None else torch.addcmul(
                self.mlp_add(context)[:, :, None, None], x, gate
            )
        else:
            out = x + self.mlp_add(context)[:, :, None, None]  # type: ignore[misc]  # (B, C, 1, 1)
        return (out, attn) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rd_channels={self.rd_channels}"


@register(
    "gca",
    family="gating",
    paper=_PAPER,
    year=2019,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "reduction": 2}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("gcnet", "global_context_add"),
)
class GlobalContextAdd(GlobalContext):
    """Global context block fused by addition: the paper's GC block (`create_attn("gca")`).

    $$
    y = x + W_2\\,\\mathrm{ReLU}\\big(\\mathrm{LN}(W_1 c)\\big),\\qquad
    c = \\sum_{h,w} \\mathrm{softmax}_{HW}(w_k^\\top x + b_k)_{h,w}\\, x_{:,h,w}
    $$

    `GlobalContext` with `fuse_add=True, fuse_scale=False` by default; same arguments.

    Shape:
        - Input: (B, C, H, W)
        - Output: (B, C, H, W), the input plus the transformed global context.

    Example:
        ```python
        >>> gca = GlobalContextAdd(64)
        >>> gca(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 8,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        use_attn: bool = True,
        fuse_add: bool = True,
        fuse_scale: bool = False,
        *,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            channels, reduction, rd_channels, rd_divisor, use_attn, fuse_add, fuse_scale,
            act_layer=act_layer, gate_layer=gate_layer, device=device, dtype=dtype,
        )
