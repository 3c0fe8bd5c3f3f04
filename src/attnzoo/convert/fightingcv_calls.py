"""fightingcv modules whose converted module is called differently: call adapters for `attnzoo.replace`.

`from_fightingcv` turns fightingcv's `EMSA`, `gfnet.GlobalFilter`, `DAT.DAttentionBaseline`,
`ScaledDotProductAttention`, `SimplifiedScaledDotProductAttention` and `MUSEAttention` into the
canonical classes, which are called as attnzoo calls them (`EMSA(x)`, maps for `GlobalFilter`, one
output for `DeformableAttention`, a `mask` that is True where a key may be attended, where
fightingcv's fourth argument `attention_mask` is True where it may not). A model that calls
fightingcv's module keeps calling it fightingcv's way, so `attnzoo.replace(model, Class)` swaps in
these subclasses instead: the converted module (same weights, state_dict keys and numbers) with
fightingcv's forward signature and return value.
`IN_PLACE` maps fightingcv's dotted class names to their converters.

Shape letters: B batch, N tokens, N_k keys, C channels, H, W map size, g offset groups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from attnzoo._checks import check_mask, check_shape, checked
from attnzoo._fx import fx_leaf
from attnzoo.convert._timm_common import TimmKeys, rename
from attnzoo.convert.fightingcv_tokens_a import EMSA_KEYS, MUSE_KEYS, SDPA_KEYS, SIMPLIFIED_SDPA_KEYS
from attnzoo.mechanisms.deformable_fightingcv import FightingcvDeformableAttention
from attnzoo.mechanisms.emsa import EMSA
from attnzoo.mechanisms.gfnet import GlobalFilter
from attnzoo.mechanisms.mha import MultiHeadAttention
from attnzoo.mechanisms.muse import MUSEAttention

__all__ = [
    "IN_PLACE", "FightingcvCallDeformable", "FightingcvCallEMSA", "FightingcvCallGlobalFilter",
    "FightingcvCallMUSE", "FightingcvCallMultiHead",
]

_PACKAGE = "fightingcv_attention.attention"


@functools.partial(checked, flags=False)  # dtypes and devices of keys and values too; one FX node
class FightingcvCallEMSA(EMSA):
    """`EMSA` called as fightingcv's: `forward(queries, keys, values, attention_mask=None,
    attention_weights=None)` on `(B, N, C)` tokens of the `feat_size` map.

    fightingcv's EMSA is self-attention in ResT (`emsa(x, x, x)`). With `sr_ratio > 1` it ignores
    `keys` and `values` (its keys and values come from the reduced map of the queries) and reads its
    `H x W`; with `sr_ratio == 1` it projects `keys` and `values` as given, `(B, N_k, C)` each, and any
    number of tokens runs. The masks (applied after the softmax there, so a masked query gives NaN)
    raise `ValueError`.
    """

    def forward(  # type: ignore[override]
        self, queries: Tensor, keys: Tensor | None = None, values: Tensor | None = None,
        attention_mask: Tensor | None = None, attention_weights: Tensor | None = None,
    ) -> Tensor:
        """Attention of `queries` `(B, N, C)` over `keys` and `values` (see the class): `(B, N, C)`."""
        who = type(self).__name__
        if attention_mask is not None or attention_weights is not None:
            given = "attention_mask" if attention_mask is not None else "attention_weights"
            raise ValueError(f"{who} takes no attention_mask or attention_weights (fightingcv applies them "
                             f"after the softmax); got {given}")
        dims = check_shape(queries, who, "B N C", "queries", C=self.dim)
        if (keys is None) != (values is None):  # fightingcv's call takes both (or, here, neither)
            raise ValueError(f"{who} expects keys and values given together (or neither, for "
                             f"self-attention), got only {'keys' if values is None else 'values'}")
        keys = queries if keys is None or self.sr_ratio > 1 else keys
        values = queries if values is None or self.sr_ratio > 1 else values
        if keys is not queries or values is not queries:
            kdims = check_shape(keys, who, "B N C", "keys", B=dims["B"], C=self.dim)
            check_shape(values, who, "B N C", "values", B=dims["B"], N=kdims["N"], C=self.dim)
        # fightingcv reads its H x W only to reduce the keys (sr_ratio > 1); without reduction any
        # number of tokens runs, as a 1 x N map
        tokens, feat = dims["N"], self.feat_size
        size = feat if feat is not None and (self.sr_ratio > 1 or tokens == feat[0] * feat[1]) else None
        if size is None and self.sr_ratio == 1:
            size = (1, tokens)
        grid = self._size(tokens, size)
        return cast(Tensor, self._attention(queries, keys, values, grid, need_weights=False))


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class FightingcvCallGlobalFilter(GlobalFilter):
    """`GlobalFilter` called as fightingcv's: `forward(x, spatial_size=None)` on tokens `(B, N, C)` of
    an `a x b` map (`spatial_size`, or square). The output keeps the input's dtype (fightingcv's is
    always float32)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, spatial_size: tuple[int, int] | None = None
    ) -> Tensor:
        """Filter tokens `(B, N, C)` as an `a x b` map: `(B, N, C)`."""
        who = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{who} expects tokens x of shape (B, N, C) (fightingcv's call), got {got}")
        batch, tokens, channels = x.shape
        if spatial_size is None:
            side = math.isqrt(tokens)
            spatial_size = (side, side)
        if len(spatial_size) != 2 or spatial_size[0] * spatial_size[1] != tokens:
            raise ValueError(f"{who} expects spatial_size (a, b) with a*b = N={tokens} (default: a square "
                             f"map), got {tuple(spatial_size)}")
        grid = x.reshape(batch, spatial_size[0], spatial_size[1], channels)  # (B, N, C) -> (B, a, b, C)
        out = cast(Tensor, super().forward(grid))  # need_weights=False: out
        return out.reshape(batch, tokens, channels)  # (B, a, b, C) -> (B, N, C)


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class FightingcvCallDeformable(FightingcvDeformableAttention):
    """`FightingcvDeformableAttention` called as fightingcv's `DAttentionBaseline`: `forward(x)`
    returns `(out, positions, references)`, the sampling points and the reference points
    `(B, g, H_k, W_k, 2)` in fightingcv's `(y, x)` order."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """`(out (B, C, H, W), positions, references)`."""
        self._points: Tensor | None = None
        out = cast(Tensor, super().forward(x))  # need_weights=False: out
        pos = self._points
        if pos is None:  # forward validated x before it sampled; nothing else leaves it unset
            raise RuntimeError(f"{type(self).__name__}: forward did not sample")
        self._points = None
        batch, g = x.shape[0], self.groups
        hk, wk = pos.shape[1:3]
        reference = self._reference(hk, wk, pos.dtype, pos.device).expand(batch * g, -1, -1, -1)
        flat = (batch, g, hk, wk, 2)
        return out, pos.reshape(flat).flip(-1), reference.reshape(flat).flip(-1)  # (x, y) -> (y, x)

    def points(self, q: Tensor, dtype: torch.dtype) -> Tensor:
        pos = super().points(q, dtype)  # (B*g, Hk, Wk, 2), (x, y)
        self._points = pos
        return pos


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class _MaskedCall(nn.Module):
    """fightingcv's `forward(queries, keys, values, attention_mask=None, attention_weights=None)`:
    `attention_mask` `(B, h, L, S)` or broadcastable (as in fightingcv, a 3-D mask is `(h, L, S)`),
    bool, True where a logit is masked. A query with every key masked gives 0 here (NaN in
    fightingcv); `attention_weights` (multiplying the logits) has no counterpart and raises
    `ValueError`."""

    def forward(
        self, queries: Tensor, keys: Tensor, values: Tensor,
        attention_mask: Tensor | None = None, attention_weights: Tensor | None = None,
    ) -> Tensor:
        """`(B, L, C)` tokens attending to `keys`/`values` `(B, S, C)`: `(B, L, C)`."""
        who = type(self).__name__
        if attention_weights is not None:
            raise ValueError(f"{who} takes no attention_weights (fightingcv multiplies the logits by them), "
                             f"got a tensor")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool:
                got = getattr(attention_mask, "dtype", type(attention_mask).__name__)
                raise TypeError(f"{who} expects attention_mask to be a bool tensor (True = masked), "
                                f"got {got}")
            mask = ~attention_mask  # fightingcv: True = masked; attnzoo: True = may attend
            # fightingcv's masked_fill broadcasts the mask against (B, h, L, S) from the right, so a
            # 3-D mask is (h, L, S) there; MultiHeadAttention reads a 3-D mask as (B, L, S): left-pad
            if isinstance(queries, Tensor) and isinstance(keys, Tensor) and queries.ndim == keys.ndim == 3:
                target = (queries.shape[0], cast(int, self.num_heads), queries.shape[1], keys.shape[1])
                check_mask(attention_mask, target, who, "attention_mask")  # names the mask as given
            if mask.ndim < 4:
                mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        return cast(Tensor, super().forward(queries, keys, values, mask))  # need_weights=False: out


class FightingcvCallMultiHead(_MaskedCall, MultiHeadAttention):  # type: ignore[misc]
    """`MultiHeadAttention` called as fightingcv's (Simplified)ScaledDotProductAttention (`_MaskedCall`)."""


class FightingcvCallMUSE(_MaskedCall, MUSEAttention):  # type: ignore[misc]
    """`MUSEAttention` called as fightingcv's MUSEAttention (`_MaskedCall`)."""


# fightingcv's key prefixes -> attnzoo's where the swapped-in module's keys differ: a fightingcv
# checkpoint still loads into the model with strict=True after `replace` (`TimmKeys` pre-hook).
_FIGHTINGCV_KEYS: dict[str, dict[str, str]] = {
    "EMSA": EMSA_KEYS,
    "ScaledDotProductAttention": SDPA_KEYS,
    "SimplifiedScaledDotProductAttention": SIMPLIFIED_SDPA_KEYS,
    "MUSEAttention": MUSE_KEYS,
}


def _adapted(
    converter_name: str, cls: type[nn.Module], base: type[nn.Module]
) -> Callable[[nn.Module], nn.Module]:
    """The `from_fightingcv` converter's result (a `base`), given `cls`'s forward (the same state)
    and, where the keys differ, a pre-hook that loads fightingcv's keys too."""
    names = _FIGHTINGCV_KEYS.get(converter_name)

    def convert(module: nn.Module) -> nn.Module:
        from attnzoo.convert.fightingcv import from_fightingcv  # lazy: fightingcv.py imports this table

        new = from_fightingcv(module)
        if names is not None:
            translate = functools.partial(rename, names=names)  # picklable, as the model must stay
            new.register_load_state_dict_pre_hook(TimmKeys(translate, tuple(names)))
        if not isinstance(new, base):
            raise TypeError(f"{converter_name}: expected a {base.__name__}, got {type(new).__name__}")
        new.__class__ = cls  # same weights and attributes; only the call changes
        return new

    return convert


IN_PLACE: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.EMSA.EMSA": _adapted("EMSA", FightingcvCallEMSA, EMSA),
    f"{_PACKAGE}.gfnet.GlobalFilter": _adapted("GlobalFilter", FightingcvCallGlobalFilter, GlobalFilter),
    f"{_PACKAGE}.DAT.DAttentionBaseline": _adapted(
        "DAttentionBaseline", FightingcvCallDeformable, FightingcvDeformableAttention
    ),
    f"{_PACKAGE}.SelfAttention.ScaledDotProductAttention": _adapted(
        "ScaledDotProductAttention", FightingcvCallMultiHead, MultiHeadAttention
    ),
    f"{_PACKAGE}.SimplifiedSelfAttention.SimplifiedScaledDotProductAttention": _adapted(
        "SimplifiedScaledDotProductAttention", FightingcvCallMultiHead, MultiHeadAttention
    ),
    f"{_PACKAGE}.MUSEAttention.MUSEAttention": _adapted("MUSEAttention", FightingcvCallMUSE, MUSEAttention),
}
