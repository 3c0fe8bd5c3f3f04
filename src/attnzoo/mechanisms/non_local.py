r"""Non-local block for 1-D, 2-D and 3-D feature maps, with the paper's four pairwise functions.

Wang, Girshick, Gupta and He, "Non-local Neural Networks", CVPR 2018, https://arxiv.org/abs/1711.07971.
$z = W(y) + x$ with $y_i = \frac{1}{C(x)} \sum_j f(x_i, x_j)\, g(x_j)$ over all N = L, H*W or T*H*W
positions (keys subsampled by 2x2 max pooling when `pool_keys`). `pairwise` picks $f$:

- `embedded_gaussian` (default, the seed): $\mathrm{softmax}_j(\theta_i \cdot \phi_j)$, unscaled logits
  (`qk_scale=C ** -0.5` with `pool_keys=False` is timm's `NonLocalAttn`);
- `gaussian`: $\mathrm{softmax}_j(x_i \cdot x_j)$ (no theta/phi projections; keys are pooled x);
- `dot_product`: $\theta_i \cdot \phi_j / N'$ with N' the number of keys;
- `concatenation`: $\mathrm{ReLU}(w \cdot [\theta_i, \phi_j]) / N'$ (`concat_project`, as in the widely
  used PyTorch port, so its checkpoints load).

Memory: nothing of size N x N' is built unless the map is asked for (`need_weights=True`, map capture)
or fusion is off (`attnzoo.fused_attn(False)`, the plain reference path). The two softmax functions run
`attnzoo.kernels.blocked.global_attention` (SDPA's flash kernel, or a blocked exact kernel when the
query/key and value widths differ); `dot_product` is reassociated, $\theta (\phi^\top g) / N'$,
O(N C1^2); `concatenation` splits $w \cdot [\theta_i, \phi_j] = a_i + b_j$ and, with the keys sorted
by $b_j$, sums $\mathrm{ReLU}(a_i + b_j) g_j = (a_i + b_j) g_j$ over the keys with $b_j > -a_i$ from
prefix sums: O((N + N') C1 + N' log N') time and memory, computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_float, check_int, check_shape
from attnzoo._registry import Example, FreeSize, register, register_seed
from attnzoo.functional import fused_enabled
from attnzoo.kernels.blocked import global_attention
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["NonLocalBlock", "NonLocalBlockND"]

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
_LETTERS = {1: "B C L", 2: "B C H W", 3: "B C T H W"}
_ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d
_CONV: dict[int, type[_ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN: dict[int, type[nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}
_POOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_POOL_KERNEL: dict[int, int | tuple[int, ...]] = {1: 2, 2: (2, 2), 3: (1, 2, 2)}
_POOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _conv(module: nn.Module) -> _ConvNd:
    """The 1x1 convolution inside `module` (itself, or the first layer of a Sequential)."""
    return cast(_ConvNd, module[0] if isinstance(module, nn.Sequential) else module)


def pointwise_tokens(x_t: Tensor, convs: Sequence[_ConvNd]) -> Tensor:
    """The 1x1 convolutions `convs` applied at once to tokens `(B, N, C) -> (B, N, sum(C_out))`."""
    weight = torch.cat([c.weight.flatten(1) for c in convs])  # (sum(C_out), C)
    bias = torch.cat([cast(Tensor, c.bias) for c in convs])
    return F.linear(x_t, weight, bias)


def _concat_sum(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    r"""$y_i = \sum_j \mathrm{ReLU}(a_i + b_j)\, g_j$ without the N x N' matrix (float64 prefix sums).

    Shape:
        - a `(B, N)`, b `(B, N')`, g `(B, N', C1)` -> `(B, N, C1)`.
    """
    work = torch.float64 if a.device.type in ("cpu", "cuda") else torch.float32
    a, b, g = a.to(work), b.to(work), g.to(work)
    shift = b.median(dim=1, keepdim=True).values.detach()  # centring shrinks the cancellation
    a, b = a + shift, b - shift  # a_i + b_j is unchanged
    b_desc, order = b.sort(dim=1, descending=True)  # (B, N')
    g_desc = g.gather(1, order.unsqueeze(-1).expand_as(g))  # (B, N', C1)
    zero = g.new_zeros(g.shape[0], 1, g.shape[2])
    sum_g = torch.cat([zero, g_desc.cumsum(1)], 1)  # (B, N'+1, C1): sums of the first m keys
    sum_bg = torch.cat([zero, (b_desc.unsqueeze(-1) * g_desc).cumsum(1)], 1)  # (B, N'+1, C1)
    # count_i = #{j : b_j > -a_i}: those keys are the first count_i in descending order.
    count = torch.searchsorted(-b_desc.detach(), a.detach(), side="left")  # (B, N)
    index = count.unsqueeze(-1).expand(-1, -1, g.shape[2])  # (B, N, C1)
    return a.unsqueeze(-1) * sum_g.gather(1, index) + sum_bg.gather(1, index)


class NonLocalBlock(nn.Module):
    r"""Non-local block $z = W(y) + x$, $y_i = \frac{1}{C(x)} \sum_j f(x_i, x_j)\, g(x_j)$.

    The first five arguments are the seed's five, in the seed's order, under vocabulary names.

    Args:
        channels: Input channels C (the seed's `in_channels`).
        rd_channels: Channels C1 of theta, phi and g (the seed's `inter_channels`). Default: None,
            `max(C // reduction, 1)`.
        spatial_dims: 1, 2 or 3 spatial dims (the seed's `dimension`). Default: 2.
        pool_keys: Max-pool the keys and values (phi, g) by 2 in every spatial dim except T (kernel 2,
            `(2, 2)`, `(1, 2, 2)`); odd sizes are floored, so the last row/column never serves as a
            key (it still gets an output). Needs L, H, W >= 2 (the seed's `sub_sample`). Default: True.
        batch_norm: `W` is a 1x1 convolution followed by BatchNorm of `spatial_dims` dims (its weight
            and bias start at 0), else a 1x1 convolution starting at 0; either way the block starts
            as the identity (the seed's `bn_layer`). Default: True.
        pairwise: The pairwise function f: `"embedded_gaussian"`, `"gaussian"`, `"dot_product"` or
            `"concatenation"` (the port's `mode`). Default: `"embedded_gaussian"`.
        reduction: theta, phi and g have `max(C // reduction, 1)` channels unless `rd_channels` is
            given. Default: 2 (the paper's C/2).
        qk_scale: Scale s of the softmax logits $s\, \theta_i \cdot \phi_j$ (`embedded_gaussian`,
            `gaussian` only); timm's `NonLocalAttn` uses `C ** -0.5`. Default: None, unscaled (the
            seed's and the paper's).
        device: Where the parameters and buffers are created. Default: None (torch's default).
        dtype: Floating dtype of the parameters and buffers. Default: None (torch's default).

    Shape:
        - Input: `(B, C, L)`, `(B, C, H, W)` or `(B, C, T, H, W)` for `spatial_dims` 1, 2, 3.
        - Output: the input's shape; with `need_weights=True` also the map `(B, N, N')`, N positions
          and N' keys (N / 4 in 2-D with `pool_keys`). The map is built only then.

    Example:
        ```python
        >>> m = NonLocalBlock(16, spatial_dims=3)  # theta, phi and g of 16 // 2 = 8 channels
        >>> m(torch.randn(2, 16, 4, 6, 6)).shape
        torch.Size([2, 16, 4, 6, 6])
        >>> m(torch.randn(2, 16, 4, 6, 6), need_weights=True)[1].shape  # keys pooled to 4 x 3 x 3
        torch.Size([2, 144, 36])

        ```
    """

    _pool_name = "pool_keys"  # the argument named in input errors (the seed class says sub_sample)

    def __init__(
        self,
        channels: int,
        rd_channels: int | None = None,
        spatial_dims: int = 2,
        pool_keys: bool = True,
        batch_norm: bool = True,
        pairwise: str = "embedded_gaussian",
        reduction: int = 2,
        *,
        qk_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels = c = check_int(channels, "channels", who)
        reduction = check_int(reduction, "reduction", who)
        c1 = max(c // reduction, 1) if rd_channels is None else check_int(rd_channels, "rd_channels", who)
        self.rd_channels = c1
        spatial_dims = check_int(spatial_dims, "spatial_dims", who, minimum=None)
        self.spatial_dims = dims = check_choice(spatial_dims, (1, 2, 3), "spatial_dims", who)
        for name, flag in (("pool_keys", pool_keys), ("batch_norm", batch_norm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{who}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
        self.pool_keys, self.pairwise = pool_keys, check_choice(pairwise, MODES, "pairwise", who)
        if qk_scale is not None and pairwise not in MODES[:2]:
            raise ValueError(f"{who}: qk_scale applies to the softmax pairwise functions {MODES[:2]}, "
                             f"got qk_scale={qk_scale} with pairwise={pairwise!r}")
        self.qk_scale = 1.0 if qk_scale is None else check_float(qk_scale, "qk_scale", who)
        conv, pool, kernel = _CONV[dims], _POOL[dims], _POOL_KERNEL[dims]
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        # Parameter names and nesting follow the seed (and the widely used port), so checkpoints load.
        self.g: nn.Module = conv(c, c1, kernel_size=1, **factory)
        w_conv = conv(c1, c, kernel_size=1, **factory)
        norm = _BN[dims](c, **factory) if batch_norm else None
        zero_init = norm if norm is not None else w_conv  # the block starts as the identity
        nn.init.zeros_(zero_init.weight)
        nn.init.zeros_(cast(Tensor, zero_init.bias))
        self.W: nn.Module = nn.Sequential(w_conv, norm) if norm is not None else w_conv
        if pairwise != "gaussian":
            self.theta = conv(c, c1, kernel_size=1, **factory)
            self.phi: nn.Module = conv(c, c1, kernel_size=1, **factory)
        if pairwise == "concatenation":
            self.concat_project = nn.Sequential(
                nn.Conv2d(2 * c1, 1, kernel_size=1, bias=False, **factory), nn.ReLU()
            )
        if pool_keys:
            self.g = nn.Sequential(self.g, pool(kernel_size=kernel))
            pooled_phi = nn.Sequential(self.phi, pool(kernel)) if pairwise != "gaussian" else pool(kernel)
            self.phi = pooled_phi  # gaussian: phi is the pooling alone (x itself is the key)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, rd_channels={self.rd_channels}, "
                f"spatial_dims={self.spatial_dims}, pairwise={self.pairwise!r}, pool_keys={self.pool_keys}")

    def reset_parameters(self) -> None:
        """W's last layer (its BatchNorm, else its convolution) back to zero, so the block starts as the
        identity; call it after the children's own `reset_parameters` (which give a BatchNorm weight 1)."""
        last = self.W[-1] if isinstance(self.W, nn.Sequential) else self.W
        nn.init.zeros_(cast(Tensor, last.weight))
        nn.init.zeros_(cast(Tensor, last.bias))

    def _pool(self, t: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """Max-pool tokens `(B, N, c)` on the grid `spatial` -> `(B, N', c)`, last dim contiguous."""
        grid = t.reshape(t.shape[0], *spatial, t.shape[-1]).movedim(-1, 1)  # (B, c, *spatial)
        pooled = _POOL_FN[self.spatial_dims](grid, _POOL_KERNEL[self.spatial_dims])
        return pooled.flatten(2).transpose(1, 2).contiguous()  # (B, N', c)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The block on `x` `(B, C, *spatial)`; with `need_weights`, also the `(B, N, N')` map."""
        who = type(self).__name__
        dims = check_shape(x, who, _LETTERS[self.spatial_dims], C=self.channels)
        spatial = tuple(x.shape[2:])
        if self.pool_keys and min(spatial[-2:] if self.spatial_dims == 3 else spatial) < 2:
            raise ValueError(
                f"{who} expects spatial sizes >= 2 with {self._pool_name}=True (keys are pooled by 2), "
                f"got {tuple(x.shape)}"
            )
        c1, mode = self.rd_channels, self.pairwise
        x_t = x.flatten(2).transpose(1, 2)  # (B, N, C): tokens, one per position
        g_conv = _conv(self.g)
        keys = None
        if mode == "gaussian":
            theta, width = x_t, self.channels
            if self.pool_keys:
                keys = torch.cat([x_t, pointwise_tokens(x_t, [g_conv])], -1)  # (B, N, C + C1)
            else:
                phi, g = x_t, pointwise_tokens(x_t, [g_conv])
        else:
            width, phi_conv = c1, _conv(self.phi)
            if self.pool_keys:
                theta = pointwise_tokens(x_t, [self.theta])  # (B, N, C1)
                keys = pointwise_tokens(x_t, [phi_conv, g_conv])  # (B, N, 2 C1)
            else:  # 3 x (B, N, C1)
                theta, phi, g = pointwise_tokens(x_t, [self.theta, phi_conv, g_conv]).split(c1, dim=-1)
        if keys is not None:
            phi, g = self._pool(keys, spatial).split([width, c1], dim=-1)  # (B, N', width), (B, N', C1)
        y_t, attn = self._pairwise(theta, phi, g, need_weights)  # (B, N, C1), (B, N, N') or None
        if capturing():  # map capture: the pairwise weights of the capture's query points
            idx = query_indices(spatial, x.device)
            with torch.no_grad():
                rows = self._pairwise(theta[:, idx], phi, g, True)[1]  # (B, Q, N')
            kernel = _POOL_KERNEL[self.spatial_dims] if keys is not None else 1
            kernel = kernel if isinstance(kernel, tuple) else (kernel,) * len(spatial)
            key_grid = tuple(s // k for s, k in zip(spatial, kernel, strict=True))
            if rows is not None:
                record(self, "rows", rows[:, None], grid=key_grid, queries=idx, query_grid=spatial)
        z_t = pointwise_tokens(y_t, [_conv(self.W)])  # (B, N, C): W's 1x1 convolution on the tokens
        # (B, C, *spatial), made contiguous: torch 2.14's BatchNorm backward is wrong for a
        # channels-last-strided input with B = 1 (and the copy is O(N C), noise next to attention).
        z = z_t.transpose(1, 2).reshape(dims["B"], self.channels, *spatial).contiguous()
        if isinstance(self.W, nn.Sequential):
            z = self.W[1](z)  # BatchNorm
        z = x + z  # x first: the result keeps x's memory format
        return (z, attn) if need_weights and attn is not None else z

    def _pairwise(
        self, theta: Tensor, phi: Tensor, g: Tensor, want_map: bool
    ) -> tuple[Tensor, Tensor | None]:
        """`y = f(theta, phi) g / C`; theta `(B, N, d)`, phi `(B, N', d)`, g `(B, N', C1)`."""
        if self.pairwise in ("embedded_gaussian", "gaussian"):
            res = global_attention(theta, phi, g, scale=self.qk_scale, need_weights=want_map)
            return res if isinstance(res, tuple) else (res, None)
        keys = phi.shape[1]
        explicit = want_map or not fused_enabled()
        if self.pairwise == "dot_product":
            if not explicit:
                return theta @ (phi.transpose(1, 2) @ g) / keys, None  # (B, N, d) @ (B, d, C1)
            f = theta @ phi.transpose(1, 2) / keys  # (B, N, N')
            return f @ g, f
        w_theta, w_phi = _conv(self.concat_project).weight.flatten().split(self.rd_channels)
        a, b = theta @ w_theta, phi @ w_phi  # (B, N), (B, N')
        if not explicit:
            return (_concat_sum(a, b, g) / keys).to(g.dtype), None
        f = F.relu(a.unsqueeze(-1) + b.unsqueeze(1)) / keys  # (B, N, N')
        return f @ g, f


register(
    "nonlocal",
    family="global",
    paper="Non-local Neural Networks",
    year=2018,
    layout="NCHW",
    example=Example(kwargs={"channels": 4, "rd_channels": 2}, inputs=((2, 4, 5, 6),), output=(2, 4, 5, 6),
                    free_sizes=(FreeSize(((0, 2),), 2, low=2), FreeSize(((0, 3),), 3, low=2))),
    aliases=("non_local", "non_local_block"),
    seed_name="NonLocalBlockND",
    uses_attend=True,
    input_rule="nd",
    for_input=lambda geo: {"spatial_dims": len(geo.spatial) if len(geo.spatial) in (1, 2, 3) else 2},
)(NonLocalBlock)


@register_seed("nonlocal", example=Example({"in_channels": 4}, ((2, 4, 6, 6),), (2, 4, 6, 6)))
class NonLocalBlockND(NonLocalBlock):
    """The seed's `NonLocalBlockND(in_channels, inter_channels=None, dimension=2, sub_sample=True,
    bn_layer=True)`: embedded Gaussian only, returns a tensor, as the seed.

    The arguments are `NonLocalBlock`'s `channels`, `rd_channels`, `spatial_dims`, `pool_keys` and
    `batch_norm`, under the seed's names (also kept as attributes). State_dict keys equal the seed's
    (`g.0`/`phi.0` when `sub_sample`, `W.0`/`W.1` when `bn_layer`, `theta`). Differences: a
    `dimension` outside (1, 2, 3) raises ValueError (the seed asserts), and inputs are checked (rank,
    channels, sizes >= 2 with `sub_sample`) before any work.

    Args:
        in_channels: Input channels C.
        inter_channels: Channels of theta, phi and g. Default: None, `max(C // 2, 1)`.
        dimension: 1, 2 or 3 spatial dims. Default: 2.
        sub_sample: Max-pool phi and g by 2. Default: True.
        bn_layer: BatchNorm after W. Default: True.

    Shape:
        - Input and output: `(B, C, L)`, `(B, C, H, W)` or `(B, C, T, H, W)` for `dimension` 1, 2, 3.
    """

    _pool_name = "sub_sample"

    def __init__(
        self,
        in_channels: int,
        inter_channels: int | None = None,
        dimension: int = 2,
        sub_sample: bool = True,
        bn_layer: bool = True,
    ) -> None:
        who = type(self).__name__
        check_int(in_channels, "in_channels", who)  # the seed's names in the messages
        if inter_channels is not None:
            check_int(inter_channels, "inter_channels", who)
        check_choice(check_int(dimension, "dimension", who, minimum=None), (1, 2, 3), "dimension", who)
        for name, flag in (("sub_sample", sub_sample), ("bn_layer", bn_layer)):
            if not isinstance(flag, bool):
                raise TypeError(f"{who}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
        super().__init__(
            in_channels, rd_channels=inter_channels, spatial_dims=dimension, pool_keys=sub_sample,
            batch_norm=bn_layer,
        )
        self.in_channels, self.inter_channels = in_channels, self.rd_channels  # the seed's attributes
        self.dimension, self.sub_sample = dimension, sub_sample

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """The block on `x`, as the seed: the output tensor alone."""
        return super().forward(x)  # type: ignore[return-value]
