"""timm's lightweight multi-scale linear attention (`timm.models.efficientvit_mit.LiteMLA`, the attention of
MIT's EfficientViT, `efficientvit_b*` and `efficientvit_l*`): its constructor, call and state_dict keys.

EfficientViT (Cai et al., 2023, "EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense
Prediction") replaces the softmax by a ReLU kernel, so attention costs O(N) in the map's positions:
each head computes

$$\\mathrm{out}_i = \\frac{\\phi(q_i)^\\top \\sum_j \\phi(k_j) v_j^\\top}
{\\phi(q_i)^\\top \\sum_j \\phi(k_j) + \\epsilon}, \\quad \\phi = \\mathrm{ReLU}$$

on the 1x1-projected `qkv` and on copies of it aggregated by a depth-wise `s x s` convolution and a
grouped 1x1 convolution for each scale `s` (more heads, each seeing a neighbourhood), then one
projection. As in timm, the attention runs in float32 with autocast off (a float64 model too), the
denominator being the last column of `q (k^T [v, 1])`.

Time O(B h N d^2) and memory O(B h N d) for N = H W positions, h heads (times 1 + the number of scales)
and d = `dim`.

Shape letters: B batch, C channels, H, W map, N = H W, h heads, d head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._registry import Example, register_compat
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["TimmLiteMLA"]


def _pair(value: Any) -> tuple[Any, Any]:
    """timm's `val2tuple(value, 2)`: a value for both, or a sequence whose last item repeats."""
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    if not items:
        return None, None
    return (items[0], items[1] if len(items) > 1 else items[0])


class _ConvNormAct(nn.Module):
    """timm's `efficientvit_mit.ConvNormAct` of a 1x1 convolution: `dropout`, `conv`, `norm`, `act`."""

    def __init__(self, cin: int, cout: int, bias: bool, norm_layer: type[nn.Module] | None,
                 act_layer: type[nn.Module] | None, dd: dict[str, Any]) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.0)
        self.conv = nn.Conv2d(cin, cout, 1, bias=bias, **dd)
        self.norm = norm_layer(num_features=cout, **dd) if norm_layer else nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(self.dropout(x))))


@register_compat(example=Example({"in_channels": 8, "out_channels": 8, "dim": 4}, ((2, 8, 3, 5),),
                                 (2, 8, 3, 5)))
class TimmLiteMLA(nn.Module):
    """timm's `LiteMLA(in_channels, out_channels, heads=None, heads_ratio=1.0, dim=8, use_bias=False,
    norm_layer=(None, nn.BatchNorm2d), act_layer=(None, None), kernel_func=nn.ReLU, scales=(5,), eps=1e-5)`
    (`attnzoo.compat.TimmLiteMLA`): the module docstring gives the formula.

    Shape:
        - x: `(B, in_channels, H, W)`.
        - Output: `(B, out_channels, H, W)`.
    """

    float32_math = True  # the attention runs in float32 whatever the input (timm's numbers): tests know it

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int | None = None,
        heads_ratio: float = 1.0,
        dim: int = 8,
        use_bias: bool | Sequence[bool] = False,
        norm_layer: Any = (None, nn.BatchNorm2d),
        act_layer: Any = (None, None),
        kernel_func: type[nn.Module] = nn.ReLU,
        scales: Sequence[int] = (5,),
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_channels = check_int(in_channels, "in_channels", who)
        self.dim = check_int(dim, "dim", who)
        ratio = check_float(heads_ratio, "heads_ratio", who, minimum=0.0)
        default = int(in_channels // dim * ratio)
        self.heads = check_int(heads or default, "heads (default in_channels // dim * heads_ratio)", who)
        self.eps = check_float(eps, "eps", who, above=0.0)  # 0: a query of all-zero ReLU features is 0 / 0
        if not isinstance(scales, (tuple, list)):  # an int would fail iterating, naming no argument
            raise TypeError(f"{who}: scales must be a tuple of odd kernel sizes such as (5,), got "
                            f"{type(scales).__name__} {scales!r}")
        self.scales = tuple(check_int(s, "scales", who) for s in scales)
        if any(s % 2 == 0 for s in self.scales):
            raise ValueError(f"{who}: scales must be odd kernel sizes (timm's same padding), got {scales}")
        total = self.heads * self.dim
        bias, norm, act = _pair(use_bias), _pair(norm_layer), _pair(act_layer)
        for name, layers in (("norm_layer", norm), ("act_layer", act)):
            if any(layer is not None and (not callable(layer) or isinstance(layer, str)) for layer in layers):
                raise TypeError(f"{who}: {name} must be an nn.Module class, None or a pair of them, got "
                                f"{layers}")
        self.qkv = _ConvNormAct(in_channels, 3 * total, bool(bias[0]), norm[0], act[0], dd)
        self.aggreg = nn.ModuleList(nn.Sequential(
            nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=bool(bias[0]), **dd),
            nn.Conv2d(3 * total, 3 * total, 1, groups=3 * self.heads, bias=bool(bias[0]), **dd),
        ) for s in self.scales)
        self.kernel_func = kernel_func(inplace=False)
        self.proj = _ConvNormAct(total * (1 + len(self.scales)), check_int(out_channels, "out_channels", who),
                                 bool(bias[1]), norm[1], act[1], dd)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, scales={self.scales}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        """Multi-scale ReLU linear attention over the positions of `x` `(B, C, H, W)`: `(B, out, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.in_channels)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        qkv = self.qkv(x)  # (B, 3 h d, H, W)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)  # (B, 3 h d (1 + scales), H, W)
        qkv = qkv.reshape(batch, -1, 3 * self.dim, height * width).transpose(-1, -2)  # (B, h', N, 3 d)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, h', N, d) each
        q, k = self.kernel_func(q), self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)  # the last column sums the denominator
        if v.device.type != "meta":
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = self._attend(q, k, v)
        else:
            out = self._attend(q, k, v)
        if capturing():  # map capture: the implicit normalised kernel rows of the capture's query points
            self._record(q, k, (height, width))
        return self.proj(out.transpose(-1, -2).reshape(batch, -1, height, width))  # (B, out, H, W)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """timm's `_attn`: in float32, `q (k^T v)` then the division by the padded column (+ eps)."""
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        out = q @ (k.transpose(-1, -2) @ v)  # (B, h', N, d + 1)
        return (out[..., :-1] / (out[..., -1:] + self.eps)).to(dtype)

    def _record(self, q: Tensor, k: Tensor, grid: tuple[int, int]) -> None:
        idx = query_indices(grid, q.device)
        with torch.no_grad():
            scores = q.float().index_select(-2, idx) @ k.float().transpose(-1, -2)  # (B, h', Q, N)
            weights = scores / (scores.sum(-1, keepdim=True) + self.eps)
        record(self, "rows", weights.to(q.dtype), grid=grid, queries=idx, query_grid=grid,
               note="no softmax: relu(q) relu(k)^T normalised over the keys (ReLU linear attention)")
