"""Lambda layer (LambdaNetworks): each query applies linear functions ("lambdas") summarising the
context by content and by relative position, instead of attention maps.

Bello, "LambdaNetworks: Modeling Long-Range Interactions Without Attention", ICLR 2021,
https://arxiv.org/abs/2102.08602.

The numbers and state_dict keys are timm's ``LambdaLayer`` (``timm.layers.lambda_layer``,
``create_attn("lambda")``), intra-depth $u = 1$; ``attnzoo.convert.from_timm`` converts it
exactly. Position lambdas come from a local lambda convolution of radius ``r`` (timm's default), or
with ``r=None`` from a global relative embedding over a fixed ``feat_size`` map. Deviations: the
output keeps ``out_channels`` (timm reshapes to the input's C, so ``dim_out != dim`` crashes there);
an even ``r`` (timm's padding changes the map size, then crashes), ``stride`` other than 1 or 2
(timm ignores it) and an input of another size than ``feat_size`` raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_divisible, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register
from attnzoo.maps.capture import capturing, record
from attnzoo.mechanisms._relpos import check_stride, qk_head_width

__all__ = ["LambdaLayer"]

_PAPER = "LambdaNetworks: Modeling Long-Range Interactions Without Attention"


def _squeeze_conv3d_weight(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load hook: timm's `(k, 1, r, r, 1)` lambda convolution weight -> the `(k, 1, r, r)` one here."""
    key = prefix + "conv_lambda.weight"
    weight = state_dict.get(key)
    if isinstance(weight, Tensor) and weight.ndim == 5 and weight.shape[-1] == 1:
        state_dict[key] = weight.squeeze(-1)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, handing a contiguous gradient back. torch's CPU BatchNorm backward (eval and
    training) computes a wrong input gradient when, for a batch of one, the gradient reaching it is
    channels-last strided with a batch stride other than C*H*W, which is what the einsum and
    convolution backward give here for a `(1, C, H, W)` map: placed after the BatchNorms, this makes a
    batch of one's gradients right (timm's, which lacks it, are wrong there)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        return tangent


def _batch_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """`norm(x)`, whose gradient reaches the BatchNorm contiguous for a batch of one (`_ContiguousGrad`;
    not under `torch.jit.trace`, whose sanity check rejects a Python autograd function)."""
    out = norm(x)
    if x.shape[0] == 1 and out.requires_grad and not torch.jit.is_tracing():
        return _ContiguousGrad.apply(out)
    return out


@register(
    "lambda",
    family="global",
    paper=_PAPER,
    year=2021,
    layout="NCHW",
    example=Example(kwargs={"channels": 8, "num_heads": 2, "head_dim": 4, "r": 3},
                    inputs=((2, 8, 5, 6),), output=(2, 8, 5, 6)),
    aliases=("lambda_layer", "lambda_conv"),
)
class LambdaLayer(nn.Module):
    """Lambda layer with content and position lambdas (Bello, 2021), timm's `LambdaLayer`.

    From 1x1 projections, queries $q_n$ (h heads of width k, BatchNorm), keys $K$ (width k, softmax
    over the N = HW positions) and values $V$ (width v = out / h, BatchNorm), the content lambda
    $\\lambda^c = \\bar K^\\top V$ (k x v) is shared by all positions and the position lambda of
    position n is $\\lambda^p_n = \\sum_m E_{nm}^\\top v_m$; each head reads

    $$
    y_n^{(i)} = \\big(\\lambda^c + \\lambda^p_n\\big)^\\top q_n^{(i)}
    $$

    With `r` set, $\\lambda^p_n$ is a lambda convolution: a learned r x r convolution (k output
    channels, with bias) over the map, applied to every value channel. With `r=None`, $E_{nm}$ is a
    learned embedding of the 2-D offset of m from n over a fixed `feat_size` map. `stride=2`
    average-pools the output by 2. No attention map is formed.

    Time $O(B N k v (h + r^2))$ and memory $O(B N k v)$ with `r`; $O(B N^2 k v)$ time and
    $O(N^2 k + B N k v)$ memory with `feat_size`.

    Args:
        channels: Number of input channels C.
        out_channels: Output width (`num_heads` times v). Default: `channels`.
        feat_size: Input size `(H, W)` (or one int) of the global relative embedding; only with
            `r=None`. Default: None.
        stride: 1, or 2 to average-pool the output by 2. Default: 1.
        num_heads: Number of query heads h. Default: 4.
        head_dim: Query/key width k. Default: 16; None gives timm's
            `make_divisible(out_channels * qk_ratio, 8) // num_heads`.
        r: Side of the lambda convolution (odd), or None for the global relative embedding.
            Default: 9.
        qk_ratio: Query/key to output width ratio used when `head_dim` is None. Default: 1.0.
        qkv_bias: Bias in the q, k, v convolution. Default: False.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(B, C, H, W)` (`(H, W) = feat_size` with `r=None`).
        - Output: `(B, out_channels, H / stride, W / stride)` (floored).
        - Weights (`need_weights=True`): the normalised keys $\\bar K$ `(B, k, H, W)`, each a
          softmax over positions.

    Example:
        ```python
        >>> lam = LambdaLayer(64, r=5)
        >>> lam(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])

        ```
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        feat_size: int | tuple[int, int] | None = None,
        stride: int = 1,
        num_heads: int = 4,
        head_dim: int | None = 16,
        r: int | None = 9,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_int(channels, "channels", who)
        out = channels if out_channels is None else check_int(out_channels, "out_channels", who)
        check_int(num_heads, "num_heads", who)
        check_divisible(out, num_heads, "out_channels", "num_heads", who)
        self.stride = check_stride(stride, who)
        self.channels, self.out_channels, self.num_heads = channels, out, num_heads
        self.head_dim = qk_head_width(out, num_heads, head_dim, qk_ratio, who)
        self.v_head_dim = out // num_heads
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        k, v = self.head_dim, self.v_head_dim
        self.qkv = nn.Conv2d(channels, num_heads * k + k + v, 1, bias=qkv_bias, **factory)
        self.norm_q = nn.BatchNorm2d(num_heads * k, **factory)
        self.norm_v = nn.BatchNorm2d(v, **factory)
        self.r: int | None = None
        self.feat_size: tuple[int, int] | None = None
        self.conv_lambda: nn.Conv2d | None = None
        self.pos_emb: nn.Parameter | None = None
        if r is not None:
            if feat_size is not None:
                raise ValueError(f"{who}: feat_size is for the global embedding (r=None), got r={r!r}")
            self.r = check_int(r, "r", who)
            if self.r % 2 == 0:
                raise ValueError(f"{who}: r must be odd (a centred lambda convolution), got {r}")
            # one r x r kernel per key channel, applied to every value channel (timm: an (r, r, 1)
            # Conv3d, whose 5-D weight loads here too; 4-D keeps `.to(memory_format=...)` working)
            self.conv_lambda = nn.Conv2d(1, k, self.r, padding=self.r // 2, **factory)
            self.register_load_state_dict_pre_hook(_squeeze_conv3d_weight)
        else:
            if feat_size is None:
                raise ValueError(f"{who}: feat_size is required with r=None (the global embedding), got None")
            self.feat_size = int_pair(feat_size, "feat_size", who)
            rows, cols = self.feat_size
            self.pos_emb = nn.Parameter(torch.empty(2 * rows - 1, 2 * cols - 1, k, **factory))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, out_channels={self.out_channels}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, r={self.r}, stride={self.stride}")

    def reset_parameters(self) -> None:
        """timm's initialisation: fan-in truncated normals for the projection and the lambda
        convolution's weight, std 0.02 for the embedding."""
        nn.init.trunc_normal_(self.qkv.weight, std=self.qkv.weight.shape[1] ** -0.5)
        if self.conv_lambda is not None:
            nn.init.trunc_normal_(self.conv_lambda.weight, std=self.head_dim**-0.5)
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def _embedding(self, table: Tensor, height: int, width: int) -> Tensor:
        """`E[n, m] = table[y_m - y_n + H - 1, x_m - x_n + W - 1]`, `(N, N, k)`."""
        dev = table.device
        ys = torch.arange(height, device=dev).repeat_interleave(width)  # (N,) row of each position
        xs = torch.arange(width, device=dev).repeat(height)  # (N,) column of each position
        dy = ys[None, :] - ys[:, None] + height - 1  # (N, N)
        dx = xs[None, :] - xs[:, None] + width - 1  # (N, N)
        return table[dy, dx]  # (N, N, k)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Apply the lambdas to `x` `(B, C, H, W)`; with `need_weights`, also return the normalised
        keys `(B, k, H, W)`."""
        who = type(self).__name__
        if self.feat_size is None:
            sizes = check_shape(x, who, "B C H W", C=self.channels)
        else:
            sizes = check_shape(x, who, "B C H W", C=self.channels, H=self.feat_size[0], W=self.feat_size[1])
        batch, height, width = sizes["B"], sizes["H"], sizes["W"]
        heads, k, v, n = self.num_heads, self.head_dim, self.v_head_dim, height * width
        q, keys, values = self.qkv(x).split([heads * k, k, v], dim=1)
        q = _batch_norm(self.norm_q, q).reshape(batch, heads, k, n)  # (B, h, k, N)
        values = _batch_norm(self.norm_v, values)  # (B, v, H, W)
        keys = keys.reshape(batch, k, n).softmax(dim=-1)  # (B, k, N)
        content = torch.einsum("bkn,bvn->bkv", keys, values.reshape(batch, v, n))  # (B, k, v)
        if self.conv_lambda is not None:
            # the lambda convolution, value channels as batch: (B*v, 1, H, W) -> (B*v, k, H, W)
            position = self.conv_lambda(values.reshape(batch * v, 1, height, width))  # (B*v, k, H, W)
            position = position.reshape(batch, v, k, n)  # (B, v, k, N)
        elif self.pos_emb is not None:
            emb = self._embedding(self.pos_emb, height, width)  # (N, N, k)
            position = torch.einsum("nmk,bvm->bvkn", emb, values.reshape(batch, v, n))  # (B, v, k, N)
        else:  # both removed by hand
            raise RuntimeError(f"{who} has neither conv_lambda nor pos_emb")
        lam = content[:, :, :, None].transpose(1, 2) + position  # (B, v, k, N): content + position
        y = torch.einsum("bhkn,bvkn->bhvn", q, lam)  # (B, h, v, N)
        y = y.reshape(batch, self.out_channels, height, width)  # (B, h*v, H, W)
        if self.stride == 2:
            y = F.avg_pool2d(y, 2)
        weights = keys.reshape(batch, k, height, width)  # (B, k, H, W)
        if capturing():
            record(self, "spatial", weights.mean(1), grid=(height, width))
        return (y, weights) if need_weights else y
