"""ECA: efficient channel attention, its circular variant and timm's MLP variant.

Wang, Wu, Zhu, Li, Zuo, Hu, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
Networks", CVPR 2020, https://arxiv.org/abs/1910.03151.

``out = x * gate(conv1d_k(mean_hw x))``: a 1-D convolution across the pooled channel vector replaces
SE's bottleneck MLP. Three registered forms, named as timm's ``create_attn`` names them:

- ``eca``: zero-padded convolution (timm's ``EcaModule``, the paper's);
- ``ceca``: circular padding, so the first and last channels are neighbours (timm's ``CecaModule``);
- ``ecam``: timm's experimental pointwise-MLP variant (``EcaModule(use_mlp=True)``, not in the paper).

Deviations: the adaptive kernel size has timm's floor of 3 (the official code has none); an explicit
``kernel_size`` is used as given (timm ignores it whenever ``channels`` is given, which
``create_attn`` always does); circular padding wraps around as often as needed, so a kernel wider
than the channel count works (timm's ``F.pad(mode="circular")`` refuses it).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape, checked
from attnzoo._registry import Example, register
from attnzoo.kernels.gate import GatePlan, fused_gate
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._widths import adaptive_kernel_size, check_layer, hidden_channels
from attnzoo.mechanisms.se import gate_plainly

__all__ = ["EfficientChannelAttention", "CircularEfficientChannelAttention", "EfficientChannelAttentionMlp"]

_PAPER = "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks"


def _kernel_size(channels: int, kernel_size: int | None, gamma: float, beta: float, who: str) -> int:
    adaptive = adaptive_kernel_size(channels, gamma, beta, who)  # checks channels, gamma, beta
    if kernel_size is None:
        return adaptive
    check_int(kernel_size, "kernel_size", who)
    if kernel_size % 2 == 0:
        raise ValueError(f"{who}: kernel_size must be odd (a centred window), got {kernel_size}")
    return kernel_size


def _circular(y: Tensor, padding: int) -> Tensor:
    """``y`` (B, k, C) extended by ``padding`` entries at each end, wrapping around C (any padding)."""
    channels = y.shape[-1]
    index = torch.arange(-padding, channels + padding, device=y.device) % channels  # (C + 2p,)
    return y.index_select(-1, index)  # (B, k, C + 2p)


@checked  # the registry checks each class's own forward; this one is inherited
class _ChannelGate(nn.Module):
    """Shared forward of the ECA gates: pool, ``mix`` the (B, 1, C) vector, gate, rescale."""

    channels: int | None  # None (set by attnzoo.convert.from_timm): any C, as timm's ECA accepts

    def mix(self, pooled: Tensor) -> Tensor:  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Rescale each channel of `x` `(B, C, H, W)`; with `need_weights`, also return the gate `(B, C)`."""
        sizes = {} if self.channels is None else {"C": self.channels}
        check_shape(x, type(self).__name__, "B C H W", **sizes)  # type: ignore[arg-type]
        plan = GatePlan(channel_fn=self.excite, channel_stats=("mean",))
        if not need_weights:  # the lean gating kernel: one full-size temporary in backward
            return fused_gate(x, plan, tuple(self.parameters()))
        out, gate, _ = gate_plainly(x, plan)
        return out, cast(Tensor, gate)  # (B, C, H, W), (B, C)

    def excite(self, pooled: Tensor) -> Tensor:
        """The gate `(B, C)` from the channel means `(B, C)`."""
        gate = self.gate(self.mix(pooled.unsqueeze(1))).squeeze(1)  # type: ignore[operator]  # (B, 1, C) -> (B, C)
        if capturing():  # map capture: the channel gate
            record(self, "channel", gate)
        return gate


@register(
    "eca",
    family="gating",
    paper=_PAPER,
    year=2020,
    layout="NCHW",
    example=Example(kwargs={"channels": 8}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("efficient_channel_attention", "EcaModule"),
)
class EfficientChannelAttention(_ChannelGate):
    """Efficient Channel Attention (Wang et al., 2020).

    The per-channel means $s$ are mixed by one 1-D convolution of odd size $k$ across channels,
    so each gate sees its $k$ neighbouring channels:

    $$
    g = \\sigma(w * s),\\qquad y_{c,h,w} = g_c\\,x_{c,h,w},\\qquad
    k = \\Big|\\frac{\\log_2 C + \\beta}{\\gamma}\\Big|_{odd} \\ge 3 .
    $$

    Args:
        channels: Number of input channels C.
        kernel_size: Odd size k of the convolution across channels; None picks it from C with
            `gamma` and `beta`, as the paper does. Default: None.
        gamma: Slope of the adaptive kernel size. Default: 2.
        beta: Offset of the adaptive kernel size. Default: 1.
        bias: Give the convolution a bias (timm's `CecaModule` has one when given an `act_layer`).
            Default: False.
        gate_layer: Gate activation class. Default: `nn.Sigmoid`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape, each channel rescaled.
        - Weights (`need_weights=True`): the gate `(B, C)`.

    Example:
        ```python
        >>> eca = EfficientChannelAttention(64)  # kernel_size 3 for 64 channels
        >>> eca(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    circular: bool = False

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2.0,
        beta: float = 1.0,
        *,
        bias: bool = False,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_layer(gate_layer, "gate_layer", who)
        self.channels: int | None = channels
        self.kernel_size = _kernel_size(channels, kernel_size, gamma, beta, who)
        self.padding = (self.kernel_size - 1) // 2
        # timm's key: conv.weight (1, 1, k); padding is applied in `mix`.
        self.conv = nn.Conv1d(1, 1, self.kernel_size, bias=bias, device=device, dtype=dtype)
        self.gate = gate_layer()

    def mix(self, pooled: Tensor) -> Tensor:
        """The convolution across channels of `pooled` `(B, 1, C)`, zero- or circularly padded."""
        if self.circular:
            return self.conv(_circular(pooled, self.padding))  # (B, 1, C + 2p) -> (B, 1, C)
        return F.conv1d(pooled, self.conv.weight, self.conv.bias, padding=self.padding)  # (B, 1, C)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, circular={self.circular}"


@register(
    "ceca",
    family="gating",
    paper=_PAPER,
    year=2020,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "kernel_size": 5}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)),
    aliases=("circular_eca", "CecaModule"),
)
class CircularEfficientChannelAttention(EfficientChannelAttention):
    """ECA with circular padding: the convolution across channels wraps around, so the first and
    last channels are neighbours (timm's `CecaModule`, by Chris Ha).

    $$
    g_c = \\sigma\\Big(\\sum_{j=-p}^{p} w_j\\, s_{(c + j) \\bmod C}\\Big),\\qquad y_{c,h,w} = g_c\\,x_{c,h,w}
    $$

    Arguments and weights as `EfficientChannelAttention`.

    Shape:
        - Input: (B, C, H, W)
        - Output: (B, C, H, W), the input rescaled per channel.

    Example:
        ```python
        >>> ceca = CircularEfficientChannelAttention(64, kernel_size=5)
        >>> ceca(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    circular = True


@register(
    "ecam",
    family="gating",
    paper=_PAPER,
    year=2020,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "rd_channels": 4}, inputs=((2, 8, 5, 5),), output=(2, 8, 5, 5)
    ),
    aliases=("eca_mlp",),
)
class EfficientChannelAttentionMlp(_ChannelGate):
    """timm's MLP variant of ECA (`EcaModule(use_mlp=True)`, an experiment, not in the paper).

    Every pooled channel value is lifted to `rd_channels` features by a pointwise convolution, passed
    through `act_layer`, and the features of the $k$ neighbouring channels are mixed back to one:

    $$
    h = \\phi(a\\, s + b),\\qquad g = \\sigma(W * h + c),\\qquad y_{c,h,w} = g_c\\,x_{c,h,w}
    $$

    with $a, b \\in \\mathbb{R}^{r}$ and $W \\in \\mathbb{R}^{1 \\times r \\times k}$.

    Args:
        channels: Number of input channels C.
        kernel_size: Odd size k of the convolution across channels; None picks it from C (as
            `EfficientChannelAttention`). Default: None.
        gamma: Slope of the adaptive kernel size. Default: 2.
        beta: Offset of the adaptive kernel size. Default: 1.
        reduction: The hidden width is `C / reduction` rounded to a multiple of `rd_divisor`
            (timm's `rd_ratio=1/8`). Default: 8.
        rd_channels: Hidden width r, overriding `reduction`. Default: None.
        rd_divisor: Round the hidden width to a multiple of this. Default: 8.
        act_layer: Activation class of the hidden features. Default: `nn.ReLU`.
        gate_layer: Gate activation class. Default: `nn.Sigmoid`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: same shape, each channel rescaled.
        - Weights (`need_weights=True`): the gate `(B, C)`.

    Example:
        ```python
        >>> ecam = EfficientChannelAttentionMlp(64)  # hidden width 8, kernel_size 3
        >>> ecam(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2.0,
        beta: float = 1.0,
        reduction: int = 8,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        *,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_layer(act_layer, "act_layer", who)
        check_layer(gate_layer, "gate_layer", who)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels: int | None = channels
        self.kernel_size = _kernel_size(channels, kernel_size, gamma, beta, who)
        self.padding = (self.kernel_size - 1) // 2
        self.rd_channels = hidden_channels(channels, reduction, rd_channels, rd_divisor, who, round_limit=0.9)
        # timm's keys: conv (r, 1, 1) + bias, conv2 (1, r, k) + bias.
        self.conv = nn.Conv1d(1, self.rd_channels, 1, **factory)
        self.act = act_layer()
        self.conv2 = nn.Conv1d(self.rd_channels, 1, self.kernel_size, padding=self.padding, **factory)
        self.gate = gate_layer()

    def mix(self, pooled: Tensor) -> Tensor:
        """`(B, 1, C)` -> `(B, r, C)` pointwise -> activation -> `(B, 1, C)` across k channels."""
        return self.conv2(self.act(self.conv(pooled)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, rd_channels={self.rd_channels}"
