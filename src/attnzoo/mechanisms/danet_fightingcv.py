"""fightingcv's DANet modules, kept with their constructors, parameter names and numbers.

fightingcv-attention's DANet.py (xmu-xiaoma666/External-Attention-pytorch) is not the paper's DANet
(see attnzoo.mechanisms.danet, Fu et al., 2019, https://arxiv.org/abs/1809.02983):

- `PositionAttentionModule(d_model, kernel_size, H, W)`: a k x k convolution, then one-head scaled
  dot-product self-attention with Linear query, key, value and output projections (C -> C,
  scale $1/\\sqrt{C}$, dropout 0.1 on the weights) over the positions; it returns **tokens**
  `(B, N, C)`, without residual or $\\gamma$. The paper's module has C/8 queries and keys, unscaled
  logits, no output projection and returns $\\gamma\\,\\mathrm{attention} + x$ as a map.
- `ChannelAttentionModule(d_model, kernel_size, H, W)`: a k x k convolution, then attention between
  the channels with scale $1/\\sqrt{HW}$, plain (not `max - energy`) logits, dropout 0.1 and a Linear
  output projection over the H*W positions, so it runs only for the `H*W` it was built for; it
  returns `(B, C, N)` without residual or $\\gamma$.
- `DAModule(d_model, kernel_size, H, W)` ignores its arguments and builds both modules for
  `d_model=512, kernel_size=3, H=W=7`, so it runs only on `(B, 512, 7, 7)` inputs; it sums the two
  outputs as maps (no convolutions around the attention, no output convolution).

The classes here reproduce that (for any size where fightingcv runs, and also where its `DAModule`
ignores its arguments: `FightingcvDAModule` uses them), running the attention through
`attnzoo.functional.attend`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape, checked
from attnzoo.functional import attend

__all__ = ["FightingcvPositionAttentionModule", "FightingcvChannelAttentionModule", "FightingcvDAModule"]


class _Projections(nn.Module):
    """fightingcv's `ScaledDotProductAttention(d, d, d, h=1)` parameters (`fc_q`, `fc_k`, `fc_v`, `fc_o`)
    or, with `qkv=False`, its `SimplifiedScaledDotProductAttention(d, h=1)` (`fc_o` only)."""

    def __init__(self, dim: int, qkv: bool, dropout: float, factory: dict[str, Any]) -> None:
        super().__init__()
        if qkv:
            self.fc_q = nn.Linear(dim, dim, **factory)
            self.fc_k = nn.Linear(dim, dim, **factory)
            self.fc_v = nn.Linear(dim, dim, **factory)
        self.fc_o = nn.Linear(dim, dim, **factory)
        self.dropout = nn.Dropout(dropout)


def _conv(d_model: int, kernel_size: int, factory: dict[str, Any]) -> nn.Conv2d:
    return nn.Conv2d(d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, **factory)


def _check(d_model: int, kernel_size: int, h: int, w: int, who: str) -> None:
    for name, value in (("d_model", d_model), ("kernel_size", kernel_size), ("H", h), ("W", w)):
        check_int(value, name, who)


@checked
class FightingcvPositionAttentionModule(nn.Module):
    """fightingcv's `PositionAttentionModule(d_model=512, kernel_size=3, H=7, W=7)` (H and W unused).

    $y = \\mathrm{conv}(x)$ as tokens, then
    $W_o\\,\\mathrm{softmax}(W_q y\\,(W_k y)^\\top / \\sqrt{C})\\,W_v y$ (one head, dropout 0.1 on
    the weights in training).

    Args:
        d_model: Channels C. Default: 512.
        kernel_size: Size of the convolution (padding `(k - 1) // 2`). Default: 3.
        H: Unused (fightingcv's signature). Default: 7.
        W: Unused (fightingcv's signature). Default: 7.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: tokens `(B, N', C)`, N' the positions of the convolution's output.

    Example:
        ```python
        >>> pam = FightingcvPositionAttentionModule(d_model=64).eval()
        >>> pam(torch.randn(2, 64, 7, 5)).shape
        torch.Size([2, 35, 64])

        ```
    """

    def __init__(
        self, d_model: int = 512, kernel_size: int = 3, H: int = 7, W: int = 7,  # noqa: N803
        *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check(d_model, kernel_size, H, W, type(self).__name__)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.cnn = _conv(d_model, kernel_size, factory)
        self.pa = _Projections(d_model, True, 0.1, factory)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens `(B, N', C)` of the attention over the convolved positions of `x` `(B, C, H, W)`."""
        check_shape(x, type(self).__name__, "B C H W", C=self.d_model)
        y = self.cnn(x).flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, N', C)
        pa = self.pa
        q, k, v = (fc(y).unsqueeze(1) for fc in (pa.fc_q, pa.fc_k, pa.fc_v))  # (B, 1, N', C)
        drop = pa.dropout.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=drop, scale=1.0 / math.sqrt(self.d_model))  # (B, 1, N', C)
        return pa.fc_o(out.squeeze(1))  # (B, N', C)


@checked
class FightingcvChannelAttentionModule(nn.Module):
    """fightingcv's `ChannelAttentionModule(d_model=512, kernel_size=3, H=7, W=7)`.

    $y = \\mathrm{conv}(x)$ as `(B, C, N)`, then
    $\\mathrm{softmax}(y y^\\top / \\sqrt{N})\\,y\\,W_o^\\top + b_o$
    (dropout 0.1 on the weights in training); $W_o$ acts on the N = H*W positions, so inputs must
    have `H*W` positions after the convolution.

    Args:
        d_model: Channels C. Default: 512.
        kernel_size: Size of the convolution (padding `(k - 1) // 2`). Default: 3.
        H: Height the output projection is built for. Default: 7.
        W: Width the output projection is built for. Default: 7.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H', W')` whose convolution has `H*W` positions.
        - Output: `(B, C, H*W)`.

    Example:
        ```python
        >>> cam = FightingcvChannelAttentionModule(d_model=64, H=5, W=3).eval()
        >>> cam(torch.randn(2, 64, 5, 3)).shape
        torch.Size([2, 64, 15])

        ```
    """

    def __init__(
        self, d_model: int = 512, kernel_size: int = 3, H: int = 7, W: int = 7,  # noqa: N803
        *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check(d_model, kernel_size, H, W, type(self).__name__)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model, self.positions = d_model, H * W
        self.cnn = _conv(d_model, kernel_size, factory)
        self.pa = _Projections(H * W, False, 0.1, factory)

    def forward(self, x: Tensor) -> Tensor:
        """`(B, C, H*W)`: attention between the channels of the convolved `x` `(B, C, H', W')`."""
        who = type(self).__name__
        check_shape(x, who, "B C H W", C=self.d_model)
        y = self.cnn(x).flatten(2)  # (B, C, N)
        if y.shape[-1] != self.positions:
            raise ValueError(
                f"{who} expects its convolution to give {self.positions} positions (H*W it was built for), "
                f"got {y.shape[-1]} from x of shape {tuple(x.shape)}"
            )
        t = y.unsqueeze(1)  # (B, 1, C, N): the channels are the tokens
        drop = self.pa.dropout.p if self.training else 0.0
        out = attend(t, t, t, dropout_p=drop, scale=1.0 / math.sqrt(self.positions))  # (B, 1, C, N)
        return self.pa.fc_o(out.squeeze(1))  # (B, C, N)


@checked
class FightingcvDAModule(nn.Module):
    """fightingcv's `DAModule`: the two modules above, their outputs summed as maps.

    fightingcv's own `DAModule` ignores its arguments and always builds the modules for
    `d_model=512, kernel_size=3, H=W=7`; this class uses the arguments (its defaults are the same).

    Args:
        d_model: Channels C. Default: 512.
        kernel_size: Size of both convolutions. Default: 3.
        H: Height of the inputs. Default: 7.
        W: Width of the inputs. Default: 7.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)`.
        - Output: `(B, C, H, W)`.

    Example:
        ```python
        >>> da = FightingcvDAModule(d_model=32, H=4, W=6).eval()
        >>> da(torch.randn(2, 32, 4, 6)).shape
        torch.Size([2, 32, 4, 6])

        ```
    """

    def __init__(
        self, d_model: int = 512, kernel_size: int = 3, H: int = 7, W: int = 7,  # noqa: N803
        *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd (the map keeps its size), got "
                             f"{kernel_size}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        args = (d_model, kernel_size, H, W)
        self.position_attention_module = FightingcvPositionAttentionModule(*args, **factory)
        self.channel_attention_module = FightingcvChannelAttentionModule(*args, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """The sum of both modules' outputs on `x` `(B, C, H, W)`, as a map."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.position_attention_module.d_model)
        b, c, h, w = dims["B"], dims["C"], dims["H"], dims["W"]
        p_out = self.position_attention_module(x).transpose(1, 2).reshape(b, c, h, w)  # (B, N, C) -> map
        c_out = self.channel_attention_module(x).reshape(b, c, h, w)  # (B, C, N) -> map
        return p_out + c_out
