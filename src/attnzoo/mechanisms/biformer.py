"""Bi-Level Routing Attention (BRA), BiFormer (Zhu et al., CVPR 2023), arXiv:2303.08810.

Official code: `rayleizhu/BiFormer` `ops/bra_legacy.py` (this module, channels-last) and
`ops/bra_nchw.py` (`attnzoo.mechanisms.biformer_nchw`). BRA splits the map into `n_win x n_win`
windows ("regions"), lets every window pick the `topk` windows whose mean key best matches its mean
query, and runs ordinary multi-head attention from each window's tokens to the tokens of the picked
windows. Outputs and gradients equal the official code, quirks included (see
`BiLevelRoutingAttention` and `docs/biformer.md`). Deviations: options the official code
rejects late (or never) are rejected at construction; `side_dwconv=0` holds no lambda (picklable).

`BiLevelRoutingAttention` is the canonical class (`dim` first, `device=`/`dtype=`, the keyword
`layout`, `forward(x, need_weights=False)`); `LegacyBiLevelRoutingAttention`, exported as
`attnzoo.compat.BiLevelRoutingAttention`, has the official constructor and
`forward(x, ret_attn_mask=False)`. Both have the official state_dict.

Speed: the official code gathers the picked windows' keys/values by `torch.gather` on an expanded
`(N, R, R, w^2, C)` view, whose backward materialises that whole tensor. Here one
`index_select` on the compact per-window key/values builds the `(N*R, topk*w^2, C)` operand
once (its backward is an `index_add` into the compact tensor), and `attnzoo.attend` (fused
SDPA) never keeps the attention matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_float, check_int, check_shape
from attnzoo._geometry import num_windows
from attnzoo._registry import Example, FreeSize, register, register_seed
from attnzoo.maps.capture import capturing
from attnzoo.maps.records import record_routed_rows, record_routing
from attnzoo.mechanisms._regions import merge, routed_attention, side_conv, to_windows

__all__ = ["BiLevelRoutingAttention", "LegacyBiLevelRoutingAttention"]

_KV_MODES = ("identity", "ada_avgpool", "ada_maxpool", "avgpool", "maxpool")
_LAYOUTS = ("nhwc", "nchw")


def _fix_layout(x: object, who: str, dim: int, layout: str, nchw_fix: str) -> dict[str, int]:
    """Check the map, pointing at `nchw_fix` (the class's way to take NCHW) when the channels sit on dim 1."""
    if isinstance(x, Tensor) and x.ndim == 4:
        last, second = x.shape[-1], x.shape[1]
        if layout == "nhwc" and last != dim and second == dim:
            raise ValueError(
                f"{who} expects a channels-last map (N, H, W, {dim}) (layout='nhwc'), got {tuple(x.shape)} "
                f"whose dim 1 is {dim}: {nchw_fix}"
            )
        if layout == "nchw" and second != dim and last == dim:
            raise ValueError(
                f"{who} expects an (N, {dim}, H, W) map (layout='nchw'), got {tuple(x.shape)} whose last "
                f"dim is {dim}: pass layout='nhwc' for channels-last (N, H, W, C) maps"
            )
    spec = "N H W C" if layout == "nhwc" else "N C H W"
    return check_shape(x, who, spec, C=dim)


class _QKVLinear(nn.Module):
    """Holds the fused projection as `qkv.qkv` (the official state_dict key)."""

    def __init__(self, dim: int, qk_dim: int, **factory: Any) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, **factory)


class _TopkRouter(nn.Module):
    """Region-level routing: `topk` of `(emb(q_r) * scale) @ emb(k_r)^T`, softmax over them."""

    def __init__(
        self, qk_dim: int, topk: int, scale: float, param_routing: bool, diff_routing: bool, **factory: Any
    ) -> None:
        super().__init__()
        self.topk, self.scale, self.diff_routing = topk, scale, diff_routing
        self.emb: nn.Module = nn.Linear(qk_dim, qk_dim, **factory) if param_routing else nn.Identity()

    def forward(self, q_r: Tensor, k_r: Tensor) -> tuple[Tensor, Tensor]:
        """`q_r, k_r`: `(N, R, qk_dim)` -> `r_weight, r_idx`: `(N, R, topk)`."""
        if not self.diff_routing:
            q_r, k_r = q_r.detach(), k_r.detach()
        logits = (self.emb(q_r) * self.scale) @ self.emb(k_r).transpose(-2, -1)  # (N, R, R)
        top, r_idx = torch.topk(logits, k=self.topk, dim=-1)  # (N, R, topk), descending
        return top.softmax(dim=-1), r_idx


@register(
    "bra",
    family="biformer",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    year=2023,
    layout="NHWC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2, "n_win": 2, "topk": 4}, inputs=((2, 4, 4, 8),), output=(2, 4, 4, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1, step=2, low=2), FreeSize(((0, 2),), 2, step=2, low=2))),
    aliases=("biformer", "bi_level_routing_attention"),
    seed_name="BiLevelRoutingAttention",
    uses_attend=True,
    for_input=lambda geo: {"n_win": (n := num_windows(geo)), "topk": min(4, n * n), "auto_pad": True},
)
class BiLevelRoutingAttention(nn.Module):
    r"""Bi-Level Routing Attention, numerically equal to BiFormer's `ops/bra_legacy.py`.

    Algorithm ($R = n_{win}^2$ windows of $w^2 = (H/n_{win})(W/n_{win})$ tokens, $c$ = `qk_dim`):

    1. (`auto_pad`) zero-pad the map right/bottom to multiples of `n_win`, **before** the
       projection, so padded tokens get q = k = v = the projection bias and take part, unmasked.
    2. `q, k, v = qkv(x)`: one Linear `dim -> 2c + dim`, split `[q | k | v]`; `(N, H, W, .)`.
    3. Windows: `(N, H, W, .) -> (N*R, w^2, .)`, windows and tokens row-major.
    4. Routing: window means `q_r, k_r` `(N, R, c)` (full resolution, detached unless
       `diff_routing`), logits `(emb(q_r) * scale) @ emb(k_r)^T` `(N, R, R)`, the `topk`
       largest per row give `r_idx` `(N, R, topk)` and `r_weight = softmax(top logits)`.
    5. Keys/values per window are pooled by `kv_downsample_mode` to `S` tokens, and each window
       gathers those of its `topk` routed windows: `(N*R, topk*S, c + dim)`; with
       `soft_routing` they are multiplied by `r_weight` (keys **and** values, as official).
    6. Multi-head attention, $\mathrm{softmax}(s\, q k^T) v$ per head, `(N*R, h, w^2, topk*S)`
       logits. $s$ = `qk_scale or qk_dim ** -0.5` uses the **full** `qk_dim`, not the
       head dim (official), and is also the routing temperature.
    7. Windows back to `(N, H, W, dim)`, plus `lepe(v)`: a depth-wise `side_dwconv`
       convolution of v over the whole (padded) map, crossing window borders.
    8. Crop the padding, then `wo` (Linear `dim -> dim`, or identity for `'qkv'`).

    The official argument names are kept (none has a shared vocabulary name but `num_heads`,
    `qk_dim` and `qk_scale`); the official's unused `kv_downsample_kernel` is only on
    `attnzoo.compat.BiLevelRoutingAttention`.

    Args:
        dim: Channels C of the input and output.
        num_heads: Heads h; `dim` and `qk_dim` must be divisible by it. Default: 8.
        n_win: Windows per side; the map is split into `n_win x n_win` windows. Default: 7.
        qk_dim: Width of queries/keys. Default: None (= `dim`).
        qk_scale: Logit scale for routing and attention; None or 0 give `qk_dim ** -0.5`
            (the official `or`). Default: None.
        kv_per_win: Tokens per side each window keeps for `'ada_avgpool'`/`'ada_maxpool'`
            (`kv_per_win**2` tokens). Default: 4.
        kv_downsample_ratio: Kernel = stride of `'avgpool'`/`'maxpool'` on each window's
            `(H/n_win, W/n_win)` grid (floor); 1 means no pooling. Default: 4.
        kv_downsample_mode: `'identity'`, `'ada_avgpool'`, `'ada_maxpool'`, `'avgpool'`
            or `'maxpool'` (`'fracpool'`/`'conv'` are unimplemented in the official code
            too and raise `ValueError` here). Default: `'identity'`.
        topk: Windows each window attends to, `1 <= topk <= n_win**2`. Default: 4.
        param_attention: `'qkvo'` (output Linear `wo`) or `'qkv'` (no `wo`). Default: `'qkvo'`.
        param_routing: A learned Linear `router.emb` (`qk_dim -> qk_dim`) on the window means;
            needs `diff_routing`. Default: False.
        diff_routing: Let gradients flow through the routing logits (only useful with
            `soft_routing`, which it requires: the official `'hard'` mode is unimplemented).
            Default: False.
        soft_routing: Scale the gathered keys and values by `r_weight`. Default: False.
        side_dwconv: Kernel of the depth-wise local-context conv `lepe` (odd); 0 disables it.
            Default: 3.
        auto_pad: Pad H, W up to multiples of `n_win` (then crop); without it they must be
            multiples. Default: False.
        layout: `'nhwc'` (channels-last, as official) or `'nchw'` (CNN maps; the output is
            NCHW too). Keyword only. Default: `'nhwc'`.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - Input: `(N, H, W, dim)` (`layout='nhwc'`) or `(N, dim, H, W)` (`'nchw'`).
        - Output: same shape as the input.
        - Weights (`need_weights=True`): `(N*n_win**2, num_heads, w^2, topk*S)`, the attention
          of each window's `w^2` tokens over the `S` (pooled) key tokens of each routed window.

    Example:
        ```python
        >>> bra = BiLevelRoutingAttention(512, num_heads=8, n_win=7, auto_pad=True, layout="nchw")
        >>> bra(torch.randn(2, 512, 28, 28)).shape
        torch.Size([2, 512, 28, 28])

        ```
    """

    _nchw_fix = "pass layout='nchw' for (N, C, H, W) maps"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        side_dwconv: int = 3,
        auto_pad: bool = False,
        *,
        layout: str = "nhwc",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.n_win = check_int(n_win, "n_win", who)
        self.qk_dim = dim if qk_dim is None else check_int(qk_dim, "qk_dim", who)
        for name, value in (("dim", self.dim), ("qk_dim", self.qk_dim)):
            if value % num_heads:
                raise ValueError(f"{who}: {name}={value} must be divisible by num_heads={num_heads}")
        if qk_scale is not None:
            check_float(qk_scale, "qk_scale", who, minimum=0.0)
        self.scale = float(qk_scale or self.qk_dim**-0.5)
        self.topk = check_int(topk, "topk", who)
        if topk > n_win * n_win:
            raise ValueError(f"{who}: topk must be <= {n_win * n_win} (n_win**2, the windows to pick from), "
                             f"got {topk} with n_win={n_win}")
        if kv_downsample_mode in ("fracpool", "conv"):
            raise ValueError(
                f"{who}: kv_downsample_mode={kv_downsample_mode!r} is not implemented (nor officially)"
            )
        self.kv_downsample_mode = check_choice(kv_downsample_mode, _KV_MODES, "kv_downsample_mode", who)
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        if kv_downsample_mode.startswith("ada_"):
            check_int(kv_per_win, "kv_per_win", who)
        elif kv_downsample_mode != "identity":
            check_int(kv_downsample_ratio, "kv_downsample_ratio", who)
        self.param_attention = check_choice(param_attention, ("qkvo", "qkv"), "param_attention", who)
        if param_routing and not diff_routing:
            raise ValueError(f"{who}: param_routing=True needs diff_routing=True (as officially)")
        if diff_routing and not soft_routing:
            raise ValueError(
                f"{who}: diff_routing=True needs soft_routing=True (the official 'hard' differentiable "
                "routing raises NotImplementedError)"
            )
        self.param_routing, self.diff_routing, self.soft_routing = param_routing, diff_routing, soft_routing
        self.side_dwconv = check_int(side_dwconv, "side_dwconv", who, minimum=0)
        if side_dwconv % 2 == 0 and side_dwconv > 0:
            raise ValueError(f"{who}: side_dwconv must be odd (or 0), got {side_dwconv}")
        self.auto_pad = bool(auto_pad)
        self.layout = check_choice(layout, _LAYOUTS, "layout", who)
        # Submodules in the official order (state_dict: lepe, router.emb, qkv.qkv, wo).
        self.lepe: nn.Conv2d | None = None  # official: a zeros lambda; None pickles, same empty state_dict
        if side_dwconv > 0:
            self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **factory)
        self.router = _TopkRouter(self.qk_dim, self.topk, self.scale, param_routing, diff_routing, **factory)
        self.qkv = _QKVLinear(dim, self.qk_dim, **factory)
        self.wo: nn.Module = nn.Linear(dim, dim, **factory) if param_attention == "qkvo" else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, qk_dim={self.qk_dim}, "
            f"topk={self.topk}, kv_downsample_mode={self.kv_downsample_mode!r}, layout={self.layout!r}"
        )

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Apply BRA to `x`: `(N, H, W, dim)`, or `(N, dim, H, W)` with `layout='nchw'`.

        Args:
            x: The map.
            need_weights: Also return the attention weights
                `(N*n_win**2, num_heads, w^2, topk*S)` (computed on the math path). The routing
                (`r_idx`, `r_weight`) is recorded by `attnzoo.capture_maps`. Default: False.

        Returns:
            `out` (the shape of `x`), or `(out, weights)` with `need_weights`.
        """
        out, _, _, attn = self._forward(x, need_weights=need_weights)
        return (out, attn) if need_weights and attn is not None else out

    def _downsample(self, kv: Tensor, rh: int, rw: int) -> Tensor:
        """Pool each window's keys or values: `(N*R, rh*rw, C) -> (N*R, S, C)`."""
        mode, ratio = self.kv_downsample_mode, self.kv_downsample_ratio
        if mode == "identity" or (mode in ("avgpool", "maxpool") and ratio <= 1):
            return kv
        if not mode.startswith("ada_") and (rh < ratio or rw < ratio):
            raise ValueError(
                f"{type(self).__name__} expects windows of at least kv_downsample_ratio={ratio} tokens per "
                f"side for {mode!r}, got windows of {rh}x{rw}"
            )
        grid = kv.unflatten(1, (rh, rw)).permute(0, 3, 1, 2)  # (N*R, C, rh, rw)
        if mode == "ada_avgpool":
            grid = F.adaptive_avg_pool2d(grid, self.kv_per_win)
        elif mode == "ada_maxpool":
            grid = F.adaptive_max_pool2d(grid, self.kv_per_win)
        elif mode == "avgpool":
            grid = F.avg_pool2d(grid, ratio)
        else:
            grid = F.max_pool2d(grid, ratio)
        return grid.flatten(2).transpose(1, 2)  # (N*R, S, C)

    def _forward(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """`(out, r_weight, r_idx, attn_weight)`; `attn_weight` only with `need_weights`."""
        who = type(self).__name__
        dims = _fix_layout(x, who, self.dim, self.layout, self._nchw_fix)
        h, w, n_win, c = dims["H"], dims["W"], self.n_win, self.qk_dim
        keep_nchw = self.layout == "nchw" and x.is_contiguous()  # return the input's memory format
        if self.layout == "nchw":
            x = x.permute(0, 2, 3, 1)  # (N, H, W, dim)
        pad_b, pad_r = (-h) % n_win, (-w) % n_win
        if pad_b or pad_r:
            if not self.auto_pad:
                raise ValueError(
                    f"{who} expects H and W divisible by n_win={n_win}, got H={h}, W={w}: pass auto_pad=True"
                )
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (N, Hp, Wp, dim), before the projection, as officially
        n, hp, wp, _ = x.shape
        rh, rw = hp // n_win, wp // n_win
        win = to_windows(x, n_win, n_win)  # (N*R, w^2, dim), the one copy of the input
        qkv = F.linear(win, self.qkv.qkv.weight, self.qkv.qkv.bias)  # (N*R, w^2, 2c+dim)
        q, k, v = qkv.split([c, c, self.dim], dim=-1)
        r_weight, r_idx = self.router(q.mean(1).view(n, -1, c), k.mean(1).view(n, -1, c))  # (N, R, topk)
        out, attn = routed_attention(
            q, self._downsample(k, rh, rw), self._downsample(v, rh, rw), r_idx, num_heads=self.num_heads,
            scale=self.scale, r_weight=r_weight if self.soft_routing else None, need_weights=need_weights,
        )  # (N*R, w^2, dim)
        if capturing():  # map capture: the routing, and rows over the routed regions (keys not pooled)
            record_routing(self, r_idx, regions=(n_win,) * 2, region=(rh, rw), size=(h, w), weights=r_weight)
            if self.kv_downsample_mode == "identity":
                record_routed_rows(self, q, k, r_idx, regions=(n_win, n_win), region=(rh, rw),
                                   size=(h, w), num_heads=self.num_heads, scale=self.scale,
                                   r_weight=r_weight if self.soft_routing else None)
        side = side_conv(self.lepe, v, n, n_win, n_win, rh, rw)  # (N, Hp, Wp, dim) or None
        out = merge(out, side, n, n_win, n_win, rh, rw)  # (N, Hp, Wp, dim)
        out = self.wo(out[:, :h, :w] if pad_b or pad_r else out)  # (N, H, W, dim)
        if self.layout == "nchw":
            out = out.permute(0, 3, 1, 2)  # (N, dim, H, W), channels-last memory
            out = out.contiguous() if keep_nchw else out
        return out, r_weight, r_idx, attn


@register_seed("bra", example=Example(
    {"dim": 8, "num_heads": 2, "n_win": 2, "topk": 4}, ((2, 4, 4, 8),), (2, 4, 4, 8), channel_dim=-1,
    free_sizes=(FreeSize(((0, 1),), 1, step=2, low=2), FreeSize(((0, 2),), 2, step=2, low=2))))
class LegacyBiLevelRoutingAttention(BiLevelRoutingAttention):
    """BiFormer's official `BiLevelRoutingAttention` (`attnzoo.compat.BiLevelRoutingAttention`).

    The official constructor (the order `dim, num_heads, n_win`, not `dim, n_win, num_heads`),
    state_dict and numbers; `forward(x, ret_attn_mask=False)` returns `out`, or the official
    `(out, r_weight, r_idx, attn_weight)`. The canonical `BiLevelRoutingAttention` takes the same
    arguments but `kv_downsample_kernel` (stored here, unused, as officially) and adds `layout`,
    `device` and `dtype`. Differences from the official code: invalid options are rejected at
    construction with `ValueError` (unknown modes, `fracpool`/`conv`, `param_routing` without
    `diff_routing`, `diff_routing` without `soft_routing`, `topk > n_win**2`, even `side_dwconv`);
    `side_dwconv=0` stores no lambda (picklable, same empty state_dict).

    Shape:
        - Input: `(N, H, W, dim)`; output: the same.
        - `r_weight`, `r_idx`: `(N, n_win**2, topk)` (`r_idx` int64, descending logit).
        - `attn_weight`: `(N*n_win**2, num_heads, w^2, topk*S)`, S key tokens per window.

    Example:
        ```python
        >>> from attnzoo.compat import BiLevelRoutingAttention
        >>> bra = BiLevelRoutingAttention(dim=64, num_heads=2, n_win=2, topk=3)
        >>> out, r_weight, r_idx, attn = bra(torch.randn(1, 4, 4, 64), ret_attn_mask=True)
        >>> tuple(r_idx.shape), tuple(attn.shape)
        ((1, 4, 3), (4, 2, 4, 12))

        ```
    """

    _nchw_fix = ("the official class has no layout argument: pass x.permute(0, 2, 3, 1), or use "
                 "attnzoo.BiLevelRoutingAttention(..., layout='nchw') (same state_dict)")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_kernel: int | None = None,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        side_dwconv: int = 3,
        auto_pad: bool = False,
    ) -> None:
        super().__init__(
            dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale, kv_per_win=kv_per_win,
            kv_downsample_ratio=kv_downsample_ratio, kv_downsample_mode=kv_downsample_mode, topk=topk,
            param_attention=param_attention, param_routing=param_routing, diff_routing=diff_routing,
            soft_routing=soft_routing, side_dwconv=side_dwconv, auto_pad=auto_pad,
        )
        self.kv_downsample_kernel = kv_downsample_kernel  # unused, as officially

    def forward(  # type: ignore[override]
        self, x: Tensor, ret_attn_mask: bool = False
    ) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor]:
        """`out`, or with `ret_attn_mask` the official `(out, r_weight, r_idx, attn_weight)`."""
        out, r_weight, r_idx, attn = self._forward(x, need_weights=ret_attn_mask)
        if ret_attn_mask and attn is not None:
            return out, r_weight, r_idx, attn
        return out
