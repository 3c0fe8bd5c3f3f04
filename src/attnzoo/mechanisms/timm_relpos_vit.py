"""timm's ViT attentions with relative position terms: the relative-position ViT's
(`timm.models.vision_transformer_relpos.RelPosAttention`, a learned bias over the patch grid) and
SAM's (`timm.models.vision_transformer_sam.Attention`, decomposed relative positions on a `(B, H, W, C)`
map, or a rotary embedding): their constructors, calls and state_dict keys, run by `attnzoo.attend`.

Relative-position ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929,
with the relative position bias of Swin (Liu et al., https://arxiv.org/abs/2103.14030) or the log-spaced
coordinate MLP of Swin V2 (Liu et al., https://arxiv.org/abs/2111.09883). SAM: Kirillov et al., "Segment
Anything", https://arxiv.org/abs/2304.02643, on ViTDet's backbone (Li et al.,
https://arxiv.org/abs/2203.16527) with MViTv2's decomposed relative positions (Li et al.,
https://arxiv.org/abs/2112.01526).

`TimmRelPosAttention` keeps timm's `rel_pos` module itself: it is built by the `rel_pos_cls` given
(timm's `RelPosBias`, `RelPosMlp`, ...; attnzoo never imports timm), and the converter deep-copies
timm's, so its keys (`rel_pos.relative_position_bias_table`, `rel_pos.mlp.fc1.weight`, ...), its
numbers (the MLP's dropout draws included) and its `set_window_size` (what timm's `set_input_size`
calls) are timm's own. Its bias `(1, h, N, N)` comes from `rel_pos.get_bias()`, as in timm's fused
path (timm's unfused path adds the same `get_bias()` in `rel_pos.forward`).

`TimmSamAttention` computes SAM's terms itself (`get_rel_pos`, `get_decomposed_rel_pos_bias`, timm's
numbers, its linear interpolation of a table made for another size included); a `rope` module is
called as timm calls it (`rope.get_embed()`).

`attnzoo.convert.from_timm` converts both (the same keys, so timm's checkpoints load with
`strict=True`), `attnzoo.replace` swaps a whole model's attention with the same logits, and
`attnzoo.capture_maps` then records what each head attends to.

Shape letters: B batch, N tokens, H x W the map (N = H W for SAM), C = dim, h heads, d = C / h.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import (
    check_divisible,
    check_dropout,
    check_int,
    check_mask,
    check_shape,
    check_tensor,
)
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms.timm_eva import apply_rope

__all__ = ["TimmRelPosAttention", "TimmSamAttention", "get_decomposed_rel_pos_bias", "get_rel_pos"]


def _fits(t: Tensor, target: tuple[int, ...]) -> bool:
    """Whether `t` broadcasts to `target` (compared from the right)."""
    shape = tuple(t.shape)
    return len(shape) <= len(target) and all(
        s in (1, w) for s, w in zip(reversed(shape), reversed(target), strict=False))


@register_compat(example=Example({"dim": 8, "num_heads": 2}, ((2, 5, 8),), (2, 5, 8), channel_dim=-1))
class TimmRelPosAttention(nn.Module):
    """timm's `vision_transformer_relpos.RelPosAttention(dim, num_heads=8, qkv_bias=False, qk_norm=False,
    rel_pos_cls=None, attn_drop=0., proj_drop=0., norm_layer=nn.LayerNorm)`
    (`attnzoo.compat.TimmRelPosAttention`): the module docstring says what it is.

    $\\mathrm{softmax}(\\mathrm{norm}_q(q)\\,\\mathrm{norm}_k(k)^\\top / \\sqrt d + B)\\,v$ per head,
    then `proj`; B is `rel_pos.get_bias()` where the module has a `rel_pos` (`rel_pos_cls(num_heads=h)`),
    else the `shared_rel_pos` given (timm's models with one bias for all blocks), else 0. As in timm,
    `shared_rel_pos` is ignored where the module has its own `rel_pos`.

    Shape:
        - x: `(B, N, C)`, N the tokens `rel_pos` was built for (its window's patches and prefix
          tokens); shared_rel_pos: float, broadcastable to `(B, h, N, N)`, or None.
        - Output: `(B, N, C)`.
    """

    rel_pos: nn.Module | None

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        rel_pos_cls: Callable[..., nn.Module] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        # Registered even when None, so a converted module's rel_pos takes timm's place among the keys.
        self.register_module("rel_pos", rel_pos_cls(num_heads=num_heads, **dd) if rel_pos_cls else None)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def _bias(self, batch: int, tokens: int, shared_rel_pos: Tensor | None) -> Tensor | None:
        """The term for `attend`: `rel_pos.get_bias()` `(1, h, N, N)`, else `shared_rel_pos` (a float
        bias, or a bool mask as timm's fused path passes it to SDPA), else None."""
        who = type(self).__name__
        full = (batch, self.num_heads, tokens, tokens)
        if self.rel_pos is None:
            if shared_rel_pos is not None:
                check_mask(shared_rel_pos, full, who, "shared_rel_pos")
            return shared_rel_pos
        get_bias: Callable[[], Tensor] = getattr(self.rel_pos, "get_bias")  # noqa: B009 (a module's method)
        bias = get_bias()
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"{who}: rel_pos.get_bias() must return a float tensor, got {bias!r:.80}")
        if not _fits(bias, full):
            raise ValueError(
                f"{who} expects x of shape (B, {bias.shape[-1]}, {self.dim}): its rel_pos "
                f"({type(self.rel_pos).__name__}) gives a bias of shape {tuple(bias.shape)} for the "
                f"{bias.shape[-1]} tokens of its window and prefix, got x with N={tokens}"
            )
        return bias

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:
        """Self-attention over the tokens `x` `(B, N, C)`: `(B, N, C)`."""
        dims = check_shape(x, type(self).__name__, "B N C", C=self.dim)
        batch, tokens = dims["B"], dims["N"]
        # checked before the projection; RelPosMlp's dropout still draws before the attention's, as timm's
        term = self._bias(batch, tokens, shared_rel_pos)
        mask, bias = (term, None) if term is not None and term.dtype == torch.bool else (None, term)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, bias=bias, mask=mask, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points
            record_rows(self, q, k, grid=(tokens,), bias=bias, mask=mask, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor, resize: bool = True) -> Tensor:
    """SAM's relative position embeddings `(q_size, k_size, C)` for one axis, as timm's `get_rel_pos`:
    the table `rel_pos` `(L, C)` linearly interpolated to `2 max(q_size, k_size) - 1` rows where its
    length differs (`resize`; MViT v2 indexes its table as it is), then row `i s_q - j s_k + (k_size - 1)
    s_k` for query i and key j, the shorter axis scaled by `s = max(other / own, 1)` (float32
    coordinates, truncated, as timm's)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if resize and rel_pos.shape[0] != max_rel_dist:  # a table made for another size: timm interpolates it
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    # timm's coordinates: float32 on the CPU; the same truncation here, whatever the table's device
    q_coords = torch.arange(q_size, dtype=torch.float32)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, dtype=torch.float32)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative_coords.long().to(rel_pos.device)]


def get_decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int],
    resize: bool = True,
) -> Tensor:
    """MViTv2's decomposed relative position bias, as timm's `get_decomposed_rel_pos_bias` (SAM) and
    `cal_rel_pos_type` (MViT v2, `resize=False`: its tables are indexed as they are):
    `bias[b, (i, j), (k, l)] = q[b, (i, j)] . R_h[i, k] + q[b, (i, j)] . R_w[j, l]`.

    Shape:
        - q: `(B', q_h q_w, C)`; rel_pos_h: `(L_h, C)`; rel_pos_w: `(L_w, C)`.
        - Output: `(B', q_h q_w, k_h k_w)`.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h, resize)  # (q_h, k_h, C)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w, resize)  # (q_w, k_w, C)
    batch, _, dim = q.shape
    r_q = q.reshape(batch, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w)
    attn_bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn_bias.reshape(-1, q_h * q_w, k_h * k_w)


@register_compat(example=Example({"dim": 8, "num_heads": 2, "use_rel_pos": True, "input_size": (3, 4)},
                                 ((2, 3, 4, 8),), (2, 3, 4, 8), channel_dim=-1))
class TimmSamAttention(nn.Module):
    """timm's `vision_transformer_sam.Attention(dim, num_heads=8, qkv_bias=True, qk_norm=False,
    attn_drop=0., proj_drop=0., norm_layer=nn.LayerNorm, use_rel_pos=False, input_size=None, rope=None)`
    (`attnzoo.compat.TimmSamAttention`): the module docstring says what it is.

    With `use_rel_pos`: $\\mathrm{softmax}(q k^\\top / \\sqrt d + B_{rel})\\,v$ per head, B_rel the
    decomposed bias `get_decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w)` of the unscaled queries
    (after `q_norm`), the tables `(2 s - 1, d)` made for `input_size` s and interpolated for other
    maps. With a `rope` module instead: q and k rotated by `rope.get_embed()` (`[sin | cos]`
    `(N, 2 d)`, interleaved pairs), as timm. Then `proj`. A `rope` is kept as given (not copied): in
    timm's SAM the blocks share the model's `rope_global`/`rope_window`, and stay tied to it here.

    Shape:
        - x: `(B, H, W, C)` (a window or the whole map).
        - Output: `(B, H, W, C)`.
    """

    rope: nn.Module | None

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        use_rel_pos: bool = False,
        input_size: int | tuple[int, int] | None = None,
        rope: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        check_divisible(dim, num_heads, "dim", "num_heads", who)  # no head-width option to offer
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_dropout(attn_drop, "attn_drop", who)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)
        self.use_rel_pos = bool(use_rel_pos)
        self.input_size: tuple[int, int] | None = None
        if self.use_rel_pos:
            if rope is not None:
                raise ValueError(f"{who}: use_rel_pos and rope exclude each other (as in timm), got both")
            if input_size is None:
                raise ValueError(f"{who}: use_rel_pos needs input_size, the (H, W) the tables are made for")
            self.input_size = int_pair(input_size, "input_size", who)
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.input_size[0] - 1, self.head_dim, **dd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.input_size[1] - 1, self.head_dim, **dd))
        if rope is not None and not callable(getattr(rope, "get_embed", None)):
            raise TypeError(f"{who}: rope must be a module with get_embed() (timm's RotaryEmbeddingCat), "
                            f"got {type(rope).__name__}")
        self.register_module("rope", rope)  # registered even when None: a converted rope takes timm's place

    def reset_parameters(self) -> None:
        """timm's start: zero relative position tables (the linear maps and norms reset themselves)."""
        if self.use_rel_pos:
            nn.init.zeros_(self.rel_pos_h)
            nn.init.zeros_(self.rel_pos_w)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"use_rel_pos={self.use_rel_pos}, input_size={self.input_size}")

    def _rope(self, tokens: int) -> Tensor:
        """`rope.get_embed()`, checked against the `(N, 2 d)` the map needs."""
        who = type(self).__name__
        get_embed: Callable[[], Tensor] = getattr(self.rope, "get_embed")  # noqa: B009 (a module's method)
        emb = get_embed()
        check_tensor(emb, who, "rope.get_embed()")
        if not _fits(emb, (tokens, 2 * self.head_dim)):
            raise ValueError(f"{who} expects rope.get_embed() broadcastable to ({tokens}, "
                             f"{2 * self.head_dim}) (the map's H W tokens, [sin | cos] of the head width), "
                             f"got {tuple(emb.shape)}")
        return emb

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the map `x` `(B, H, W, C)`: `(B, H, W, C)`."""
        dims = check_shape(x, type(self).__name__, "B H W C", C=self.dim)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        tokens, heads = height * width, self.num_heads
        emb = self._rope(tokens) if not self.use_rel_pos and self.rope is not None else None  # checked first
        qkv = self.qkv(x.reshape(batch, tokens, self.dim)).view(batch, tokens, 3, heads, self.head_dim)
        # timm's layout: q, k, v `(B h, N, d)`, where its bias is computed
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, tokens, self.head_dim).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if self.use_rel_pos:
            size = (height, width)
            bias = get_decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, size, size)
            bias = bias.view(batch, heads, tokens, tokens)
        elif emb is not None:
            q, k = apply_rope(q, emb).type_as(v), apply_rope(k, emb).type_as(v)
        q, k, v = (t.reshape(batch, heads, tokens, self.head_dim) for t in (q, k, v))
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attend(q, k, v, bias=bias, dropout_p=dropout_p, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: rows of the capture's query points on the (H, W) map
            record_rows(self, q, k, grid=(height, width), bias=bias, scale=self.scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)))
        return out.view(batch, height, width, self.dim)
