"""timm's CLIP-style attention pooling of a feature map (`timm.layers.attention_pool2d.AttentionPool2d`, the
head of the CLIP ResNets `resnet50_clip`, `resnet101_clip`, `resnet50x4_clip`, ...): its constructor,
call, `reset` and state_dict keys, run by `attnzoo.attend`.

CLIP (Radford et al., 2021) replaces a ResNet's global average pool by one multi-head attention layer:
the map's positions, plus a leading token (their mean, or a learnt class token), get a learnt absolute
position embedding, and every token attends to all of them; the leading token's output is the pooled
feature (`pool_type='token'`), or the map's tokens come back as a map (`pool_type=''`):

$$t = [\\bar x; x_1..x_N] + P, \\quad \\mathrm{out} = W_o\\,\\mathrm{softmax}(q k^\\top / \\sqrt d)\\,v$$

The embedding `P` is made for `feat_size`; another map size resamples it as timm does (bicubic with
antialiasing, in float32, the leading token's row kept), so a float64 model sees float32-rounded
positions there, as in timm.

Time O(B h N^2 d) and memory O(B h N^2) (N = HW + 1; the SDPA kernels keep the map out of memory).

Shape letters: B batch, C = in_features, H, W map, N tokens, h heads, d head width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_choice, check_dropout, check_int, check_shape
from attnzoo._geometry import int_pair
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record, row_weights

__all__ = ["TimmAttentionPool2d", "resample_pos_embed"]


def resample_pos_embed(pos_embed: Tensor, size: tuple[int, int], old_size: tuple[int, int]) -> Tensor:
    """timm's `resample_abs_pos_embed` for one leading token: the `(1 + h w, C)` embedding of an
    `old_size` map for a map of `size` (bicubic, antialiased, in float32, back in its dtype).

    Shape:
        - pos_embed: `(1 + H0 W0, C)`; output: `(1 + H W, C)`.
    """
    if tuple(size) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:1], pos_embed[1:]
    width = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bicubic", antialias=True)  # (1, C, H, W)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, width).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=0)


@register_compat(example=Example({"in_features": 8, "feat_size": 3, "head_dim": 4}, ((2, 8, 3, 3),), (2, 8)))
class TimmAttentionPool2d(nn.Module):
    """timm's `AttentionPool2d(in_features, feat_size=7, out_features=None, embed_dim=None, head_dim=64,
    num_heads=None, qkv_bias=True, qkv_separate=False, pool_type='token', class_token=False,
    drop_rate=0.)` (`attnzoo.compat.TimmAttentionPool2d`): the module docstring gives the formula.

    `out_features=0` leaves the projection out (timm's pre-logits mode); `reset(num_classes, pool_type)`
    swaps the projection as timm's does for a model's `reset_classifier`.

    Shape:
        - x: `(B, C, H, W)` (any H, W: the embedding is resampled).
        - Output: `(B, out_features)` with `pool_type='token'`, else `(B, out_features, H, W)`; with
          `pre_logits=True` the same before `proj` (`embed_dim` wide).
    """

    def __init__(
        self,
        in_features: int,
        feat_size: int | tuple[int, int] = 7,
        out_features: int | None = None,
        embed_dim: int | None = None,
        head_dim: int | None = 64,
        num_heads: int | None = None,
        qkv_bias: bool = True,
        qkv_separate: bool = False,
        pool_type: str = "token",
        class_token: bool = False,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features = check_int(in_features, "in_features", who)
        width_name = "embed_dim" if embed_dim else "in_features"  # the argument the width came from
        self.embed_dim = embed_dim = check_int(embed_dim or in_features, width_name, who)
        self.pool_type = check_choice(pool_type, ("", "token"), "pool_type", who)
        if out_features is not None:
            check_int(out_features, "out_features", who, minimum=0)
        self.out_features = in_features if out_features is None else out_features or embed_dim
        self.num_heads, self.head_dim = self._heads(embed_dim, head_dim, num_heads, who, width_name)
        if class_token and embed_dim != in_features:  # timm's concatenation fails in its forward
            raise ValueError(f"{who}: class_token needs embed_dim == in_features (the token joins the "
                             f"input tokens), got embed_dim={embed_dim} and in_features={in_features}")
        self.feat_size = int_pair(feat_size, "feat_size", who)
        self.seq_len = self.feat_size[0] * self.feat_size[1]
        self.scale = self.head_dim**-0.5
        self.cls_token = nn.Parameter(torch.zeros(1, embed_dim, **dd)) if class_token else None
        self.qkv: nn.Linear | None = None
        self.q = self.k = self.v = None
        if qkv_separate:
            self.q, self.k, self.v = (nn.Linear(in_features, embed_dim, qkv_bias, **dd) for _ in range(3))
        else:
            self.qkv = nn.Linear(in_features, 3 * embed_dim, bias=qkv_bias, **dd)
        self.drop = check_dropout(drop_rate, "drop_rate", who)
        no_proj = out_features == 0  # timm's pre-logits mode
        self.proj: nn.Module = nn.Identity() if no_proj else nn.Linear(embed_dim, self.out_features, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(self.seq_len + 1, in_features, **dd))
        self.init_weights()

    @staticmethod
    def _heads(width: int, head_dim: int | None, num_heads: int | None, who: str,
               name: str) -> tuple[int, int]:
        """timm's rule: `num_heads` wins when given, else `width / head_dim` heads; either must divide."""
        if num_heads is not None:
            heads = check_int(num_heads, "num_heads", who)
            if width % heads:
                raise ValueError(f"{who}: num_heads must divide {name}={width}, got {heads}")
            return heads, width // heads
        head = check_int(head_dim, "head_dim", who)
        if width % head:
            raise ValueError(f"{who}: head_dim must divide {name}={width}, got {head}")
        return width // head, head

    def init_weights(self, zero_init_last: bool = False) -> None:
        """timm's initialisation: truncated normal projections of std `in_features ** -0.5`, zero biases."""
        std = self.in_features**-0.5
        for linear in (self.qkv,) if self.qkv is not None else (self.q, self.k, self.v):
            assert linear is not None
            nn.init.trunc_normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)

    def reset_parameters(self) -> None:
        """`init_weights`, and the class token back to 0 (`to_empty` leaves it uninitialised)."""
        self.init_weights()
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)

    @property
    def fc(self) -> nn.Module:
        """The classifier, by the name a timm model's `get_classifier` reads once its head is not timm's."""
        return self.proj

    @property
    def num_features(self) -> int:
        """The pre-logits width (timm's `ClassifierHead.num_features`, read by `reset_classifier`)."""
        return self.embed_dim

    def reset(self, num_classes: int | None = None, pool_type: str | None = None, reset_other: bool = False,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              in_features: int | None = None) -> None:
        """timm's head `reset`: a new `proj` for `num_classes` (0: none) and/or another `pool_type`.
        (`in_features`, which a timm model passes to a head that is not its `AttentionPool2d`, must be this
        head's input width: the attention's input is fixed.)"""
        who = type(self).__name__
        if in_features is not None and in_features != self.in_features:
            raise ValueError(f"{who}.reset: in_features must stay {self.in_features}, got {in_features}")
        if pool_type is not None:
            self.pool_type = check_choice(pool_type, ("", "token"), "pool_type", who)
        if num_classes is not None:
            like = self.pos_embed
            dd: dict[str, Any] = {"device": device or like.device, "dtype": dtype or like.dtype}
            classes = check_int(num_classes, "num_classes", who, minimum=0)
            self.proj = nn.Linear(self.embed_dim, classes, **dd) if classes > 0 else nn.Identity()
            self.proj.train(self.training)
            self.out_features = classes if classes > 0 else self.embed_dim

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"feat_size={self.feat_size}, pool_type={self.pool_type!r}")

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Attention pooling of the map `x` `(B, C, H, W)`: see Shape."""
        dims = check_shape(x, type(self).__name__, "B C H W", C=self.in_features)
        batch, height, width = dims["B"], dims["H"], dims["W"]
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        cls = self.cls_token
        lead = tokens.mean(1, keepdim=True) if cls is None else cls.expand(batch, -1, -1)  # (B, 1, C)
        tokens = torch.cat([lead, tokens], dim=1)
        tokens = tokens + resample_pos_embed(self.pos_embed, (height, width), self.feat_size)  # (B, N, C)
        q, k, v = self._qkv(tokens)  # (B, h, N, d) each
        out = attend(q, k, v, scale=self.scale)  # (B, h, N, d)
        if capturing():  # map capture: the pooled token's row over the map positions
            weights, idx = row_weights(q[:, :, :1], k, grid=(1,), scale=self.scale)  # (B, h, 1, N)
            record(self, "rows", weights[..., 1:], grid=(height, width), queries=idx, query_grid=(1,),
                   token_share=weights[..., :1], note="the pooled query over the map, its own share left out")
        out = self.drop(out.transpose(1, 2).reshape(batch, height * width + 1, self.embed_dim))
        if not pre_logits:
            out = self.proj(out)
        if self.pool_type == "token":
            return out[:, 0]
        return out[:, 1:].reshape(batch, height, width, -1).permute(0, 3, 1, 2)

    def _qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The heads' queries, keys and values of `tokens` `(B, N, C)`: `(B, h, N, d)` each."""
        batch, length, _ = tokens.shape
        heads, width = self.num_heads, self.head_dim
        if self.qkv is not None:
            qkv = self.qkv(tokens).reshape(batch, length, 3, heads, width).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return q, k, v
        q, k, v = (proj(tokens).reshape(batch, length, heads, width).transpose(1, 2)
                   for proj in (self.q, self.k, self.v) if proj is not None)
        return q, k, v
