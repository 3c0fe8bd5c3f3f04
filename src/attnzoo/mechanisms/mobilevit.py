"""MobileViT block, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer"
(Mehta and Rastegari, 2021), arXiv:2110.02178.

Convolutions encode local structure; the map is cut into p x p patches and a small transformer
attends across the patches, separately for each of the p^2 pixel positions inside a patch; the
result is folded back, projected and fused with the input by a convolution. Time
$O(B N C_t (N / p^2 + C_t) \\cdot depth + B N C^2 k^2)$, memory $O(B h N^2 / p^2)$ for one layer's
weights (N = H W): attention is global over the n = N / p^2 patches, not over all N positions.

Deviations from the paper's code (ml-cvnets `MobileViTBlock`): H and W must be multiples of
`patch_size` (the paper's code resizes the map bilinearly otherwise; this class raises a
ValueError). fightingcv's `MobileViTAttention(in_channel, dim, kernel_size, patch_size)` hard-codes
`depth=3, num_heads=8, head_dim=64, mlp_dim=1024`, has no BatchNorm/SiLU in its convolutions (all with
bias), no final LayerNorm and no query/key/value bias: `norm_layer=None, act_layer=None,
final_norm=False, qkv_bias=False` with those sizes reproduce it.

Shape letters: B batch, C channels, H, W height and width, p patch size, P = p^2 pixel positions per
patch, n = H W / P patches, C_t transformer width (`transformer_dim`), h heads, e head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape
from attnzoo._geometry import grid2d
from attnzoo._registry import Example, FreeSize, register
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["MobileViTBlock"]


def _conv(cin: int, cout: int, k: int, norm: type[nn.Module] | None, act: type[nn.Module] | None,
          use_norm: bool, factory: dict[str, Any]) -> nn.Sequential:
    """k x k convolution (with a bias only when the block has no norm layer, as the paper's code), then
    the norm and activation when `use_norm`."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm is None, **factory)]
    if use_norm and norm is not None:
        layers.append(norm(cout, **factory))
    if use_norm and act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class _Layer(nn.Module):
    """Pre-norm transformer layer: `x + MSA(LN(x))`, then `x + MLP(LN(x))` (SiLU)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int, qkv_bias: bool, drop: float,
                 factory: dict[str, Any]) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.drop = num_heads, head_dim, drop
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(num_heads * head_dim, dim, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.fc1 = nn.Linear(dim, mlp_dim, **factory)
        self.fc2 = nn.Linear(mlp_dim, dim, **factory)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(drop)

    def forward(
        self, x: Tensor, need_weights: bool, grid: tuple[int, int, int] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        tokens, n = x.shape[0], x.shape[1]  # x: (M, n, C_t), M = B P
        qkv = self.qkv(self.norm1(x)).reshape(tokens, n, 3, self.num_heads, self.head_dim)  # (M, n, 3, h, e)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (M, h, n, e) each
        if grid is not None and capturing():
            self._record(q, k, *grid)
        result = attend(q, k, v, dropout_p=self.drop if self.training else 0.0, need_weights=need_weights)
        out, weights = result if isinstance(result, tuple) else (result, None)
        x = x + self.dropout(self.proj(out.transpose(1, 2).flatten(2)))  # (M, h, n, e) -> (M, n, h e)
        x = x + self.dropout(self.fc2(self.dropout(self.act(self.fc1(self.norm2(x))))))
        return x, weights

    def _record(self, q: Tensor, k: Tensor, p: int, nh: int, nw: int) -> None:
        """Rows of the capture's query pixels over the patches: a pixel attends the pixels at its own
        offset in every patch, so its row lies on the (nh, nw) patch grid."""
        height, width = nh * p, nw * p
        idx = query_indices((height, width), q.device)
        ys, xs = idx // width, idx % width
        offset, patch = (ys % p) * p + xs % p, (ys // p) * nw + xs // p  # (Q,) each
        with torch.no_grad():
            q5 = q.reshape(-1, p * p, *q.shape[1:])  # (B, P, h, n, e)
            k5 = k.reshape(-1, p * p, *k.shape[1:])
            q_rows = q5[:, offset, :, patch]  # (Q, B, h, e)
            logits = torch.einsum("qbhe,bqhne->bhqn", q_rows, k5[:, offset]) * self.head_dim**-0.5
        record(self, "rows", logits.softmax(-1), grid=(nh, nw), queries=idx, query_grid=(height, width),
               note=f"each query pixel over the {nh}x{nw} patches (the pixels at its offset in every patch)")


@register(
    "mobilevit",
    family="mobilevit",
    paper="MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer",
    year=2021,
    layout="NCHW",
    example=Example(
        kwargs={"channels": 8, "transformer_dim": 16}, inputs=((2, 8, 6, 4),), output=(2, 8, 6, 4),
        free_sizes=(FreeSize(((0, 2),), 2, step=2, low=2), FreeSize(((0, 3),), 3, step=2, low=2)),
    ),
    uses_attend=True,
    for_input=lambda geo: {"patch_size": 2 if all(s % 2 == 0 for s in grid2d(geo)) else 1},
)
class MobileViTBlock(nn.Module):
    r"""MobileViT block: local convolutions, a transformer across patches, convolutional fusion.

    $$
    z = W_{1\times1}\,\mathrm{conv}_{k}(x), \qquad
    z_{P} = \mathrm{Transformer}^{L}(z_{P}) \ \text{for each pixel position } P \text{ of a patch}, \qquad
    y = \mathrm{conv}_{k}\big([x, \mathrm{conv}_{1\times1}(z)]\big)
    $$

    where $z_P$ is the sequence of the n = N / p^2 patches' pixels at position P, and each
    transformer layer is pre-norm multi-head self-attention and a SiLU MLP. Time
    $O(L\,B N C_t (n + C_t) + B N C^2 k^2)$, memory $O(B h P n^2)$ for one layer's weights, N = H W.

    Args:
        channels: Channels C of the input and output.
        transformer_dim: Transformer width C_t (ml-cvnets' name). Default: None (`channels`).
        kernel_size: Size k of the two k x k convolutions. Default: 3.
        patch_size: Patch side p; H and W must be multiples of it. Default: 2.
        depth: Transformer layers L. Default: 2.
        num_heads: Heads h. Default: 4.
        head_dim: Head width e. Default: None (`transformer_dim // num_heads`, which must divide evenly).
        mlp_dim: Hidden width of the MLPs. Default: None (`2 * transformer_dim`).
        qkv_bias: Give the query/key/value projection a bias. Default: True.
        norm_layer: Norm after the k x k and the output 1x1 convolutions, or None (convolutions then
            have a bias). Default: `nn.BatchNorm2d`.
        act_layer: Activation after those norms, or None. Default: `nn.SiLU`.
        final_norm: A LayerNorm after the last transformer layer. Default: True.
        proj_drop: Dropout in the transformer (attention weights, projections, MLP). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, C, H, W)`, H and W multiples of `patch_size`.
        - Output: `(B, C, H, W)`; with `need_weights=True` also every layer's weights
          `(B, L, P, h, n, n)`: P = p^2 pixel positions, n patches (row-major).

    Example:
        ```python
        >>> block = MobileViTBlock(32, transformer_dim=48, patch_size=2)
        >>> x = torch.randn(2, 32, 8, 6)
        >>> out, weights = block(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 32, 8, 6]), torch.Size([2, 2, 4, 4, 12, 12]))

        ```
    """

    def __init__(
        self,
        channels: int,
        transformer_dim: int | None = None,
        kernel_size: int = 3,
        patch_size: int = 2,
        depth: int = 2,
        num_heads: int = 4,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        act_layer: type[nn.Module] | None = nn.SiLU,
        final_norm: bool = True,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.channels = check_int(channels, "channels", who)
        self.dim = check_int(channels if transformer_dim is None else transformer_dim, "transformer_dim", who)
        self.patch_size = check_int(patch_size, "patch_size", who)
        if check_int(kernel_size, "kernel_size", who) % 2 == 0:  # padding k // 2 keeps H, W for odd k only
            raise ValueError(f"{who}: kernel_size must be odd (it keeps H and W), got {kernel_size}")
        check_int(depth, "depth", who)
        check_int(num_heads, "num_heads", who)
        if head_dim is None:
            if self.dim % num_heads:
                raise ValueError(
                    f"{who}: transformer_dim={self.dim} must be divisible by num_heads={num_heads} "
                    "(or give head_dim)"
                )
            head_dim = self.dim // num_heads
        check_int(head_dim, "head_dim", who)
        mlp_dim = check_int(2 * self.dim if mlp_dim is None else mlp_dim, "mlp_dim", who)
        drop = check_float(proj_drop, "proj_drop", who, minimum=0.0, maximum=1.0)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        c, d = channels, self.dim
        self.conv1 = _conv(c, c, kernel_size, norm_layer, act_layer, True, factory)
        self.conv2 = _conv(c, d, 1, norm_layer, act_layer, False, factory)
        self.layers = nn.ModuleList(
            _Layer(d, num_heads, head_dim, mlp_dim, qkv_bias, drop, factory) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d, **factory) if final_norm else nn.Identity()
        self.conv3 = _conv(d, c, 1, norm_layer, act_layer, True, factory)
        self.conv4 = _conv(2 * c, c, kernel_size, norm_layer, act_layer, True, factory)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, transformer_dim={self.dim}, patch_size={self.patch_size}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Local convolutions, global attention across patches, fusion; `(out, weights)` with `need_weights`.

        Args:
            x: Feature map `(B, C, H, W)`.
            need_weights: Also return the `(B, L, P, h, n, n)` weights. Default: False.
        """
        who = type(self).__name__
        dims = check_shape(x, who, "B C H W", C=self.channels)
        batch, height, width, p = dims["B"], dims["H"], dims["W"], self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"{who} expects H and W to be multiples of patch_size={p}, got H={height}, W={width}"
            )
        nh, nw = height // p, width // p
        z = self.conv2(self.conv1(x))  # (B, C_t, H, W)
        z = z.reshape(batch, self.dim, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1)  # (B, p, p, nh, nw, C_t)
        z = z.reshape(batch * p * p, nh * nw, self.dim)  # (B P, n, C_t)
        maps = []
        for layer in self.layers:
            z, weights = layer(z, need_weights, (p, nh, nw))
            if weights is not None:
                maps.append(weights.reshape(batch, p * p, *weights.shape[1:]))  # (B, P, h, n, n)
        z = self.norm(z)
        z = z.reshape(batch, p, p, nh, nw, self.dim).permute(0, 5, 3, 1, 4, 2)  # (B, C_t, nh, p, nw, p)
        z = self.conv3(z.reshape(batch, self.dim, height, width))  # (B, C, H, W)
        out = self.conv4(torch.cat([x, z], 1))  # (B, 2C, H, W) -> (B, C, H, W)
        return (out, torch.stack(maps, 1)) if need_weights else out
