"""Swin V2 window attention, "Swin Transformer V2: Scaling Up Capacity and Resolution"
(Liu et al., 2022), arXiv:2111.09883.

`ShiftedWindowAttentionV2` (registered `swin_v2_window`) is Swin V2's (shifted-)window attention
over a whole `(B, H, W, C)` map of any size: scaled cosine attention with a learnable per-head
temperature (`logit_scale`, clamped at log 100), a continuous relative position bias produced by a
small MLP (`cpb_mlp`) from log-spaced relative coordinates, biases on q and v only, and the
cyclic shift with its region mask. Parameter names follow the official code and timm
(`qkv`, `q_bias`, `v_bias`, `logit_scale`, `cpb_mlp`, `proj`).

Deviations from the official code and torchvision (documented in docs/mechanisms/swin_v2_window.md):

- Any map size: the map is padded with zeros at the bottom/right to window multiples, and padded
  tokens are masked as keys, so the output on the real tokens does not depend on the padding
  (torchvision lets the zero tokens take part; `attnzoo.compat.ShiftedWindowAttentionV2`
  reproduces that). Along a side where the padded map is a single window the shift is dropped
  (torchvision's rule); the window is never clipped, so the learned bias keeps its meaning.
- The shifted-window mask blocks keys of other regions completely (a boolean mask); the official
  code adds -100, which cosine logits of up to 100 plus a bias of up to 16 can overcome.
- A window (or `pretrained_window_size`) of 1 along a side normalises the coordinates by 1
  instead of dividing 0 by 0 (as timm).

Shape letters: B batch, H/W map size, C channels, h heads, d head width, (Wh, Ww) window,
N = Wh*Ww tokens per window, nW windows per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register
from attnzoo.functional import attend, gather_relative_bias, relative_position_index_2d
from attnzoo.maps.capture import capturing, record
from attnzoo.maps.records import windows_to_image

__all__ = [
    "ShiftedWindowAttentionV2",
    "cosine_window_attention",
    "log_spaced_coords",
    "partition_windows",
    "record_windows",
    "region_ids",
    "reverse_windows",
]

_MAX_LOGIT_SCALE = math.log(100.0)
CPB_HIDDEN = 512  # width of the continuous position bias MLP (the paper's and every reference's)


def _unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    """`x / max(||x||, eps)` over the last dim, as `F.normalize`, written through the squared norm so
    that its second derivative stays finite at a zero vector (padded keys are zero). float16 runs in
    float32: `eps * eps` is 0 there, and a zero key would give 0 * inf = NaN."""
    if x.dtype == torch.float16:
        return _unit(x.float(), eps).to(x.dtype)
    return x * x.square().sum(-1, keepdim=True).clamp_min(eps * eps).rsqrt()


def log_spaced_coords(
    window: tuple[int, int],
    normaliser: tuple[int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Swin V2's log-spaced relative coordinates, the input of the continuous position bias MLP.

    Offsets $\\Delta$ in ``[-(W-1), W-1]`` per side are divided by ``normaliser - 1`` (by 1 where
    ``normaliser`` is 1), scaled to ``[-8, 8]`` and mapped to
    $\\mathrm{sign}(\\Delta)\\log_2(1 + |\\Delta|) / \\log_2 8$. Computed in float32, as every
    reference computes it, then cast to ``dtype``.

    Shape:
        - Output: ``(1, 2*Wh - 1, 2*Ww - 1, 2)``, (row offset, column offset) last.
    """
    sides = []
    for size, norm in zip(window, normaliser, strict=True):
        offsets = torch.arange(-(size - 1), size, dtype=torch.float32)
        sides.append(offsets / (norm - 1) if norm > 1 else offsets)
    table = torch.stack(torch.meshgrid(*sides, indexing="ij"), dim=-1)[None] * 8  # (1, 2Wh-1, 2Ww-1, 2)
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
    return table.to(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())


def partition_windows(x: Tensor, window: tuple[int, int]) -> Tensor:
    """``(B, Hp, Wp, C)`` with window multiples -> ``(B * nW, N, C)``, image-major then row-major."""
    b, hp, wp, c = x.shape
    wh, ww = window
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, c)  # (B, Hp/Wh, Wh, Wp/Ww, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)  # (B*nW, N, C)


def reverse_windows(windows: Tensor, window: tuple[int, int], padded: tuple[int, int]) -> Tensor:
    """Undo `partition_windows`: ``(B * nW, N, C)`` -> ``(B, Hp, Wp, C)``."""
    (wh, ww), (hp, wp), c = window, padded, windows.shape[-1]
    x = windows.reshape(-1, hp // wh, wp // ww, wh, ww, c)  # (B, Hp/Wh, Wp/Ww, Wh, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)  # (B, Hp, Wp, C)


def region_ids(
    padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> Tensor:
    """Which shifted-window region each token of the rolled, padded map belongs to (Swin's slicing).

    Per side the regions are ``[0, P-W)``, ``[P-W, P-s)``, ``[P-s, P)`` (one region when ``s`` is
    0); tokens of different regions in one window were not neighbours before the roll.

    Shape:
        - Output: ``(nW, N)`` int64, windows in `partition_windows` order.
    """
    labels = []
    for size, win, step in zip(padded, window, shift, strict=True):
        pos = torch.arange(size, device=device)
        labels.append(((pos >= size - win).long() + (pos >= size - step).long()) if step else pos * 0)
    region = (labels[0][:, None] * 3 + labels[1][None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
    return partition_windows(region, window)[..., 0]  # (nW, N)


def record_windows(
    module: nn.Module,
    weights: Tensor,
    size: tuple[int, int],
    padded: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
) -> None:
    """Record every window's rows ``(B*nW, h, N, N)`` for ``module``, then turn them into rows over the
    ``(H, W)`` map (`attnzoo.maps.records.windows_to_image`)."""
    n = window[0] * window[1]
    queries = torch.arange(n, device=weights.device)
    record(module, "rows", weights.detach(), grid=window, queries=queries, query_grid=window)
    windows_to_image(module, module, size=size, padded=padded, window=window, shift=shift)


def cosine_window_attention(
    qkv: Tensor,
    logit_scale: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    *,
    dropout_p: float,
    need_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """Scaled cosine attention in windows, run by `attnzoo.attend`.

    $\\mathrm{softmax}(\\tau_h \\cos(q, k) + B + M)\\,v$ with $\\tau_h = \\exp(\\min(\\theta_h, \\log 100))$:
    q and k are normalised, q is multiplied by $\\tau_h$, and ``attend`` runs with ``scale=1``.

    Args:
        qkv: ``(B*nW, N, 3, h, d)``.
        logit_scale: ``(h, 1, 1)``, the log temperatures $\\theta$.
        bias: ``(h, N, N)`` position bias.
        mask: Bool ``(B*nW, 1, N, N)`` (True = may attend) or float (added), or None.
        dropout_p: Dropout on the weights.
        need_weights: Also return the weights ``(B*nW, h, N, N)`` (before dropout).

    Returns:
        ``(out (B*nW, N, h*d), weights or None)``.
    """
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, h, N, d) each
    scale = torch.clamp(logit_scale, max=_MAX_LOGIT_SCALE).exp().to(q.dtype)  # (h, 1, 1)
    q = _unit(q) * scale
    k = _unit(k)
    if need_weights:
        out, weights = attend(q, k, v, bias=bias, mask=mask, scale=1.0, dropout_p=dropout_p,
                              need_weights=True)
    else:
        out, weights = attend(q, k, v, bias=bias, mask=mask, scale=1.0, dropout_p=dropout_p), None
    return out.transpose(1, 2).flatten(2), weights  # (B*nW, h, N, d) -> (B*nW, N, h*d)


@register(
    "swin_v2_window",
    family="transformer",
    paper="Swin Transformer V2: Scaling Up Capacity and Resolution",
    year=2022,
    layout="NHWC",
    example=Example(
        kwargs={"dim": 8, "window_size": (2, 3), "num_heads": 2, "shift_size": (1, 1)},
        inputs=((2, 5, 7, 8),),
        output=(2, 5, 7, 8),
        channel_dim=-1,
    ),
    aliases=("swinv2_window", "swin_v2", "shifted_window_v2"),
    uses_attend=True,
)
class ShiftedWindowAttentionV2(nn.Module):
    r"""Swin V2 (shifted-)window attention over a whole `(B, H, W, C)` map of any size.

    Inside each window of the padded map rolled by $-s$:

    $$
    \mathrm{Attn}(Q, K, V) = \mathrm{softmax}\big(\tau_h \cos(Q, K)
        + 16\,\sigma(\mathrm{MLP}(\hat\Delta)) + M\big)\,V
    $$

    with $\tau_h = \exp(\min(\theta_h, \log 100))$ a learnable temperature per head,
    $\hat\Delta = \mathrm{sign}(\Delta)\log_2(1 + 8|\Delta| / (W_p - 1)) / 3$ the log-spaced relative
    coordinates ($W_p$ = `pretrained_window_size`, or the window), and $M$ masking keys of other
    shifted-window regions and padded keys. Then the map is rolled back by $+s$ and cropped.

    Args:
        dim: Channels C.
        window_size: `(Wh, Ww)`, or an int for a square window. Default: 8 (Swin V2-T).
        num_heads: Heads h; must divide `dim`. Default: 8.
        shift_size: `(sh, sw)` or an int, each in `[0, window)`; 0 gives W-MSA. Default: None, half
            the window (`Wh // 2, Ww // 2`).
        qkv_bias: Learnable biases on q and v (k has none, as in the paper). Default: True.
        attn_drop: Dropout on the attention weights (training only). Default: 0.0.
        proj_drop: Dropout on the output (training only). Default: 0.0.
        pretrained_window_size: Window the coordinates are normalised by (the pre-training window,
            when fine-tuning with a larger one), an int or a pair; 0 uses `window_size`. Default: 0.
        device: Device of the parameters and buffers. Default: None.
        dtype: dtype of the floating parameters and buffers. Default: None.

    Shape:
        - Input: `(B, H, W, C)`, any H, W >= 1.
        - Output: `(B, H, W, C)`; with `need_weights=True`, `(out, weights)` with weights
          `(B * nW, h, N, N)` over the windows of the padded, rolled map (image-major, row-major).

    Example:
        ```python
        >>> import torch, attnzoo
        >>> attn = attnzoo.ShiftedWindowAttentionV2(32, window_size=4, num_heads=4)
        >>> attn(torch.randn(2, 9, 10, 32)).shape
        torch.Size([2, 9, 10, 32])

        ```
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int] = 8,
        num_heads: int = 8,
        shift_size: int | Sequence[int] | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int | Sequence[int] = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.window_size = int_pair(window_size, "window_size", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        wh, ww = self.window_size
        default_shift = (wh // 2, ww // 2)
        self.shift_size = default_shift if shift_size is None else int_pair(shift_size, "shift_size", who, 0)
        if self.shift_size[0] >= wh or self.shift_size[1] >= ww:
            raise ValueError(
                f"{who}: shift_size must be smaller than window_size {(wh, ww)}, got {self.shift_size}"
            )
        self.pretrained_window_size = int_pair(pretrained_window_size, "pretrained_window_size", who, 0)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **factory)
        self.q_bias = nn.Parameter(torch.zeros(dim, **factory)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim, **factory)) if qkv_bias else None
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0), **factory))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN, **factory),
            nn.ReLU(),
            nn.Linear(CPB_HIDDEN, num_heads, bias=False, **factory),
        )
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self._position_buffers(device, dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"shift_size={self.shift_size}")

    def reset_parameters(self) -> None:
        """Zero q/v biases, the logit scale at log 10 and the position buffers recomputed (`to_empty`
        leaves them uninitialised); the linear maps reset themselves."""
        for bias in (self.q_bias, self.v_bias):
            if bias is not None:
                nn.init.zeros_(bias)
        nn.init.constant_(self.logit_scale, math.log(10.0))
        table: Tensor = self.relative_coords_table  # type: ignore[assignment]  # a registered buffer
        self._position_buffers(table.device, table.dtype)

    def _position_buffers(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """The log-spaced coordinate table and the relative position index of `window_size`. Both
        follow from the window: not part of the state_dict (as timm's)."""
        normaliser = self.pretrained_window_size if self.pretrained_window_size[0] > 0 else self.window_size
        # (1, 2Wh-1, 2Ww-1, 2)
        coords = log_spaced_coords(self.window_size, normaliser, device=device, dtype=dtype)
        self.register_buffer("relative_coords_table", coords, persistent=False)
        index = relative_position_index_2d(self.window_size).to(device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def position_bias(self) -> Tensor:
        """The continuous position bias $16\\,\\sigma(\\mathrm{MLP}(\\hat\\Delta))$, ``(h, N, N)``."""
        table = self.cpb_mlp(self.relative_coords_table).reshape(-1, self.num_heads)  # (T, h)
        index: Tensor = self.relative_position_index  # type: ignore[assignment]  # a registered buffer
        return 16 * torch.sigmoid(gather_relative_bias(table, index))  # (h, N, N)

    def _mask(self, size: tuple[int, int], padded: tuple[int, int], shift: tuple[int, int], batch: int,
              device: torch.device) -> Tensor | None:
        """Bool ``(B*nW, 1, N, N)``: True where the key is real and in the query's region; or None."""
        (height, width), (hp, wp), (sh, sw) = size, padded, shift
        if not (sh or sw) and (hp, wp) == (height, width):
            return None
        ids = region_ids(padded, self.window_size, shift, device)  # (nW, N)
        rows = (torch.arange(hp, device=device) + sh) % hp < height  # real rows of the rolled map
        cols = (torch.arange(wp, device=device) + sw) % wp < width
        real = (rows[:, None] & cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
        real = partition_windows(real, self.window_size)[..., 0]  # (nW, N)
        keep = (ids[:, :, None] == ids[:, None, :]) & real[:, None, :]  # (nW, N, N) query x key
        n = keep.shape[-1]
        return keep[None].expand(batch, -1, -1, -1).reshape(-1, 1, n, n)  # (B*nW, 1, N, N)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Shifted-window cosine attention over the map `x` `(B, H, W, C)`.

        Args:
            x: The map.
            need_weights: Also return the per-window attention weights. Default: False.

        Returns:
            `out` `(B, H, W, C)`, or `(out, weights)` with weights `(B * nW, h, N, N)`.
        """
        who = type(self).__name__
        dims = check_shape(x, who, "B H W C", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
        shift = (sh if hp > wh else 0, sw if wp > ww else 0)  # one window along a side: no shift
        if (hp, wp) != (height, width):
            x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))  # zeros at the bottom/right
        if shift != (0, 0):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = partition_windows(x, self.window_size)  # (B*nW, N, C)
        qkv_bias = None
        if self.q_bias is not None and self.v_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(windows, self.qkv.weight, qkv_bias).unflatten(-1, (3, self.num_heads, -1))
        mask = self._mask((height, width), (hp, wp), shift, batch, x.device)
        capture = False
        capture = capturing()
        out, weights = cosine_window_attention(  # out: (B*nW, N, C)
            qkv, self.logit_scale, self.position_bias(), mask,
            dropout_p=self.attn_drop.p if self.training else 0.0, need_weights=need_weights or capture,
        )
        if capture and weights is not None:
            record_windows(self, weights, (height, width), (hp, wp), self.window_size, shift)
        out = reverse_windows(self.proj_drop(self.proj(out)), self.window_size, (hp, wp))  # (B, Hp, Wp, C)
        if shift != (0, 0):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        out = out[:, :height, :width].contiguous()
        if need_weights and weights is not None:
            return out, weights
        return out
