"""timm's other ViT-style attentions, with timm's constructors, calls and state_dict keys, run by
`attnzoo.attend`:

- FastViT's `timm.models.fastvit.Attention` (`TimmFastVitAttention`): ViT's multi-head self-attention
  (`TimmAttention`) over the positions of an NCHW map, heads of `head_dim` channels;
- CrossViT's `timm.models.crossvit.CrossAttention` (`TimmCrossAttention`): the class token attends to
  every token of its sequence (the other branch's class token swapped in by the model), separate `wq`,
  `wk`, `wv` projections;
- the latent-query attention pooling head of the SigLIP and `*_map` ViTs,
  `timm.layers.attention_pool.AttentionPoolLatent` (`TimmAttentionPoolLatent`).

`attnzoo.convert.from_timm` converts timm's modules (the same keys: timm's checkpoints load with
`strict=True`), and `attnzoo.replace(model, timm.models.fastvit.Attention)` (or `CrossAttention`) swaps
them in a whole model with the same logits; `attnzoo.capture_maps` then records what each head attends
to. Where timm asserts (`head_dim` not dividing `dim`), these raise `ValueError`.

Shape letters: B batch, C channels, H, W map, N tokens, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import (
    check_choice,
    check_dropout,
    check_float,
    check_head_widths,
    check_int,
    check_mask,
    check_shape,
)
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_attention import TimmAttention

__all__ = ["TimmFastVitAttention", "TimmCrossAttention", "TimmAttentionPoolLatent"]


@register_compat(example=Example({"dim": 8, "head_dim": 4}, ((2, 8, 3, 5),), (2, 8, 3, 5)))
class TimmFastVitAttention(TimmAttention):
    """timm's `fastvit.Attention(dim, head_dim=32, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmFastVitAttention`): `TimmAttention` with `dim / head_dim` heads over the H*W
    positions of a map.

    Shape:
        - x: `(B, C, H, W)`, C = dim.
        - Output: `(B, C, H, W)`.
    """

    def __init__(
        self,
        dim: int,
        head_dim: int = 32,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = type(self).__name__
        check_int(dim, "dim", who)
        check_int(head_dim, "head_dim", who)
        if dim % head_dim:
            raise ValueError(f"{who}: head_dim ({head_dim}) must divide dim ({dim}), as in timm")
        super().__init__(dim, dim // head_dim, attn_head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Self-attention over the positions of `x` `(B, C, H, W)`: `(B, C, H, W)`."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.dim)
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = TimmAttention.forward(self, tokens)  # (B, H*W, C)
        return out.transpose(1, 2).reshape(dims["B"], self.dim, dims["H"], dims["W"])


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 1, 8), channel_dim=-1))
class TimmCrossAttention(nn.Module):
    """timm's `crossvit.CrossAttention(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`
    (`attnzoo.compat.TimmCrossAttention`): the module docstring says what it is.

    $\\mathrm{softmax}(q_0 K^\\top \\cdot \\mathrm{scale})\\,V$ per head, $q_0$ the first (class)
    token's query, then `proj`. `scale` is `head_dim ** -0.5` (timm's attribute; its converter copies
    timm's, which its comment says may be set by hand for older weights).

    Shape:
        - x: `(B, N, C)`, the class token first.
        - Output: `(B, 1, C)`: the class token's new value.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(dim, num_heads, None, None, who, None)
        self.scale = self.head_dim**-0.5
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=qkv_bias, **dd) for _ in range(3))
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor) -> Tensor:
        """The first token of `x` `(B, N, C)` attending to every token: `(B, 1, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        heads = (self.num_heads, self.head_dim)
        q = self.wq(x[:, :1]).reshape(batch, 1, *heads).transpose(1, 2)  # (B, h, 1, d)
        k, v = (w(x).reshape(batch, tokens, *heads).transpose(1, 2) for w in (self.wk, self.wv))  # (B,h,N,d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, dropout_p=dropout_p, scale=self.scale)  # (B, h, 1, d)
        if capturing():  # map capture: the class token's row over the tokens
            record_rows(self, q, k, grid=(1,), key_grid=(tokens,), scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, 1, self.dim)))


class _Mlp(nn.Module):
    """timm's `Mlp` as `AttentionPoolLatent` builds it: `fc1`, the activation, `fc2` (timm's keys)."""

    def __init__(self, width: int, hidden: int, act_layer: type[nn.Module], dd: dict[str, Any]) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(width, hidden, **dd), act_layer()
        self.fc2 = nn.Linear(hidden, width, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@register_compat(example=Example({"in_features": 8, "num_heads": 2, "mlp_ratio": 2.0}, ((2, 5, 8),), (2, 8),
                                 channel_dim=-1))
class TimmAttentionPoolLatent(nn.Module):
    """timm's `layers.attention_pool.AttentionPoolLatent(in_features, out_features=None, embed_dim=None,
    num_heads=8, feat_size=None, mlp_ratio=4., qkv_bias=True, q_proj=True, qk_norm=False, latent_len=1,
    latent_dim=None, pos_embed='', pool_type='token', norm_layer=None, act_layer=nn.GELU, drop=0.)`
    (`attnzoo.compat.TimmAttentionPoolLatent`; the SigLIP and `*_map` ViTs' pooling head): learnt
    latent queries attend to the tokens, then `proj`, a residual MLP after `norm`, and the pool.

    $\\mathrm{softmax}(\\mathrm{norm}_q(q(L))\\,\\mathrm{norm}_k(k)^\\top / \\sqrt d + M)\\,v$ per head
    for the `latent_len` latents L; `out_features=0` keeps the attention output (timm's pre-logits
    mode, no `proj`, norm or MLP).

    Shape:
        - x: `(B, N, C)` (C = embed_dim; N = feat_size with `pos_embed='abs'`); attn_mask: bool (True =
          may attend) or float, broadcastable to `(B, h, latent_len, N)`, or None.
        - Output: `(B, out_features)` pooled (`pool_type` 'token' or 'avg'), else
          `(B, latent_len, out_features)`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        embed_dim: int | None = None,
        num_heads: int = 8,
        feat_size: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        q_proj: bool = True,
        qk_norm: bool = False,
        latent_len: int = 1,
        latent_dim: int | None = None,
        pos_embed: str = "",
        pool_type: str = "token",
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features = check_int(in_features, "in_features", who)
        self.embed_dim = check_int(embed_dim or in_features, "embed_dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        self.head_dim, _ = check_head_widths(self.embed_dim, num_heads, None, None, who, None,
                                             dim_name="in_features" if embed_dim is None else "embed_dim")
        self.scale = self.head_dim**-0.5
        self.pool = check_choice(pool_type, ("token", "avg", ""), "pool_type", who)
        self.feat_size = feat_size
        self.pos_embed: nn.Parameter | None = None
        if check_choice(pos_embed, ("abs", ""), "pos_embed", who) == "abs":
            if feat_size is None:
                raise ValueError(f"{who}: pos_embed='abs' needs feat_size, got None")
            positions = check_int(feat_size, "feat_size", who)
            self.pos_embed = nn.Parameter(torch.zeros(positions, in_features, **dd))
        self.latent_dim = check_int(latent_dim or self.embed_dim, "latent_dim", who)
        if not q_proj and self.latent_dim != self.embed_dim:
            raise ValueError(f"{who}: q_proj=False uses the latent as the query: latent_dim must equal "
                             f"embed_dim ({self.embed_dim}), got {self.latent_dim}")
        self.latent_len = check_int(latent_len, "latent_len", who)
        self.latent = nn.Parameter(torch.zeros(1, self.latent_len, self.latent_dim, **dd))
        self.q = nn.Linear(self.latent_dim, self.embed_dim, bias=qkv_bias, **dd) if q_proj else nn.Identity()
        self.kv = nn.Linear(self.embed_dim, 2 * self.embed_dim, bias=qkv_bias, **dd)
        qk = (norm_layer or nn.LayerNorm) if qk_norm else None
        self.q_norm = qk(self.head_dim, **dd) if qk is not None else nn.Identity()
        self.k_norm = qk(self.head_dim, **dd) if qk is not None else nn.Identity()
        out = in_features if out_features is None else check_int(out_features, "out_features", who, minimum=0)
        self.proj_drop = check_dropout(drop, "drop", who)
        ratio = check_float(mlp_ratio, "mlp_ratio", who, minimum=0.0)  # < 0: a negative hidden width
        self.mlp: _Mlp | None = None
        if out > 0:
            self.proj: nn.Module = nn.Linear(self.embed_dim, out, **dd)
            self.norm: nn.Module = norm_layer(out, **dd) if norm_layer is not None else nn.Identity()
            self.mlp = _Mlp(out, int(out * ratio), act_layer, dd)
        else:
            self.proj, self.norm, out = nn.Identity(), nn.Identity(), self.embed_dim
        self.out_features = out
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's `init_weights`: fan-in truncated normals for the latent and the position embedding (the
        linear maps reset themselves)."""
        nn.init.trunc_normal_(self.latent, std=self.latent_dim**-0.5)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=self.pos_embed.shape[1] ** -0.5)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """The latents attending to the tokens `x` `(B, N, C)`, pooled: see Shape."""
        who = type(self).__name__
        spec = {"C": self.embed_dim} if self.pos_embed is None else {"C": self.embed_dim, "N": self.feat_size}
        dims = check_shape(x, who, "B N C", **spec)
        batch, tokens = dims["B"], dims["N"]
        if attn_mask is not None:
            check_mask(attn_mask, (batch, self.num_heads, self.latent_len, tokens), who, "attn_mask")
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        heads = (self.num_heads, self.head_dim)
        q = self.q(self.latent.expand(batch, -1, -1)).reshape(batch, self.latent_len, *heads).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, tokens, 2, *heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v, mask=attn_mask, scale=self.scale)  # (B, h, latent_len, d)
        if capturing():  # map capture: each latent's row over the tokens
            record_rows(self, q, k, grid=(self.latent_len,), key_grid=(tokens,), mask=attn_mask,
                        scale=self.scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, self.latent_len, self.embed_dim)))
        if self.mlp is not None:
            out = out + self.mlp(self.norm(out))
        if self.pool == "token":
            return out[:, 0]
        return out.mean(1) if self.pool == "avg" else out
