"""Class-specific residual attention (CSRA): a classification head, mean pooling plus attention pooling.

Zhu, Wu, "Residual Attention: A Simple but Effective Method for Multi-Label Recognition", ICCV 2021,
https://arxiv.org/abs/2108.02456. Official code: https://github.com/Kevinz-code/CSRA (``CSRA``).

Each class scores every position with a 1x1 convolution; the class logit is the mean of its scores
plus $\\lambda$ times their attention-weighted sum (softmax with temperature $T$; $T = \\infty$ is the
maximum). The defaults are the official single-head ones ($T = 1$, $\\lambda = 0.1$, the scores divided
by the norm of each class's weight vector). fightingcv's ``ResidualAttention(channel, num_class, la)``
is the $T = \\infty$ case without that normalisation (``temperature=math.inf, normalize=False``;
``from_fightingcv`` sets both).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, record

__all__ = ["ResidualAttention"]


@register(
    "residual_attention",
    family="head",
    paper="Residual Attention: A Simple but Effective Method for Multi-Label Recognition",
    year=2021,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "num_classes": 5},
        inputs=((2, 8, 5, 5),),
        output=(2, 5),
        free_sizes=(FreeSize(((0, 2),)), FreeSize(((0, 3),))),
    ),
    aliases=("csra", "ResidualAttention", "CSRA"),
)
class ResidualAttention(nn.Module):
    """Class-specific residual attention head (Zhu and Wu, 2021).

    With $s_{k,j} = m_k^\\top x_j / \\lVert m_k \\rVert$ the score of class $k$ at position $j$ of $N = HW$:

    $$
    a_{k,j} = \\frac{e^{T s_{k,j}}}{\\sum_{j'} e^{T s_{k,j'}}},\\qquad
    y_k = \\frac1N \\sum_j s_{k,j} + \\lambda \\sum_j a_{k,j}\\, s_{k,j}
    $$

    and $\\sum_j a_{k,j} s_{k,j} = \\max_j s_{k,j}$ for $T = \\infty$.

    Args:
        channels: Number of input channels C.
        num_classes: Number of classes K (output width). Default: 1000.
        lam: Weight $\\lambda$ of the attention term. Default: 0.1 (the official code's).
        temperature: Softmax temperature $T$ > 0; `math.inf` takes the maximum. Default: 1.0.
        normalize: Divide each class's scores by the norm of its weight vector (the official
            code's; fightingcv does not). Default: True.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: `(B, K)` class logits.
        - Weights (`need_weights=True`): the attention `(B, K, H, W)` over positions (one-hot at the
          maximum for $T = \\infty$).

    Example:
        ```python
        >>> head = ResidualAttention(64, num_classes=20)
        >>> head(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 20])

        ```
    """

    infinite_options: ClassVar[tuple[str, ...]] = ("temperature",)  # math.inf: the maximum (the paper's T)

    def __init__(
        self,
        channels: int,
        num_classes: int = 1000,
        lam: float = 0.1,
        temperature: float = 1.0,
        *,
        normalize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels = check_int(channels, "channels", who)
        self.num_classes = check_int(num_classes, "num_classes", who)
        self.lam = check_float(lam, "lam", who)
        if math.isinf(self.lam):
            raise ValueError(f"{who}: lam must be finite, got {lam}")
        self.temperature = check_float(temperature, "temperature", who)
        if self.temperature <= 0:
            raise ValueError(f"{who}: temperature must be > 0 (math.inf for the maximum), got {temperature}")
        self.normalize = bool(normalize)
        self.head = nn.Conv2d(channels, num_classes, 1, bias=False, device=device, dtype=dtype)

    @property
    def temperature(self) -> float:
        """Softmax temperature; `math.inf` takes the maximum."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        # The branch is a bool fixed here: torch.compile makes a float that differs between instances a
        # SymFloat, which math.isinf in forward cannot take, and whose `== inf` guard it did not keep.
        self._temperature, self.takes_max = value, math.isinf(value)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.channels)
        score = self.head(x)  # (B, K, H, W)
        if self.normalize:
            norm = self.head.weight.flatten(1).norm(dim=1)  # (K, C, 1, 1) -> (K,)
            score = score / norm[None, :, None, None]  # (K,) -> (1, K, 1, 1)
        score = score.flatten(2)  # (B, K, H*W)
        base = score.mean(2)
        if self.takes_max:
            att, index = score.max(2)  # (B, K)
            weights = nn.functional.one_hot(index, score.shape[2]).to(score.dtype) if need_weights else None
        else:
            soft = torch.softmax(score * self.temperature, dim=2)  # (B, K, H*W)
            att, weights = (score * soft).sum(2), soft
        if capturing() and weights is not None:  # map capture: the attention averaged over classes
            grid = (dims["H"], dims["W"])
            record(self, "spatial", weights.mean(1).reshape(-1, *grid), grid=grid)
        out = base + self.lam * att  # (B, K)
        if not need_weights:
            return out
        if weights is None:  # pragma: no cover - set above whenever need_weights
            raise RuntimeError("weights were not computed")
        return out, weights.reshape(-1, self.num_classes, dims["H"], dims["W"])  # (B, K, H*W) -> (B, K, H, W)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_classes={self.num_classes}, lam={self.lam}, "
            f"temperature={self.temperature}, normalize={self.normalize}"
        )
