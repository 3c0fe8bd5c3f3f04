"""timm's EVA self-attention (`timm.models.eva.EvaAttention`, used by EVA-02, the rope ViTs and other
timm models built from `eva.Block`): its constructor, call `(x, rope=None, attn_mask=None,
is_causal=False)` and state_dict keys, run by `attnzoo.attend`.

Fang et al., "EVA-02: A Visual Representation for Neon Genesis", https://arxiv.org/abs/2303.11331;
rotary position embedding from Su et al., "RoFormer", https://arxiv.org/abs/2104.09864.

EVA's attention is ViT's with three differences, all kept: the query and value biases are parameters
beside a bias-free fused `qkv` (the key bias is a zero buffer), or three separate projections
(`qkv_fused=False`, the key one without bias); the rotary embedding `rope` given to `forward` rotates
the queries and keys of every token after the `num_prefix_tokens` class/register tokens; and a scale
norm (`scale_norm=True`, timm's default) normalises the heads' output before `proj`.

`attnzoo.convert.from_timm` converts timm's module (the same keys, so timm's checkpoint loads with
`strict=True`), and `attnzoo.replace(model, timm.models.eva.EvaAttention)` swaps a whole EVA's
attention with the same logits; `attnzoo.capture_maps` then records what each head attends to.
Where timm fails (`attn_head_dim * num_heads != dim`: it reshapes the heads to `dim`), this class
runs (`proj` maps the heads back to `dim`). A query whose every key `attn_mask` masks gets zero
output here (`attend`'s rule; NaN in timm).

Shape letters: B batch, N tokens, P prefix tokens, C = dim, h heads, d head width.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from attnzoo._checks import (
    check_bool,
    check_dropout,
    check_head_widths,
    check_int,
    check_mask,
    check_shape,
    check_tensor,
)
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows

__all__ = ["TimmEvaAttention", "TimmRopeAttention", "apply_rope"]


def apply_rope(x: Tensor, rope: Tensor, half: bool = False) -> Tensor:
    """Rotate `x` `(..., N, d)` by the concatenated `[sin | cos]` embedding `rope` `(..., N, 2 d)`, as
    timm's `apply_rot_embed_cat`: interleaved pairs `(x0, x1)` (or, with `half`, the two halves of the
    head) rotate by the same angle. Products in the embedding's dtype, the result in x's."""
    sin, cos = rope.chunk(2, -1)  # (..., N, d) each
    if half:
        first, second = x.chunk(2, -1)
        turned = torch.cat([-second, first], -1)  # [-x_{d/2:}, x_{:d/2}]
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)  # [-x1, x0, -x3, x2, ...]
    return (x * cos + turned * sin).to(x.dtype)


@register_compat(example=Example({"dim": 8, "num_heads": 2, "scale_norm": False}, ((2, 5, 8),), (2, 5, 8),
                                 channel_dim=-1))
class TimmEvaAttention(nn.Module):
    """timm's `eva.EvaAttention(dim, num_heads=8, qkv_bias=True, qkv_fused=True, qkv_bias_separate=False,
    num_prefix_tokens=1, attn_drop=0., proj_drop=0., attn_head_dim=None, norm_layer=None, qk_norm=False,
    scale_norm=True, rotate_half=False, gated=False)` (`attnzoo.compat.TimmEvaAttention`): the module
    docstring says what it is.

    $\\mathrm{softmax}(R(\\mathrm{norm}_q(q))\\,R(\\mathrm{norm}_k(k))^\\top / \\sqrt d + M)\\,v$ per
    head, R the rotary embedding on the tokens after the prefix, then the scale `norm`, the sigmoid
    `gate` and `proj`.

    Shape:
        - x: `(B, N, C)`; rope: `[sin | cos]` `(N - P, 2 d)` or broadcastable to `(B, h, N - P, 2 d)`,
          or None; attn_mask: bool (True = may attend) or float (added), broadcastable to
          `(B, h, N, N)`, or None.
        - Output: `(B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        qkv_bias_separate: bool = False,
        num_prefix_tokens: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_head_dim: int | None = None,
        norm_layer: type[nn.Module] | None = None,
        qk_norm: bool = False,
        scale_norm: bool = True,
        rotate_half: bool = False,
        gated: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(dim, num_heads, attn_head_dim, None, who, "attn_head_dim")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError(f"{who}: norm_layer must be given with qk_norm or scale_norm, got None")
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", who, minimum=0)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_bias_separate = bool(qkv_bias_separate)  # the same sum either way; kept for timm's repr
        self.rotate_half = bool(rotate_half)
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv: nn.Linear | None = None
        self.q_proj = self.k_proj = self.v_proj = None
        self.q_bias = self.v_bias = None
        k_bias = None
        if qkv_fused:
            self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=False, **dd)
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd))
                k_bias = torch.zeros(self.attn_dim, **dd)  # timm's: a zero buffer
                self.v_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd))
        else:
            self.q_proj = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, self.attn_dim, bias=False, **dd)
            self.v_proj = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
        self.register_buffer("k_bias", k_bias, persistent=False)
        norm = norm_layer if norm_layer is not None else nn.Identity
        self.q_norm = norm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.norm = norm(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def reset_parameters(self) -> None:
        """timm's start: zero q/k/v biases (`to_empty` leaves the k buffer uninitialised too); the
        linear maps and norms reset themselves."""
        for name in ("q_bias", "k_bias", "v_bias"):
            if getattr(self, name) is not None:
                nn.init.zeros_(getattr(self, name))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values `(B, h, N, d)` each."""
        batch, tokens = x.shape[:2]
        if self.qkv is None:  # three projections
            heads = (batch, tokens, self.num_heads, self.head_dim)
            return tuple(p(x).reshape(heads).transpose(1, 2)  # type: ignore[misc, return-value]
                         for p in (self.q_proj, self.k_proj, self.v_proj))
        bias = None
        if self.q_bias is not None and self.v_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))  # k: no bias
        qkv = nn.functional.linear(x, self.qkv.weight, bias)  # (B, N, 3 h d)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _rotate(self, t: Tensor, rope: Tensor, like: Tensor) -> Tensor:
        """`t` `(B, h, N, d)` with the tokens after the prefix rotated by `rope`, in `like`'s dtype."""
        npt = self.num_prefix_tokens
        rotated = apply_rope(t[:, :, npt:], rope, half=self.rotate_half)
        return torch.cat([t[:, :, :npt], rotated], dim=2).type_as(like)

    def forward(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """Self-attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        who = type(self).__name__
        dims = check_shape(x, who, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        if attn_mask is not None:  # SDPA's rule, checked here so that the message names attn_mask
            check_mask(attn_mask, (batch, self.num_heads, tokens, tokens), who, "attn_mask")
        if rope is not None:
            check_tensor(rope, who, "rope")
            rotated = max(tokens - self.num_prefix_tokens, 0)
            check_mask(rope, (batch, self.num_heads, rotated, 2 * self.head_dim), who, "rope")
            if rope.ndim < 2 or rope.shape[-1] != 2 * self.head_dim:  # [sin | cos]: no broadcast there
                raise ValueError(f"{who} expects rope of shape (..., N, {2 * self.head_dim}) ([sin | cos] of "
                                 f"the head width {self.head_dim}), got {tuple(rope.shape)}")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope, v), self._rotate(k, rope, v)
        dropout_p = self.attn_drop.p if self.training else 0.0
        causal = check_bool(is_causal, "is_causal", type(self).__name__)  # timm's SDPA call refuses others
        out = attend(q, k, v, mask=attn_mask, causal=causal, dropout_p=dropout_p, scale=self.scale)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(tokens,), mask=attn_mask, causal=causal, scale=self.scale)
        out = self.norm(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim))  # (B, N, h d)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


@register_compat(example=Example({"dim": 8, "num_heads": 4, "qkv_fused": False, "num_kv_heads": 2},
                                 ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmRopeAttention(TimmEvaAttention):
    """timm's `layers.attention.AttentionRope(dim, num_heads=8, dim_out=None, qkv_bias=True, qkv_fused=True,
    num_prefix_tokens=1, attn_drop=0., proj_drop=0., attn_head_dim=None, norm_layer=None, qk_norm=False,
    scale_norm=False, proj_bias=True, rotate_half=False, gated=False, num_kv_heads=None)` (Qwen3-ViT,
    DeepSeek's ViT; `attnzoo.compat.TimmRopeAttention`): EVA's attention (`TimmEvaAttention`, the same
    call and rotary embedding) with a plain `qkv` bias (or three projections, the key one biased too),
    grouped-query attention (`num_kv_heads` key/value heads, each shared by `num_heads / num_kv_heads`
    query heads, with separate projections), an output width `dim_out` and a `proj_bias` switch.

    Shape:
        - x: `(B, N, C)`; rope and attn_mask as `TimmEvaAttention`'s.
        - Output: `(B, N, dim_out)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        dim_out: int | None = None,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        num_prefix_tokens: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_head_dim: int | None = None,
        norm_layer: type[nn.Module] | None = None,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        rotate_half: bool = False,
        gated: bool = False,
        num_kv_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        kv_heads = check_int(num_kv_heads or num_heads, "num_kv_heads", who)
        if num_heads % kv_heads:
            raise ValueError(f"{who}: num_kv_heads ({kv_heads}) must divide num_heads ({num_heads})")
        if qkv_fused and kv_heads != num_heads:
            raise ValueError(f"{who}: grouped-query attention (num_kv_heads={kv_heads} of {num_heads}) needs "
                             f"qkv_fused=False, as in timm")
        super().__init__(
            dim, num_heads, qkv_bias=False, qkv_fused=qkv_fused, num_prefix_tokens=num_prefix_tokens,
            attn_drop=attn_drop, proj_drop=proj_drop, attn_head_dim=attn_head_dim, norm_layer=norm_layer,
            qk_norm=qk_norm, scale_norm=scale_norm, rotate_half=rotate_half, gated=gated, device=device,
            dtype=dtype,
        )
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_kv_heads, self.num_kv_groups = kv_heads, num_heads // kv_heads
        kv_dim = kv_heads * self.head_dim
        if qkv_fused:  # timm's own Linear bias, not EVA's q/v parameters
            self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        else:
            self.q_proj = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias, **dd)
            self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias, **dd)
        if gated:
            self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
        self.dim_out = check_int(dim_out or dim, "dim_out", who)  # timm's `dim_out or dim`
        self.proj = nn.Linear(self.attn_dim, self.dim_out, bias=proj_bias, **dd)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values `(B, h, N, d)` each; the key/value heads repeated for their query
        heads (timm repeats them after the norms and the rotation, which act per head: the same numbers)."""
        batch, tokens = x.shape[:2]
        if self.qkv is not None:
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q_proj, k_proj, v_proj = cast(nn.Linear, self.q_proj), cast(nn.Linear, self.k_proj), self.v_proj
        q = q_proj(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (p(x).reshape(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
                for p in (k_proj, cast(nn.Linear, v_proj)))  # (B, h_kv, N, d)
        if self.num_kv_groups > 1:
            k, v = (t.repeat_interleave(self.num_kv_groups, dim=1) for t in (k, v))
        return q, k, v
